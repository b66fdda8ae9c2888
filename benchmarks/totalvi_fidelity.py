"""totalVI fidelity: atlasvi's TOTALVI next to scvi-tools 1.4.2's on CBMC CITE-seq (8,617 cells, 2000 genes, 13 ADT).

    .venv/bin/python benchmarks/totalvi_fidelity.py --seeds 0 1 2 --max-epochs 40 --n-steps-kl-warmup 600

Both tools get the same cells (numpy default_rng(0).permutation of the file's cells): the first 10% are held out and
never trained on; the next 10% ("rna_only") train with their protein counts hidden; the other 80% ("cite") train
with RNA and proteins. Batch `source` (cite / rna_only): atlasvi's store marks every protein of the rna_only cells
as not measured (their h5ad has an obsm DataFrame of no antibodies); scvi-tools reads the same cells with all-zero
protein counts, which it detects as that batch's missing panel (protein_batch_mask), so its TOTALVI turns on its
adversarial batch classifier (its default with missing proteins; atlasvi's too, `adversarial_classifier`). Each tool
trains with its TOTALVI defaults (n_latent 20, n_hidden 256, lr 4e-3, batch 256, a 10% validation split of its training
cells, reduce-lr-on-plateau and early stopping on the validation -ELBO); `--max-epochs` and `--n-steps-kl-warmup`
set both tools' epochs and KL warm-up (the default warm-up, 0.75 x cells steps, is ~190 epochs here, so a shorter
run must shorten it to end at KL weight 1); `--scvi-no-adversary` trains scvi-tools' TOTALVI without its adversarial
classifier (adversarial_classifier=False), `--atlasvi-no-adversary` atlasvi's; `--atlasvi-nb-eps` (a diagnostic,
with `--out`) runs atlasvi with scvi-tools' log(mu + 1e-8) in its NB log-likelihoods (patched into
atlasvi.distributions for the run; its held-out -ELBO then uses that NB too).
Per seed and tool:

- held-out -ELBO: nats per held-out cell at KL weight 1, each tool's own get_elbo (RNA + protein reconstruction,
  KL of z, the protein background terms), one draw;
- label kNN accuracy of the latent (posterior means of all 8,617 cells) on `scdcc_label` (15 clusters): 15-nearest-
  neighbour classifier, stratified 5-fold cross-validation (sklearn, shuffled with random_state 0) over the cells
  in one order for both tools (the cite, rna_only, heldout files'), so both get the same folds (before 2026-12-07
  atlasvi's latent was in its store's order: other folds);
- protein imputation from RNA alone: the rna_only cells' denoised protein expression decoded as batch cite (each
  tool's own call, mean of 10 draws), Pearson r per protein of log1p(imputed) vs log1p(the hidden counts); the mean
  over the 13 proteins.

The scvi-tools half is this file run with `--side scvi` in the scvi-tools venv (benchmarks/.cache/scvi-venv,
`bash benchmarks/setup_scvi_venv.sh`) as a subprocess after atlasvi's runs, one torch thread. Output:
results/totalvi_fidelity.json and .md (`--out NAME` for another name).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.fidelity_data import KNN_FOLDS, KNN_NEIGHBOURS, knn_accuracy, seed_summary

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
CBMC = SHARED / "cbmc_citeseq_stoeckius2017_top2000genes.h5ad"
SCVI_PYTHON = HERE / ".cache" / "scvi-venv" / "bin" / "python"
CACHE = HERE / ".cache" / "totalvi_fidelity"
PROTEIN_KEY, BATCH_KEY, LABELS_KEY = "protein_expression", "source", "scdcc_label"
HELD_OUT_FRACTION = RNA_ONLY_FRACTION = 0.1
IMPUTATION_DRAWS = 10


def imputation_pearson(imputed: np.ndarray, observed: np.ndarray) -> list[float]:
    """Pearson r per protein (column) of log1p(imputed) vs log1p(observed), (n_cells, n_proteins) each."""
    a, b = np.log1p(imputed), np.log1p(observed)
    return [float(np.corrcoef(a[:, j], b[:, j])[0, 1]) for j in range(a.shape[1])]


def split(n_cells: int) -> dict[str, np.ndarray]:
    """Cell indices of the held-out, rna_only and cite sets (numpy default_rng(0).permutation, h5ad order kept)."""
    order = np.random.default_rng(0).permutation(n_cells)
    n_held, n_rna = round(HELD_OUT_FRACTION * n_cells), round(RNA_ONLY_FRACTION * n_cells)
    parts = {"heldout": order[:n_held], "rna_only": order[n_held : n_held + n_rna], "cite": order[n_held + n_rna :]}
    return {name: np.sort(cells) for name, cells in parts.items()}


def prepare() -> dict[str, Path]:
    """The h5ad files both tools read (cite, rna_only with no antibodies, heldout) and atlasvi's stores."""
    import anndata as ad
    import pandas as pd

    from atlasvi.data import BuildConfig, build_store

    CACHE.mkdir(parents=True, exist_ok=True)
    paths = {name: CACHE / f"{name}.h5ad" for name in ("cite", "rna_only", "heldout")}
    adata = ad.read_h5ad(CBMC)
    adata.obs = adata.obs[[LABELS_KEY]].astype(str)
    for name, cells in split(adata.n_obs).items():
        if paths[name].exists():
            continue
        part = adata[cells].copy()
        part.obs[BATCH_KEY] = "rna_only" if name == "rna_only" else "cite"
        if name == "rna_only":
            part.uns["hidden_proteins"] = part.obsm[PROTEIN_KEY].to_numpy()
            part.uns["protein_names"] = np.asarray(part.obsm[PROTEIN_KEY].columns, dtype=str)
            part.obsm[PROTEIN_KEY] = pd.DataFrame(index=part.obs_names)  # this study measured no antibody
        part.write_h5ad(paths[name])
    stores = {"train_store": CACHE / "train.zarr", "heldout_store": CACHE / "heldout.zarr"}
    inputs = {"train_store": [paths["cite"], paths["rna_only"]], "heldout_store": [paths["heldout"]]}
    for name, store in stores.items():
        if not store.exists():
            config = BuildConfig(
                inputs=[str(p) for p in inputs[name]], output=str(store), protein_key=PROTEIN_KEY,
                batch_key=BATCH_KEY, labels_key=LABELS_KEY,
            )  # fmt: skip
            build_store(config)
    return paths | stores


def train_fields(args: argparse.Namespace) -> dict:
    """The training options both sides apply over their TOTALVI defaults."""
    fields: dict = {}
    if args.max_epochs is not None:
        fields["max_epochs"] = args.max_epochs
    if args.n_steps_kl_warmup is not None:
        fields["n_steps_kl_warmup"] = args.n_steps_kl_warmup
    return fields


# --------------------------------------------------------------------------------------------- atlasvi
def atlasvi_side(
    paths: dict[str, Path], seed: int, fields: dict, adversary: bool | None = None, init: dict | None = None
) -> dict:
    """atlasvi's TOTALVI on the training store; the figures of one seed. adversary: its config's
    adversarial_classifier (None: its default, on where proteins are missing); init: a state dict (every weight,
    the adversary's included) to start from instead of its seeded draw."""
    import torch

    from atlasvi.api import TOTALVI
    from atlasvi.data import LoaderConfig
    from atlasvi.models.totalvi import TOTALVIConfig
    from atlasvi.train import TrainConfig

    torch.set_num_threads(1)
    config = TOTALVIConfig(adversarial_classifier=adversary)
    model = TOTALVI(paths["train_store"], config=config, device="cpu", seed=seed)
    if init is not None:
        model.module.load_state_dict(init)  # strict
    started = time.perf_counter()
    model.fit(TrainConfig(seed=seed, **fields), LoaderConfig(seed=seed))  # the batch size: TOTALVI's default
    seconds = time.perf_counter() - started
    return (
        {"tool": "atlasvi", "seed": seed}
        | atlasvi_scores(model, paths)
        | {
            "epochs": len(model.history),
            "train_seconds": seconds,
            "adversarial_classifier": getattr(model.module, "adversary", None) is not None,
            "batch_size": model.loader_config.batch_size,
            "steps_per_epoch": len(model.history[0].step_losses),
        }
    )


def cell_order(paths: dict[str, Path]) -> list[str]:
    """Every cell's name in the order both tools' latents are scored in (the cite, rna_only, heldout files'
    order): the kNN's cross-validation folds are positions, so both tools get the same folds."""
    import anndata as ad

    return [name for part in ("cite", "rna_only", "heldout") for name in ad.read_h5ad(paths[part]).obs_names]


def atlasvi_scores(model, paths: dict[str, Path]) -> dict:
    """A trained atlasvi TOTALVI's held-out -ELBO, kNN accuracy (latent in `cell_order`) and imputation r."""
    import anndata as ad
    import pandas as pd

    train_obs = ad.read_zarr(paths["train_store"]).obs
    held_obs = ad.read_zarr(paths["heldout_store"]).obs
    latent = np.concatenate(
        [model.get_latent_representation(), model.get_latent_representation(store=paths["heldout_store"])]
    )
    names = np.concatenate([train_obs.index, held_obs.index])
    labels = np.concatenate([train_obs[LABELS_KEY].astype(str), held_obs[LABELS_KEY].astype(str)])
    order = pd.Index(names).get_indexer(cell_order(paths))
    imputed = model.get_protein_expression(transform_batch="cite", n_samples=IMPUTATION_DRAWS)
    rna_only = (train_obs[BATCH_KEY] == "rna_only").to_numpy()
    truth = ad.read_h5ad(paths["rna_only"])
    rows = truth.obs_names.get_indexer(train_obs.index[rna_only])
    assert list(model.protein_names) == list(truth.uns["protein_names"])
    pearson = imputation_pearson(imputed[rna_only], truth.uns["hidden_proteins"][rows])
    return {
        "heldout_elbo": model.get_elbo(store=paths["heldout_store"]),
        "knn_accuracy": knn_accuracy(latent[order], labels[order]),
        "imputation_pearson_mean": float(np.mean(pearson)),
        "imputation_pearson": dict(zip(model.protein_names, pearson, strict=True)),
    }


# --------------------------------------------------------------------------------------------- scvi-tools
def scvi_adatas(paths: dict[str, str]) -> tuple:
    """(train AnnData registered for scvi-tools' TOTALVI, held-out AnnData, protein names, the rna_only cells'
    hidden protein counts): the same cells as atlasvi's stores, the rna_only cells with all-zero proteins (scvi-tools'
    missing panel). Needs the scvi-tools venv."""
    import anndata as ad
    import pandas as pd
    import scvi

    cite, rna_only, held = (ad.read_h5ad(paths[name]) for name in ("cite", "rna_only", "heldout"))
    names = list(rna_only.uns["protein_names"])
    hidden = rna_only.uns["hidden_proteins"]
    rna_only.obsm[PROTEIN_KEY] = pd.DataFrame(np.zeros_like(hidden), index=rna_only.obs_names, columns=names)
    del rna_only.uns["hidden_proteins"], rna_only.uns["protein_names"]
    train = ad.concat([cite, rna_only])
    for adata in (train, held):
        adata.X = adata.X.astype(np.float32)
        adata.obsm[PROTEIN_KEY] = adata.obsm[PROTEIN_KEY][names].astype(np.float32)
    scvi.model.TOTALVI.setup_anndata(train, protein_expression_obsm_key=PROTEIN_KEY, batch_key=BATCH_KEY)
    return train, held, names, hidden


def scvi_scores(model, train, held, names: list[str], hidden: np.ndarray) -> dict:
    """A trained scvi-tools TOTALVI's held-out -ELBO, kNN accuracy (latent in `cell_order`: train = cite then
    rna_only, then held) and imputation r."""
    latent = np.concatenate([model.get_latent_representation(train), model.get_latent_representation(held)])
    labels = np.concatenate([train.obs[LABELS_KEY].astype(str), held.obs[LABELS_KEY].astype(str)])
    indices = np.flatnonzero((train.obs[BATCH_KEY] == "rna_only").to_numpy())
    _, protein = model.get_normalized_expression(
        train, indices=indices, transform_batch="cite", n_samples=IMPUTATION_DRAWS, return_mean=True,
        return_numpy=True,
    )  # fmt: skip
    pearson = imputation_pearson(np.asarray(protein), hidden)
    return {
        "heldout_elbo": -float(model.get_elbo(held)),  # get_elbo is the ELBO itself ("higher is better")
        "knn_accuracy": knn_accuracy(latent, labels),
        "imputation_pearson_mean": float(np.mean(pearson)),
        "imputation_pearson": dict(zip(names, pearson, strict=True)),
    }


def scvi_setup(seed: int) -> None:
    """scvi-tools' settings of every run here: quiet, one thread, no loader workers, the seed."""
    import logging

    import scvi

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = seed


def scvi_side(paths: dict[str, str], seed: int, fields: dict, adversary: bool | None = None) -> dict:
    """scvi-tools' TOTALVI on the same cells (run in the scvi-tools venv); the figures of one seed. adversary: its
    train's adversarial_classifier (None: its default, on where proteins are missing)."""
    import warnings

    import scvi
    import torch

    scvi_setup(seed)
    train, held, names, hidden = scvi_adatas(paths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scvi.model.TOTALVI(train)
    started = time.perf_counter()
    options = fields | ({} if adversary is None else {"adversarial_classifier": adversary})
    model.train(accelerator="cpu", devices=1, enable_progress_bar=False, **options)
    seconds = time.perf_counter() - started
    return (
        {"tool": "scvi-tools", "seed": seed}
        | scvi_scores(model, train, held, names, hidden)
        | {
            "epochs": int(model.history["elbo_train"].shape[0]),
            "train_seconds": seconds,
            "adversarial_classifier": bool(model._use_adversarial_classifier if adversary is None else adversary),
            "versions": {"scvi-tools": scvi.__version__, "torch": torch.__version__},
        }
        | scvi_loader_figures(model)
    )


def scvi_loader_figures(model) -> dict:
    """A trained scvi-tools model's training batch size (its data splitter's) and minibatches per epoch."""
    batches = model.trainer.datamodule.data_loader_kwargs["batch_size"]
    return {"batch_size": int(batches), "steps_per_epoch": len(model.trainer.datamodule.train_dataloader())}


# --------------------------------------------------------------------------------------------- report
def markdown(rows: list[dict], meta: dict) -> str:
    """The results table: every seed, then mean ± sd [min, max] per tool, then Pearson r per protein."""
    lines = [
        "# totalVI fidelity: atlasvi vs scvi-tools 1.4.2 (CBMC CITE-seq, 8,617 cells x 2000 genes, 13 ADT)",
        "",
        "Commands (each row ran under one): "
        + "; ".join(f"`{c}`" for c in dict.fromkeys(r.get("command", meta["command"]) for r in rows))
        + f". Machine: {meta['machine']}.",
        "",
        f"Same cells for both tools: {meta['cells']['heldout']} held out (never trained on), "
        f"{meta['cells']['rna_only']} trained with their proteins hidden (batch rna_only), {meta['cells']['cite']} "
        "trained with RNA and proteins (batch cite). Each tool's TOTALVI defaults; training options over them: "
        f"{meta['train_fields'] or 'none'}. Held-out -ELBO: nats per cell, each tool's get_elbo (lower is better). "
        f"kNN: {KNN_NEIGHBOURS}-NN accuracy on scdcc_label, stratified {KNN_FOLDS}-fold CV on the latent of every "
        "cell. Imputation: the rna_only cells' denoised proteins decoded as batch cite from RNA alone, Pearson r of "
        f"log1p per protein vs the hidden counts, mean over 13 proteins ({IMPUTATION_DRAWS} draws averaged).",
        "",
        f"Adversarial classifier: scvi-tools {meta['scvi_adversarial_classifier']}; atlasvi "
        f"{meta['atlasvi_adversarial_classifier']}.",
        "",
        "kNN cross-validation folds: "
        + (
            f"the same for both tools (latents scored in one cell order: {meta['knn_cell_order']})."
            if "knn_cell_order" in meta
            else "atlasvi's latent was scored in its store's cell order, scvi-tools' in the files' order, so the "
            "two tools' folds differ (the script now scores both in one order; results/totalvi_paired.md)."
        ),
        "",
        "| tool | seed | epochs | adversarial classifier | held-out -ELBO | kNN accuracy | imputation r (mean) "
        "| train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["tool"], r["seed"])):
        adversary = "yes" if r.get("adversarial_classifier") else "no"
        lines.append(
            f"| {r['tool']} | {r['seed']} | {r['epochs']} | {adversary} | {r['heldout_elbo']:.1f} | "
            f"{r['knn_accuracy']:.3f} | {r['imputation_pearson_mean']:.3f} | {r['train_seconds']:.0f} |"
        )
    lines += ["", "| tool | held-out -ELBO | kNN accuracy | imputation r (mean) |", "|---|---|---|---|"]
    for tool in ("atlasvi", "scvi-tools"):
        cells = []
        for key, digits in (("heldout_elbo", 1), ("knn_accuracy", 3), ("imputation_pearson_mean", 3)):
            mean, sd, low, high = seed_summary(rows, tool, key)
            cells.append(f"{mean:.{digits}f} ± {sd:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]")
        lines.append(f"| {tool} | " + " | ".join(cells) + " |")
    proteins = list(rows[0]["imputation_pearson"])
    lines += ["", "Imputation Pearson r per protein, mean over seeds:", ""]
    lines += ["| tool | " + " | ".join(proteins) + " |", "|---|" + "---|" * len(proteins)]
    for tool in ("atlasvi", "scvi-tools"):
        values = [np.mean([r["imputation_pearson"][p] for r in rows if r["tool"] == tool]) for p in proteins]
        lines.append(f"| {tool} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--n-steps-kl-warmup", type=int, default=None)
    parser.add_argument("--scvi-no-adversary", action="store_true", help="scvi-tools without its adversary")
    parser.add_argument("--atlasvi-no-adversary", action="store_true", help="atlasvi without its adversary")
    parser.add_argument("--atlasvi-nb-eps", action="store_true", help="diagnostic: atlasvi's NB with log(mu + 1e-8)")
    parser.add_argument("--scvi-only", action="store_true", help="run the scvi-tools side alone (merge with --merge)")
    parser.add_argument("--atlasvi-only", action="store_true", help="run atlasvi's side alone (merge with --merge)")
    parser.add_argument(
        "--merge",
        default=None,
        help="keep the rows of results/MERGE.json (same options) not redone; each names its command",
    )
    parser.add_argument("--side", choices=["scvi"], default=None, help="internal: run the scvi-tools half")
    parser.add_argument("--paths", default=None, help="internal: the JSON of the prepared files")
    parser.add_argument("--out", default="totalvi_fidelity", help="results/OUT.json and results/OUT.md")
    args = parser.parse_args()
    fields = train_fields(args)
    if args.side == "scvi":
        paths = json.loads(args.paths)
        for seed in args.seeds:
            adversary = False if args.scvi_no_adversary else None
            print(json.dumps(scvi_side(paths, seed, fields, adversary)), flush=True)
        return
    paths = prepare()
    if args.atlasvi_nb_eps:
        import torch

        import atlasvi.distributions

        atlasvi.distributions._log_mu = lambda mu: torch.log(mu + 1e-8)  # scvi-tools' log_nb_positive
    command = " ".join(["python", "benchmarks/totalvi_fidelity.py", *sys.argv[1:]])
    rows, one_order = [], True  # one_order: every row's kNN scored in one cell order for both tools
    if args.merge is not None:  # an earlier run's rows (same options) that this run does not redo
        earlier = json.loads((HERE / "results" / f"{args.merge}.json").read_text())
        one_order = "knn_cell_order" in earlier["meta"]
        if earlier["meta"]["train_fields"] != fields:
            raise SystemExit(f"results/{args.merge}.json was run with {earlier['meta']['train_fields']}, not {fields}")
        redone = {tool for tool, skip in (("atlasvi", args.scvi_only), ("scvi-tools", args.atlasvi_only)) if not skip}
        rows = [
            {"command": earlier["meta"]["command"]} | r
            for r in earlier["rows"]
            if not (r["tool"] in redone and r["seed"] in args.seeds)
        ]
        if args.atlasvi_only:
            args.scvi_no_adversary = earlier["meta"]["scvi_adversarial_classifier"] == "off"
    for seed in [] if args.scvi_only else args.seeds:
        rows.append(
            {"command": command} | atlasvi_side(paths, seed, fields, False if args.atlasvi_no_adversary else None)
        )
        print(json.dumps(rows[-1]), flush=True)
    for line in [] if args.atlasvi_only else _scvi_rows(args, paths):
        rows.append({"command": command} | json.loads(line))
        print(line, flush=True)
    atlasvi_adversary = {r.get("adversarial_classifier", False) for r in rows if r["tool"] == "atlasvi"}
    cells = {name: len(part) for name, part in split(8617).items()}
    meta = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), CPU only, 1 torch thread",
        "train_fields": fields,
        "scvi_adversarial_classifier": "off" if args.scvi_no_adversary else "default (on: proteins missing)",
        "atlasvi_adversarial_classifier": "default (on: proteins missing)" if atlasvi_adversary == {True} else "off",
        **({"atlasvi_nb_eps": 1e-8} if args.atlasvi_nb_eps else {}),
        **({"knn_cell_order": "the cite, rna_only and heldout files' order"} if one_order else {}),
        "cells": cells,
    }
    results = HERE / "results"
    (results / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (results / f"{args.out}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


def _scvi_rows(args: argparse.Namespace, paths: dict[str, Path]) -> list[str]:
    """The scvi-tools side's JSON lines, run in its venv after atlasvi's runs."""
    prepared = json.dumps({k: str(v) for k, v in paths.items()})
    command = [str(SCVI_PYTHON), __file__, "--side", "scvi", "--paths", prepared]
    command += ["--seeds", *map(str, args.seeds)] + (["--scvi-no-adversary"] if args.scvi_no_adversary else [])
    for flag, value in (("--max-epochs", args.max_epochs), ("--n-steps-kl-warmup", args.n_steps_kl_warmup)):
        command += [flag, str(value)] if value is not None else []
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    scvi = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, check=False)  # after atlasvi's runs
    if scvi.returncode != 0:
        raise SystemExit(f"the scvi-tools side failed (exit {scvi.returncode})")
    return [line for line in scvi.stdout.splitlines() if line.startswith('{"tool"')]


if __name__ == "__main__":
    main()
