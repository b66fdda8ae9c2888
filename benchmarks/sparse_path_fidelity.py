"""scVI on Kang, the full README training: the sparse fast path vs the dense path, per-step losses and held-out ELBO.

    .venv/bin/python benchmarks/sparse_path_fidelity.py               # seed 0 three ways, seed 1 fast; 400 epochs
    .venv/bin/python benchmarks/sparse_path_fidelity.py --epochs 20 --paths fast dense --scale-seeds

The store is the README's (`atlasvi build kang2018_pbmc_ifnb_muscat.h5ad --batch-key sample --labels-key
cell_type`), the model scVI with its defaults and scvi-tools' epoch rule (400 epochs here), trained by `SCVI.fit`
three ways from the same seed (same initial weights, same minibatches, same draws):
- fast: as atlasvi trains today (CSR counts into the first encoder layer, the fused NB / ZINB rows, fused Adam);
- dense: the same module reading each minibatch densified (`module.unpack` returns dense counts: log1p over every
  entry, the dense first layer, `log_prob(x).sum(-1)`), the same fused Adam;
- before: the dense path with torch's default (foreach) Adam step, what atlasvi ran before the fast path.
Per-step losses are compared step by step (relative difference; float rounding grows over thousands of Adam steps,
so the early steps are the exactness check and the end the statistical one); the held-out -ELBO of each trained
model is averaged over DRAWS seeded draws of the latents (the same draws for every model) and compared with the
difference between two seeds of the fast path (`--scale-seeds`: the run-to-run scale). 1 torch thread.
Writes `results/sparse_path_fidelity.md` and `.json` (or `--out`).
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from atlasvi.api import SCVI
from atlasvi.data import BuildConfig, LoaderConfig, build_store
from atlasvi.train import TrainConfig, evaluate
from atlasvi.train.job import make_loaders

HERE = Path(__file__).resolve().parent
KANG = HERE.parent.parent / "shared" / "data" / "kang2018_pbmc_ifnb_muscat.h5ad"
DRAWS = 16
PATHS = ("fast", "dense", "before")


def _dense(model: SCVI) -> None:
    """Make `model`'s module read every minibatch as dense counts (the path before the sparse fast path)."""
    module, unpack = model.module, model.module.unpack
    module.unpack = lambda batch: dataclasses.replace(unpack(batch), x=batch.counts())


def _held_out(model: SCVI, dense: bool) -> float:
    """Mean held-out -ELBO per cell over DRAWS seeded draws (the loop's validation rows), fast or dense reading."""
    codes = {k: v.numpy() for k, v in model.code_maps.items()}
    _, validation = make_loaders(model.store, LoaderConfig(), model.train_config.validation_fraction, code_maps=codes)
    if dense:
        _dense(model)
    values = []
    with validation, torch.random.fork_rng(devices=[]):
        for draw in range(DRAWS):
            torch.manual_seed(1000 + draw)
            values.append(evaluate(model.module, validation, torch.device("cpu"))[0])
    model.module.__dict__.pop("unpack", None)  # the class's unpack again
    return statistics.fmean(values)


def train(store: Path, path: str, seed: int, epochs: int | None) -> dict:
    """One run of `path` from `seed`: its step losses, epoch figures, held-out -ELBO (both readings), seconds."""
    model = SCVI(store, seed=seed, device="cpu")
    if path != "fast":
        _dense(model)
    fused = None
    if path == "before":  # torch's default Adam step, as fit built it before the fast path
        import atlasvi.train.loop as loop

        fused, loop._fused = loop._fused, lambda params: {}
    started = time.perf_counter()
    try:
        history = model.fit(TrainConfig(max_epochs=epochs, seed=seed))
    finally:
        if fused is not None:
            loop._fused = fused
    seconds = time.perf_counter() - started
    model.module.__dict__.pop("unpack", None)
    return {
        "path": path,
        "seed": seed,
        "epochs": len(history),
        "seconds": round(seconds, 1),
        "step_losses": [loss for record in history for loss in record.step_losses],
        "validation_elbo_last_epoch": history[-1].validation_elbo,
        "held_out_elbo": _held_out(model, dense=False),
        "held_out_elbo_dense_reading": _held_out(model, dense=True),
    }


def _relative(a: list[float], b: list[float]) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    return np.abs(a - b) / np.abs(b)


def compare(runs: list[dict]) -> dict:
    """Step-loss differences and held-out -ELBO differences of each path against the fast path, per seed."""
    by = {(r["path"], r["seed"]): r for r in runs}
    rows = []
    for (path, seed), run in sorted(by.items(), key=lambda item: (item[0][1], PATHS.index(item[0][0]))):
        fast = by[("fast", seed)]
        rel = _relative(run["step_losses"], fast["step_losses"])
        rows.append(
            {
                "path": path,
                "seed": seed,
                "epochs": run["epochs"],
                "seconds": run["seconds"],
                "held_out_elbo": round(run["held_out_elbo"], 3),
                "held_out_elbo_dense_reading": round(run["held_out_elbo_dense_reading"], 3),
                "held_out_vs_fast_relative": (run["held_out_elbo"] - fast["held_out_elbo"]) / fast["held_out_elbo"],
                "step_loss_rel_diff_first": float(rel[0]),
                "step_loss_rel_diff_max_first_10": float(rel[:10].max()),
                "step_loss_rel_diff_max_first_100": float(rel[:100].max()),
                "step_loss_rel_diff_median_all": float(np.median(rel)),
                "step_loss_rel_diff_median_last_tenth": float(np.median(rel[-max(1, len(rel) // 10) :])),
                "steps": len(rel),
            }
        )
    seeds = sorted(s for p, s in by if p == "fast")
    between = None
    if len(seeds) > 1:
        a, b = (by[("fast", s)] for s in seeds[:2])
        between = {
            "seeds": [a["seed"], b["seed"]],
            "held_out_relative": (b["held_out_elbo"] - a["held_out_elbo"]) / a["held_out_elbo"],
            "step_loss_rel_diff_median_all": float(np.median(_relative(b["step_losses"], a["step_losses"]))),
            "step_loss_rel_diff_max_first_100": float(_relative(b["step_losses"], a["step_losses"])[:100].max()),
        }
    return {"rows": rows, "fast_seed_to_seed": between}


def markdown(result: dict, command: str) -> str:
    lines = [
        "# scVI on Kang: sparse fast path vs dense path (full README training)",
        "",
        f"`{command}`; {result['started']} UTC, 1 torch thread, shared 2-core VM (1-minute load "
        f"{result['load_1min'][0]:.1f} at the start, {result['load_1min'][1]:.1f} at the end).",
        "",
        "| path | seed | epochs | steps | held-out -ELBO (fast reading) | (dense reading) | vs fast "
        "| step-loss rel. diff: step 1 | max, first 10 | max, first 100 | median, all | median, last 10% | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["comparison"]["rows"]:
        lines.append(
            f"| {r['path']} | {r['seed']} | {r['epochs']} | {r['steps']} | {r['held_out_elbo']:.3f} | "
            f"{r['held_out_elbo_dense_reading']:.3f} | {r['held_out_vs_fast_relative']:+.2e} | "
            f"{r['step_loss_rel_diff_first']:.1e} | {r['step_loss_rel_diff_max_first_10']:.1e} | "
            f"{r['step_loss_rel_diff_max_first_100']:.1e} | {r['step_loss_rel_diff_median_all']:.1e} | "
            f"{r['step_loss_rel_diff_median_last_tenth']:.1e} | {r['seconds']} |"
        )
    between = result["comparison"]["fast_seed_to_seed"]
    if between:
        lines += [
            "",
            f"Run-to-run scale, fast path seed {between['seeds'][1]} vs seed {between['seeds'][0]}: held-out -ELBO "
            f"{between['held_out_relative']:+.2e} relative, per-step loss difference (relative) max over the first "
            f"100 steps {between['step_loss_rel_diff_max_first_100']:.1e}, "
            f"median {between['step_loss_rel_diff_median_all']:.1e} "
            "(other initial weights, draws and minibatch order).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds every path trains from")
    parser.add_argument("--scale-seeds", type=int, nargs="*", default=[1], help="seeds the fast path alone trains from")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--epochs", type=int, default=None, help="default: scvi-tools' rule (400 on Kang)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "sparse_path_fidelity")
    parser.add_argument("--from-json", action="store_true", help="re-write OUT.md from the runs in OUT.json")
    args = parser.parse_args()
    if args.from_json:
        result = json.loads(args.out.with_suffix(".json").read_text())
        result["comparison"] = compare(result["runs"])
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result, result["command"]))
        return
    torch.set_num_threads(1)
    started, load = time.strftime("%Y-%m-%d %H:%M", time.gmtime()), [os.getloadavg()[0]]
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        store = build_store(
            BuildConfig(inputs=[str(KANG)], output=str(Path(folder) / "kang.zarr"), batch_key="sample",
                        labels_key="cell_type")
        )  # fmt: skip
        plan = [(seed, path) for seed in args.seeds for path in ("fast", *(p for p in args.paths if p != "fast"))]
        for seed, path in plan + [(seed, "fast") for seed in args.scale_seeds if seed not in args.seeds]:
            run = train(store, path, seed, args.epochs)
            print(json.dumps({k: v for k, v in run.items() if k != "step_losses"}), flush=True)
            runs.append(run)
    load.append(os.getloadavg()[0])
    command = ("benchmarks/sparse_path_fidelity.py " + " ".join(sys.argv[1:])).strip()
    result = {"started": started, "load_1min": load, "command": command, "comparison": compare(runs), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main()
