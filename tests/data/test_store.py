"""Opening a store cross-checks its atlasvi attrs against its arrays: an edited or damaged store is refused."""

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import zarr

from atlasvi.data import StoreError, open_store
from atlasvi.data.sampler import split_rows
from atlasvi.errors import ConfigError


def _edit_attrs(field: str, value: object) -> Callable[[Path], None]:
    def edit(store: Path) -> None:
        root = store / "zarr.json"
        meta = json.loads(root.read_text())
        meta["attributes"]["atlasvi"][field] = value(meta["attributes"]["atlasvi"][field]) if callable(value) else value
        root.write_text(json.dumps(meta))

    return edit


def _set_element(name: str, index: int, value: int) -> Callable[[Path], None]:
    def edit(store: Path) -> None:
        zarr.open_array(str(store / name), mode="r+")[index] = value

    return edit


def _remove_obs_index(store: Path) -> None:
    shutil.rmtree(store / "obs" / "_index")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(store), zarr_format=3)


def _renamed_sample(categorical: dict) -> dict:
    return categorical | {"sample": ["renamed", *categorical["sample"][1:]]}


EDITS = {
    "n_cells": (_edit_attrs("n_cells", 1000), "attrs n_cells = 1000 but len(X/indptr) - 1 = 1556"),
    "nnz": (_edit_attrs("nnz", 585000), "attrs nnz = 585000 but len(X/data) = 585251"),
    "indptr end": (_set_element("X/indptr", 1556, 585250), "attrs nnz = 585251 but X/indptr[1556] = 585250"),
    "n_genes": (_edit_attrs("n_genes", 1200), "attrs n_genes = 1200 but len(var/_index) = 1267"),
    "categories dropped": (
        _edit_attrs("categorical", lambda c: c | {"sample": c["sample"][:3]}),
        "attrs len(categorical.sample) = 3 but len(obs/sample/categories) = 4",
    ),
    "category renamed": (
        _edit_attrs("categorical", _renamed_sample),
        "attrs categorical.sample[0] = 'renamed' but obs/sample/categories[0] = 'ctrl101'",
    ),
    "code out of range": (
        _set_element("obs/sample/codes", 5, 7),
        "attrs categorical.sample = 4 categories but obs/sample/codes[5] = 7",
    ),
    "no obs index": (_remove_obs_index, "no 1-D array obs/_index"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_attrs_that_do_not_match_the_arrays_are_refused(kang_store, tmp_path, edit):
    apply, message = EDITS[edit]
    store = Path(shutil.copytree(kang_store, tmp_path / "kang.zarr"))
    assert open_store(store).n_cells == 1556
    apply(store)
    with pytest.raises(StoreError) as raised:
        open_store(store)
    assert str(store) in str(raised.value) and message in str(raised.value), str(raised.value)


@pytest.mark.parametrize(
    ("n_cells", "fraction", "message"),
    [
        (300, 0.001, "holds out round(300 x 0.001) = 0 of the store's 300 cells; the smallest fraction that holds "
         "out a cell is 0.0034"),
        (7, 0.05, "the smallest fraction that holds out a cell is 0.15"),
        (3, 0.9, "holds out round(3 x 0.9) = 3 of the store's 3 cells, leaving none to train on"),
    ],
)  # fmt: skip
def test_a_validation_fraction_that_holds_out_no_cell_names_the_smallest_that_does(n_cells, fraction, message):
    with pytest.raises(ConfigError) as raised:
        split_rows(n_cells, fraction)
    assert "validation_fraction" in str(raised.value) and message in str(raised.value), str(raised.value)
    assert split_rows(300, 0.0034) == ((0, 299), (299, 300))
    assert split_rows(7, 0.15) == ((0, 6), (6, 7))


def test_ctrl_c_while_the_arrays_open_is_an_interrupt_not_a_damaged_store(kang_store, monkeypatch):
    """Ctrl-C during tensorstore's first import surfaces as ImportError('initialization failed') caused by the
    KeyboardInterrupt: opening the store re-raises the interrupt (exit 130) instead of calling the store damaged."""
    import atlasvi.data.store as store_module

    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as err:
            raise ImportError("initialization failed") from err

    monkeypatch.setattr(store_module, "_make_reader", interrupted)
    with pytest.raises(KeyboardInterrupt):
        open_store(kang_store)
