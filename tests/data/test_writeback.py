"""Writing per-cell results back into a store: anndata reads them, and an unfinished write changes nothing."""

import shutil

import anndata as ad
import numpy as np
import pytest

from atlasvi.data import StoreError, open_store
from atlasvi.data.writeback import ObsArrayWriter


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
        with ObsArrayWriter(store, "layers", "normalized", 3) as writer:
            writer.write(np.zeros((10, 3), np.float32))
            raise RuntimeError("interrupted")
    after = ad.read_zarr(store)
    assert list(after.obsm) == list(before.obsm) == [] and list(after.layers) == []
    assert not list(store.parent.glob(".*.partial"))


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
