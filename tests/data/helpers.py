"""Writers of the 10x input formats, and a reference / query split of Kang, for tests that build from them."""

import gzip
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
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


def write_10x_h5(
    adata: ad.AnnData,
    path: Path,
    gene_id_key: str | None,
    proteins: pd.DataFrame | None = None,
    feature_type: str = "Antibody Capture",
) -> Path:
    """A Cell Ranger v3 filtered_feature_bc_matrix.h5 (CSC genes x cells = CSR cells x genes); with `proteins`
    (cells x features) those follow the genes as `feature_type` features (antibodies, or "Peaks" of a multiome).
    gene_id_key None: the var names are the ids."""
    counts = sp.csr_matrix(adata.X)
    names = list(adata.var_names.astype(str))
    ids = list(adata.var[gene_id_key].astype(str)) if gene_id_key else names
    types = ["Gene Expression"] * adata.n_vars
    if proteins is not None:
        counts = sp.hstack([counts, sp.csr_matrix(proteins.to_numpy())], format="csr")
        ids, names = ids + list(proteins.columns), names + list(proteins.columns)
        types += [feature_type] * proteins.shape[1]
    with h5py.File(path, "w") as handle:
        matrix = handle.create_group("matrix")
        matrix["barcodes"] = np.array(adata.obs_names, dtype="S")
        matrix["data"] = counts.data.astype(np.int32)
        matrix["indices"] = counts.indices.astype(np.int64)
        matrix["indptr"] = counts.indptr.astype(np.int64)
        matrix["shape"] = np.array([counts.shape[1], adata.n_obs], dtype=np.int32)
        features = matrix.create_group("features")
        features["id"] = np.array(ids, dtype="S")
        features["name"] = np.array(names, dtype="S")
        features["feature_type"] = np.array(types, dtype="S")
        features["genome"] = np.array(["GRCh38"] * len(ids), dtype="S")
    return path


def build_ctrl_stim_stores(kang: ad.AnnData, n_genes: int, folder: Path) -> tuple[Path, Path]:
    """Kang's `n_genes` most expressed genes as two stores: ctrl samples with cell-type labels (a reference) and
    stim samples with no labels key (a query study whose batches are new)."""
    from atlasvi.data import BuildConfig, build_store

    genes = kang.var_names[np.argsort(-np.asarray(kang.X.sum(axis=0)).ravel())[:n_genes]]
    reference = kang[kang.obs["condition"] == "ctrl", genes].copy()
    query = kang[kang.obs["condition"] == "stim", genes].copy()
    query.obs = query.obs[["sample"]]
    paths = []
    for name, adata, labels in (("reference", reference, "cell_type"), ("query", query, None)):
        adata.write_h5ad(folder / f"{name}.h5ad")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = BuildConfig(
                inputs=[str(folder / f"{name}.h5ad")], output=str(folder / f"{name}.zarr"), batch_key="sample",
                labels_key=labels,
            )  # fmt: skip
            paths.append(build_store(config))
    return paths[0], paths[1]
