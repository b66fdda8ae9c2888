"""Readers for build inputs: `.h5ad`, `.h5mu`, 10x matrix folders and 10x `.h5` files.

Each input is opened once for its metadata (cells, genes, requested obs columns) and then read in
chunks of rows, so that a build never holds more than one chunk of counts in memory. `.h5ad` files
are read through anndata's backed sparse datasets; 10x inputs through scanpy's readers (a 10x file
is loaded whole, one input at a time: the MatrixMarket text format cannot be read by rows).

Surface-protein counts (CITE-seq), asked for with a protein key: an `.h5ad`'s `obsm[key]` (a DataFrame
whose columns are the antibodies, as scvi-tools' totalVI reads it, or an array with the names in
`uns[key + "_names"]` or `uns["protein_names"]`), read by rows like X; a 10x `.h5`'s "Antibody Capture"
features (its "Gene Expression" features are X); an `.h5mu`'s modality named by the protein key (e.g. "prot"),
whose cells are matched to the RNA modality's ("rna") by name: an RNA cell without protein counts is stored
as not measured, a protein cell without RNA is refused.
"""

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
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
    protein_names: np.ndarray | None = None  # (n_proteins,) str, when proteins were asked for
    _protein: object = None  # rows [start:stop] -> counts
    _protein_present: np.ndarray | None = None  # (n_cells,) bool, where not every cell has protein counts

    @property
    def n_cells(self) -> int:
        return len(self.obs)

    def obs_rows(self, start: int, stop: int) -> pd.DataFrame:
        """(stop - start, k) requested obs columns of cells [start, stop), index = cell names."""
        return self.obs.iloc[start:stop] if isinstance(self.obs, pd.DataFrame) else self.obs.rows(start, stop)

    def iter_chunks(self, chunk_size: int) -> Iterator[tuple[int, sp.csr_matrix, pd.DataFrame]]:
        """Yield (first row, counts, obs) for chunks of at most chunk_size cells.

        counts: canonical CSR (rows, n_genes): indices sorted and in range, duplicates summed, no stored zeros.
        """
        for start in range(0, self.n_cells, chunk_size):
            stop = min(start + chunk_size, self.n_cells)
            try:
                block = sp.csr_matrix(self._x[start:stop])
                block.check_format(full_check=True)
                obs = self.obs_rows(start, stop)
            except (OSError, RuntimeError, KeyError, ValueError) as err:
                raise AtlasInputError(
                    f"{self.path}: cannot read cells {start}..{stop} (truncated or corrupt?): {err}"
                ) from err
            block.sum_duplicates()
            block.eliminate_zeros()
            yield start, block, obs

    def protein_rows(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, n_proteins) float64 protein counts of cells [start, stop) (as stored: not validated)."""
        try:
            return _dense_rows(self._protein, start, stop)
        except (OSError, RuntimeError, KeyError, ValueError) as err:
            raise AtlasInputError(
                f"{self.path}: cannot read the protein counts of cells {start}..{stop} (truncated or corrupt?): {err}"
            ) from err

    def protein_present(self, start: int, stop: int) -> np.ndarray:
        """(stop - start,) bool: which of cells [start, stop) have protein counts at all."""
        if self._protein_present is None:
            return np.ones(stop - start, dtype=bool)
        return self._protein_present[start:stop]

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


def _dense_rows(source, start: int, stop: int) -> np.ndarray:
    block = source[start:stop]
    return np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)


def _h5ad_proteins(path: Path, handle: h5py.File, key: str, n_cells: int) -> tuple[np.ndarray, object]:
    """(names, row reader) of the protein counts obsm[key] of an `.h5ad`."""
    obsm = handle["obsm"] if "obsm" in handle else {}
    if key not in obsm:
        raise AtlasInputError(f"{path}: obsm has no {key!r} (the protein counts); obsm keys are {list(obsm.keys())}")
    elem = obsm[key]
    encoding = elem.attrs.get("encoding-type", "array")
    if encoding == "dataframe":
        frame = _ColumnFrame(elem)
        names, reader = np.asarray(frame.columns, dtype=str), frame
    else:
        reader = ad.io.sparse_dataset(elem) if encoding in ("csr_matrix", "csc_matrix") else elem
        uns = handle["uns"] if "uns" in handle else {}
        found = [k for k in (f"{key}_names", "protein_names") if k in uns]
        if not found:
            raise AtlasInputError(
                f"{path}: obsm[{key!r}] is an array without protein names: put them in uns[{key + '_names'!r}] or "
                "uns['protein_names'], or store the proteins as a DataFrame"
            )
        names = np.asarray(ad.io.read_elem(uns[found[0]]), dtype=str)
    if len(reader.shape) != 2 or reader.shape[0] != n_cells or reader.shape[1] != len(names):
        raise AtlasInputError(
            f"{path}: obsm[{key!r}] has shape {tuple(reader.shape)}, expected ({n_cells} cells, {len(names)} proteins)"
        )
    return names, reader


class _MatchedRows:
    """Rows of another modality's matrix in the order of the RNA cells: row i is `source` row `index[i]`, zeros
    where index[i] is -1 (an RNA cell the modality did not measure)."""

    def __init__(self, source, index: np.ndarray):
        self._source, self._index = source, index
        self.shape = (len(index), source.shape[1])

    def __getitem__(self, rows: slice) -> np.ndarray:
        index = self._index[rows]
        out = np.zeros((len(index), self.shape[1]), dtype=np.float64)
        present = index >= 0
        if present.any():
            wanted, inverse = np.unique(index[present], return_inverse=True)
            block = self._source[wanted]
            block = block.toarray() if sp.issparse(block) else np.asarray(block)
            out[present] = block[inverse]
        return out


def _cell_names(group: h5py.Group) -> np.ndarray:
    index = group[group.attrs["_index"]]
    return np.asarray(index.asstr()[:] if index.dtype.kind in "OS" else index[:], dtype=str)


def _h5mu_proteins(path: Path, handle: h5py.File, key: str, rna_names: np.ndarray):
    """(names, row reader in RNA order, (n_rna,) present) of the .h5mu modality `key`."""
    mods = list(handle["mod"].keys())
    if key not in mods:
        raise AtlasInputError(f"{path}: no modality {key!r} (the protein counts); modalities are {mods}")
    group = handle["mod"][key]
    names = np.asarray(ad.io.read_elem(group["var"]).index, dtype=str)
    cells = _cell_names(group["obs"])
    index = pd.Index(rna_names).get_indexer(cells)
    if (index < 0).any():
        cell = str(cells[int(np.flatnonzero(index < 0)[0])])
        raise AtlasInputError(
            f"{path}: cell {cell!r} of modality {key!r} is not a cell of {RNA_MODALITY!r} "
            f"({int((index < 0).sum())} such cells): every cell with protein counts needs its RNA"
        )
    rna_to_protein = np.full(len(rna_names), -1, dtype=np.int64)
    rna_to_protein[index] = np.arange(len(cells))
    x = group["X"]
    source = ad.io.sparse_dataset(x) if isinstance(x, h5py.Group) else x
    if source.shape != (len(cells), len(names)):
        raise AtlasInputError(
            f"{path}: modality {key!r} has X of shape {tuple(source.shape)} but obs/var give {(len(cells), len(names))}"
        )
    return names, _MatchedRows(source, rna_to_protein), rna_to_protein >= 0


def _open_h5ad(
    path: Path,
    obs_keys: list[str],
    layer: str | None,
    gene_id_key: str | None,
    protein_key: str | None,
    modality: str | None = None,
) -> InputFile:
    """An `.h5ad`, or with `modality` the RNA modality of an `.h5mu` (the same AnnData layout under mod/NAME)."""
    what = ".h5mu" if modality else ".h5ad"
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise AtlasInputError(f"{path}: not a readable {what} file (truncated or corrupt?): {err}") from err
    present = None
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
        x = ad.io.sparse_dataset(x_elem) if isinstance(x_elem, h5py.Group) else x_elem
        if not protein_key:
            proteins = (None, None)
        elif modality is None:
            proteins = _h5ad_proteins(path, root, protein_key, len(obs))
        else:
            *proteins, present = _h5mu_proteins(path, handle, protein_key, _cell_names(obs_group))
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
    return InputFile(path, kind, gene_ids, np.asarray(var.index, dtype=str), obs, handle, x, *proteins, present)


def _open_10x(path: Path, kind: InputKind, obs_keys: list[str], proteins: bool) -> InputFile:
    import scanpy as sc

    try:
        if kind == "10x_mtx":
            adata = sc.read_10x_mtx(path, var_names="gene_ids")
        else:
            adata = sc.read_10x_h5(path, gex_only=not proteins)
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise AtlasInputError(f"{path}: not a readable 10x input (truncated or corrupt?): {err}") from err
    protein_names, protein = None, None
    if proteins:
        types = adata.var.get("feature_types", pd.Series("Gene Expression", index=adata.var_names)).astype(str)
        antibody = (types == "Antibody Capture").to_numpy()
        if not antibody.any():
            raise AtlasInputError(
                f"{path}: no 'Antibody Capture' features (the protein counts); feature types are {sorted(set(types))}"
            )
        protein_names = np.asarray(adata.var_names[antibody], dtype=str)
        protein = sp.csr_matrix(adata.X[:, antibody])
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
    return InputFile(path, kind, gene_ids, gene_names, obs, None, sp.csr_matrix(adata.X), protein_names, protein)


def open_input(
    path: Path,
    obs_keys: list[str],
    layer: str | None = None,
    gene_id_key: str | None = None,
    protein_key: str | None = None,
) -> InputFile:
    """Open one input for a build; obs_keys must all be obs columns of it. protein_key: read the protein counts
    too (an `.h5ad`'s obsm[protein_key]; a 10x `.h5`'s Antibody Capture features; 10x folders have none)."""
    if not path.exists():
        raise AtlasInputError(f"{path}: input does not exist")
    kind = detect_kind(path)
    if protein_key and kind == "10x_mtx":
        raise AtlasInputError(f"{path}: a 10x matrix folder holds no protein counts; give the 10x .h5 file instead")
    if kind in ("h5ad", "h5mu"):
        modality = RNA_MODALITY if kind == "h5mu" else None
        opened = _open_h5ad(path, obs_keys, layer, gene_id_key, protein_key, modality)
    else:
        opened = _open_10x(path, kind, obs_keys, protein_key is not None)
    duplicated = pd.Index(opened.gene_ids)[pd.Index(opened.gene_ids).duplicated()].unique()
    if len(duplicated):
        opened.close()
        raise AtlasInputError(
            f"{path}: duplicated gene ids {list(duplicated[:5])} ({len(duplicated)} in all); "
            "gene ids must be unique (use --gene-id-key to choose a unique id column)"
        )
    if opened.protein_names is not None:
        repeated = pd.Index(opened.protein_names)[pd.Index(opened.protein_names).duplicated()].unique()
        if len(repeated):
            opened.close()
            raise AtlasInputError(
                f"{path}: duplicated protein (antibody) names {list(repeated[:5])}; each protein needs its own name"
            )
    return opened
