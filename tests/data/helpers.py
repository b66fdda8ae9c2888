"""Writers of the 10x input formats, for tests that build from them."""

import gzip
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import scipy.io
import scipy.sparse as sp


def write_10x_mtx(adata: ad.AnnData, folder: Path, gene_id_key: str) -> Path:
    """A Cell Ranger v3 matrix folder (matrix.mtx.gz genes x cells, features.tsv.gz, barcodes.tsv.gz)."""
    folder.mkdir(parents=True)
    with gzip.open(folder / "matrix.mtx.gz", "wb") as handle:
        scipy.io.mmwrite(handle, sp.csr_matrix(adata.X).T.tocoo())
    ids, names = adata.var[gene_id_key].astype(str), adata.var_names.astype(str)
    with gzip.open(folder / "features.tsv.gz", "wt") as handle:
        handle.writelines(f"{i}\t{n}\tGene Expression\n" for i, n in zip(ids, names, strict=True))
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as handle:
        handle.writelines(f"{b}\n" for b in adata.obs_names)
    return folder


def write_10x_h5(adata: ad.AnnData, path: Path, gene_id_key: str) -> Path:
    """A Cell Ranger v3 filtered_feature_bc_matrix.h5 (CSC genes x cells = CSR cells x genes)."""
    counts = sp.csr_matrix(adata.X)
    with h5py.File(path, "w") as handle:
        matrix = handle.create_group("matrix")
        matrix["barcodes"] = np.array(adata.obs_names, dtype="S")
        matrix["data"] = counts.data.astype(np.int32)
        matrix["indices"] = counts.indices.astype(np.int64)
        matrix["indptr"] = counts.indptr.astype(np.int64)
        matrix["shape"] = np.array([adata.n_vars, adata.n_obs], dtype=np.int32)
        features = matrix.create_group("features")
        features["id"] = np.array(adata.var[gene_id_key].astype(str), dtype="S")
        features["name"] = np.array(adata.var_names.astype(str), dtype="S")
        features["feature_type"] = np.array(["Gene Expression"] * adata.n_vars, dtype="S")
        features["genome"] = np.array(["GRCh38"] * adata.n_vars, dtype="S")
    return path
