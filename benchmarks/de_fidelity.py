"""Bayesian DE fidelity: atlasvi vs scvi-tools 1.4.2 on data with a known answer (issue 8).

    .venv/bin/python benchmarks/de_fidelity.py --seeds 0 1 2          # both tools, both datasets (~25 min, 2 cores)
    .venv/bin/python benchmarks/de_fidelity.py --dataset kang --seeds 0 --max-epochs 50   # a quick look

The scvi-tools side is this same file run with `--side scvi` in the scvi venv (benchmarks/.cache/scvi-venv,
`bash benchmarks/setup_scvi_venv.sh`) as a subprocess. Both sides see the same cells and genes (one input
h5ad written here), train scVI with the same architecture (scvi-tools' defaults: n_latent 10, n_hidden 128,
1 layer, ZINB, gene dispersion), on the same training cells (the store's first 90% of rows, i.e. atlasvi's
training split; scvi-tools with train_size=1.0 on exactly those cells), for the same epochs, KL warm-up and
batch size, then run DE on all cells with the defaults both share (change mode, delta 0.25,
n_samples_overall 5000, batch_correction False, pseudocounts estimated, FDR target 0.05).

Datasets
- rnamix: `cellbench_rnamix_2tech.h5ad` (CellBench RNA mixtures of H2228 / H1975 / HCC827, CEL-seq2 +
  SORT-seq, batch = protocol), genes = top 3000 Seurat v3 HVGs over the batches + all 26 ERCC spike-ins.
  Truth: a mixture with proportions p has expected expression sum_k p_k mu_k, mu_k the mean library-
  normalised expression (counts / total counts of the kept genes) of the pure group of cell line k, so the
  expected LFC of mixture A vs mixture B is log2(sum_k pA_k mu_k / sum_k pB_k mu_k). Only mixtures are
  compared (the truth comes from the pure groups, not from the tested cells). Metrics: Pearson / Spearman of
  lfc_mean with the expected LFC over endogenous genes expressed in both mixtures' expectation (>= 1e-5,
  10 per million), and the fraction of ERCC spike-ins called DE at FDR 0.05.
- kang: `kang2018_pbmc_ifnb_muscat.h5ad` (batch = sample), groups = cell type x condition; per cell type
  stim vs ctrl; the ranks of ISG15, IFI6, IFIT1, IFIT3, MX1 by proba_de (tied genes share the best rank,
  1 + the number of genes with a strictly larger proba_de) and by lfc_mean (descending).

Writes benchmarks/results/de_fidelity.{json,md}; per-run DE tables stay in benchmarks/.cache/de_fidelity/.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
CACHE = HERE / ".cache" / "de_fidelity"
SCVI_PYTHON = HERE / ".cache" / "scvi-venv" / "bin" / "python"
ISGS = ["ISG15", "IFI6", "IFIT1", "IFIT3", "MX1"]
MIXTURES = [
    ("0.68_0.16_0.16", "0.16_0.68_0.16"),
    ("0.68_0.16_0.16", "0.16_0.16_0.68"),
    ("0.16_0.68_0.16", "0.16_0.16_0.68"),
    ("0.68_0.16_0.16", "0.33_0.33_0.33"),
    ("0.16_0.16_0.68", "0.33_0.33_0.33"),
]
PURE = {"H2228": "1.0_0.0_0.0", "H1975": "0.0_1.0_0.0", "HCC827": "0.0_0.0_1.0"}  # mix_label = H2228_H1975_HCC827
DATASETS = {"rnamix": ("batch", "mix_label"), "kang": ("sample", "group")}


def log(message: str) -> None:
    print(f"[de_fidelity] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- inputs
def prepare(name: str) -> tuple[Path, Path, list[tuple[str, str]]]:
    """(input h5ad, atlas store, comparisons) of a dataset; cached in .cache/de_fidelity/<name>/."""
    import warnings

    from atlasvi.data import BuildConfig, build_store

    folder = CACHE / name
    folder.mkdir(parents=True, exist_ok=True)
    h5ad, store = folder / "input.h5ad", folder / "store.zarr"
    if name == "rnamix":
        comparisons = MIXTURES
        if not h5ad.exists():
            import scanpy as sc

            adata = ad.read_h5ad(SHARED / "cellbench_rnamix_2tech.h5ad")
            hvg = sc.pp.highly_variable_genes(
                adata, flavor="seurat_v3", n_top_genes=3000, batch_key="batch", inplace=False
            )
            keep = hvg["highly_variable"].to_numpy() | adata.var["is_ercc"].to_numpy()
            adata = adata[:, keep].copy()
            adata.obs = adata.obs[["batch", "mix_label", "mRNA_amount"]].astype({"mix_label": str})
            adata.write_h5ad(h5ad)
    else:
        comparisons = [
            (f"{c}_stim", f"{c}_ctrl")
            for c in sorted(ad.read_h5ad(SHARED / "kang2018_pbmc_ifnb_muscat.h5ad").obs["cell_type"].unique())
        ]
        if not h5ad.exists():
            adata = ad.read_h5ad(SHARED / "kang2018_pbmc_ifnb_muscat.h5ad")
            adata.obs["group"] = adata.obs["cell_type"].astype(str) + "_" + adata.obs["condition"].astype(str)
            adata.obs = adata.obs[["sample", "group", "cell_type", "condition"]]
            adata.write_h5ad(h5ad)
    batch_key, labels_key = DATASETS[name]
    if not store.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_store(BuildConfig(inputs=[str(h5ad)], output=str(store), batch_key=batch_key, labels_key=labels_key))
    return h5ad, store, comparisons


def train_cells(store: Path) -> list[str]:
    """The store's training cells (first 90% of rows, atlasvi's split), by name."""
    from atlasvi.data import split_rows
    from atlasvi.train import TrainConfig

    names = ad.read_zarr(store).obs_names
    (start, stop), _ = split_rows(len(names), TrainConfig().validation_fraction)
    return names[start:stop].tolist()


# --------------------------------------------------------------------------------------------- runs
def run_atlasvi(name: str, store: Path, comparisons, seed: int, args) -> pd.DataFrame:
    import torch

    from atlasvi.api import SCVI
    from atlasvi.train import TrainConfig

    torch.manual_seed(seed)
    model = SCVI(store, device="cpu")
    started = time.perf_counter()
    model.fit(TrainConfig(max_epochs=args.max_epochs, n_epochs_kl_warmup=args.n_epochs_kl_warmup, seed=seed))
    trained = time.perf_counter()
    frames = [
        model.differential_expression(DATASETS[name][1], group1=a, group2=b, seed=seed, batch_size=args.batch_size)
        for a, b in comparisons
    ]
    log(f"atlasvi {name} seed {seed}: fit {trained - started:.0f} s, DE {time.perf_counter() - trained:.0f} s")
    return pd.concat(frames)


def run_scvi(args) -> None:
    """The scvi-tools side (in the scvi venv): train on the given cells, DE of every comparison to CSV."""
    import logging

    import scvi
    import torch

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = args.seed
    batch_key, labels_key = DATASETS[args.dataset]
    adata = ad.read_h5ad(args.h5ad)
    adata.X = adata.X.astype(np.float32)
    train = adata[adata.obs_names.isin(Path(args.train_cells).read_text().split())].copy()
    scvi.model.SCVI.setup_anndata(train, batch_key=batch_key)
    model = scvi.model.SCVI(train)
    started = time.perf_counter()
    model.train(
        max_epochs=args.max_epochs, accelerator="cpu", devices=1, train_size=1.0, batch_size=128,
        early_stopping=False, enable_progress_bar=False,
        plan_kwargs={"n_epochs_kl_warmup": args.n_epochs_kl_warmup, "n_steps_kl_warmup": None},
    )  # fmt: skip
    trained = time.perf_counter()
    frames = []
    for a, b in json.loads(args.comparisons):
        frames.append(
            model.differential_expression(
                adata, groupby=labels_key, group1=a, group2=b, mode="change", delta=0.25, batch_correction=False,
                fdr_target=0.05, silent=True,
            )
        )  # fmt: skip
    seconds = f"fit {trained - started:.0f} s, DE {time.perf_counter() - trained:.0f} s"
    log(f"scvi-tools {scvi.__version__} {args.dataset} seed {args.seed}: {seconds}, {torch.get_num_threads()} threads")
    pd.concat(frames).to_csv(args.out, index_label="gene")


def de_table(tool: str, name: str, store: Path, h5ad: Path, comparisons, seed: int, args) -> pd.DataFrame:
    out = CACHE / name / f"{tool}_seed{seed}_e{args.max_epochs}.csv"
    if not out.exists() or args.rerun:
        if tool == "atlasvi":
            run_atlasvi(name, store, comparisons, seed, args).to_csv(out, index_label="gene")
        else:
            cells = CACHE / name / "train_cells.txt"
            cells.write_text("\n".join(train_cells(store)) + "\n")
            command = [
                str(SCVI_PYTHON), __file__, "--side", "scvi", "--dataset", name, "--h5ad", str(h5ad),
                "--train-cells", str(cells), "--seed", str(seed), "--max-epochs", str(args.max_epochs),
                "--n-epochs-kl-warmup", str(args.n_epochs_kl_warmup), "--comparisons", json.dumps(comparisons),
                "--out", str(out),
            ]  # fmt: skip
            env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
            subprocess.run(command, check=True, env=env)
    return pd.read_csv(out, index_col="gene")


# --------------------------------------------------------------------------------------------- metrics
def expected_lfc(h5ad: Path) -> tuple[pd.DataFrame, pd.Series, pd.DataFrame]:
    """(expected expression per mixture (genes x mixtures), is_ercc, mixture summary: cells, mRNA amount)."""
    adata = ad.read_h5ad(h5ad)
    counts = adata.X.toarray().astype(np.float64)
    normalized = counts / counts.sum(1, keepdims=True)
    label = adata.obs["mix_label"].astype(str).to_numpy()
    mu = {line: normalized[label == pure].mean(0) for line, pure in PURE.items()}
    mixtures = sorted({m for pair in MIXTURES for m in pair})
    expected = {}
    for mixture in mixtures:
        props = dict(zip(PURE, map(float, mixture.split("_")), strict=True))
        expected[mixture] = sum(props[line] * mu[line] for line in PURE)
    summary = pd.DataFrame(
        {
            "cells": adata.obs["mix_label"].astype(str).value_counts(),
            "mean_mRNA_pg": adata.obs.groupby("mix_label", observed=True)["mRNA_amount"].mean(),
        }
    )
    return pd.DataFrame(expected, index=adata.var_names), adata.var["is_ercc"], summary


def rnamix_metrics(table: pd.DataFrame, expected: pd.DataFrame, is_ercc: pd.Series) -> list[dict]:
    from scipy.stats import pearsonr, spearmanr

    rows = []
    for a, b in MIXTURES:
        part = table[table["comparison"] == f"{a} vs {b}"]
        endogenous = ~is_ercc.to_numpy()
        ea, eb = expected[a].to_numpy(), expected[b].to_numpy()
        genes = endogenous & (ea >= 1e-5) & (eb >= 1e-5)
        truth = pd.Series(np.log2(ea[genes] / eb[genes]), index=expected.index[genes])
        lfc = part["lfc_mean"].reindex(truth.index)
        ercc = part.loc[is_ercc[is_ercc].index]
        rows.append(
            {
                "comparison": f"{a} vs {b}",
                "n_genes": int(genes.sum()),
                "pearson": float(pearsonr(lfc, truth)[0]),
                "spearman": float(spearmanr(lfc, truth)[0]),
                "mae": float(np.abs(lfc - truth).mean()),
                "n_de_endogenous": int(part.loc[truth.index, "is_de_fdr_0.05"].sum()),
                "ercc_called_de": float(ercc["is_de_fdr_0.05"].mean()),
                "ercc_lfc_mean": float(ercc["lfc_mean"].mean()),
                # the spike-ins' observed LFC of library-normalised counts (their share of each cell's counts)
                "ercc_raw_lfc": float(np.log2(ercc["raw_normalized_mean1"] / ercc["raw_normalized_mean2"]).mean()),
            }
        )
    return rows


def kang_ranks(table: pd.DataFrame, comparisons) -> list[dict]:
    rows = []
    for a, b in comparisons:
        part = table[table["comparison"] == f"{a} vs {b}"]
        proba = part["proba_de"]
        by_lfc = part["lfc_mean"].rank(ascending=False, method="min")
        for gene in ISGS:
            rows.append(
                {
                    "cell_type": a.removesuffix("_stim"),
                    "gene": gene,
                    "rank_proba_de": int((proba > proba[gene]).sum()) + 1,
                    "rank_lfc": int(by_lfc[gene]),
                    "proba_de": float(proba[gene]),
                    "lfc_mean": float(part.loc[gene, "lfc_mean"]),
                    "is_de": bool(part.loc[gene, "is_de_fdr_0.05"]),
                    "n_genes_proba_1": int((proba >= 1.0).sum()),
                }
            )
    return rows


# --------------------------------------------------------------------------------------------- report
def report(results: dict, args) -> str:
    lines = [
        "# Bayesian DE fidelity: atlasvi vs scvi-tools 1.4.2",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), no GPU; torch 1 thread on both sides.",
        f"Seeds {args.seeds}; {args.max_epochs} epochs, KL warm-up {args.n_epochs_kl_warmup} epochs, batch 128; "
        "DE: change mode, delta 0.25, 5000 draws per group, observed batches, estimated pseudocounts, FDR 0.05.",
        f"Command: `.venv/bin/python benchmarks/de_fidelity.py --seeds {' '.join(map(str, args.seeds))} "
        f"--max-epochs {args.max_epochs} --n-epochs-kl-warmup {args.n_epochs_kl_warmup}`",
        "",
    ]
    if "rnamix" in results:
        frame = pd.DataFrame(results["rnamix"]["rows"])
        lines += [
            "## CellBench RNA mixtures (3000 HVGs + 26 ERCC): lfc_mean vs the expected LFC",
            "",
            "Mean (sd) over seeds; n_genes = endogenous genes with expected expression >= 1e-5 in both mixtures.",
            "",
            "| comparison | n_genes | tool | Pearson | Spearman | mean abs error | endogenous DE | ERCC called DE "
            "| ERCC mean LFC | ERCC observed LFC |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (comparison, tool), part in frame.groupby(["comparison", "tool"], sort=False):
            lines.append(
                f"| {comparison} | {part['n_genes'].iloc[0]} | {tool} | {_ms(part['pearson'])} "
                f"| {_ms(part['spearman'])} "
                f"| {_ms(part['mae'])} | {part['n_de_endogenous'].mean():.0f} | {_ms(part['ercc_called_de'], 2)} "
                f"| {_ms(part['ercc_lfc_mean'], 2)} | {part['ercc_raw_lfc'].mean():.2f} |"
            )
        overall = frame.groupby("tool", sort=False)[["pearson", "spearman", "ercc_called_de"]].mean()
        lines += [
            "",
            "Over all comparisons and seeds:",
            "",
            "| tool | Pearson | Spearman | ERCC called DE |",
            "|---|---|---|---|",
        ]
        for tool, row in overall.iterrows():
            lines.append(f"| {tool} | {row['pearson']:.4f} | {row['spearman']:.4f} | {row['ercc_called_de']:.3f} |")
        summary = pd.DataFrame(results["rnamix"]["mixtures"])
        lines += ["", "Mixture groups:", "", "| mix_label (H2228_H1975_HCC827) | cells | mean mRNA amount (pg) |"]
        lines += ["|---|---|---|"] + [
            f"| {r.mix_label} | {r.cells} | {r.mean_mRNA_pg:.2f} |" for r in summary.itertuples()
        ]
        lines.append("")
    if "kang" in results:
        frame = pd.DataFrame(results["kang"]["rows"])
        lines += [
            "## Kang 2018 PBMC: interferon-stimulated genes, stim vs ctrl per cell type (1267 genes)",
            "",
            "Worst (max) rank over the seeds, by proba_de (ties share the best rank) / by lfc_mean; "
            "the last column: genes with proba_de = 1 (median over seeds).",
            "",
            "| cell type | tool | " + " | ".join(ISGS) + " | genes at proba_de 1 |",
            "|---|---|" + "---|" * len(ISGS) + "---|",
        ]
        for (cell_type, tool), part in frame.groupby(["cell_type", "tool"], sort=False):
            worst = part.groupby("gene")[["rank_proba_de", "rank_lfc"]].max()
            cells = [f"{worst.loc[g, 'rank_proba_de']} / {worst.loc[g, 'rank_lfc']}" for g in ISGS]
            lines.append(
                f"| {cell_type} | {tool} | " + " | ".join(cells) + f" | {part['n_genes_proba_1'].median():.0f} |"
            )
        lines += ["", "Over the 5 genes x 5 cell types x seeds:", ""]
        lines += ["| tool | called DE at FDR 0.05 | rank by proba_de: mean / max | rank by lfc_mean: mean / max |"]
        lines += ["|---|---|---|---|"]
        for tool, part in frame.groupby("tool", sort=False):
            lines.append(
                f"| {tool} | {part['is_de'].mean():.0%} | {part['rank_proba_de'].mean():.1f} / "
                f"{part['rank_proba_de'].max()} | {part['rank_lfc'].mean():.1f} / {part['rank_lfc'].max()} |"
            )
        lines.append("")
    return "\n".join(lines)


def _ms(values: pd.Series, digits: int = 4) -> str:
    return f"{values.mean():.{digits}f} ({values.std(ddof=1) if len(values) > 1 else 0:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["both", "scvi"], default="both")
    parser.add_argument("--dataset", choices=sorted(DATASETS), nargs="+", default=sorted(DATASETS, reverse=True))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--n-epochs-kl-warmup", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1024, help="atlasvi's DE minibatch")
    parser.add_argument("--rerun", action="store_true", help="ignore cached DE tables")
    parser.add_argument("--h5ad"), parser.add_argument("--train-cells"), parser.add_argument("--comparisons")
    parser.add_argument("--out", default=str(HERE / "results" / "de_fidelity"))
    args = parser.parse_args()
    if args.side == "scvi":
        args.dataset = args.dataset[0]
        return run_scvi(args)
    import torch

    torch.set_num_threads(1)
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "seeds": args.seeds}
    for name in args.dataset:
        h5ad, store, comparisons = prepare(name)
        rows: list[dict] = []
        for seed in args.seeds:
            for tool in ("atlasvi", "scvi-tools"):
                table = de_table(tool, name, store, h5ad, comparisons, seed, args)
                if name == "rnamix":
                    expected, is_ercc, mixtures = expected_lfc(h5ad)
                    found = rnamix_metrics(table, expected, is_ercc)
                    results["rnamix"] = {"mixtures": mixtures.reset_index(names="mix_label").to_dict("records")}
                else:
                    found = kang_ranks(table, comparisons)
                rows += [{"tool": tool, "seed": seed, **row} for row in found]
        results.setdefault(name, {})["rows"] = rows
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(report(results, args))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
