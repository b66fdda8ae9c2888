"""Spatial coordinates in the store: obsm["spatial"] travels with its cells through the build's shuffle, is read by
anndata, and bad or partial coordinates are refused or left out with a clear message."""

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from atlasvi.data import AtlasInputError, BuildConfig, build_store, open_store
from atlasvi.data.store import read_store_attrs
from tests.conftest import SHARED_DATA

VISIUM = SHARED_DATA / "human_lymph_node_visium_rctd.h5ad"  # 1000 spots x 2000 genes, obsm["spatial"]


def _build(tmp_path: Path, inputs: list, name: str = "store.zarr", **fields) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_store(BuildConfig(inputs=[str(p) for p in inputs], output=str(tmp_path / name), **fields))


def _spots(tmp_path: Path, n: int = 300, name: str = "spots.h5ad") -> tuple[Path, ad.AnnData]:
    adata = ad.read_h5ad(VISIUM)[:n].copy()
    adata.write_h5ad(tmp_path / name)
    return tmp_path / name, adata


def test_coordinates_travel_with_their_spots_through_the_shuffle(tmp_path: Path) -> None:
    source, adata = _spots(tmp_path)
    store = _build(tmp_path, [source], chunk_size=64)
    stored = ad.read_zarr(store)
    assert not np.array_equal(stored.obs_names, adata.obs_names)  # shuffled
    expected = adata[stored.obs_names].obsm["spatial"]
    np.testing.assert_array_equal(stored.obsm["spatial"], expected)
    assert stored.obsm["spatial"].dtype == np.float64
    assert read_store_attrs(store)["spatial"] == {"obsm_key": "spatial", "n_dims": 2}
    assert open_store(store).n_cells == 300  # the store opens as before


def test_another_obsm_key_and_none(tmp_path: Path) -> None:
    source, adata = _spots(tmp_path)
    adata.obsm["coords"] = adata.obsm["spatial"] * 2
    del adata.obsm["spatial"]
    adata.write_h5ad(source)
    assert read_store_attrs(_build(tmp_path, [source], "default.zarr"))["spatial"] is None
    store = _build(tmp_path, [source], "coords.zarr", spatial_key="coords")
    stored = ad.read_zarr(store)
    np.testing.assert_array_equal(stored.obsm["spatial"], adata[stored.obs_names].obsm["coords"])
    assert read_store_attrs(_build(tmp_path, [source], "none.zarr", spatial_key=None))["spatial"] is None


def test_an_input_without_coordinates_leaves_them_out_with_a_warning(tmp_path: Path) -> None:
    first, _ = _spots(tmp_path, 100, "a.h5ad")
    second, adata = _spots(tmp_path, 100, "b.h5ad")
    del adata.obsm["spatial"]
    adata.obs_names = [f"b{i}" for i in range(100)]
    adata.write_h5ad(second)
    with pytest.warns(UserWarning, match=r"b\.h5ad: no obsm\['spatial'\].*keeps none"):
        store = build_store(BuildConfig(inputs=[str(first), str(second)], output=str(tmp_path / "s.zarr")))
    assert read_store_attrs(store)["spatial"] is None


def test_bad_coordinates_are_refused_naming_file_and_cell(tmp_path: Path) -> None:
    source, adata = _spots(tmp_path)
    adata.obsm["spatial"] = adata.obsm["spatial"].astype(float)
    adata.obsm["spatial"][7, 1] = np.nan
    adata.write_h5ad(source)
    with pytest.raises(AtlasInputError, match=rf"spots\.h5ad: .*NaN or infinite values at cell '{adata.obs_names[7]}'"):
        _build(tmp_path, [source])
    adata.obsm["spatial"] = np.zeros((300, 4))
    adata.write_h5ad(source)
    with pytest.raises(AtlasInputError, match=r"has 4 columns .* expected 2 or 3"):
        _build(tmp_path, [source])
    three, other = _spots(tmp_path, 300, "three.h5ad")
    other.obsm["spatial"] = np.zeros((300, 3))
    other.obs_names = [f"t{i}" for i in range(300)]
    other.write_h5ad(three)
    two, _ = _spots(tmp_path, 300, "two.h5ad")
    with pytest.raises(AtlasInputError, match="one coordinate system"):
        _build(tmp_path, [two, three])
