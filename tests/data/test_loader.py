"""StreamingLoader on a real store: content, ranks, backends, resume, HTTP, bounded read-ahead."""

import functools
import http.server
import itertools
import os
import subprocess
import sys
import threading
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from atlasvi.data import LoaderConfig, StreamingLoader, open_store
from atlasvi.data.loader import minibatch_from_rows
from atlasvi.data.memory import glibc
from atlasvi.data.store import Buffers, resolve_backend

SMALL = {"batch_size": 64, "block_size": 100, "buffer_blocks": 3}


def _epoch(loader: StreamingLoader) -> list:
    return list(loader)


def _same(a, b) -> bool:
    return (
        torch.equal(a.crow_indices, b.crow_indices)
        and torch.equal(a.col_indices, b.col_indices)
        and torch.equal(a.values, b.values)
        and torch.equal(a.rows, b.rows)
        and all(torch.equal(a.categorical[k], b.categorical[k]) for k in a.categorical)
    )


def test_minibatches_hold_the_store_cells(kang_store):
    adata = ad.read_zarr(kang_store)
    loader = StreamingLoader(kang_store, LoaderConfig(**SMALL))
    batches = _epoch(loader)
    assert len(batches) == len(loader) == 25  # 24 full batches and a short one (last_batch="keep")
    assert [len(b) for b in batches[-2:]] == [64, 1556 - 24 * 64]
    for batch in batches[:5]:
        rows = batch.rows.numpy()
        np.testing.assert_array_equal(batch.counts().numpy(), adata.X[rows].toarray())
        np.testing.assert_array_equal(
            batch.categorical["sample"].numpy(), adata.obs["sample"].cat.codes.to_numpy()[rows]
        )
        np.testing.assert_array_equal(
            batch.categorical["cell_type"].numpy(), adata.obs["cell_type"].cat.codes.to_numpy()[rows]
        )
        assert batch.counts().dtype == torch.float32 and batch.counts().shape == (64, adata.n_vars)
    seen = torch.cat([b.rows for b in batches]).numpy()
    assert len(np.unique(seen)) == len(seen) == 1556
    assert loader.epoch == 1 and loader.step == 0


def test_batches_mix_batches_and_change_between_epochs(kang_store):
    loader = StreamingLoader(kang_store, LoaderConfig(**SMALL))
    first, second = _epoch(loader), _epoch(loader)
    assert all(len(torch.unique(b.categorical["sample"])) == 4 for b in first)  # every batch mixes all 4 samples
    assert not torch.equal(first[0].rows, second[0].rows)
    again = StreamingLoader(kang_store, LoaderConfig(**SMALL))
    assert all(_same(a, b) for a, b in zip(first, _epoch(again), strict=True))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("last_batch", ["keep", "drop", "pad"])
def test_ranks_read_disjoint_equal_shards(kang_store, world_size, last_batch):
    config = LoaderConfig(**SMALL, last_batch=last_batch)
    loaders = [StreamingLoader(kang_store, config, rank, world_size) for rank in range(world_size)]
    per_rank = [torch.cat([b.rows for b in _epoch(loader)]).numpy() for loader in loaders]
    assert len({len(r) for r in per_rank}) == 1 and len({len(loader) for loader in loaders}) == 1
    seen = np.concatenate(per_rank)
    if last_batch == "keep":
        assert len(np.unique(seen)) == len(seen) == 1556 // world_size * world_size
    elif last_batch == "drop":
        assert len(np.unique(seen)) == len(seen) > 1556 - world_size * 64
    else:
        assert set(seen.tolist()) == set(range(1556))


@pytest.mark.parametrize("backend", ["tensorstore", "zarrs", "auto"])
def test_every_backend_yields_the_batches_of_zarr_python(kang_store, backend):
    by_zarr = _epoch(StreamingLoader(kang_store, LoaderConfig(**SMALL, backend="zarr")))
    by_other = _epoch(StreamingLoader(kang_store, LoaderConfig(**SMALL, backend=backend)))
    assert len(by_zarr) == len(by_other)
    assert all(_same(a, b) for a, b in zip(by_zarr, by_other, strict=True))


def test_the_default_backend_is_tensorstore_where_it_can_read(kang_store):
    assert LoaderConfig().backend == "auto"
    assert StreamingLoader(kang_store).store.backend == "tensorstore"
    assert [resolve_backend("auto", p) for p in ("a.zarr", "http://h/a.zarr", "https://h/a", "s3://b/a.zarr")] == [
        "tensorstore", "tensorstore", "tensorstore", "zarr",
    ]  # fmt: skip
    assert resolve_backend("zarrs", "s3://b/a.zarr") == "zarrs"


def test_the_default_loader_places_counts_from_the_shard_files_as_zarr_python_reads_them(tmp_path, monkeypatch):
    """Backend "auto" on a local store reads X's counts straight from the shard files (`atlasvi.data.shards`):
    here chunks of 4,096 entries in shards of four, so cells cross chunk and shard boundaries; every minibatch
    equals zarr-python's, and tensorstore is never asked for X's counts."""
    import warnings

    from atlasvi.data import BuildConfig, build, build_store, store
    from tests.conftest import KANG

    monkeypatch.setattr(build, "CHUNK_NNZ", 4096)
    monkeypatch.setattr(build, "SHARD_NNZ", 4 * 4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = build_store(BuildConfig(inputs=[str(KANG)], output=str(tmp_path / "k.zarr"), batch_key="sample"))
    assert len(list((path / "X/data/c").iterdir())) > 30
    asked = []
    read_many = store.TensorStoreReader.read_many
    monkeypatch.setattr(
        store.TensorStoreReader, "read_many", lambda self, r: asked.extend(n for n, *_ in r) or read_many(self, r)
    )
    config = {**SMALL, "buffer_blocks": 5}
    direct = StreamingLoader(path, LoaderConfig(**config))
    assert direct.store.direct_counts and direct.store.backend == "tensorstore"
    by_zarr = StreamingLoader(path, LoaderConfig(**config, backend="zarr"))
    assert not by_zarr.store.direct_counts
    for epoch in range(2):
        direct.set_epoch(epoch), by_zarr.set_epoch(epoch)
        mine, theirs = _epoch(direct), _epoch(by_zarr)
        assert len(mine) == len(theirs) == len(direct)
        assert all(_same(a, b) for a, b in zip(mine, theirs, strict=True))
    assert "X/indptr" in asked and not {"X/data", "X/indices"} & set(asked)


def test_the_default_loader_loads_its_placing_kernel_when_built_for_the_windows_signature(kang_store, monkeypatch):
    """The direct reads' kernel is loaded by the constructor (not by the first window read, which would wait for it),
    with the very argument types every window's calls have: no window compiles or loads another version."""
    from atlasvi.data import shards

    kernel, calls = shards._place_chunk, []

    def spy(*args):
        calls.append(tuple(kernel.typeof_pyval(a) for a in args))
        return kernel(*args)

    monkeypatch.setattr(shards, "_place_chunk", spy)
    loader = StreamingLoader(kang_store, LoaderConfig(**SMALL))
    assert loader.store.direct_counts and len(calls) == 1
    loaded = calls[0]
    assert len(_epoch(loader)) == len(loader)
    loader.close()  # the next epoch's windows read ahead are done or dropped
    assert len(calls) > 10 and set(calls) == {loaded}
    n_calls = len(calls)
    StreamingLoader(kang_store, LoaderConfig(**SMALL, backend="tensorstore"))  # no direct reads: not loaded
    assert len(calls) == n_calls


def test_the_placing_kernel_comes_from_numbas_cache_in_a_new_process(kang_store):
    """numba's cache of the kernel stays valid across processes: a new process's loader loads it, compiling nothing."""
    StreamingLoader(kang_store, LoaderConfig(**SMALL))  # compiled and cached here if no process had
    script = (
        "import sys; from atlasvi.data import LoaderConfig, StreamingLoader, shards\n"
        "StreamingLoader(sys.argv[1], LoaderConfig(batch_size=64))\n"
        "stats = shards._place_chunk.stats\n"
        "print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(kang_store)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0"]


def test_minibatches_are_views_of_one_window_in_their_dtypes(kang_store):
    loader = StreamingLoader(kang_store, LoaderConfig(**SMALL))
    first, second = list(itertools.islice(iter(loader), 2))
    loader.close()
    assert (first.crow_indices.dtype, first.col_indices.dtype, first.values.dtype) == (torch.int32,) * 2 + (
        torch.float32,
    )
    assert first.rows.dtype == torch.int64 and all(v.dtype == torch.int64 for v in first.categorical.values())
    assert int(first.crow_indices[0]) == 0 and int(first.crow_indices[-1]) == len(first.values)
    # consecutive minibatches of a window are consecutive slices of its arrays: no per-batch copy of the counts
    assert second.values.data_ptr() == first.values.data_ptr() + 4 * len(first.values)
    assert second.col_indices.data_ptr() == first.col_indices.data_ptr() + 4 * len(first.col_indices)


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def test_a_buffer_is_handed_out_again_only_once_nothing_refers_to_it():
    buffers = Buffers(keep=2)
    first = buffers.take(1000)
    address = _address(first)
    view = first[8:40].view(np.int32)  # a view of it keeps it busy
    del first
    second = buffers.take(1000)
    assert not np.shares_memory(second, view)
    tensor = torch.from_numpy(second[:100])  # so does a tensor sharing its memory
    del second
    third = buffers.take(1000)  # both kept buffers busy: a plain array
    assert not np.shares_memory(third, view) and not np.shares_memory(third, tensor.numpy())
    assert len(buffers._buffers) == 2
    del view, third
    assert _address(buffers.take(900)) == address  # idle again: reused
    assert _address(buffers.take(3000)) != address  # more than it holds: another


def test_minibatches_that_live_on_keep_their_counts_while_windows_are_reused(kang_store):
    adata = ad.read_zarr(kang_store)
    dense = adata.X.toarray()
    loader = StreamingLoader(kang_store, LoaderConfig(**SMALL))
    held = []
    for _ in range(3):
        for i, batch in enumerate(loader):
            np.testing.assert_array_equal(batch.counts().numpy(), dense[batch.rows.numpy()])
            if i % 5 == 0:
                held.append(batch)  # lives on; the other minibatches are dropped as training drops them
    for batch in held:
        np.testing.assert_array_equal(batch.counts().numpy(), dense[batch.rows.numpy()])
    assert len(loader._buffers._buffers) <= loader.config.prefetch + 3


@pytest.mark.parametrize("stop_after", [1, 7, 9, 24 + 5])
def test_resume_mid_stream_yields_exactly_the_next_batches(kang_store, stop_after):
    config = LoaderConfig(**SMALL)
    reference = StreamingLoader(kang_store, config)
    stream = _epoch(reference) + _epoch(reference)  # two epochs, 25 batches each
    interrupted = StreamingLoader(kang_store, config)
    taken = 0
    while taken < stop_after:
        for _ in interrupted:
            taken += 1
            if taken == stop_after:
                break
    state = interrupted.state_dict()
    resumed = StreamingLoader(kang_store, config)
    resumed.load_state_dict(state)
    rest = []
    while len(rest) < len(stream) - stop_after:
        rest += _epoch(resumed)
    assert all(_same(a, b) for a, b in zip(stream[stop_after:], rest, strict=True))


def test_resume_refuses_a_loader_with_other_sampling(kang_store):
    state = StreamingLoader(kang_store, LoaderConfig(**SMALL)).state_dict()
    other = StreamingLoader(kang_store, LoaderConfig(**(SMALL | {"batch_size": 32})))
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


def test_read_ahead_is_bounded_by_prefetch(kang_store, monkeypatch):
    config = LoaderConfig(batch_size=16, block_size=50, buffer_blocks=1, prefetch=2)
    loader = StreamingLoader(kang_store, config)
    started: list[int] = []
    original = StreamingLoader._read_window

    def recording(self, epoch, index, ranges):
        started.append(index)
        return original(self, epoch, index, ranges)

    monkeypatch.setattr(StreamingLoader, "_read_window", recording)
    iterator = iter(loader)
    next(iterator)
    # cutting window 0: windows 1..prefetch + 1 submitted beyond it, nothing more (a read thread may already
    # have started the last one submitted, so the bound is the submission's)
    assert max(started) <= config.prefetch + 1
    for _ in range(3 * (loader.window_rows // 16)):
        next(iterator)
    assert max(started) <= 3 + config.prefetch + 1  # cutting window 3


def test_read_ahead_thread_ids_name_the_threads_that_read(kang_store, monkeypatch):
    config = LoaderConfig(batch_size=16, block_size=50, buffer_blocks=1, prefetch=2, num_threads=2)
    loader = StreamingLoader(kang_store, config)
    assert loader.read_ahead_thread_ids() == []  # no threads before the first iteration
    readers: set[int] = set()
    original = StreamingLoader._read_window

    def recording(self, epoch, index, ranges):
        readers.add(threading.get_native_id())
        return original(self, epoch, index, ranges)

    monkeypatch.setattr(StreamingLoader, "_read_window", recording)
    list(loader)
    ids = loader.read_ahead_thread_ids()
    assert len(ids) == 2 and threading.get_native_id() not in ids
    assert readers and readers <= set(ids)
    loader.close()
    assert loader.read_ahead_thread_ids() == []


@pytest.fixture
def served_store(kang_store: Path):
    handler = functools.partial(QuietHandler, directory=str(kang_store))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support (bytes=a-b, a-, -n), as object stores serve them."""

    def log_message(self, *args) -> None:
        return None

    def do_GET(self) -> None:
        spec = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if spec is None or not path.is_file():
            return super().do_GET()
        body = path.read_bytes()
        first, last = spec.removeprefix("bytes=").split("-")
        if first == "":
            start, stop = max(0, len(body) - int(last)), len(body)
        else:
            start, stop = int(first), min(len(body), int(last) + 1 if last else len(body))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(body)}")
        self.send_header("Content-Length", str(stop - start))
        self.end_headers()
        self.wfile.write(body[start:stop])


@pytest.mark.parametrize("backend", ["zarr", "tensorstore"])
def test_store_served_over_http_yields_the_local_batches(kang_store, served_store, backend):
    config = LoaderConfig(**SMALL, backend=backend)
    local = _epoch(StreamingLoader(kang_store, config))
    with StreamingLoader(served_store, config) as loader:
        remote = _epoch(loader)
    assert all(_same(a, b) for a, b in zip(local, remote, strict=True))


def test_minibatch_moves_sparse_and_densifies_on_its_device(kang_store):
    batch = next(iter(StreamingLoader(kang_store, LoaderConfig(**SMALL))))
    moved = batch.to("cpu")
    assert moved.values.numel() < moved.counts().numel() / 2  # only non-zeros travel
    assert torch.equal(moved.counts(), batch.counts())
    assert moved.counts().sum() == batch.values.sum()


def test_a_process_exits_cleanly_with_read_ahead_in_flight(kang_store):
    """One epoch, then exit while the next epoch's windows are being read: no hang, no native crash."""
    script = (
        "import sys; from atlasvi.data import LoaderConfig, StreamingLoader\n"
        "loader = StreamingLoader(sys.argv[1], LoaderConfig(batch_size=64, block_size=100, buffer_blocks=1, "
        "prefetch=4, backend='tensorstore'))\n"
        "print(sum(len(b) for b in loader))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(kang_store)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1556"


_STEPS_AROUND_AN_EPOCH = """
import resource, sys
import numpy as np
from atlasvi.data import LoaderConfig, StreamingLoader, open_store
from atlasvi.data.resident import ResidentLoader, ResidentRows

def faults_a_step():  # training steps' temporaries: 8 tensors of 1 MiB alive together, then freed; median of 5
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step = [np.ones(2**18, dtype=np.float32) for _ in range(8)]
        del step
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sorted(faults[1:])[2]

store, config = open_store(sys.argv[2]), LoaderConfig(batch_size=64, block_size=100, buffer_blocks=3)
before = faults_a_step()
if sys.argv[1] == "streaming":
    loader = StreamingLoader(store, config)
else:
    loader = ResidentLoader(store, ResidentRows(store, 0, store.n_cells), config)
sum(len(b) for b in loader)
print(before, faults_a_step())
"""


@pytest.mark.skipif(not glibc(), reason="glibc's malloc thresholds only")
@pytest.mark.parametrize("kind", ["streaming", "resident"])
def test_steps_fed_by_a_loader_keep_their_freed_memory_mapped(kang_store, kind):
    """With glibc's defaults (the environment's malloc settings removed) a step's 8 MiB of temporaries are mapped
    afresh every step, a fault per 4 KiB page (kernel time that was 12% of a streaming scVI step at batch 128);
    after a loader's epoch they stay mapped."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", _STEPS_AROUND_AN_EPOCH, kind, str(kang_store)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    before, after = map(int, done.stdout.split())
    assert before > 1000 and after < 100


def test_a_row_range_reads_only_those_rows(kang_store):
    from atlasvi.data import split_rows

    train, validation = split_rows(1556, 0.1)
    assert train == (0, 1400) and validation == (1400, 1556)
    held_out = torch.cat(
        [b.rows for b in StreamingLoader(kang_store, LoaderConfig(**SMALL, last_batch="pad"), rows=validation)]
    )
    assert set(held_out.tolist()) == set(range(1400, 1556))
    trained = torch.cat([b.rows for b in StreamingLoader(kang_store, LoaderConfig(**SMALL), rows=train)])
    assert trained.max() < 1400 and len(trained) == 1400


def test_unshuffled_reads_every_row_in_store_order(kang_store):
    config = LoaderConfig(**SMALL, shuffle=False)
    rows = torch.cat([b.rows for b in StreamingLoader(kang_store, config, rows=(100, 1500))])
    assert torch.equal(rows, torch.arange(100, 1500))  # 1400 = 21 x 64 + 56: the short batch is kept
    first, second = (torch.cat([b.rows for b in StreamingLoader(kang_store, config, 1, 2)]) for _ in range(2))
    assert torch.equal(first, second) and torch.equal(first, torch.arange(778, 1556))


def test_minibatch_from_rows_gathers_repeats_and_maps_codes(kang_store):
    adata = ad.read_zarr(kang_store)
    store = open_store(kang_store)
    block = store.read_selected(np.array([3, 10, 500]))
    take = np.array([0, 2, 2, 1])  # rows 3, 500, 500, 10: one cell per draw
    n_samples = len(adata.obs["sample"].cat.categories)
    code_map = np.arange(n_samples)[::-1].copy()
    batch = minibatch_from_rows(block, take, store.schema.n_genes, {"sample": code_map})
    rows = np.array([3, 500, 500, 10])
    np.testing.assert_array_equal(batch.rows.numpy(), rows)
    np.testing.assert_array_equal(batch.counts().numpy(), adata.X[rows].toarray())
    codes = adata.obs["sample"].cat.codes.to_numpy()[rows]
    np.testing.assert_array_equal(batch.categorical["sample"].numpy(), code_map[codes])
    np.testing.assert_array_equal(
        batch.categorical["cell_type"].numpy(), adata.obs["cell_type"].cat.codes.to_numpy()[rows]
    )
    assert batch.categorical["sample"].dtype == torch.int64 and batch.col_indices.dtype == torch.int32


def test_the_loader_applies_code_maps_to_every_batch(kang_store):
    n_samples = len(ad.read_zarr(kang_store).obs["sample"].cat.categories)
    code_map = (np.arange(n_samples) + 1) % n_samples
    plain = _epoch(StreamingLoader(kang_store, LoaderConfig(**SMALL)))
    mapped = _epoch(StreamingLoader(kang_store, LoaderConfig(**SMALL), code_maps={"sample": code_map}))
    for a, b in zip(plain, mapped, strict=True):
        assert torch.equal(a.rows, b.rows) and torch.equal(a.values, b.values)
        assert torch.equal(torch.from_numpy(code_map)[a.categorical["sample"]], b.categorical["sample"])
