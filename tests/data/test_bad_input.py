"""Bad input: a clear error naming the file, key, gene or chunk, and nothing written.

Inputs are tiny real subsets (200 cells x 300 genes of Kang 2018 PBMC); each failed build must leave
neither the target store nor a hidden staging / scratch sibling behind.
"""

import json
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from pydantic import ValidationError

from atlasvi.data import (
    AtlasInputError,
    BuildConfig,
    LoaderConfig,
    StoreCorruptError,
    StoreError,
    StreamingLoader,
    build_store,
    open_store,
)
from tests.data.helpers import write_10x_h5, write_10x_mtx

N_CELLS, N_GENES = 200, 300
BAD_ROW = 150  # in the third input chunk with chunk_size=64: the error must still name the right cell


@pytest.fixture(scope="module")
def small(kang: ad.AnnData) -> ad.AnnData:
    """200 cells x 300 genes of Kang 2018, raw integer counts (no cell has zero counts)."""
    rows = np.sort(np.random.default_rng(0).choice(kang.n_obs, N_CELLS, replace=False))
    subset = kang[rows, :N_GENES].copy()
    subset.X = sp.csr_matrix(subset.X)
    assert (np.asarray(subset.X.sum(axis=1)).ravel() > 0).all()
    return subset


def _write(adata: ad.AnnData, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Variable names are not unique"
        adata.write_h5ad(path)
    return path


def _leftovers(output: Path) -> list[str]:
    """The target and any hidden sibling of it (staging, scratch) in its folder."""
    if not output.parent.exists():
        return []
    return sorted(
        p.name for p in output.parent.iterdir() if p.name == output.name or p.name.startswith(f".{output.name}.")
    )


def _build_fails(inputs: list[Path], output: Path, *patterns: str, **options) -> str:
    """Build, expect an AtlasInputError whose message holds every pattern (literal), check nothing was written."""
    config = BuildConfig(inputs=[str(p) for p in inputs], output=str(output), chunk_size=64, **options)
    with pytest.raises(AtlasInputError) as raised:
        build_store(config)
    message = str(raised.value)
    for pattern in patterns:
        assert pattern in message, f"{pattern!r} not in {message!r}"
    assert _leftovers(output) == []
    return message


# -- counts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "what"),
    [
        (0.5, "non-integer counts"),
        (-3.0, "negative counts"),
        (np.nan, "NaN or infinite counts"),
        (np.inf, "NaN or infinite counts"),
        (-np.inf, "NaN or infinite counts"),
    ],
)
def test_bad_count_values_name_file_cell_and_gene(small: ad.AnnData, tmp_path: Path, value: float, what: str):
    adata = small.copy()
    x = adata.X.astype(np.float32)
    position = x.indptr[BAD_ROW] + 2
    x.data[position] = value
    adata.X = x
    gene = adata.var_names[x.indices[position]]
    source = _write(adata, tmp_path / "bad.h5ad")
    _build_fails([source], tmp_path / "atlas.zarr", str(source), what, repr(adata.obs_names[BAD_ROW]), repr(gene))


def _with_empty_cells(adata: ad.AnnData, rows: list[int]) -> ad.AnnData:
    x = adata.X.tolil()
    x[rows] = 0
    out = adata.copy()
    out.X = sp.csr_matrix(x)
    return out


def test_zero_count_cells_raise_naming_the_cell(small: ad.AnnData, tmp_path: Path):
    adata = _with_empty_cells(small, [10, BAD_ROW])
    source = _write(adata, tmp_path / "empty_cells.h5ad")
    message = _build_fails(
        [source], tmp_path / "atlas.zarr", str(source), f"cell {adata.obs_names[10]!r} has zero counts"
    )
    assert "zero_count_cells='drop'" in message


def test_zero_count_cells_dropped_with_a_warning(small: ad.AnnData, tmp_path: Path):
    adata = _with_empty_cells(small, [10, BAD_ROW])
    source = _write(adata, tmp_path / "empty_cells.h5ad")
    config = BuildConfig(
        inputs=[str(source)], output=str(tmp_path / "atlas.zarr"), chunk_size=64, zero_count_cells="drop"
    )
    with pytest.warns(UserWarning, match="dropped 2 cells with zero counts"):
        output = build_store(config)
    store = open_store(output)
    assert store.n_cells == N_CELLS - 2
    assert store.read_rows(0, store.n_cells).indptr[-1] == adata.X.nnz
    names = set(ad.read_zarr(output).obs_names)
    assert len(names) == N_CELLS - 2
    assert not names & {adata.obs_names[10], adata.obs_names[BAD_ROW]}


def test_non_canonical_csr_input_is_stored_canonical(small: ad.AnnData, tmp_path: Path):
    """Explicit zeros, duplicated and unsorted entries are valid CSR: the store holds the summed counts, no zeros."""
    x = small.X.copy()
    x.data[x.data == 1] = 0  # explicit zeros
    first = x.indptr[BAD_ROW]
    data = np.insert(x.data, first, 1)  # a duplicate of the cell's first entry
    indices = np.insert(x.indices, first, x.indices[first])
    indptr = x.indptr + (np.arange(len(x.indptr)) > BAD_ROW)
    indices[indptr[5] : indptr[6]] = indices[indptr[5] : indptr[6]][::-1].copy()  # unsorted
    data[indptr[5] : indptr[6]] = data[indptr[5] : indptr[6]][::-1].copy()
    adata = small.copy()
    adata.X = sp.csr_matrix((data, indices, indptr), shape=x.shape)
    assert not adata.X.has_canonical_format
    source = _write(adata, tmp_path / "non_canonical.h5ad")
    config = BuildConfig(inputs=[str(source)], output=str(tmp_path / "atlas.zarr"), zero_count_cells="drop")
    output = build_store(config)
    store = open_store(output)
    block = store.read_rows(0, store.n_cells)  # validated: counts > 0, indices sorted within each cell
    assert (block.data > 0).all()
    stored = ad.read_zarr(output)
    expected = sp.csr_matrix((data, indices, indptr), shape=x.shape)
    expected.sum_duplicates()
    expected.eliminate_zeros()
    rows = small.obs_names.get_indexer(stored.obs_names)
    assert (rows >= 0).all()
    assert (sp.csr_matrix(stored.X) != expected[rows]).nnz == 0


# -- keys and genes -------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["batch_key", "labels_key"])
def test_missing_obs_key_names_key_file_and_columns(small: ad.AnnData, tmp_path: Path, role: str):
    source = _write(small, tmp_path / "small.h5ad")
    _build_fails(
        [source],
        tmp_path / "atlas.zarr",
        str(source),
        "'donor'",
        "'cell_type'",
        "'sample'",
        "'condition'",
        **{role: "donor"},
    )


def test_duplicated_gene_ids_are_named(small: ad.AnnData, tmp_path: Path):
    adata = small.copy()
    names = adata.var_names.to_numpy().copy()
    names[7] = names[3]
    adata.var_names = names
    source = _write(adata, tmp_path / "dup_genes.h5ad")
    _build_fails([source], tmp_path / "atlas.zarr", str(source), "duplicated gene ids", repr(names[3]))


def test_inputs_without_common_genes_name_both_files(small: ad.AnnData, tmp_path: Path):
    first = _write(small[:100, :150].copy(), tmp_path / "first.h5ad")
    second = _write(small[100:, 150:].copy(), tmp_path / "second.h5ad")
    _build_fails([first, second], tmp_path / "atlas.zarr", "no gene ids in common", str(first), str(second))


# -- unreadable inputs ----------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def _bad_gene_index(path: Path) -> None:
    """Corrupt X/indices inside an otherwise readable file (no checksum in an uncompressed h5ad)."""
    with h5py.File(path, "r+") as handle:
        handle["X/indices"][handle["X/indptr"][BAD_ROW]] = 10**6


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (_truncate, "not a readable .h5ad file"),
        (_random_bytes, "not a readable .h5ad file"),
        (_bad_gene_index, "cannot read cells 128..192"),
    ],
)
def test_unreadable_input_names_the_file(small: ad.AnnData, tmp_path: Path, damage: Callable[[Path], None], what: str):
    source = _write(small, tmp_path / "small.h5ad")
    damage(source)
    _build_fails([source], tmp_path / "atlas.zarr", str(source), what)


@pytest.mark.parametrize("kind", ["mtx", "h5"])
def test_truncated_10x_input_names_the_file(small: ad.AnnData, tmp_path: Path, kind: str):
    if kind == "mtx":
        source = write_10x_mtx(small, tmp_path / "filtered_feature_bc_matrix", gene_id_key="ENSEMBL")
        _truncate(source / "matrix.mtx.gz")
    else:
        source = write_10x_h5(small, tmp_path / "filtered_feature_bc_matrix.h5", gene_id_key="ENSEMBL")
        _truncate(source)
    _build_fails([source], tmp_path / "atlas.zarr", str(source), "not a readable 10x input")


def test_missing_input_names_the_path(small: ad.AnnData, tmp_path: Path):
    present = _write(small, tmp_path / "small.h5ad")
    missing = tmp_path / "no_such_file.h5ad"
    _build_fails([present, missing], tmp_path / "atlas.zarr", str(missing), "does not exist")


def test_failed_build_removes_the_folders_it_made(small: ad.AnnData, tmp_path: Path):
    missing = tmp_path / "no_such_file.h5ad"
    source = _write(small, tmp_path / "small.h5ad")
    _build_fails([source, missing], tmp_path / "new" / "deeper" / "atlas.zarr", str(missing))
    assert not (tmp_path / "new").exists()


def test_interrupted_build_leaves_nothing_and_keeps_an_existing_store(small: ad.AnnData, tmp_path: Path):
    """A failure while the store is being written (staging and scratch exist) removes both."""
    source = _write(small, tmp_path / "small.h5ad")
    output = tmp_path / "atlas.zarr"
    output.mkdir()
    (output / "previous").write_text("kept")

    class Interrupted(Exception):
        pass

    def interrupt(stage: str, done: int, total: int) -> None:
        if stage == "write":
            hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".atlas.zarr.")]
            assert any(".building-" in n for n in hidden) and any(".scratch-" in n for n in hidden), hidden
            raise Interrupted

    config = BuildConfig(inputs=[str(source)], output=str(output), overwrite=True)
    with pytest.raises(Interrupted):
        build_store(config, progress=interrupt)
    assert _leftovers(output) == ["atlas.zarr"]
    assert (output / "previous").read_text() == "kept"


# -- config typos ---------------------------------------------------------------------------------


def test_build_config_typo_is_an_error(tmp_path: Path):
    with pytest.raises(ValidationError, match="batch_kye"):
        BuildConfig(inputs=["a.h5ad"], output=str(tmp_path / "atlas.zarr"), batch_kye="x")


def test_loader_config_typo_is_an_error():
    with pytest.raises(ValidationError, match="batch_sise"):
        LoaderConfig(batch_sise=1)


# -- damaged stores -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_store(small: ad.AnnData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("store")
    source = _write(small, folder / "small.h5ad")
    config = BuildConfig(
        inputs=[str(source)], output=str(folder / "atlas.zarr"), batch_key="sample", labels_key="cell_type"
    )
    return build_store(config)


def _flip_bytes(store: Path) -> None:
    shard = store / "X/data/c/0"
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    shard.write_bytes(bytes(data))


def _set_schema_version(store: Path) -> None:
    """schema_version -> 99 wherever the root's atlasvi attrs are recorded (attributes, consolidated metadata)."""

    def patch(node: object) -> int:
        if isinstance(node, dict):
            hits = int("schema_version" in node)
            if hits:
                node["schema_version"] = 99
            return hits + sum(patch(v) for v in node.values())
        if isinstance(node, list):
            return sum(patch(v) for v in node)
        return 0

    root = store / "zarr.json"
    meta = json.loads(root.read_text())
    assert patch(meta) >= 1
    root.write_text(json.dumps(meta))


DAMAGES: dict[str, tuple[Callable[[Path], None], type[Exception], list[str]]] = {
    "flipped bytes in X/data": (_flip_bytes, StoreCorruptError, ["X/data[", "shard file X/data/c/0"]),
    "truncated X/data shard": (lambda s: _truncate(s / "X/data/c/0"), StoreCorruptError, ["X/data", "X/data/c/0"]),
    "missing X/indices shard": (lambda s: (s / "X/indices/c/0").unlink(), StoreCorruptError, ["X/indices/c/0"]),
    "missing X/indptr shard": (lambda s: (s / "X/indptr/c/0").unlink(), StoreCorruptError, ["X/indptr/c/0"]),
    "missing obs codes shard": (
        lambda s: (s / "obs/sample/codes/c/0").unlink(),
        StoreCorruptError,
        ["obs/sample/codes", "obs/sample/codes/c/0"],
    ),
    "truncated root zarr.json": (lambda s: _truncate(s / "zarr.json"), StoreError, ["zarr.json"]),
    "other schema version": (_set_schema_version, StoreError, ["version 99", "version 1"]),
}


def _read_everything(store: Path, backend: str, via: str) -> None:
    if via == "read_rows":
        opened = open_store(store, backend=backend)
        opened.read_rows(0, opened.n_cells)
    else:
        loader = StreamingLoader(store, LoaderConfig(batch_size=20, block_size=50, backend=backend))
        assert sum(len(batch) for batch in loader) == N_CELLS


@pytest.mark.parametrize("via", ["read_rows", "loader"])
@pytest.mark.parametrize("backend", ["zarr", "tensorstore"])
def test_undamaged_store_reads(valid_store: Path, backend: str, via: str):
    _read_everything(valid_store, backend, via)


@pytest.mark.parametrize("via", ["read_rows", "loader"])
@pytest.mark.parametrize("backend", ["zarr", "tensorstore"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_store_is_never_read_silently(valid_store: Path, tmp_path: Path, damage: str, backend: str, via: str):
    apply, error, patterns = DAMAGES[damage]
    store = Path(shutil.copytree(valid_store, tmp_path / "atlas.zarr"))
    apply(store)
    with pytest.raises(error) as raised:
        _read_everything(store, backend, via)
    message = str(raised.value)
    assert str(store) in message
    for pattern in patterns:
        assert pattern in message, f"{pattern!r} not in {message!r}"
    if error is StoreCorruptError:
        assert re.search(r"chunk \d+ = elements \d+\.\.\d+", message), message
