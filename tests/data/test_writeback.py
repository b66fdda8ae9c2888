"""Writing per-cell results back into a store: anndata reads them, an unfinished write changes nothing, and what a
killed writer left is cleaned up by the next write-back."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from atlasvi.data import StoreError, open_store
from atlasvi.data.writeback import ObsArrayWriter, ObsCategoricalWriter, VarmWriter


@pytest.fixture
def store(kang_store, tmp_path):
    copy = tmp_path / "kang.zarr"
    shutil.copytree(kang_store, copy)
    return copy


def test_rows_written_in_pieces_read_back_with_anndata(store):
    values = np.random.default_rng(0).normal(size=(1556, 7)).astype(np.float32)
    writer = ObsArrayWriter(store, "obsm", "X_test", 7)
    writer.chunk_rows = 100  # several chunks, pieces that straddle chunk boundaries
    for start in range(0, 1556, 333):
        writer.write(values[start : start + 333])
    assert writer.commit() == store / "obsm" / "X_test"
    adata = ad.read_zarr(store)
    np.testing.assert_array_equal(adata.obsm["X_test"], values)
    assert open_store(store).n_cells == 1556  # the atlas attrs survive re-consolidation
    assert not list(store.parent.glob(".*.partial"))


def test_an_unfinished_write_leaves_the_store_unchanged(store):
    before = ad.read_zarr(store)
    with pytest.raises(StoreError, match="1000 of 1556 rows written; the store is unchanged"):
        with ObsArrayWriter(store, "obsm", "X_test", 3) as writer:
            writer.write(np.zeros((1000, 3), np.float32))
            writer.commit()
    with pytest.raises(RuntimeError, match="interrupted"):
        with ObsArrayWriter(store, "layers", "normalized", 1267) as writer:
            writer.write(np.zeros((10, 1267), np.float32))
            raise RuntimeError("interrupted")
    after = ad.read_zarr(store)
    assert list(after.obsm) == list(before.obsm) == [] and list(after.layers) == []
    assert not list(store.parent.glob(".*.partial"))


def test_varm_gets_one_row_per_gene_and_a_wrong_shape_or_an_abort_leaves_the_store_unchanged(store):
    values = np.random.default_rng(0).normal(size=(1267, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="one row per gene"):
        VarmWriter(store, "loadings", values[:100])
    with VarmWriter(store, "loadings", values) as writer:
        writer.abort()
    assert list(ad.read_zarr(store).varm) == []
    with VarmWriter(store, "loadings", values) as writer:
        assert writer.commit() == store / "varm" / "loadings"
    np.testing.assert_array_equal(ad.read_zarr(store).varm["loadings"], values)
    assert open_store(store).n_cells == 1556 and not list(store.parent.glob(".*"))


def test_overwrite_replaces_and_a_kept_array_is_refused(store):
    for fill in (1.0, 2.0):
        with ObsArrayWriter(store, "obsm", "X_test", 2) as writer:
            writer.write(np.full((1556, 2), fill, np.float32))
            writer.commit()
    assert (ad.read_zarr(store).obsm["X_test"] == 2.0).all()
    with pytest.raises(StoreError, match=r"obsm\['X_test'\] exists"):
        ObsArrayWriter(store, "obsm", "X_test", 2, overwrite=False)
    with pytest.raises(ValueError, match="more rows than the store's 1556 cells"):
        ObsArrayWriter(store, "obsm", "X_more", 2).write(np.zeros((1557, 2), np.float32))


def test_a_store_whose_attrs_were_edited_gets_no_write_back(store):
    root = store / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"]["atlasvi"]["n_cells"] = 1000
    root.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="attrs n_cells = 1000 but len.X/indptr. - 1 = 1556"):
        ObsArrayWriter(store, "obsm", "X_test", 2)
    with pytest.raises(StoreError, match="attrs n_cells = 1000"):
        ObsCategoricalWriter(store, "predicted", ["a", "b"])
    assert ad.read_zarr(store).n_obs == 1556 and not list(store.parent.glob(f".{store.name}.*"))


def test_a_layer_has_one_column_per_gene(store):
    with pytest.raises(ValueError, match="3 columns for 1267 genes"):
        ObsArrayWriter(store, "layers", "normalized", 3)
    assert not list(store.parent.glob(f".{store.name}.*"))


def test_a_writer_that_fails_to_start_leaves_no_lock_or_staging(store, monkeypatch):
    """A zero-width array (a DestVI's absent latent) was a ZeroDivisionError after the lock file was taken, and
    any failure creating the staged array left `.STORE.obsm.KEY.PID-ID.lock` beside the store."""
    with pytest.raises(ValueError, match="needs at least one column, not 0"):
        ObsArrayWriter(store, "obsm", "X_none", 0)
    assert not list(store.parent.glob(f".{store.name}.*"))
    import atlasvi.data.writeback as writeback

    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writeback.zarr, "create_array", failing)
    with pytest.raises(OSError, match="No space left"):
        ObsArrayWriter(store, "obsm", "X_full", 4)
    assert not list(store.parent.glob(f".{store.name}.*"))


def _writer_process(store: Path, kill_while_swapping: bool) -> subprocess.Popen:
    """A python process writing obsm['X_killed'] into `store`, waiting to be killed once its rows are staged
    (or killing itself between moving the old array aside and the new one in)."""
    script = f"""
import os, signal, sys, time
import numpy as np
from atlasvi.data.writeback import ObsArrayWriter, ObsCategoricalWriter, VarmWriter
writer = ObsArrayWriter({str(store)!r}, "obsm", "X_killed", 3)
writer.chunk_rows = 100
writer.write(np.full((1556 if {kill_while_swapping} else 500, 3), 9.0, np.float32))
if {kill_while_swapping}:
    replace = os.replace
    def replace_then_die(source, destination):
        replace(source, destination)
        if str(destination).endswith(".replaced"):
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace_then_die
    writer.commit()
print("staged", flush=True)
time.sleep(600)
"""
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def test_the_next_write_back_removes_the_staging_of_a_sigkilled_writer_only(store):
    process = _writer_process(store, kill_while_swapping=False)
    assert process.stdout.readline() == "staged\n"
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    dead = sorted(p.name for p in store.parent.glob(f".{store.name}.obsm.X_killed.*"))
    assert [Path(p).suffix for p in dead] == [".lock", ".partial"], dead
    foreign = store.parent / f".{store.name}.obsm.X_killed.1234abcd.partial"  # no lock file: not known as ours
    foreign.mkdir()
    live = ObsArrayWriter(store, "obsm", "X_live", 2)  # a live writer's staging is kept
    with ObsArrayWriter(store, "obsm", "X_next", 2) as writer:
        writer.write(np.ones((1556, 2), np.float32))
        writer.commit()
    left = {p.name for p in store.parent.glob(f".{store.name}.*")}
    assert left == {foreign.name, live.partial.name, live._lock.name}, left
    live.write(np.zeros((1556, 2), np.float32))
    live.commit()
    adata = ad.read_zarr(store)
    assert sorted(adata.obsm) == ["X_live", "X_next"] and (adata.obsm["X_next"] == 1).all()
    assert {p.name for p in store.parent.glob(f".{store.name}.*")} == {foreign.name}


def test_a_writer_killed_while_swapping_in_leaves_the_old_array_back_after_the_next_write_back(store):
    with ObsArrayWriter(store, "obsm", "X_killed", 3) as writer:
        writer.write(np.full((1556, 3), 1.0, np.float32))
        writer.commit()
    process = _writer_process(store, kill_while_swapping=True)
    assert process.wait() == -signal.SIGKILL
    assert not (store / "obsm" / "X_killed").exists()  # moved aside, the new one not yet in
    with ObsCategoricalWriter(store, "predicted", ["a", "b"]) as writer:
        writer.write(np.zeros(1556, np.int8))
        writer.commit()
    adata = ad.read_zarr(store)
    assert (adata.obsm["X_killed"] == 1.0).all() and list(adata.obs["predicted"].unique()) == ["a"]
    assert not list(store.parent.glob(f".{store.name}.*"))
