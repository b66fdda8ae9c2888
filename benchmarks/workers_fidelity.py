"""N Ray Train workers train as well as one: `atlasvi train` with 1 and 2 workers on a real dataset, same seeds.

    .venv/bin/python benchmarks/workers_fidelity.py --seeds 0 1 2

Kang 2018 PBMC (kang2018_pbmc_ifnb_muscat.h5ad, 1,556 cells x 1,267 genes; batch `sample`, 4 samples; labels
`cell_type`), built once into an atlas store with `atlasvi build`, then trained per seed with the README's settings
(configs/scvi.yaml: scVI, 100 epochs, batch 128, the default 10% held-out rows) as `atlasvi train --num-workers 1`
(this process) and `--num-workers 2` (Ray Train DDP, 2 x 64 cells a step: the batch size is global). Per run, from
the saved model and the store (atlasvi's API, the same cells and draws for every run):

- held-out -ELBO: nats per held-out cell at KL weight 1 (`SCVI.get_elbo`, the store's held-out rows);
- batch-mixing entropy: for each cell, the entropy of `sample` among its 15 nearest neighbours in the latent
  (posterior means of every cell), over log(4); the mean over cells;
- label kNN accuracy of the latent on `cell_type` (benchmarks/fidelity_data.knn_accuracy).

The goal (issue "Speed ..."): 2 workers within 1% of 1 worker's held-out -ELBO and within 0.02 of its entropy
(means over seeds). Output: results/workers_fidelity.json and .md. One torch thread per process; the runs go one
after another, each with its own SQLite MLflow store under the cache folder.
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

from benchmarks.fidelity_data import knn_accuracy

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KANG = ROOT.parent / "shared" / "data" / "kang2018_pbmc_ifnb_muscat.h5ad"
CACHE = HERE / ".cache" / "workers_fidelity"
BATCH_KEY, LABELS_KEY, NEIGHBOURS = "sample", "cell_type", 15
ELBO_TOLERANCE, ENTROPY_TOLERANCE = 0.01, 0.02


def batch_entropy(latent: np.ndarray, batches: np.ndarray, k: int = NEIGHBOURS) -> float:
    """Mean over cells of the entropy of the batches among a cell's k nearest neighbours (itself excluded), divided
    by log(n_batches): 1 = perfectly mixed. latent (n_cells, n_latent), batches (n_cells,)."""
    from sklearn.neighbors import NearestNeighbors

    codes = np.unique(batches, return_inverse=True)[1]
    n_batches = int(codes.max()) + 1
    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(latent).kneighbors(latent, return_distance=False)[:, 1:]
    shares = np.stack([(codes[neighbours] == b).mean(axis=1) for b in range(n_batches)], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(shares > 0, shares * np.log(shares), 0.0).sum(axis=1)
    return float(entropy.mean() / np.log(n_batches))


def atlasvi(*args: str) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{CACHE / 'mlflow.db'}"}
    subprocess.run([str(ROOT / ".venv" / "bin" / "atlasvi"), *args], check=True, env=env, cwd=ROOT)


def score(model_dir: Path, store: Path) -> dict[str, float]:
    """Held-out -ELBO, batch entropy and label kNN accuracy of a saved scVI on the store."""
    import anndata as ad
    import torch

    from atlasvi.api import SCVI

    torch.set_num_threads(1)
    model = SCVI.load(model_dir, store, device="cpu")
    obs = ad.read_zarr(store).obs
    latent = model.get_latent_representation()
    return {
        "held_out_elbo": model.get_elbo(),
        "batch_entropy": batch_entropy(latent, obs[BATCH_KEY].to_numpy()),
        "knn_accuracy": knn_accuracy(latent, obs[LABELS_KEY].to_numpy()),
    }


def table(rows: list[dict], command: str) -> str:
    lines = [
        "# N workers train as one: `atlasvi train --num-workers 1` vs `2` on Kang (1,556 cells, batch `sample`)",
        "",
        f"Command: `{command}`. Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), CPU only, "
        "1 torch thread per process. configs/scvi.yaml settings (scVI, 100 epochs, batch 128: 2 workers read 64 "
        "cells each a step). Held-out -ELBO: nats per held-out cell (lower is better); batch entropy: 15-NN entropy "
        "of `sample` over log 4 (higher mixes more); kNN: 15-NN `cell_type` accuracy, 5-fold CV.",
        "",
        "| workers | seed | held-out -ELBO | batch entropy | kNN accuracy | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['seed']} | {r['held_out_elbo']:.2f} | {r['batch_entropy']:.3f} | "
            f"{r['knn_accuracy']:.3f} | {r['wall_s']:.0f} |"
        )
    lines += ["", "| workers | held-out -ELBO | batch entropy | kNN accuracy |", "|---|---|---|---|"]
    means = {}
    for workers in sorted({r["workers"] for r in rows}):
        mine = [r for r in rows if r["workers"] == workers]
        means[workers] = {k: float(np.mean([r[k] for r in mine])) for k in ("held_out_elbo", "batch_entropy")}
        values = {k: [r[k] for r in mine] for k in ("held_out_elbo", "batch_entropy", "knn_accuracy")}
        cells = [
            f"{np.mean(v):.{d}f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.{d}f}"
            for (k, v), d in zip(values.items(), (2, 3, 3), strict=True)
        ]
        lines.append(f"| {workers} | {' | '.join(cells)} |")
    if 1 in means and 2 in means:
        elbo = abs(means[2]["held_out_elbo"] / means[1]["held_out_elbo"] - 1)
        entropy = abs(means[2]["batch_entropy"] - means[1]["batch_entropy"])
        met = elbo <= ELBO_TOLERANCE and entropy <= ENTROPY_TOLERANCE
        lines += [
            "",
            f"2 workers vs 1 (means over seeds): held-out -ELBO differs by {100 * elbo:.2f}% (goal <= 1%), batch "
            f"entropy by {entropy:.3f} (goal <= 0.02): {'met' if met else 'NOT met'}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="workers_fidelity")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    store = CACHE / "kang.zarr"
    if not (store / "zarr.json").exists():
        atlasvi("build", str(KANG), "--output", str(store), "--batch-key", BATCH_KEY, "--labels-key", LABELS_KEY)
    rows = []
    for seed in args.seeds:
        for workers in args.workers:
            output = CACHE / f"w{workers}_s{seed}"
            started = time.perf_counter()
            atlasvi(
                "train", "--config", str(ROOT / "configs" / "scvi.yaml"), "--store", str(store), "--output",
                str(output), "--seed", str(seed), "--num-workers", str(workers),
                "--latent-key", f"X_w{workers}_s{seed}", "--overwrite",
            )  # fmt: skip
            row = {"workers": workers, "seed": seed, "wall_s": time.perf_counter() - started}
            row |= score(output / "model", store)
            rows.append(row)
            print(json.dumps(row), flush=True)
    command = "python benchmarks/workers_fidelity.py " + " ".join(sys.argv[1:])
    results = HERE / "results"
    (results / f"{args.out}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    (results / f"{args.out}.md").write_text(table(rows, command))
    print(table(rows, command))


if __name__ == "__main__":
    main()
