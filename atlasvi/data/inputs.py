"""Readers for build inputs: `.h5ad`, 10x matrix folders and 10x `.h5` files.

Each input is opened once for its metadata (cells, genes, requested obs columns) and then read in
chunks of rows, so that a build never holds more than one chunk of counts in memory. `.h5ad` files
are read through anndata's backed sparse datasets; 10x inputs through scanpy's readers (a 10x file
is loaded whole, one input at a time: the MatrixMarket text format cannot be read by rows).
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

InputKind = Literal["h5ad", "10x_mtx", "10x_h5"]


def detect_kind(path: Path) -> InputKind:
    """Tell an input's format from its path (folder = 10x matrix folder)."""
    if path.is_dir():
        return "10x_mtx"
    if path.suffix == ".h5ad":
        return "h5ad"
    if path.suffix == ".h5":
        return "10x_h5"
    raise AtlasInputError(f"{path}: unknown input format (expected .h5ad, a 10x .h5 or a 10x matrix folder)")


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


def _open_h5ad(path: Path, obs_keys: list[str], layer: str | None, gene_id_key: str | None) -> InputFile:
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise AtlasInputError(f"{path}: not a readable .h5ad file (truncated or corrupt?): {err}") from err
    try:
        var = ad.io.read_elem(handle["var"])
        obs_group = handle["obs"]
        columns = [k for k in obs_group.keys() if k != obs_group.attrs["_index"]]
        _check_obs_keys(path, columns, obs_keys)
        obs = _H5adObs(obs_group, obs_keys)
        if layer is None:
            x_elem = handle["X"]
        elif "layers" in handle and layer in handle["layers"]:
            x_elem = handle["layers"][layer]
        else:
            available = list(handle["layers"].keys()) if "layers" in handle else []
            raise AtlasInputError(f"{path}: no layer {layer!r}; layers are {available}")
        x = ad.io.sparse_dataset(x_elem) if isinstance(x_elem, h5py.Group) else x_elem
    except AtlasInputError:
        handle.close()
        raise
    except (OSError, KeyError, RuntimeError) as err:
        handle.close()
        raise AtlasInputError(f"{path}: not a readable .h5ad file (truncated or corrupt?): {err}") from err
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
    return InputFile(path, "h5ad", gene_ids, np.asarray(var.index, dtype=str), obs, handle, x)


def _open_10x(path: Path, kind: InputKind, obs_keys: list[str]) -> InputFile:
    import scanpy as sc

    try:
        adata = sc.read_10x_mtx(path, var_names="gene_ids") if kind == "10x_mtx" else sc.read_10x_h5(path)
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise AtlasInputError(f"{path}: not a readable 10x input (truncated or corrupt?): {err}") from err
    if kind == "10x_mtx":
        gene_ids = np.asarray(adata.var_names, dtype=str)
        gene_names = np.asarray(adata.var.get("gene_symbols", adata.var_names), dtype=str)
    else:
        gene_ids = np.asarray(adata.var["gene_ids"], dtype=str)
        gene_names = np.asarray(adata.var_names, dtype=str)
    _check_obs_keys(path, list(adata.obs.columns), obs_keys)
    obs = adata.obs[obs_keys]
    obs.index = obs.index.astype(str)
    return InputFile(path, kind, gene_ids, gene_names, obs, None, sp.csr_matrix(adata.X))


def open_input(path: Path, obs_keys: list[str], layer: str | None = None, gene_id_key: str | None = None) -> InputFile:
    """Open one input for a build; obs_keys must all be obs columns of it."""
    if not path.exists():
        raise AtlasInputError(f"{path}: input does not exist")
    kind = detect_kind(path)
    opened = _open_h5ad(path, obs_keys, layer, gene_id_key) if kind == "h5ad" else _open_10x(path, kind, obs_keys)
    duplicated = pd.Index(opened.gene_ids)[pd.Index(opened.gene_ids).duplicated()].unique()
    if len(duplicated):
        opened.close()
        raise AtlasInputError(
            f"{path}: duplicated gene ids {list(duplicated[:5])} ({len(duplicated)} in all); "
            "gene ids must be unique (use --gene-id-key to choose a unique id column)"
        )
    return opened
