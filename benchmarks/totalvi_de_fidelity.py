"""totalVI DE over genes and proteins: atlasvi's TOTALVI.differential_expression next to scvi-tools 1.4.2's on CBMC.

    .venv/bin/python benchmarks/totalvi_de_fidelity.py --seeds 0 1 2 --max-epochs 30 --n-steps-kl-warmup 420

Each tool trains its TOTALVI (defaults; one batch, every protein measured, so no adversarial classifier in either;
`--max-epochs` / `--n-steps-kl-warmup` for both, as benchmarks/totalvi_fidelity.py) on all 8,617 CBMC cells
(2000 genes, 13 ADT), then runs its own differential_expression with its TOTALVI defaults (change mode, delta 0.25,
pseudocounts 1e-5, protein_prior_count 0.1, 5000 draws per group) for every `scdcc_label` cluster vs the rest (15
comparisons). Per seed s, atlasvi seed s against scvi-tools seed s:

- protein rank agreement: Spearman's rho of the 13 proteins' lfc_mean, per comparison, mean over the comparisons;
- gene agreement: Pearson r of the 2000 genes' lfc_mean, per comparison, mean over the comparisons;
- top protein: the share of comparisons whose most up protein is the same.

The same three figures between seeds s and s + 1 of one tool (within atlasvi, within scvi-tools) say how far a
tool agrees with itself. The scvi-tools half runs in its venv (benchmarks/.cache/scvi-venv) after atlasvi's, one
torch thread. Output: results/totalvi_de_fidelity.json and .md.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
CBMC = SHARED / "cbmc_citeseq_stoeckius2017_top2000genes.h5ad"
SCVI_PYTHON = HERE / ".cache" / "scvi-venv" / "bin" / "python"
CACHE = HERE / ".cache" / "totalvi_de_fidelity"
PROTEIN_KEY, LABELS_KEY = "protein_expression", "scdcc_label"


def lfc_tables(table, genes: list[str], proteins: list[str]) -> dict[str, np.ndarray]:
    """{"clusters", "genes" (n_comparisons, n_genes), "proteins" (n_comparisons, n_proteins)}: lfc_mean per
    comparison of a one-vs-rest DE table (scvi-tools' layout: a "comparison" column, proteins as "<name>_protein")."""
    clusters = sorted({c.removesuffix(" vs Rest") for c in table["comparison"]}, key=int)
    out = {"clusters": np.array(clusters), "genes": [], "proteins": []}
    for cluster in clusters:
        part = table[table["comparison"] == f"{cluster} vs Rest"]["lfc_mean"]
        out["genes"].append(part.loc[genes].to_numpy(np.float64))
        out["proteins"].append(part.loc[[f"{p}_protein" for p in proteins]].to_numpy(np.float64))
    return {k: np.asarray(v) for k, v in out.items()}


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """Protein Spearman, gene Pearson (means over comparisons) and the share of comparisons with the same top
    protein, of two runs' lfc tables."""
    from scipy import stats

    assert list(a["clusters"]) == list(b["clusters"])
    rho = [stats.spearmanr(x, y)[0] for x, y in zip(a["proteins"], b["proteins"], strict=True)]
    r = [stats.pearsonr(x, y)[0] for x, y in zip(a["genes"], b["genes"], strict=True)]
    top = np.mean(a["proteins"].argmax(1) == b["proteins"].argmax(1))
    return {"protein_spearman": float(np.mean(rho)), "gene_pearson": float(np.mean(r)), "same_top_protein": float(top)}


def prepare() -> dict[str, Path]:
    """The h5ad both tools read (labels as strings) and atlasvi's store built from it."""
    import anndata as ad

    from atlasvi.data import BuildConfig, build_store

    CACHE.mkdir(parents=True, exist_ok=True)
    paths = {"h5ad": CACHE / "cbmc.h5ad", "store": CACHE / "cbmc.zarr"}
    if not paths["h5ad"].exists():
        adata = ad.read_h5ad(CBMC)
        adata.obs = adata.obs[[LABELS_KEY]].astype(str)
        adata.write_h5ad(paths["h5ad"])
    if not paths["store"].exists():
        config = BuildConfig(
            inputs=[str(paths["h5ad"])], output=str(paths["store"]), protein_key=PROTEIN_KEY, labels_key=LABELS_KEY
        )
        build_store(config)
    return paths


def atlasvi_side(paths: dict[str, Path], seed: int, fields: dict) -> Path:
    """Train atlasvi's TOTALVI, run its DE; the lfc tables' npz."""
    import anndata as ad
    import torch

    from atlasvi.api import TOTALVI
    from atlasvi.data import LoaderConfig
    from atlasvi.train import TrainConfig

    torch.set_num_threads(1)
    model = TOTALVI(paths["store"], device="cpu", seed=seed)
    model.fit(TrainConfig(seed=seed, **fields), LoaderConfig(seed=seed))  # the batch size: TOTALVI's default, 256
    table = model.differential_expression(LABELS_KEY, seed=seed)
    var = ad.read_zarr(paths["store"]).var_names
    out = CACHE / f"atlasvi_seed{seed}.npz"
    np.savez(out, **lfc_tables(table, list(var), list(model.protein_names)))
    return out


def scvi_side(paths: dict[str, str], seed: int, fields: dict) -> Path:
    """Train scvi-tools' TOTALVI on the same cells, run its DE (in the scvi-tools venv); the lfc tables' npz."""
    import logging
    import warnings

    import anndata as ad
    import scvi

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = seed
    adata = ad.read_h5ad(paths["h5ad"])
    adata.X = adata.X.astype(np.float32)
    adata.obsm[PROTEIN_KEY] = adata.obsm[PROTEIN_KEY].astype(np.float32)
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key=PROTEIN_KEY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scvi.model.TOTALVI(adata)
        model.train(accelerator="cpu", devices=1, enable_progress_bar=False, **fields)
        table = model.differential_expression(groupby=LABELS_KEY, silent=True)
    proteins = list(adata.obsm[PROTEIN_KEY].columns)
    out = CACHE / f"scvi_seed{seed}.npz"
    np.savez(out, **lfc_tables(table, list(adata.var_names), proteins))
    return out


TOOLS = {"atlasvi": "atlasvi", "scvi-tools": "scvi"}


def _scvi_seed(paths: dict[str, Path], seed: int, args: argparse.Namespace) -> None:
    """The scvi-tools half of one seed, in its venv (one process at a time)."""
    command = [
        str(SCVI_PYTHON),
        __file__,
        "--side",
        "scvi",
        "--paths",
        json.dumps({k: str(v) for k, v in paths.items()}),
    ]
    command += ["--seeds", str(seed)]
    for flag, value in (("--max-epochs", args.max_epochs), ("--n-steps-kl-warmup", args.n_steps_kl_warmup)):
        command += [flag, str(value)] if value is not None else []
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    if subprocess.run(command, env=env, check=False).returncode != 0:
        raise SystemExit(f"the scvi-tools side failed (seed {seed})")


def markdown(rows: list[dict], meta: dict) -> str:
    """Per seed the between-tool figures, then the within-tool seed-to-seed figures; means."""
    keys = (("protein_spearman", "protein LFC Spearman"), ("gene_pearson", "gene LFC Pearson"))
    keys += (("same_top_protein", "same top protein"),)
    lines = [
        "# totalVI DE over genes and proteins: atlasvi vs scvi-tools 1.4.2 (CBMC CITE-seq, 8,617 cells, 13 ADT)",
        "",
        f"Command: `{meta['command']}`. Machine: {meta['machine']}.",
        "",
        "Each tool's TOTALVI (defaults; training options over them: "
        f"{meta['train_fields'] or 'none'}) on all cells, then its differential_expression with its defaults for "
        f"every scdcc_label cluster vs the rest ({meta['n_comparisons']} comparisons). Protein LFC Spearman: rank "
        "agreement of the 13 proteins' lfc_mean per comparison, mean over comparisons; gene LFC Pearson: the 2000 "
        "genes' lfc_mean, likewise; same top protein: share of comparisons whose most up protein is the same.",
        "",
        "| pair | " + " | ".join(label for _, label in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for r in rows:
        lines.append(f"| {r['pair']} | " + " | ".join(f"{r[k]:.3f}" for k, _ in keys) + " |")
    lines += ["", "| pairs | " + " | ".join(label for _, label in keys) + " |", "|---|" + "---|" * len(keys)]
    for kind in ("atlasvi vs scvi-tools", "atlasvi vs atlasvi", "scvi-tools vs scvi-tools"):
        part = [r for r in rows if r["kind"] == kind]
        if part:
            cells = [f"{np.mean([r[k] for r in part]):.3f} (n = {len(part)})" for k, _ in keys]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", "Mean lfc_mean of each protein in the cluster where CD19 is most up (seed means):", ""]
    lines += ["| tool | " + " | ".join(meta["proteins"]) + " |", "|---|" + "---|" * len(meta["proteins"])]
    for tool, values in meta["b_cluster_lfc"].items():
        lines.append(f"| {tool} (cluster {meta['b_cluster']}) | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import anndata as ad

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--n-steps-kl-warmup", type=int, default=None)
    parser.add_argument("--report-only", action="store_true", help="the figures of the seeds' saved LFC tables")
    parser.add_argument("--side", choices=["scvi"], default=None, help="internal: run the scvi-tools half")
    parser.add_argument("--paths", default=None, help="internal: the JSON of the prepared files")
    args = parser.parse_args()
    fields = {k: v for k, v in (("max_epochs", args.max_epochs), ("n_steps_kl_warmup", args.n_steps_kl_warmup))}
    fields = {k: v for k, v in fields.items() if v is not None}
    if args.side == "scvi":
        for seed in args.seeds:
            print(scvi_side(json.loads(args.paths), seed, fields), flush=True)
        return
    paths = prepare()
    for seed in [] if args.report_only else args.seeds:  # one seed of each tool after the other
        atlasvi_side(paths, seed, fields)
        _scvi_seed(paths, seed, args)
    runs = {(tool, seed): CACHE / f"{name}_seed{seed}.npz" for tool, name in TOOLS.items() for seed in args.seeds}
    tables = {key: dict(np.load(path)) for key, path in runs.items()}
    rows = []
    for seed in args.seeds:
        rows.append({"pair": f"atlasvi {seed} vs scvi-tools {seed}", "kind": "atlasvi vs scvi-tools"}
                    | agreement(tables["atlasvi", seed], tables["scvi-tools", seed]))  # fmt: skip
    for tool in ("atlasvi", "scvi-tools"):
        for a, b in zip(args.seeds, args.seeds[1:], strict=False):
            rows.append({"pair": f"{tool} {a} vs {tool} {b}", "kind": f"{tool} vs {tool}"}
                        | agreement(tables[tool, a], tables[tool, b]))  # fmt: skip
    first = tables["scvi-tools", args.seeds[0]]
    proteins = list(ad.read_h5ad(paths["h5ad"], backed="r").obsm[PROTEIN_KEY].columns)
    b_row = int(np.argmax(first["proteins"][:, proteins.index("CD19")]))
    meta = {
        "command": " ".join(["python", "benchmarks/totalvi_de_fidelity.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), CPU only, 1 torch thread",
        "train_fields": fields,
        "n_comparisons": len(first["clusters"]),
        "proteins": proteins,
        "b_cluster": str(first["clusters"][b_row]),
        "b_cluster_lfc": {
            tool: np.mean([tables[tool, s]["proteins"][b_row] for s in args.seeds], axis=0).round(4).tolist()
            for tool in ("atlasvi", "scvi-tools")
        },
    }
    results = HERE / "results"
    (results / "totalvi_de_fidelity.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (results / "totalvi_de_fidelity.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
