"""Device-resident loader: exactly the streaming loader's minibatches, ranks and resume; the auto choice."""

import numpy as np
import pytest
import torch

from atlasvi.data import LoaderConfig, StreamingLoader, open_store
from atlasvi.data.resident import ResidentLoader, ResidentRows, choose_resident, resident_bytes

SMALL = {"batch_size": 64, "block_size": 100, "buffer_blocks": 3}


def _assert_same(a, b) -> None:
    """Every tensor of two minibatches equal, dtypes included (sparse modalities compared dense)."""
    pairs = [
        (a.crow_indices, b.crow_indices),
        (a.col_indices, b.col_indices),
        (a.values, b.values),
        (a.rows, b.rows),
    ]
    for name in ("categorical", "continuous", "obsm", "masks"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.keys() == y.keys()
        pairs += [(x[k], y[k]) for k in x]
    assert a.n_genes == b.n_genes
    for x, y in pairs:
        assert x.dtype == y.dtype and x.layout == y.layout
        if x.layout == torch.sparse_csr:
            assert torch.equal(x.crow_indices(), y.crow_indices()) and torch.equal(x.col_indices(), y.col_indices())
            x, y = x.to_dense(), y.to_dense()
        assert torch.equal(x, y)


def _pair(path, config: LoaderConfig, rank=0, world_size=1, rows=None, modalities=(), code_maps=None):
    store = open_store(path)
    resident = ResidentRows(store, 0, store.n_cells, modalities)
    streaming = StreamingLoader(store, config, rank, world_size, rows, code_maps, modalities)
    return streaming, ResidentLoader(store, resident, config, rank, world_size, rows, code_maps)


@pytest.mark.parametrize("last_batch", ["keep", "pad"])
def test_resident_minibatches_are_the_streaming_ones_over_two_epochs(kang_store, last_batch):
    codes = {"sample": np.array([3, 2, 1, 0])}  # a model's coding of the store's batches
    config = LoaderConfig(**SMALL, last_batch=last_batch, seed=7)
    streaming, resident = _pair(kang_store, config, rows=(0, 1400), code_maps=codes)
    with streaming:
        for _ in range(2):
            expected, got = list(streaming), list(resident)
            assert len(got) == len(expected) == len(resident)
            for a, b in zip(expected, got, strict=True):
                _assert_same(a, b)
    assert resident.state_dict() == streaming.state_dict() and resident.epoch == 2
    assert not torch.equal(got[0].rows, list(resident)[0].rows)  # epoch 2 shuffles anew


def test_unshuffled_held_out_rows_are_the_streaming_ones(kang_store):
    config = LoaderConfig(batch_size=50, shuffle=False)
    streaming, resident = _pair(kang_store, config, rows=(1400, 1556))
    with streaming:
        for a, b in zip(list(streaming), list(resident), strict=True):
            _assert_same(a, b)
    assert torch.equal(torch.cat([b.rows for b in resident]), torch.arange(1400, 1556))


@pytest.mark.parametrize(("fixture", "modality"), [("cbmc_store", "protein"), ("multiome_store", "atac")])
def test_modalities_dense_and_sparse_are_the_streaming_ones(request, fixture, modality):
    config = LoaderConfig(batch_size=40, block_size=64, buffer_blocks=2)
    streaming, resident = _pair(request.getfixturevalue(fixture), config, modalities=(modality,))
    with streaming:
        batches = list(resident)
        for a, b in zip(list(streaming), batches, strict=True):
            _assert_same(a, b)
    assert modality in batches[0].masks


def test_resume_mid_epoch_from_a_streaming_position(kang_store):
    config = LoaderConfig(**SMALL)
    streaming, resident = _pair(kang_store, config)
    with streaming:
        streaming.set_epoch(1)
        head = []
        for batch in streaming:
            head.append(batch)
            if len(head) == 11:  # inside the window of batches 9-13 (4 blocks of 100 rows: 4 batches + a part)
                break
        state = streaming.state_dict()
        tail = list(streaming)  # the epoch's rest, continuing from the position
    resident.load_state_dict(state)
    assert resident.state_dict() == state
    rest = list(resident)
    assert len(rest) == len(tail) == len(resident) - 11
    for a, b in zip(tail, rest, strict=True):
        _assert_same(a, b)
    assert resident.state_dict() == {**state, "epoch": 2, "step": 0}


@pytest.mark.parametrize("last_batch", ["keep", "drop", "pad"])
def test_ranks_hold_every_row_and_read_disjoint_shards(kang_store, last_batch):
    config = LoaderConfig(**SMALL, last_batch=last_batch)
    pairs = [_pair(kang_store, config, rank, 2) for rank in (0, 1)]
    for epoch in (0, 1):
        shards = []
        for streaming, resident in pairs:
            streaming.set_epoch(epoch)
            resident.set_epoch(epoch)
            expected, got = list(streaming), list(resident)
            for a, b in zip(expected, got, strict=True):
                _assert_same(a, b)
            shards.append(torch.cat([b.rows for b in got]).numpy())
            streaming.close()
        assert len(shards[0]) == len(shards[1])
        if last_batch != "pad":
            assert not set(shards[0]) & set(shards[1])


def test_auto_streams_over_the_budget_and_holds_the_rows_within_it(kang_store):
    store = open_store(kang_store)
    nbytes = resident_bytes(store, 0, store.n_cells)
    held = ResidentRows(store, 0, store.n_cells)
    assert held.nbytes() == nbytes  # the estimate is what is held
    # 1556 cells, 4 bytes of counts and 4 of gene index per stored entry, 8 per row pointer, 8 per obs code
    assert nbytes == 8 * store.nnz + 8 * 1557 + 8 * 1556 * len(store.schema.categorical)
    small = choose_resident(store, LoaderConfig(resident_budget_mb=nbytes / 2**20 * 0.99))
    large = choose_resident(store, LoaderConfig(resident_budget_mb=nbytes / 2**20 * 1.01))
    assert (small.resident, large.resident) == (False, True)
    assert small.describe().startswith(f"streaming loader: {nbytes / 2**20:.1f} MiB of CSR rows over the ")
    assert choose_resident(store, LoaderConfig(resident=True, resident_budget_mb=0.001)).resident
    assert not choose_resident(store, LoaderConfig(resident=False)).resident
    assert choose_resident(store, LoaderConfig()).budget > 0  # the default budget: available RAM on CPU


def test_resident_rows_must_cover_the_loader_rows(kang_store):
    store = open_store(kang_store)
    with pytest.raises(ValueError, match=r"rows 0:1556 are not all resident \(rows 0:1000 are\)"):
        ResidentLoader(store, ResidentRows(store, 0, 1000), LoaderConfig())


@pytest.mark.parametrize(("fixture", "modality"), [("kang_store", None), ("multiome_store", "atac")])
def test_device_gather_takes_the_rows_the_cpu_gather_takes(request, fixture, modality):
    """The index-arithmetic gather (the path on a GPU) equals the CPU path's scipy gather: rows in any order,
    repeats and empty rows included, dtypes kept (int32 gene indices, int64 peak indices)."""
    store = open_store(request.getfixturevalue(fixture))
    held = ResidentRows(store, 0, store.n_cells, (modality,) if modality else ())
    csr = held.obsm[modality] if modality else held.x
    rows = torch.from_numpy(np.random.default_rng(0).integers(0, store.n_cells, 300))
    rows = torch.cat([rows, rows[:5], torch.nonzero(csr.indptr[1:] == csr.indptr[:-1]).flatten()[:3]])
    scipy_path, torch_path = csr.take(rows), csr.gather(rows)
    for name in ("indptr", "indices", "data"):
        a, b = getattr(scipy_path, name), getattr(torch_path, name)
        assert a.dtype == b.dtype == getattr(csr, name).dtype and torch.equal(a, b)
    assert len(scipy_path.indices) > 0
