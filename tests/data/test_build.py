"""atlasvi build on real data: round trips, HVG, library prior, permutation, layout, atomicity."""

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from atlasvi.data import AtlasInputError, BuildConfig, build_store, open_store
from atlasvi.data.store import SCHEMA_VERSION
from atlasvi.models.scvi.module import SCVIModule
from tests.conftest import CELLBENCH, KANG, KANG_HARMONY
from tests.data.helpers import write_10x_h5, write_10x_mtx


def _build(tmp_path: Path, name: str = "atlas.zarr", **fields) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_store(BuildConfig(output=str(tmp_path / name), **fields))


def _dense_by_name(adata: ad.AnnData, cells, genes) -> np.ndarray:
    return adata[list(cells), list(genes)].X.toarray()


def test_build_from_h5ad_10x_mtx_and_10x_h5_round_trips_every_count(tmp_path, cellbench):
    """Three real inputs in three formats, one batch per file, intersected genes: every count kept."""
    genes = cellbench.var_names[:3000]
    parts = {
        "celseq2_5cl.h5ad": cellbench.obs.batch.isin(["sc_celseq2_5cl_p1", "sc_celseq2_5cl_p2"]),
        "celseq2": cellbench.obs.batch == "sc_celseq2",
        "dropseq.h5": cellbench.obs.batch == "sc_dropseq",
    }
    inputs = []
    for name, mask in parts.items():
        # each input holds a different, overlapping slice of genes: the intersection is genes[500:2500]
        offset = {"celseq2_5cl.h5ad": 0, "celseq2": 500, "dropseq.h5": 250}[name]
        part = cellbench[mask.to_numpy(), genes[offset : offset + 2500]].copy()
        path = tmp_path / name
        if name.endswith(".h5ad"):
            part.write_h5ad(path)
        elif name.endswith(".h5"):
            write_10x_h5(part, path, "gene_ids")
        else:
            write_10x_mtx(part, path, "gene_ids")
        inputs.append(str(path))
    store = _build(tmp_path, inputs=inputs, gene_join="inner")
    built = ad.read_zarr(store)
    assert built.n_vars == 2000 and set(built.var_names) == set(genes[500:2500])
    assert built.n_obs == int(sum(m.sum() for m in parts.values()))
    expected = _dense_by_name(cellbench, built.obs_names, built.var_names)
    np.testing.assert_array_equal(built.X.toarray(), expected)
    batch_of_cell = pd.Series(cellbench.obs.batch.astype(str).to_numpy(), index=cellbench.obs_names)
    file_of_batch = {"sc_celseq2_5cl_p1": "celseq2_5cl.h5ad", "sc_celseq2_5cl_p2": "celseq2_5cl.h5ad"}
    file_of_batch |= {"sc_celseq2": "celseq2", "sc_dropseq": "dropseq.h5"}
    expected_batch = batch_of_cell[built.obs_names].map(file_of_batch).to_numpy()
    np.testing.assert_array_equal(built.obs["batch"].astype(str).to_numpy(), expected_batch)


def test_hvg_is_scanpy_seurat_v3_batch_aware(tmp_path, kang):
    store = _build(tmp_path, inputs=[str(KANG)], batch_key="sample", n_top_genes=400, chunk_size=200)
    reference = kang.copy()
    sc.pp.highly_variable_genes(reference, flavor="seurat_v3", n_top_genes=400, batch_key="sample")
    built = ad.read_zarr(store)
    assert set(built.var_names) == set(reference.var_names[reference.var.highly_variable])
    ref_var = reference.var.loc[built.var_names]
    np.testing.assert_allclose(built.var["variances_norm"], ref_var["variances_norm"], rtol=1e-6)
    np.testing.assert_array_equal(built.var["highly_variable_nbatches"], ref_var["highly_variable_nbatches"])


def test_library_prior_is_scvi_tools_per_batch_log_library(tmp_path, kang):
    store = _build(tmp_path, inputs=[str(KANG)], batch_key="sample", chunk_size=300)
    schema = open_store(store).schema
    log_library = np.log(np.asarray(kang.X.sum(axis=1)).ravel())
    for i, batch in enumerate(schema.batch_categories):
        in_batch = (kang.obs["sample"] == batch).to_numpy()
        assert schema.library_log_means[i] == pytest.approx(log_library[in_batch].mean(), rel=1e-9)
        assert schema.library_log_vars[i] == pytest.approx(log_library[in_batch].var(), rel=1e-6)


def test_cells_are_globally_shuffled_by_a_seeded_permutation(tmp_path, cellbench):
    first = ad.read_zarr(_build(tmp_path, "a.zarr", inputs=[str(CELLBENCH)], batch_key="batch", seed=1))
    again = ad.read_zarr(_build(tmp_path, "b.zarr", inputs=[str(CELLBENCH)], batch_key="batch", seed=1))
    other = ad.read_zarr(_build(tmp_path, "c.zarr", inputs=[str(CELLBENCH)], batch_key="batch", seed=2))
    assert list(first.obs_names) == list(again.obs_names)
    assert list(first.obs_names) != list(other.obs_names)
    assert sorted(first.obs_names) == sorted(cellbench.obs_names)
    # the input is sorted by batch; in the store every block of 200 rows holds all 5 batches
    for start in range(0, 1400 - 200, 200):
        assert first.obs["batch"].iloc[start : start + 200].nunique() == 5
    np.testing.assert_array_equal(first.X.toarray(), _dense_by_name(cellbench, first.obs_names, first.var_names))


def test_chunk_size_bounds_memory_without_changing_the_store(tmp_path):
    small = ad.read_zarr(_build(tmp_path, "small.zarr", inputs=[str(KANG)], batch_key="sample", chunk_size=97))
    large = ad.read_zarr(_build(tmp_path, "large.zarr", inputs=[str(KANG)], batch_key="sample", chunk_size=100_000))
    assert list(small.obs_names) == list(large.obs_names)
    assert (small.X != large.X).nnz == 0


def test_gene_join_inner_and_outer_across_two_real_studies(tmp_path, kang):
    harmony = ad.read_h5ad(KANG_HARMONY)
    inputs = [str(KANG), str(KANG_HARMONY)]
    inner = ad.read_zarr(_build(tmp_path, "inner.zarr", inputs=inputs, gene_join="inner"))
    outer = ad.read_zarr(_build(tmp_path, "outer.zarr", inputs=inputs, gene_join="outer"))
    common = set(kang.var_names) & set(harmony.var_names)
    assert set(inner.var_names) == common and len(common) > 500
    assert set(outer.var_names) == set(kang.var_names) | set(harmony.var_names)
    cells = [c for c in outer.obs_names if c.startswith("stim:")][:200]
    harmony_genes = set(harmony.var_names)  # once: built per gene this line took 9-20 s
    only_kang = [g for g in outer.var_names if g not in harmony_genes]
    assert outer[cells, only_kang].X.nnz == 0  # union genes missing in an input are zeros
    shared = sorted(common)
    np.testing.assert_array_equal(outer[cells, shared].X.toarray(), _dense_by_name(harmony, cells, shared))
    assert set(outer.obs["batch"].cat.categories) == {KANG.name, KANG_HARMONY.name}


def test_counts_layer_and_gene_id_key(tmp_path, kang):
    normalized = kang[:300].copy()
    normalized.layers["counts"] = normalized.X.copy()
    normalized.X = sp.csr_matrix(normalized.X.multiply(1.0 / normalized.X.sum(axis=1)))
    path = tmp_path / "with_layer.h5ad"
    normalized.write_h5ad(path)
    built = ad.read_zarr(
        _build(tmp_path, inputs=[str(path)], layer="counts", gene_id_key="ENSEMBL", batch_key="sample")
    )
    assert list(built.var_names) == list(kang.var["ENSEMBL"])
    assert list(built.var["gene_names"]) == list(kang.var_names)
    np.testing.assert_array_equal(built.X.toarray(), kang[list(built.obs_names)].X.toarray())


@pytest.mark.parametrize("compressor", ["zstd", "lz4"])
def test_store_layout_is_anndata_zarr_v3_sharded_compressed_checksummed(tmp_path, kang, compressor):
    store = _build(tmp_path, inputs=[str(KANG)], batch_key="sample", labels_key="cell_type", compressor=compressor)
    meta = json.loads((store / "X" / "data" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["data_type"] in ("uint16", "uint32")
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    inner = [c["name"] for c in sharding["configuration"]["codecs"]]
    assert inner == ["bytes", "blosc", "crc32c"]
    blosc = sharding["configuration"]["codecs"][1]["configuration"]
    assert blosc["cname"] == compressor and blosc["shuffle"] == "bitshuffle"
    indices = json.loads((store / "X" / "indices" / "zarr.json").read_text())["codecs"][0]["configuration"]["codecs"]
    assert indices[1]["configuration"]["cname"] == compressor and indices[1]["configuration"]["shuffle"] == "shuffle"
    built = ad.read_zarr(store)
    np.testing.assert_array_equal(built.X.toarray(), _dense_by_name(kang, built.obs_names, built.var_names))
    assert sp.issparse(built.X) and built.X.format == "csr" and np.issubdtype(built.X.dtype, np.integer)
    assert isinstance(built.obs["cell_type"].dtype, pd.CategoricalDtype)


def test_store_attrs_carry_schema_genes_covariates_prior_and_provenance(tmp_path):
    store = _build(tmp_path, inputs=[str(KANG)], batch_key="sample", labels_key="cell_type", n_top_genes=300)
    meta = json.loads((store / "zarr.json").read_text())["attributes"]["atlasvi"]
    assert meta["schema_version"] == SCHEMA_VERSION and meta["n_cells"] == 1556 and meta["n_genes"] == 300
    assert len(meta["gene_ids"]) == 300 and all(meta["highly_variable"])
    assert meta["categorical"]["cell_type"] == sorted(ad.read_h5ad(KANG, backed="r").obs["cell_type"].unique())
    assert len(meta["library_log_means"]) == 4 and len(meta["library_log_vars"]) == 4
    (source,) = meta["provenance"]["inputs"]
    assert source["sha256"] == hashlib.sha256(KANG.read_bytes()).hexdigest()
    assert meta["provenance"]["parameters"]["n_top_genes"] == 300
    assert meta["provenance"]["atlasvi_version"]


def test_an_interrupted_build_leaves_nothing_and_keeps_the_old_store(tmp_path, monkeypatch):
    import atlasvi.data.build as build_module

    old = _build(tmp_path, inputs=[str(KANG)], batch_key="sample")
    before = ad.read_zarr(old).obs_names.tolist()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(build_module._SpanWriter, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path, "fresh.zarr", inputs=[str(KANG)], batch_key="sample")
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path, inputs=[str(KANG)], batch_key="sample", seed=5, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas.zarr"]
    assert ad.read_zarr(old).obs_names.tolist() == before


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_build_killed_with_sigkill_leaves_debris_the_next_build_removes(tmp_path):
    """SIGKILL skips every clean-up: the next build of the same output removes the staging / scratch
    folders of dead builds of this host, and leaves those of a live build or another host alone."""
    output = tmp_path / "atlas.zarr"
    command = [sys.executable, "-m", "atlasvi.cli.main", "build", str(KANG), "-o", str(output), "--chunk-size", "20"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".atlas.zarr.scratch-*")) and time.monotonic() < deadline:
        time.sleep(0.005)
    process.kill()
    assert process.wait() == -signal.SIGKILL
    debris = sorted(p.name for p in tmp_path.iterdir())
    assert debris and all(name.startswith(".atlas.zarr.") for name in debris), debris
    host = socket.gethostname()
    kept = [f".atlas.zarr.scratch-{host}-{os.getpid()}-0123abcd", ".atlas.zarr.building-elsewhere-1-0123abcd"]
    dead = f".atlas.zarr.building-{host}-{_dead_pid()}-89abcdef"
    for name in [*kept, dead]:
        (tmp_path / name).mkdir()
    _build(tmp_path, inputs=[str(KANG)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "atlas.zarr"])
    assert open_store(output).n_cells == 1556


def test_a_store_set_aside_by_a_killed_build_is_restored(tmp_path):
    """Killed between setting the old store aside and renaming the new one in: the old store comes back."""
    old = _build(tmp_path, inputs=[str(KANG)], seed=3)
    names = ad.read_zarr(old).obs_names.tolist()
    old.rename(tmp_path / f".atlas.zarr.replaced-{socket.gethostname()}-{_dead_pid()}-0123abcd")
    with pytest.raises(AtlasInputError, match="exists already; --overwrite \\(overwrite=True\\) replaces it"):
        _build(tmp_path, inputs=[str(KANG)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas.zarr"]
    assert ad.read_zarr(old).obs_names.tolist() == names


def test_ctrl_c_during_a_store_write_leaves_no_staging_folder(tmp_path, monkeypatch):
    """Ctrl-C while zarr writes a shard on its IO thread: that write goes on after the main thread has
    stopped waiting for it, and recreated `.NAME.building-*` after the clean-up unless the build waits.
    The write itself sends the SIGINT and lands only after the main thread has taken it, so the interrupt
    always arrives mid-write: no timer (one fired late under load, after the build had finished), and its
    own SIGINT handler (a handler another test or library left installed might not raise)."""
    from zarr.storage import LocalStore

    original = LocalStore.set
    main = threading.main_thread().ident
    fired, interrupted, written = threading.Event(), threading.Event(), threading.Event()

    def ctrl_c(signum, frame):
        interrupted.set()
        raise KeyboardInterrupt

    async def interrupted_set(self, key, value):
        if not key.startswith("X/data/c") or fired.is_set():
            return await original(self, key, value)
        fired.set()
        signal.pthread_kill(main, signal.SIGINT)
        for _ in range(1000):  # until the main thread has raised KeyboardInterrupt (10 s at most)
            if interrupted.is_set():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # a build that does not wait has removed its staging folder by now
        await original(self, key, value)
        written.set()

    monkeypatch.setattr(LocalStore, "set", interrupted_set)
    previous = signal.signal(signal.SIGINT, ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            _build(tmp_path, inputs=[str(KANG)])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert interrupted.is_set() and written.wait(10)
    assert list(tmp_path.iterdir()) == []


def test_annotation_columns_are_stored_but_not_covariates(tmp_path, kang):
    """annotation_keys keep obs columns (missing values stay missing) that the model does not condition on."""
    source = kang.copy()
    source.obs["donor"] = pd.Categorical(np.where(np.arange(kang.n_obs) % 10 == 0, None, kang.obs["sample"].str[-3:]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source.write_h5ad(tmp_path / "kang.h5ad")
    store = _build(
        tmp_path, inputs=[str(tmp_path / "kang.h5ad")], batch_key="sample", annotation_keys=["condition", "donor"]
    )
    built = ad.read_zarr(store)
    for key in ["condition", "donor"]:
        assert isinstance(built.obs[key].dtype, pd.CategoricalDtype)
        expected = source.obs.loc[built.obs_names, key].astype(object)
        pd.testing.assert_series_equal(built.obs[key].astype(object), expected, check_names=False)
    assert built.obs["donor"].isna().sum() == 156
    opened = open_store(store)
    assert set(opened.schema.categorical) == {"sample"}
    assert SCVIModule(opened.schema).categorical_keys == ()
    meta = json.loads((store / "zarr.json").read_text())["attributes"]["atlasvi"]
    assert meta["annotations"] == {"condition": ["ctrl", "stim"], "donor": ["101", "107"]}
    codes, categories = opened.read_obs_categorical("condition")
    assert categories == ("ctrl", "stim") and np.bincount(codes).tolist() == [750, 806]


def test_genes_stores_exactly_those_genes_in_that_order(tmp_path, kang):
    """`genes` (a model's genes): those columns, in the given order, every count kept; a gene not in the input is
    named (inner join) or stored as zeros (outer join); not with n_top_genes."""
    top = np.argsort(-np.asarray(kang.X.sum(axis=0)).ravel())[:30]  # every cell has counts in them
    genes = [str(g) for g in kang.var_names[np.sort(top)[::-1]]]  # the file's order, reversed
    path = _build(tmp_path, inputs=[str(KANG)], batch_key="sample", genes=genes)
    store = open_store(path)
    assert list(store.schema.gene_ids) == genes
    stored = ad.read_zarr(path)
    np.testing.assert_array_equal(stored.X.toarray(), _dense_by_name(kang, stored.obs_names, genes))
    with pytest.raises(AtlasInputError, match=r"1 of the 31 genes asked for are not in every input \(first \['NOPE'\]"):
        _build(tmp_path, "missing.zarr", inputs=[str(KANG)], genes=[*genes, "NOPE"])
    outer = ad.read_zarr(_build(tmp_path, "outer.zarr", inputs=[str(KANG)], genes=["NOPE", *genes], gene_join="outer"))
    assert list(outer.var_names) == ["NOPE", *genes]
    assert outer.X[:, 0].sum() == 0 and outer.X[:, 1:].sum() == kang[:, genes].X.sum()
    with pytest.raises(ValueError, match="genes and n_top_genes exclude each other"):
        BuildConfig(inputs=[str(KANG)], output="x.zarr", genes=genes, n_top_genes=10)
