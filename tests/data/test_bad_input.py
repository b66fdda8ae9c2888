"""Bad input: a clear error naming the file, key, gene or chunk, and nothing written.

Inputs are tiny real subsets (200 cells x 300 genes of Kang 2018 PBMC); each failed build must leave
neither the target store nor a hidden staging / scratch sibling behind.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
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
    message = _build_fails([source], tmp_path / "atlas.zarr", str(source), what, repr(adata.obs_names[BAD_ROW]))
    assert f"gene {gene!r}" in message and "np.str_" not in message


@pytest.mark.parametrize("dtype", [np.int64, np.float64])
def test_counts_too_large_for_32_bits_are_stored_exactly(small: ad.AnnData, tmp_path: Path, dtype: type):
    """2^32 + 5 was stored as 5 (uint32 wrap-around): the store's count type follows the largest count."""
    adata = small.copy()
    adata.X = adata.X.astype(dtype)
    adata.X.data[adata.X.indptr[BAD_ROW]] = 2**32 + 5
    output = build_store(BuildConfig(inputs=[str(_write(adata, tmp_path / "big.h5ad"))], output=str(tmp_path / "a")))
    built = ad.read_zarr(output)
    assert built.X.dtype == np.uint64 and built.X.max() == 2**32 + 5
    assert (built[adata.obs_names].X != adata.X).nnz == 0
    store = open_store(output)
    assert store.schema.count_dtype == "uint64" and store.read_rows(0, N_CELLS).data.max() == 2**32 + 5


@pytest.mark.parametrize("value", [1e20, 2**53 + 2])
def test_counts_beyond_the_widest_count_type_name_file_cell_and_gene(small: ad.AnnData, tmp_path: Path, value: float):
    """An integer-valued 1e20 was stored as 0; counts above 2^53 (not exact in float64) are refused."""
    adata = small.copy()
    adata.X = adata.X.astype(np.float64 if isinstance(value, float) else np.int64)
    position = adata.X.indptr[BAD_ROW] + 1
    adata.X.data[position] = value
    gene = adata.var_names[adata.X.indices[position]]
    source = _write(adata, tmp_path / "huge.h5ad")
    cell = adata.obs_names[BAD_ROW]
    _build_fails([source], tmp_path / "atlas.zarr", str(source), "counts above 9007199254740992", f"cell {cell!r}")
    _build_fails([source], tmp_path / "atlas.zarr", f"gene {gene!r}", f"first {adata.X.data[position]}")


@pytest.mark.parametrize("count_type", [(1000, "uint16"), (70_000, "uint32")])
def test_count_type_is_the_narrowest_that_holds_the_largest_count(
    small: ad.AnnData, tmp_path: Path, count_type: tuple[int, str]
):
    largest, name = count_type
    adata = small.copy()
    adata.X.data[0] = largest
    output = build_store(BuildConfig(inputs=[str(_write(adata, tmp_path / "in.h5ad"))], output=str(tmp_path / "a")))
    assert open_store(output).schema.count_dtype == name and ad.read_zarr(output).X.max() == largest


# -- outputs --------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["10x folder as its own output", "folder holding the input", "inside a 10x folder"])
def test_overwrite_never_replaces_an_input(small: ad.AnnData, tmp_path: Path, case: str):
    """--overwrite deleted a 10x input given as its own output, and a folder holding the input (exit 0)."""
    work = tmp_path / "work"
    if case == "folder holding the input":
        work.mkdir()
        source = _write(small, work / "in.h5ad")
        (work / "notes.txt").write_text("mine")
        output, relation = work, "contains the input"
    else:
        source = write_10x_mtx(small, work, "ENSEMBL")
        output = work if case == "10x folder as its own output" else work / "atlas.zarr"
        relation = "is the input" if output == source else "lies inside the input folder"
    before = _snapshot(tmp_path)
    config = BuildConfig(inputs=[str(source)], output=str(output), overwrite=True)
    with pytest.raises(AtlasInputError, match=relation) as raised:
        build_store(config)
    assert str(raised.value).startswith(f"{output}: ")
    assert _snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["work"]


@pytest.mark.parametrize("what", ["folder of other files", "file", "zarr group of another program"])
def test_overwrite_replaces_only_an_atlas_store(small: ad.AnnData, tmp_path: Path, what: str):
    source = _write(small, tmp_path / "in.h5ad")
    output = tmp_path / "out.zarr"
    if what == "file":
        output.write_text("mine")
    else:
        output.mkdir()
        content = '{"zarr_format": 3, "node_type": "group", "attributes": {}}' if "zarr" in what else "mine"
        (output / ("zarr.json" if "zarr" in what else "notes.txt")).write_text(content)
    before = _snapshot(tmp_path)
    config = BuildConfig(inputs=[str(source)], output=str(output), overwrite=True)
    with pytest.raises(AtlasInputError, match="exists and is not an atlas store"):
        build_store(config)
    assert _snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "out.zarr"]
    output.unlink() if output.is_file() else shutil.rmtree(output)
    output.mkdir()  # an empty folder holds nothing to lose
    assert open_store(build_store(config)).n_cells == N_CELLS
    (output / "extra.txt").write_text("kept in the store")  # an atlas store is recognised by its attrs
    replaced = build_store(config.model_copy(update={"seed": 4}))
    assert not (replaced / "extra.txt").exists() and open_store(replaced).n_cells == N_CELLS


def test_a_read_only_output_folder_is_refused_before_the_inputs_are_read(small: ad.AnnData, tmp_path: Path):
    """The folder was found read-only only after the whole validation pass: now first, in one line."""
    adata = small.copy()
    adata.X = adata.X.astype(np.float32)
    adata.X.data[-1] = 0.5  # a bad count in the last chunk: reading the inputs would fail on it
    source = _write(adata, tmp_path / "in.h5ad")
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    prefix = []
    if os.geteuid() == 0:  # root writes anywhere: drop its capabilities for the build
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv")
        prefix = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    command = [*prefix, sys.executable, "-m", "atlasvi.cli.main", "build", str(source), "-o", str(folder / "a.zarr")]
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"COLUMNS": "200"})
    assert result.returncode == 1, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line == f"error: {folder}: cannot write the store there (Permission denied)"
    assert list(folder.iterdir()) == []


def test_cell_names_repeated_across_inputs_are_made_unique_as_anndata_does(small: ad.AnnData, tmp_path: Path):
    """The same barcodes in two inputs (and a name that already ends in -1): later occurrences are renamed
    as anndata.utils.make_index_unique does, with a warning; each name keeps its own cell's counts."""
    first = small.copy()
    first.obs_names = [f"{first.obs_names[1]}-1", *first.obs_names[1:]]
    second = small[:50].copy()
    second.X = second.X * 2
    inputs = [_write(first, tmp_path / "a.h5ad"), _write(second, tmp_path / "b.h5ad")]
    config = BuildConfig(inputs=[str(p) for p in inputs], output=str(tmp_path / "atlas.zarr"), chunk_size=64)
    with pytest.warns(UserWarning, match=r"49 cells have a name an earlier cell of the inputs has"):
        built = ad.read_zarr(build_store(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's own notes on the names it is given
        expected = ad.utils.make_index_unique(pd.Index([*first.obs_names, *second.obs_names]))
        both = ad.concat([first, second])
    assert built.obs_names.is_unique and sorted(built.obs_names) == sorted(expected)
    both.obs_names = expected
    assert (built[both.obs_names].X != both.X).nnz == 0
    assert f"{small.obs_names[1]}-2" in built.obs_names  # -1 was taken


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


@pytest.mark.parametrize("beside", [False, True])
def test_an_input_without_cells_is_named(small: ad.AnnData, tmp_path: Path, beside: bool):
    empty = _write(small[:0].copy(), tmp_path / "no_cells.h5ad")
    inputs = [_write(small, tmp_path / "small.h5ad"), empty] if beside else [empty]
    _build_fails(inputs, tmp_path / "atlas.zarr", f"{empty}: holds no cells")


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
    output = build_store(BuildConfig(inputs=[str(source)], output=str(tmp_path / "atlas.zarr"), seed=1))
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


def _rewrite(store: Path, name: str, element: int, value: int) -> None:
    """Write one element of a store array through zarr: a wrong value in a chunk whose checksum is valid."""
    zarr.open_array(store / name, mode="r+")[element] = value


def _unsorted_genes(store: Path) -> None:
    """Swap the first two gene indices of the first cell with two or more (checksums valid)."""
    indptr = zarr.open_array(store / "X/indptr", mode="r")[:]
    row = int(np.flatnonzero(np.diff(indptr) >= 2)[0])
    indices = zarr.open_array(store / "X/indices", mode="r+")
    a = int(indptr[row])
    indices[a : a + 2] = indices[a : a + 2][::-1]


DAMAGES: dict[str, tuple[Callable[[Path], None], type[Exception], list[str]]] = {
    "flipped bytes in X/data": (_flip_bytes, StoreCorruptError, ["X/data[", "shard file X/data/c/0"]),
    "a count of 0 in X/data": (
        lambda s: _rewrite(s, "X/data", 7, 0),
        StoreCorruptError,
        ["X/data holds 0 at element 7", "counts are > 0"],
    ),
    "a gene index out of range": (
        lambda s: _rewrite(s, "X/indices", 7, 10**6),
        StoreCorruptError,
        ["X/indices holds gene index 1000000"],
    ),
    "gene indices out of order in a cell": (_unsorted_genes, StoreCorruptError, ["X/indices is not sorted"]),
    "truncated X/data shard": (lambda s: _truncate(s / "X/data/c/0"), StoreCorruptError, ["X/data", "X/data/c/0"]),
    "missing X/indices shard": (lambda s: (s / "X/indices/c/0").unlink(), StoreCorruptError, ["X/indices/c/0"]),
    "missing X/indptr shard": (lambda s: (s / "X/indptr/c/0").unlink(), StoreCorruptError, ["X/indptr/c/0"]),
    "missing obs codes shard": (
        lambda s: (s / "obs/sample/codes/c/0").unlink(),
        StoreCorruptError,
        ["obs/sample/codes", "obs/sample/codes/c/0"],
    ),
    "truncated root zarr.json": (lambda s: _truncate(s / "zarr.json"), StoreError, ["zarr.json"]),
    "other schema version": (_set_schema_version, StoreError, ["version 99", "versions 1, 2"]),
}


def _read_everything(store: Path, backend: str, via: str) -> None:
    if via == "read_rows":
        opened = open_store(store, backend=backend)
        opened.read_rows(0, opened.n_cells)
    else:
        loader = StreamingLoader(store, LoaderConfig(batch_size=20, block_size=50, backend=backend))
        assert sum(len(batch) for batch in loader) == N_CELLS


@pytest.mark.parametrize("via", ["read_rows", "loader"])
@pytest.mark.parametrize("backend", ["zarr", "tensorstore", "auto"])
def test_undamaged_store_reads(valid_store: Path, backend: str, via: str):
    _read_everything(valid_store, backend, via)


@pytest.mark.parametrize("via", ["read_rows", "loader"])
@pytest.mark.parametrize("backend", ["zarr", "tensorstore", "auto"])  # auto: the loader's direct counts reads
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
