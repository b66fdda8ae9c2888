"""Readers for build inputs: `.h5ad`, `.h5mu`, 10x matrix folders and 10x `.h5` files.

Each input is opened once for its metadata (cells, genes, requested obs columns) and then read in
chunks of rows, so that a build never holds more than one chunk of counts in memory. `.h5ad` files
are read through anndata's backed sparse datasets; 10x inputs through scanpy's readers (a 10x file
is loaded whole, once by each build worker that reads it: the MatrixMarket text format cannot be read by rows).

Surface-protein counts (CITE-seq), asked for with a protein key: an `.h5ad`'s `obsm[key]` (a DataFrame
whose columns are the antibodies, as scvi-tools' totalVI reads it, or an array with the names in
`uns[key + "_names"]` or `uns["protein_names"]`), read by rows like X; a 10x `.h5`'s "Antibody Capture"
features (its "Gene Expression" features are X); an `.h5mu`'s modality named by the protein key (e.g. "prot"),
whose cells are matched to the RNA modality's ("rna") by name: an RNA cell without protein counts is stored
as not measured, a protein cell without RNA is refused.

Peak counts (scATAC), asked for with an ATAC key, are read the same way, as sparse rows: an `.h5ad`'s
`obsm[key]` with the peak names in `uns[key + "_names"]`, an `.h5mu`'s modality `key` (e.g. "atac"), a 10x
`.h5`'s "Peaks" features. The cells of an `.h5mu` with peaks are the UNION of its RNA and ATAC cells (MultiVI's
paired and unpaired cells): its RNA cells first, then the ATAC cells without RNA, whose RNA rows read as empty
(the build stores them as RNA not measured) and whose obs columns come from the ATAC modality's obs.

Spatial coordinates, asked for with a spatial key, are an `.h5ad`'s (or the `.h5mu` RNA modality's) dense
`obsm[key]` (spots x 2 or 3, as scanpy and squidpy keep `obsm["spatial"]`), read by rows; an input without
them has no "spatial" side (the build decides what that means).
"""

import glob
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasvi.data.errors import AtlasInputError

InputKind = Literal["h5ad", "h5mu", "10x_mtx", "10x_h5"]
RNA_MODALITY = "rna"  # the .h5mu modality read as X (MuData's and muon's name for gene expression)


def detect_kind(path: Path) -> InputKind:
    """Tell an input's format from its path (folder = 10x matrix folder)."""
    if path.is_dir():
        return "10x_mtx"
    if path.suffix == ".h5ad":
        return "h5ad"
    if path.suffix == ".h5mu":
        return "h5mu"
    if path.suffix == ".h5":
        return "10x_h5"
    raise AtlasInputError(f"{path}: unknown input format (expected .h5ad, .h5mu, a 10x .h5 or a 10x matrix folder)")


INPUT_SUFFIXES = (".h5ad", ".h5mu", ".h5")


def _is_10x_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("matrix.mtx", "matrix.mtx.gz"))


def expand_inputs(items: list[str]) -> list[Path]:
    """The inputs a build reads, in order: each item is an input (an `.h5ad`, `.h5mu` or 10x `.h5` file, a 10x
    matrix folder), a folder of inputs (its `.h5ad` / `.h5mu` / `.h5` files and 10x matrix folders, by name) or
    a glob pattern (e.g. `studies/*.h5ad`, matches by name). A folder or pattern that matches nothing, and an
    input named twice, are refused."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if glob.has_magic(item):
            matched = [Path(p) for p in sorted(glob.glob(item))]
            found = [p for p in matched if p.suffix in INPUT_SUFFIXES or _is_10x_folder(p)]
            if not found:
                raise AtlasInputError(f"{item}: matches no input (.h5ad, .h5mu, 10x .h5 files or 10x matrix folders)")
            paths += found
        elif path.is_dir() and not _is_10x_folder(path):
            found = [
                p for p in sorted(path.iterdir()) if (p.is_file() and p.suffix in INPUT_SUFFIXES) or _is_10x_folder(p)
            ]
            if not found:
                raise AtlasInputError(
                    f"{path}: a folder with no inputs (.h5ad, .h5mu, 10x .h5 files or 10x matrix folders) and not "
                    "a 10x matrix folder (no matrix.mtx)"
                )
            paths += found
        else:
            paths.append(path)
    seen: set[Path] = set()
    for path in paths:
        if path.resolve() in seen:
            raise AtlasInputError(f"{path}: given twice among the inputs (its cells would be stored twice)")
        seen.add(path.resolve())
    return paths


def file_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's files in name order (10x matrix folders)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


class _H5adObs:
    """Requested obs columns of an .h5ad, read by row range (a column is never loaded whole)."""

    def __init__(self, group: h5py.Group, keys: list[str]):
        self._index = group[group.attrs["_index"]]
        self._columns = {key: group[key] for key in keys}
        self._categories = {
            key: np.asarray(ad.io.read_elem(elem["categories"]), dtype=object)
            for key, elem in self._columns.items()
            if elem.attrs.get("encoding-type") == "categorical"
        }

    def __len__(self) -> int:
        return self._index.shape[0]

    def rows(self, start: int, stop: int) -> pd.DataFrame:
        names = self._index.asstr()[start:stop] if self._index.dtype.kind in "OS" else self._index[start:stop]
        columns = {key: self._column(key, elem, start, stop) for key, elem in self._columns.items()}
        return pd.DataFrame(columns, index=pd.Index(np.asarray(names, dtype=str)))

    def _column(self, key: str, elem, start: int, stop: int) -> np.ndarray:
        encoding = elem.attrs.get("encoding-type", "array")
        if encoding == "categorical":
            return pd.Categorical.from_codes(elem["codes"][start:stop], self._categories[key])
        if encoding in ("nullable-integer", "nullable-boolean", "nullable-string-array"):
            values = pd.Series(elem["values"][start:stop], dtype=object)
            return values.where(~elem["mask"][start:stop], None).to_numpy()
        if elem.dtype.kind in "OS":
            return np.asarray(elem.asstr()[start:stop], dtype=object)
        return elem[start:stop]


@dataclass
class InputFile:
    """One opened input: its cells and genes; counts and requested obs columns are read in chunks.

    gene_ids, gene_names: (n_genes,) str.
    """

    path: Path
    kind: InputKind
    gene_ids: np.ndarray
    gene_names: np.ndarray
    obs: _H5adObs | pd.DataFrame
    _h5: h5py.File | None = None
    _x: object = None
    sides: dict[str, "SideModality"] = field(default_factory=dict)  # "protein", "atac": asked-for modalities

    @property
    def n_cells(self) -> int:
        return len(self.obs)

    def obs_rows(self, start: int, stop: int) -> pd.DataFrame:
        """(stop - start, k) requested obs columns of cells [start, stop), index = cell names."""
        try:
            return self.obs.iloc[start:stop] if isinstance(self.obs, pd.DataFrame) else self.obs.rows(start, stop)
        except (OSError, RuntimeError, KeyError, ValueError) as err:
            raise AtlasInputError(
                f"{self.path}: cannot read the obs of cells {start}..{stop} (truncated or corrupt?): {err}"
            ) from err

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Counts of cells [start, stop): canonical CSR (rows, n_genes): indices sorted and in range, duplicates
        summed, no stored zeros."""
        try:
            block = sp.csr_matrix(self._x[start:stop])
            block.check_format(full_check=True)
        except (OSError, RuntimeError, KeyError, ValueError) as err:
            raise AtlasInputError(
                f"{self.path}: cannot read cells {start}..{stop} (truncated or corrupt?): {err}"
            ) from err
        block.sum_duplicates()
        block.eliminate_zeros()
        return block

    def side_rows(self, name: str, start: int, stop: int) -> np.ndarray | sp.csr_matrix:
        """Counts of modality `name` for cells [start, stop), as stored (not validated): (stop - start, features)
        float64 for proteins (and spatial coordinates), canonical CSR (indices sorted, duplicates summed, no
        stored zeros) for peaks."""
        try:
            block = self.sides[name].reader[start:stop]
            if name != "atac":
                return np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)
            block = sp.csr_matrix(block)
            block.sum_duplicates()
            block.eliminate_zeros()
            return block
        except (OSError, RuntimeError, KeyError, ValueError) as err:
            raise AtlasInputError(
                f"{self.path}: cannot read the {SIDE_WHAT[name][0]} of cells {start}..{stop} (truncated or "
                f"corrupt?): {err}"
            ) from err

    def side_present(self, name: str, start: int, stop: int) -> np.ndarray:
        """(stop - start,) bool: which of cells [start, stop) have modality `name` at all."""
        present = self.sides[name].present
        return np.ones(stop - start, dtype=bool) if present is None else present[start:stop]

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None


def _check_obs_keys(path: Path, columns: list[str], keys: list[str]) -> None:
    """Raise naming the file, the first missing key and the columns there are."""
    missing = [k for k in keys if k not in columns]
    if missing:
        raise AtlasInputError(
            f"{path}: obs has no column {missing[0]!r} (asked for {missing}); obs columns are {columns}"
        )


class _ColumnFrame:
    """An `.h5ad` obsm DataFrame read by rows: its columns side by side."""

    def __init__(self, group: h5py.Group):
        self.columns = [str(c) for c in group.attrs["column-order"]]
        self._columns = [group[c] for c in self.columns]
        self.shape = (group[group.attrs["_index"]].shape[0], len(self.columns))

    def __getitem__(self, rows: slice) -> np.ndarray:
        """(cells, columns) float64; a frame of no columns (a study that measured no protein) gives (cells, 0)."""
        if not self._columns:
            return np.zeros((len(range(*rows.indices(self.shape[0]))), 0))
        return np.stack([np.asarray(c[rows], dtype=np.float64) for c in self._columns], axis=1)


SIDE_WHAT = {
    "protein": ("protein counts", "protein"),
    "atac": ("peak counts", "peak"),
    "spatial": ("spatial coordinates", "coordinate"),
}
"""modality -> (what its counts are, what a feature is), for messages."""


@dataclass
class SideModality:
    """A modality read beside X: names (n_features,) str, `reader[start:stop]` its rows in the cells' order, and
    present (n_cells,) bool where not every cell has it (an .h5mu modality of fewer cells)."""

    names: np.ndarray
    reader: object
    present: np.ndarray | None = None


def _h5ad_side(path: Path, handle: h5py.File, name: str, key: str, n_cells: int) -> SideModality:
    """Modality `name` of an `.h5ad`: obsm[key] (a DataFrame, or an array / sparse matrix named in uns)."""
    what, feature = SIDE_WHAT[name]
    obsm = handle["obsm"] if "obsm" in handle else {}
    if key not in obsm:
        raise AtlasInputError(f"{path}: obsm has no {key!r} (the {what}); obsm keys are {list(obsm.keys())}")
    elem = obsm[key]
    encoding = elem.attrs.get("encoding-type", "array")
    if encoding == "dataframe":
        frame = _ColumnFrame(elem)
        names, reader = np.asarray(frame.columns, dtype=str), frame
    else:
        reader = ad.io.sparse_dataset(elem) if encoding in ("csr_matrix", "csc_matrix") else elem
        uns = handle["uns"] if "uns" in handle else {}
        found = [k for k in (f"{key}_names", f"{name}_names") if k in uns]
        if not found:
            raise AtlasInputError(
                f"{path}: obsm[{key!r}] is an array without {feature} names: put them in uns[{key + '_names'!r}] or "
                f"uns[{name + '_names'!r}], or store the {what} as a DataFrame"
            )
        names = np.asarray(ad.io.read_elem(uns[found[0]]), dtype=str)
    if len(reader.shape) != 2 or reader.shape[0] != n_cells or reader.shape[1] != len(names):
        raise AtlasInputError(
            f"{path}: obsm[{key!r}] has shape {tuple(reader.shape)}, "
            f"expected ({n_cells} cells, {len(names)} {feature}s)"
        )
    return SideModality(names, reader)


def _h5ad_spatial(path: Path, root: h5py.Group, key: str, n_cells: int) -> SideModality | None:
    """Spatial coordinates of an `.h5ad` (or of an `.h5mu`'s RNA modality): a dense obsm[key] of n_cells rows and
    2 or 3 columns; None when obsm has no `key`."""
    obsm = root["obsm"] if "obsm" in root else {}
    if key not in obsm:
        return None
    elem = obsm[key]
    if not isinstance(elem, h5py.Dataset) or len(elem.shape) != 2 or elem.shape[0] != n_cells:
        shape = tuple(elem.shape) if isinstance(elem, h5py.Dataset) else elem.attrs.get("encoding-type", "group")
        raise AtlasInputError(
            f"{path}: obsm[{key!r}] (spatial coordinates) is {shape}, expected a dense array of ({n_cells} cells, 2 "
            "or 3 coordinates)"
        )
    if elem.shape[1] not in (2, 3) or elem.dtype.kind not in "iuf":
        raise AtlasInputError(
            f"{path}: obsm[{key!r}] (spatial coordinates) has {elem.shape[1]} columns of dtype {elem.dtype}, expected "
            "2 or 3 numeric coordinates"
        )
    return SideModality(np.asarray(["x", "y", "z"][: elem.shape[1]]), elem)


class _MatchedRows:
    """Rows of another modality's matrix in the order of the RNA cells: row i is `source` row `index[i]`, zeros
    where index[i] is -1 (an RNA cell the modality did not measure)."""

    def __init__(self, source, index: np.ndarray):
        self._source, self._index = source, index
        self.shape = (len(index), source.shape[1])

    def __getitem__(self, rows: slice) -> np.ndarray | sp.csr_matrix:
        """Dense rows of a dense source, CSR rows (empty where absent) of a sparse one."""
        index = self._index[rows]
        present = np.flatnonzero(index >= 0)
        wanted, inverse = np.unique(index[present], return_inverse=True)
        block = self._source[wanted] if len(wanted) else None
        if block is not None and sp.issparse(block) or isinstance(self._source, ad.abc.CSRDataset):
            block = sp.csr_matrix(block if block is not None else (0, self.shape[1]))[inverse]
            place = sp.csr_matrix(
                (np.ones(len(present)), (present, np.arange(len(present)))), shape=(len(index), len(present))
            )
            return sp.csr_matrix(place @ block)
        out = np.zeros((len(index), self.shape[1]), dtype=np.float64)
        if block is not None:
            out[present] = np.asarray(block)[inverse]
        return out


def _cell_names(group: h5py.Group) -> np.ndarray:
    index = group[group.attrs["_index"]]
    return np.asarray(index.asstr()[:] if index.dtype.kind in "OS" else index[:], dtype=str)


def _h5mu_group(path: Path, handle: h5py.File, name: str, key: str) -> h5py.Group:
    """The `.h5mu` modality `key` read as modality `name`; raises naming the modalities there are."""
    mods = list(handle["mod"].keys())
    if key not in mods:
        raise AtlasInputError(f"{path}: no modality {key!r} (the {SIDE_WHAT[name][0]}); modalities are {mods}")
    return handle["mod"][key]


def _h5mu_side(
    path: Path, handle: h5py.File, name: str, key: str, rna_names: np.ndarray, n_rna: int | None = None
) -> SideModality:
    """Modality `name` of an `.h5mu`: its modality `key`, rows matched to the cells `rna_names` by name (with
    n_rna: the first n_rna of them are the RNA cells, the others ATAC cells without RNA, which only the peaks
    may have)."""
    what = SIDE_WHAT[name][0]
    group = _h5mu_group(path, handle, name, key)
    names = np.asarray(ad.io.read_elem(group["var"]).index, dtype=str)
    cells = _cell_names(group["obs"])
    index = pd.Index(rna_names).get_indexer(cells)
    if name != "atac" and n_rna is not None:
        index[index >= n_rna] = -1
    if (index < 0).any():
        cell = str(cells[int(np.flatnonzero(index < 0)[0])])
        raise AtlasInputError(
            f"{path}: cell {cell!r} of modality {key!r} is not a cell of {RNA_MODALITY!r} "
            f"({int((index < 0).sum())} such cells): every cell with {what} needs its RNA"
        )
    rna_to_side = np.full(len(rna_names), -1, dtype=np.int64)
    rna_to_side[index] = np.arange(len(cells))
    x = group["X"]
    source = ad.io.sparse_dataset(x) if isinstance(x, h5py.Group) else x
    if source.shape != (len(cells), len(names)):
        raise AtlasInputError(
            f"{path}: modality {key!r} has X of shape {tuple(source.shape)} but obs/var give {(len(cells), len(names))}"
        )
    return SideModality(names, _MatchedRows(source, rna_to_side), rna_to_side >= 0)


class _UnionObs:
    """The requested obs columns of the RNA cells, then those of the ATAC cells without RNA (a DataFrame)."""

    def __init__(self, rna: _H5adObs, extra: pd.DataFrame):
        self._rna, self._extra, self._n_rna = rna, extra, len(rna)

    def __len__(self) -> int:
        return self._n_rna + len(self._extra)

    def rows(self, start: int, stop: int) -> pd.DataFrame:
        parts = [self._rna.rows(start, min(stop, self._n_rna))] if start < self._n_rna else []
        if stop > self._n_rna:
            parts.append(self._extra.iloc[max(start - self._n_rna, 0) : stop - self._n_rna])
        if len(parts) == 1:
            return parts[0]
        return pd.concat([p.astype(object) if len(p.columns) else p for p in parts])


class _UnionRows:
    """RNA counts of the union of cells: the RNA modality's rows, then empty rows for the ATAC-only cells."""

    def __init__(self, x, n_extra: int):
        self._x, self._n = x, x.shape[0]
        self.shape = (self._n + n_extra, x.shape[1])

    def __getitem__(self, rows: slice) -> sp.csr_matrix:
        start, stop, _ = rows.indices(self.shape[0])
        head = sp.csr_matrix(self._x[start : min(stop, self._n)]) if start < self._n else None
        n_empty = stop - max(start, self._n)
        if n_empty <= 0:
            return head
        empty = sp.csr_matrix((n_empty, self.shape[1]), dtype=head.dtype if head is not None else np.float32)
        return empty if head is None else sp.vstack([head, empty], format="csr")


def _union_with_atac(path: Path, handle: h5py.File, key: str, obs_keys: list[str], obs: _H5adObs, x, cells: np.ndarray):
    """(obs, X, cell names) of the union of an `.h5mu`'s RNA cells and its ATAC modality's cells: the ATAC cells
    without RNA appended, their obs columns from the ATAC modality's obs, their RNA rows empty."""
    group = _h5mu_group(path, handle, "atac", key)
    atac_cells = _cell_names(group["obs"])
    extra = np.flatnonzero(pd.Index(cells).get_indexer(atac_cells) < 0)
    if not len(extra):
        return obs, x, cells
    columns = [k for k in group["obs"].keys() if k != group["obs"].attrs["_index"]]
    missing = [k for k in obs_keys if k not in columns]
    if missing:
        raise AtlasInputError(
            f"{path}: modality {key!r} has {len(extra)} cells without RNA, and its obs has no column {missing[0]!r} "
            f"for them (asked for {missing}); its obs columns are {columns}"
        )
    frame = _H5adObs(group["obs"], obs_keys).rows(0, len(atac_cells)).iloc[extra]
    return _UnionObs(obs, frame), _UnionRows(x, len(extra)), np.concatenate([cells, atac_cells[extra]])


def _open_h5ad(
    path: Path,
    obs_keys: list[str],
    layer: str | None,
    gene_id_key: str | None,
    side_keys: dict[str, str],
    modality: str | None = None,
    spatial_key: str | None = None,
) -> InputFile:
    """An `.h5ad`, or with `modality` the RNA modality of an `.h5mu` (the same AnnData layout under mod/NAME)."""
    what = ".h5mu" if modality else ".h5ad"
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise AtlasInputError(f"{path}: not a readable {what} file (truncated or corrupt?): {err}") from err
    try:
        if modality is not None and modality not in handle.get("mod", {}):
            mods = list(handle["mod"].keys()) if "mod" in handle else []
            raise AtlasInputError(f"{path}: no modality {modality!r} (read as RNA counts); modalities are {mods}")
        root = handle if modality is None else handle["mod"][modality]
        var = ad.io.read_elem(root["var"])
        obs_group = root["obs"]
        columns = [k for k in obs_group.keys() if k != obs_group.attrs["_index"]]
        _check_obs_keys(path, columns, obs_keys)
        obs = _H5adObs(obs_group, obs_keys)
        if layer is None:
            x_elem = root["X"]
        elif "layers" in root and layer in root["layers"]:
            x_elem = root["layers"][layer]
        else:
            available = list(root["layers"].keys()) if "layers" in root else []
            raise AtlasInputError(f"{path}: no layer {layer!r}; layers are {available}")
        # indptr read per slice, not cached whole: 8 bytes per cell of the input in every worker otherwise
        x = ad.io.sparse_dataset(x_elem, should_cache_indptr=False) if isinstance(x_elem, h5py.Group) else x_elem
        if modality is None:
            sides = {name: _h5ad_side(path, root, name, key, len(obs)) for name, key in side_keys.items()}
        else:
            cells = _cell_names(obs_group)
            n_rna = len(cells)
            if "atac" in side_keys:
                obs, x, cells = _union_with_atac(path, handle, side_keys["atac"], obs_keys, obs, x, cells)
            sides = {name: _h5mu_side(path, handle, name, key, cells, n_rna) for name, key in side_keys.items()}
        if spatial_key is not None and (spatial := _h5ad_spatial(path, root, spatial_key, len(obs))) is not None:
            sides["spatial"] = spatial
    except AtlasInputError:
        handle.close()
        raise
    except (OSError, KeyError, RuntimeError) as err:
        handle.close()
        raise AtlasInputError(f"{path}: not a readable {what} file (truncated or corrupt?): {err}") from err
    if gene_id_key is None:
        gene_ids = np.asarray(var.index, dtype=str)
    elif gene_id_key in var.columns:
        gene_ids = np.asarray(var[gene_id_key], dtype=str)
    else:
        handle.close()
        raise AtlasInputError(f"{path}: var has no column {gene_id_key!r}; var columns are {list(var.columns)}")
    if x.shape != (len(obs), len(gene_ids)):
        handle.close()
        raise AtlasInputError(f"{path}: X has shape {x.shape} but obs/var give {(len(obs), len(gene_ids))}")
    kind: InputKind = "h5ad" if modality is None else "h5mu"
    return InputFile(path, kind, gene_ids, np.asarray(var.index, dtype=str), obs, handle, x, sides)


TENX_FEATURE_TYPES = {"protein": "Antibody Capture", "atac": "Peaks"}


def _open_10x(path: Path, kind: InputKind, obs_keys: list[str], side_names: list[str]) -> InputFile:
    import scanpy as sc

    try:
        if kind == "10x_mtx":
            adata = sc.read_10x_mtx(path, var_names="gene_ids")
        else:
            adata = sc.read_10x_h5(path, gex_only=not side_names)
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise AtlasInputError(f"{path}: not a readable 10x input (truncated or corrupt?): {err}") from err
    sides = {}
    if side_names:
        types = adata.var.get("feature_types", pd.Series("Gene Expression", index=adata.var_names)).astype(str)
        for name in side_names:
            chosen = (types == TENX_FEATURE_TYPES[name]).to_numpy()
            if not chosen.any():
                raise AtlasInputError(
                    f"{path}: no {TENX_FEATURE_TYPES[name]!r} features (the {SIDE_WHAT[name][0]}); feature types "
                    f"are {sorted(set(types))}"
                )
            sides[name] = SideModality(
                np.asarray(adata.var_names[chosen], dtype=str), sp.csr_matrix(adata.X[:, chosen])
            )
        adata = adata[:, (types == "Gene Expression").to_numpy()]
    if kind == "10x_mtx":
        gene_ids = np.asarray(adata.var_names, dtype=str)
        gene_names = np.asarray(adata.var.get("gene_symbols", adata.var_names), dtype=str)
    else:
        gene_ids = np.asarray(adata.var["gene_ids"], dtype=str)
        gene_names = np.asarray(adata.var_names, dtype=str)
    _check_obs_keys(path, list(adata.obs.columns), obs_keys)
    obs = adata.obs[obs_keys]
    obs.index = obs.index.astype(str)
    return InputFile(path, kind, gene_ids, gene_names, obs, None, sp.csr_matrix(adata.X), sides)


def open_input(
    path: Path,
    obs_keys: list[str],
    layer: str | None = None,
    gene_id_key: str | None = None,
    protein_key: str | None = None,
    atac_key: str | None = None,
    spatial_key: str | None = None,
) -> InputFile:
    """Open one input for a build; obs_keys must all be obs columns of it. protein_key / atac_key: read the protein
    (peak) counts too: an `.h5ad`'s obsm[key], an `.h5mu`'s modality key, a 10x `.h5`'s Antibody Capture (Peaks)
    features; 10x folders have neither. spatial_key: the `.h5ad`'s (`.h5mu` RNA modality's) obsm key of spatial
    coordinates, read as the side "spatial" where the input has it (10x inputs have none)."""
    if not path.exists():
        raise AtlasInputError(f"{path}: input does not exist")
    kind = detect_kind(path)
    side_keys = {name: key for name, key in (("protein", protein_key), ("atac", atac_key)) if key}
    if side_keys and kind == "10x_mtx":
        what = " or ".join(SIDE_WHAT[name][0] for name in side_keys)
        raise AtlasInputError(f"{path}: a 10x matrix folder holds no {what}; give the 10x .h5 file instead")
    if kind in ("h5ad", "h5mu"):
        modality = RNA_MODALITY if kind == "h5mu" else None
        opened = _open_h5ad(path, obs_keys, layer, gene_id_key, side_keys, modality, spatial_key)
    else:
        opened = _open_10x(path, kind, obs_keys, list(side_keys))
    duplicated = pd.Index(opened.gene_ids)[pd.Index(opened.gene_ids).duplicated()].unique()
    if len(duplicated):
        opened.close()
        raise AtlasInputError(
            f"{path}: duplicated gene ids {list(duplicated[:5])} ({len(duplicated)} in all); "
            "gene ids must be unique (use --gene-id-key to choose a unique id column)"
        )
    for name, side in opened.sides.items():
        repeated = pd.Index(side.names)[pd.Index(side.names).duplicated()].unique()
        if len(repeated):
            opened.close()
            what = "protein (antibody)" if name == "protein" else SIDE_WHAT[name][1]
            raise AtlasInputError(
                f"{path}: duplicated {what} names {list(repeated[:5])}; each {SIDE_WHAT[name][1]} needs its own name"
            )
    return opened
