"""Shared data preparation and scoring for the scVI fidelity comparison (issue 4).

Imported by `scvi_reference.py` (scvi-tools venv) and usable from the atlasvi venv, so both sides see
the same cells, the same genes, the same held-out cells and the same scib-metrics call. Needs numpy,
pandas, anndata and scanpy (+ scikit-misc for Seurat v3 HVG); scib-metrics only for `scib_scores`.

    # write the held-out file (numpy default_rng(seed), a fraction of the cells, one name a line)
    python benchmarks/fidelity_data.py heldout --h5ad ../shared/data/X.h5ad --filter-obs k=v \
        --out benchmarks/.cache/heldout_X.txt
    # scib-metrics Benchmarker totals of latents written by either side (run in the scvi venv)
    benchmarks/.cache/scvi-venv/bin/python benchmarks/fidelity_data.py scib --h5ad ... \
        --batch-key K --labels-key L --n-top-genes 2000 --cells DIR/cells.txt --latent DIR/latent_seed0.npy
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

KNN_NEIGHBOURS, KNN_FOLDS = 15, 5


def knn_accuracy(latent: np.ndarray, labels: np.ndarray, k: int = KNN_NEIGHBOURS, folds: int = KNN_FOLDS) -> float:
    """Mean accuracy of a k-nearest-neighbour label classifier on the latent, stratified `folds`-fold CV."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    return float(cross_val_score(KNeighborsClassifier(n_neighbors=k), latent, labels, cv=split).mean())


def seed_summary(rows: list[dict], tool: str, key: str) -> tuple[float, float, float, float]:
    """(mean, sd, min, max) of `key` over the rows (one a seed) of `tool`."""
    values = np.array([r[key] for r in rows if r["tool"] == tool])
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0, values.min(), values.max()


def paired_differences(rows: list[dict], key: str) -> dict:
    """atlasvi - scvi-tools of `key` per seed run by both tools (rows: one per tool and seed): the differences, their
    mean, sd, standard error and t = mean / se (0 when the differences do not vary), n."""
    by_seed = {(r["tool"], r["seed"]): r[key] for r in rows}
    seeds = sorted(s for t, s in by_seed if t == "atlasvi" and ("scvi-tools", s) in by_seed)
    diff = np.array([by_seed["atlasvi", s] - by_seed["scvi-tools", s] for s in seeds])
    sd = float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    se = sd / np.sqrt(len(diff)) if len(diff) else 0.0
    return {
        "seeds": seeds,
        "differences": diff.tolist(),
        "mean": float(diff.mean()) if len(diff) else 0.0,
        "sd": sd,
        "se": float(se),
        "t": float(diff.mean() / se) if se > 0 else 0.0,
        "n": len(diff),
    }


def save_init(state: dict, method: str, path: Path) -> Path:
    """An atlasvi module's state (its initial weights) under scvi-tools' names of `method` (scvi-tools' class name,
    `atlasvi.models.scvi_tools`), for `load_init` in the scvi-tools venv. Run in the atlasvi venv."""
    import torch

    from atlasvi.models.scvi_tools import to_scvi_tools_name

    torch.save({to_scvi_tools_name(method, k): v.detach().clone() for k, v in state.items()}, path)
    return path


def load_init(module, path: Path, unused: tuple[str, ...] = ()) -> None:
    """Copy the weights `save_init` wrote into a scvi-tools module (in place). SystemExit when a saved name is not
    the module's or has another shape, or when a module entry the file lacks does not start with one of `unused`
    (parts scvi-tools builds and never uses in the configuration, e.g. LDVAE's zero-inflation layer for NB)."""
    import torch

    saved = torch.load(path, weights_only=True)
    own = module.state_dict()
    foreign = [k for k, v in saved.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k not in saved and not k.startswith(unused)]
    if foreign or missing:
        raise SystemExit(f"{path}: names not in the scvi-tools module {foreign}; module entries not in it {missing}")
    with torch.no_grad():
        for k, v in saved.items():
            own[k].copy_(v)


def parse_filters(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--filter-obs expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def load_cells(h5ad: str | Path, filters: dict[str, str] | None = None):
    """Read the h5ad, keep cells whose obs[key] == value (as strings) for every filter, h5ad order."""
    import anndata as ad

    adata = ad.read_h5ad(h5ad)
    keep = np.ones(adata.n_obs, dtype=bool)
    for key, value in (filters or {}).items():
        if key not in adata.obs:
            raise SystemExit(f"{h5ad}: obs has no column {key!r} (filter {key}={value})")
        keep &= adata.obs[key].astype(str).to_numpy() == value
    if not keep.any():
        raise SystemExit(f"{h5ad}: no cell passes the filters {filters}")
    return adata[keep].copy() if not keep.all() else adata


def load_dataset(
    h5ad: str | Path, batch_key: str, filters: dict[str, str] | None = None, n_top_genes: int | None = 2000
):
    """Filtered cells x (Seurat v3 batch-aware HVG on raw counts, original gene order), counts in X.

    As atlasvi's store build: HVG over all kept cells (training and held-out); when n_top_genes >= the
    number of genes every gene is kept (scanpy's seurat_v3 would otherwise fail or rank needlessly).
    """
    import scanpy as sc

    adata = load_cells(h5ad, filters)
    if batch_key not in adata.obs:
        raise SystemExit(f"{h5ad}: obs has no batch key {batch_key!r}")
    if n_top_genes is not None and n_top_genes < adata.n_vars:
        sc.pp.highly_variable_genes(
            adata, flavor="seurat_v3", n_top_genes=n_top_genes, batch_key=batch_key, subset=True
        )
    return adata


def make_heldout(cell_names, fraction: float = 0.1, seed: int = 0) -> list[str]:
    """A seeded `fraction` of the cells (numpy default_rng(seed), without replacement), in h5ad order."""
    names = np.asarray(cell_names, dtype=object)
    n_held = int(round(fraction * len(names)))
    picked = np.random.default_rng(seed).choice(len(names), size=n_held, replace=False)
    return [str(x) for x in names[np.sort(picked)]]


def read_names(path: str | Path) -> list[str]:
    return [line.rstrip("\n") for line in Path(path).read_text().splitlines() if line.strip()]


def pre_integration_pca(adata, n_comps: int = 50, seed: int = 0) -> np.ndarray:
    """The 'unintegrated' embedding for scib's PCR comparison: PCA of log1p(normalize_total 1e4) counts."""
    import scanpy as sc

    tmp = adata.copy()
    tmp.X = tmp.X.astype(np.float32)
    sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    n_comps = min(n_comps, tmp.n_vars - 1, tmp.n_obs - 1)
    sc.tl.pca(tmp, n_comps=n_comps, svd_solver="arpack", random_state=seed)
    return np.asarray(tmp.obsm["X_pca"])


def scib_scores(
    adata, latents: dict[str, np.ndarray], batch_key: str, labels_key: str, n_jobs: int = 2
) -> dict[str, dict[str, float]]:
    """scib-metrics Benchmarker with its default metric sets, unscaled (min_max_scale=False), so each
    embedding's score does not depend on which other embeddings are scored with it.
    Returns {name: {"total", "batch_correction", "bio_conservation", <each metric>}}."""
    from scib_metrics.benchmark import Benchmarker

    bdata = adata.copy()
    bdata.obsm["X_pca"] = pre_integration_pca(adata)
    for name, z in latents.items():
        z = np.asarray(z, dtype=np.float32)
        if z.shape[0] != bdata.n_obs:
            raise SystemExit(f"latent {name}: {z.shape[0]} rows for {bdata.n_obs} cells")
        bdata.obsm[name] = z
    bm = Benchmarker(
        bdata,
        batch_key=batch_key,
        label_key=labels_key,
        embedding_obsm_keys=list(latents),
        pre_integrated_embedding_obsm_key="X_pca",
        n_jobs=n_jobs,
        progress_bar=False,
    )
    bm.benchmark()
    df = bm.get_results(min_max_scale=False)
    df = df.drop(index="Metric Type", errors="ignore")
    out = {}
    for name in latents:
        row = df.loc[name]
        scores = {str(k): float(v) for k, v in row.items()}
        out[name] = {
            "total": scores.pop("Total"),
            "batch_correction": scores.pop("Batch correction"),
            "bio_conservation": scores.pop("Bio conservation"),
            "metrics": scores,
        }
    return out


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("heldout", help="write a seeded held-out cell list")
    h.add_argument("--h5ad", required=True)
    h.add_argument("--filter-obs", action="append")
    h.add_argument("--fraction", type=float, default=0.1)
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--out", required=True)
    s = sub.add_parser("scib", help="scib-metrics totals of latents (rows = --cells order)")
    s.add_argument("--h5ad", required=True)
    s.add_argument("--batch-key", required=True)
    s.add_argument("--labels-key", required=True)
    s.add_argument("--filter-obs", action="append")
    s.add_argument("--n-top-genes", type=int, default=2000)
    s.add_argument("--cells", required=True, help="cell names of the latent rows, one a line")
    s.add_argument("--latent", action="append", required=True, help="NAME=PATH.npy or PATH.npy")
    args = p.parse_args(argv)

    if args.cmd == "heldout":
        adata = load_cells(args.h5ad, parse_filters(args.filter_obs))
        names = make_heldout(adata.obs_names, args.fraction, args.seed)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(names) + "\n")
        print(f"{args.out}: {len(names)} of {adata.n_obs} cells held out", file=sys.stderr)
        return 0

    adata = load_dataset(args.h5ad, args.batch_key, parse_filters(args.filter_obs), args.n_top_genes)
    cells = read_names(args.cells)
    missing = set(cells) - set(adata.obs_names)
    if missing:
        raise SystemExit(f"{len(missing)} cells of {args.cells} are not in the filtered data")
    # score in the h5ad's cell order whatever order the latent rows come in: KMeans (NMI / ARI) depends on the
    # row order, so two tools' latents are only comparable scored in the same order
    order = np.argsort(adata.obs_names.get_indexer(cells))
    adata = adata[np.asarray(cells)[order]].copy()
    latents = {}
    for item in args.latent:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem, item
        latents[name] = np.load(path)[order]
    print(json.dumps(scib_scores(adata, latents, args.batch_key, args.labels_key), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
