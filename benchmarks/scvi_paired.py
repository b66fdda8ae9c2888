"""atlasvi's scVI next to scvi-tools 1.4.2's SCVI from the same initial weights, on Baron human + mouse (species as
the batch): mixing and label conservation, paired per seed, and which part of the training stream moves them.

    python benchmarks/scvi_paired.py --seeds 0 1 2 3 4 --epochs 400

The data, store, split and metrics are benchmarks/sysvi_fidelity.py's (2000 system-aware Seurat v3 HVGs; iLISI,
batch-neighbour entropy, label kNN accuracy, NMI of k-means); the recipe and one training step are checked equal by
`python benchmarks/ldvae_peakvi_step.py --cases scvi-baron --name scvi_baron_step`.
Per seed s, both tools start from atlasvi's initial weights of `SCVI(store, seed=s)` (copied into scvi-tools' SCVI
under its names, `fidelity_data.save_init`), train on the same cells (atlasvi holds out the store's last 10% of
rows; scvi-tools gets that split through `external_indexing`) with each tool's scVI defaults (ZINB, observed library
size, batch into the decoder, Adam lr 1e-3 / eps 0.01 / weight decay 1e-6, KL warm-up over 400 epochs, batch size
128, no early stopping) for --epochs epochs. The stream (minibatch order, dropout masks, latent draws) is each
tool's own. Runs per seed, one after another on one torch thread:
- atlasvi: loader seed s (minibatch order), train seed s (dropout and latent draws);
- atlasvi order: loader seed s + 1000, train seed s: another minibatch order, the same draw stream;
- atlasvi draws: loader seed s, train seed s + 1000: the same minibatch order, other draws;
- scvi-tools: scvi.settings.seed = s after the weights are loaded (its minibatch order and draws);
- scvi-tools stream: scvi.settings.seed = s + 1000 (another stream from the same weights: the control of how far
  two runs of one tool from one start lie apart).
Reported: each metric per run, the paired differences atlasvi - scvi-tools (mean, sd, se, t = mean / se), the
same for the within-tool controls (scvi-tools - scvi-tools stream, atlasvi - atlasvi order, atlasvi - atlasvi
draws), and each run's held-out -ELBO (its own tool's figure on the 33 held-out cells at the last epoch).
`--own-init` adds scvi-tools' own initial weights of seed s (built after scvi.settings.seed = s, as
benchmarks/sysvi_fidelity.py builds its scVI) trained on atlasvi's split: against sysvi_fidelity's runs of the same
weights on scvi-tools' own random split, it separates the split from the initial weights. The scvi side's --runs
also takes scvi-tools-own-init-stream (those weights on the stream of seed s + 1000; benchmarks/scvi_init_draws.py).
`--runs atlasvi scvi-tools` trains only those runs (their pair; a control needs both its runs).
Latents are cached in the workdir (a finished run is not trained again). Output: results/<--name>.{json,md}
(default scvi_paired).
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.sysvi_fidelity import DATASETS, METRICS, prepare  # noqa: E402

DATASET = "baron"
BATCH_SIZE = 128
VALIDATION_FRACTION = 0.1
OFFSET = 1000  # the other stream's seed: s + OFFSET
UNUSED = ("l_encoder.", "decoder.px_r_decoder.")  # scvi-tools builds them, an observed library / gene dispersion
ATLASVI_RUNS = {"atlasvi": (0, 0), "atlasvi-order": (OFFSET, 0), "atlasvi-draws": (0, OFFSET)}  # loader, train offset
SCVI_RUNS = {"scvi-tools": 0, "scvi-tools-stream": OFFSET}
OWN_INIT = "scvi-tools-own-init"  # --own-init: scvi-tools' own initial weights of seed s, atlasvi's split
OWN_INIT_STREAM = "scvi-tools-own-init-stream"  # the same weights on the stream of seed s + OFFSET
OWN_INIT_RUNS = {OWN_INIT: 0, OWN_INIT_STREAM: OFFSET}  # scvi-tools' own weights of seed s: stream offset
PAIRS = (  # (label, minuend, subtrahend)
    ("atlasvi - scvi-tools", "atlasvi", "scvi-tools"),
    ("scvi-tools - scvi-tools stream (control)", "scvi-tools", "scvi-tools-stream"),
    ("atlasvi - atlasvi order (control)", "atlasvi", "atlasvi-order"),
    ("atlasvi - atlasvi draws (control)", "atlasvi", "atlasvi-draws"),
)


def latent_path(workdir: Path, run: str, seed: int, epochs: int) -> Path:
    """One run's latent and figures (named as sysvi_fidelity's score side reads them: "<run>_s<seed>" its key)."""
    return workdir / f"{DATASET}_e{epochs}_{run}_s{seed}.npz"


def save_atlasvi_init(store: Path, seed: int, workdir: Path) -> Path:
    """`SCVI(store, seed=seed)`'s initial weights under scvi-tools' names (workdir/init_s<seed>.pt, kept)."""
    from atlasvi.api import SCVI
    from benchmarks.fidelity_data import save_init

    init = workdir / f"init_s{seed}.pt"
    if not init.exists():
        save_init(SCVI(store, device="cpu", seed=seed).module.state_dict(), "SCVI", init)
    return init


def atlasvi_side(store: Path, seeds: list[int], epochs: int, workdir: Path, runs: list[str]) -> None:
    """atlasvi's `runs` (of ATLASVI_RUNS) per seed, each from `SCVI(store, seed=s)`'s weights, whose copy under
    scvi-tools' names is written first (init_s<seed>.pt)."""
    import torch

    from atlasvi.api import SCVI
    from atlasvi.data import LoaderConfig
    from atlasvi.train import TrainConfig

    torch.set_num_threads(1)
    for seed in seeds:
        save_atlasvi_init(store, seed, workdir)
        for run in runs:
            loader_offset, train_offset = ATLASVI_RUNS[run]
            out = latent_path(workdir, run, seed, epochs)
            if out.exists():
                continue
            model = SCVI(store, device="cpu", seed=seed)
            started = time.perf_counter()
            train = TrainConfig(max_epochs=epochs, validation_fraction=VALIDATION_FRACTION, seed=seed + train_offset)
            loader = LoaderConfig(batch_size=BATCH_SIZE, seed=seed + loader_offset)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                history = model.fit(train, loader)
            seconds = time.perf_counter() - started
            np.savez(
                out, latent=model.get_latent_representation(), seconds=seconds, load=np.array(os.getloadavg()),
                heldout_neg_elbo=history[-1].validation_elbo,
            )  # fmt: skip
            print(json.dumps({"run": out.stem, "seconds": round(seconds, 1)}), flush=True)


def scvi_side(h5ad: Path, seeds: list[int], epochs: int, workdir: Path, runs: list[str]) -> None:
    """scvi-tools' `runs` per seed on atlasvi's split: those of SCVI_RUNS from atlasvi's initial weights, those of
    OWN_INIT_RUNS from scvi-tools' own (scvi.settings.seed = s before the model is built, as
    benchmarks/sysvi_fidelity.py, no copy); each run's stream is scvi.settings.seed = s + its offset."""
    import logging

    import anndata as ad
    import scvi
    import torch

    from benchmarks.fidelity_data import load_init

    torch.set_num_threads(1)
    scvi.settings.dl_num_workers = 0
    scvi.settings.verbosity = logging.WARNING
    counts = ad.read_h5ad(h5ad)
    counts.X = counts.X.astype(np.float32)
    n_train = counts.n_obs - round(counts.n_obs * VALIDATION_FRACTION)  # atlasvi.data.sampler.split_rows
    indexing = [np.arange(n_train), np.arange(n_train, counts.n_obs)]
    for seed in seeds:
        for run in runs:
            offset = {**SCVI_RUNS, **OWN_INIT_RUNS}[run]
            out = latent_path(workdir, run, seed, epochs)
            if out.exists():
                continue
            adata = counts.copy()
            scvi.model.SCVI.setup_anndata(adata, batch_key=DATASETS[DATASET][1])
            scvi.settings.seed = seed
            model = scvi.model.SCVI(adata)
            if run not in OWN_INIT_RUNS:
                load_init(model.module, workdir / f"init_s{seed}.pt", UNUSED)
            scvi.settings.seed = seed + offset  # the stream: minibatch order, dropout, draws
            started = time.perf_counter()
            model.train(
                max_epochs=epochs, batch_size=BATCH_SIZE, accelerator="cpu", enable_progress_bar=False,
                check_val_every_n_epoch=epochs, datasplitter_kwargs={"external_indexing": [i.copy() for i in indexing]},
            )  # fmt: skip
            seconds = time.perf_counter() - started
            history = model.history
            np.savez(
                out, latent=model.get_latent_representation(adata), seconds=seconds, load=np.array(os.getloadavg()),
                heldout_neg_elbo=float(history["elbo_validation"].iloc[-1, 0]), version=scvi.__version__,
            )  # fmt: skip
            print(json.dumps({"run": out.stem, "seconds": round(seconds, 1)}), flush=True)


def paired(values: dict[str, list[float]], a: str, b: str) -> dict:
    """Paired differences values[a] - values[b]: each, mean, sd, se and t = mean / se."""
    diff = np.subtract(values[a], values[b])
    sd = float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    se = sd / math.sqrt(len(diff))
    return {
        "differences": diff.tolist(),
        "mean": float(diff.mean()),
        "sd": sd,
        "se": se,
        "t": float(diff.mean() / se) if se > 0 else 0.0,
    }


def spread(report: dict) -> dict[str, dict[str, float]]:
    """The sd of one run's figure from the stream alone (each control pair's sd of differences / sqrt 2) and across
    seeds (the sd over seeds of the atlasvi and scvi-tools runs: initial weights and stream)."""
    out = {}
    for label, _, _ in PAIRS[1:]:
        if label not in report["paired"]:
            continue
        out[f"stream: {label.removesuffix(' (control)')}"] = {
            m: v["sd"] / math.sqrt(2) for m, v in report["paired"][label].items()
        }
    for run in ("atlasvi", "scvi-tools"):
        out[f"across seeds: {run}"] = {m: float(np.std(v, ddof=1)) for m, v in report["runs"][run].items()}
    return out


def markdown(report: dict) -> str:
    seeds = report["seeds"]
    lines = [
        "# scVI: atlasvi vs scvi-tools 1.4.2 SCVI from the same initial weights (Baron human + mouse, species)",
        "",
        f"Command: `{report['command']}`. Machine: {report['machine']}; 1-minute load average at the end of each "
        f"run {report['load_at_run_ends'][0]:.1f}-{report['load_at_run_ends'][1]:.1f}. "
        f"{report['n_cells']} cells x {report['n_genes']} genes, "
        f"{report['n_train']} training cells in both tools, seeds {seeds}, {report['epochs']} epochs. Design: the "
        "script's docstring. Seconds per run: atlasvi "
        f"{report['seconds']['atlasvi']:.0f}, scvi-tools {report['seconds']['scvi-tools']:.0f} (medians, shared VM).",
        "",
        "| run | " + " | ".join(METRICS) + " | held-out -ELBO |",
        "|---|" + "---|" * (len(METRICS) + 1),
    ]
    for run, rows in report["runs"].items():
        cells = [f"{np.mean(rows[m]):.3f} ± {np.std(rows[m], ddof=1):.3f}" for m in METRICS]
        cells.append(f"{np.mean(rows['heldout_neg_elbo']):.1f} ± {np.std(rows['heldout_neg_elbo'], ddof=1):.1f}")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sd over seeds.", "", "## Paired differences (mean ± se over seeds, t)", ""]
    lines += ["| pair | " + " | ".join(METRICS) + " | held-out -ELBO |", "|---|" + "---|" * (len(METRICS) + 1)]
    for label, pair in report["paired"].items():
        cells = [f"{pair[m]['mean']:+.3f} ± {pair[m]['se']:.3f} (t {pair[m]['t']:.2f})" for m in METRICS]
        e = pair["heldout_neg_elbo"]
        cells.append(f"{e['mean']:+.2f} ± {e['se']:.2f} (t {e['t']:.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Where the spread comes from (sd of one run's figure)",
        "",
        "Stream alone: the sd of a control pair's differences over sqrt(2) (the same weights, another stream). Across "
        "seeds: the sd over seeds of one run's figures (initial weights and stream both change).",
        "",
        "| source | " + " | ".join(METRICS) + " | held-out -ELBO |",
        "|---|" + "---|" * (len(METRICS) + 1),
    ]
    for label, spread in report["spread"].items():
        lines.append(f"| {label} | " + " | ".join(f"{spread[m]:.3f}" for m in (*METRICS, "heldout_neg_elbo")) + " |")
    lines += ["", "## Per seed", "", "| metric | run | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
    lines.append("|---|---|" + "---|" * len(seeds))
    for m in (*METRICS, "heldout_neg_elbo"):
        for run, rows in report["runs"].items():
            lines.append(f"| {m} | {run} | " + " | ".join(f"{v:.3f}" for v in rows[m]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["main", "scvi"], default="main")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "scvi_paired")
    parser.add_argument("--scvi-python", default=str(HERE / ".cache" / "scvi-venv" / "bin" / "python"))
    parser.add_argument("--h5ad", type=Path)
    parser.add_argument("--own-init", action="store_true", help=f"also {OWN_INIT} (see scvi_side)")
    parser.add_argument(
        "--runs", nargs="+", choices=[*ATLASVI_RUNS, *SCVI_RUNS, *OWN_INIT_RUNS],
        help="(--side scvi) the runs; (main) only these of ATLASVI_RUNS and SCVI_RUNS (default: all), paired as PAIRS "
        "where both are run",
    )  # fmt: skip
    parser.add_argument("--name", default="scvi_paired", help="results/<NAME>.json and .md")
    args = parser.parse_args()
    if args.side == "scvi":
        return scvi_side(args.h5ad, args.seeds, args.epochs, args.workdir, args.runs)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data_dir = HERE / ".cache" / "sysvi_fidelity"
    data_dir.mkdir(parents=True, exist_ok=True)
    store, h5ad = prepare(DATASET, data_dir)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    me = [args.scvi_python, str(Path(__file__).resolve())]
    chosen = args.runs or [*ATLASVI_RUNS, *SCVI_RUNS]
    ours, theirs = [r for r in ATLASVI_RUNS if r in chosen], [r for r in SCVI_RUNS if r in chosen]
    theirs += [OWN_INIT] if args.own_init else []
    for seed in args.seeds:  # seed by seed: a stopped run leaves whole seeds
        atlasvi_side(store, [seed], args.epochs, args.workdir, ours)
        subprocess.run(
            [*me, "--side", "scvi", "--h5ad", str(h5ad), "--seeds", str(seed), "--epochs", str(args.epochs),
             "--workdir", str(args.workdir), "--runs", *theirs],
            env=env, check=True,
        )  # fmt: skip
    runs = [*ours, *theirs]
    latents = [latent_path(args.workdir, r, s, args.epochs) for r in runs for s in args.seeds]
    scores_out = args.workdir / f"scores_e{args.epochs}.json"
    subprocess.run(
        [args.scvi_python, str(HERE / "sysvi_fidelity.py"), "--side", "score", "--datasets", DATASET, "--h5ad",
         str(h5ad), "--latents", *map(str, latents), "--out", str(scores_out)],
        env=env, check=True,
    )  # fmt: skip
    scores = json.loads(scores_out.read_text())  # keyed "<run>_s<seed>"
    table: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, list[float]] = {"atlasvi": [], "scvi-tools": []}
    loads = []  # the 1-minute load average at the end of each run
    for path in latents:
        key = path.stem.split("_", 2)[2]
        run = key.rsplit("_s", 1)[0]
        with np.load(path) as data:
            row = table.setdefault(run, {m: [] for m in (*METRICS, "heldout_neg_elbo")})
            for m in METRICS:
                row[m].append(scores[key][m])
            row["heldout_neg_elbo"].append(float(data["heldout_neg_elbo"]))
            seconds["atlasvi" if run.startswith("atlasvi") else "scvi-tools"].append(float(data["seconds"]))
            loads.append(float(data["load"][0]))
    import anndata as ad

    adata = ad.read_h5ad(h5ad, backed="r")
    report = {
        "command": f"python benchmarks/scvi_paired.py --seeds {' '.join(map(str, args.seeds))} --epochs {args.epochs}"
        + (" --own-init" if args.own_init else "")
        + (f" --runs {' '.join(args.runs)}" if args.runs else "")
        + (f" --name {args.name}" if args.name != "scvi_paired" else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared VM), CPU only, 1 torch thread",
        "load_at_run_ends": [min(loads), max(loads)],
        "seeds": args.seeds,
        "epochs": args.epochs,
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_train": int(adata.n_obs - round(adata.n_obs * VALIDATION_FRACTION)),
        "seconds": {k: float(np.median(v)) for k, v in seconds.items()},
        "runs": table,
        "paired": {
            label: {m: paired({a: table[a][m], b: table[b][m]}, a, b) for m in table[a]}
            for label, a, b in PAIRS
            if a in table and b in table
        },
    }
    report["spread"] = spread(report)
    results = HERE / "results"
    (results / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (results / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
