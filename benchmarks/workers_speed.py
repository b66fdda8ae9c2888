"""Training cells/s with 1 worker (the plain process) and N Ray Train workers, on one store.

    python benchmarks/workers_speed.py --store benchmarks/.cache/atlas_10k_zstd.zarr --workers 1 2 --epochs 4

The global batch (--global-batch, default 128) is the loader's batch size, split over the workers. cells/s: training
cells of an epoch (all ranks) over its wall time, median of the epochs after the first. Prints one JSON line per
setting and a Markdown table; CPU here (gloo), one torch thread per worker.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from atlasvi.data import LoaderConfig, open_store
from atlasvi.launch import DistributedConfig, connect, train_distributed
from atlasvi.models.scvi import SCVIModule
from atlasvi.train import TrainConfig, fit
from atlasvi.train.job import TrainJobConfig, make_loaders, rank_batch_size
from atlasvi.train.loop import read_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for workers in args.workers:
        job = TrainJobConfig(
            store=args.store,
            train=TrainConfig(max_epochs=args.epochs, n_epochs_kl_warmup=args.epochs),
            loader=LoaderConfig(batch_size=args.global_batch),  # global: the workers split it
        )
        started = time.perf_counter()
        if workers == 1:
            store = open_store(args.store)
            train, validation = make_loaders(store, job.loader, job.train.validation_fraction)
            history = fit(SCVIModule(store.schema, job.model), train, validation, job.train)
        else:
            connect(None)
            run = DistributedConfig(num_workers=workers, storage_path=tempfile.mkdtemp(), name=f"workers{workers}")
            history = read_checkpoint(train_distributed(job, os.path.abspath(args.store), run)[0])[1]
        wall = time.perf_counter() - started
        steady = [r.cells_per_second for r in history[1:]] or [history[0].cells_per_second]
        row = {
            "workers": workers, "per_worker_batch": rank_batch_size(job.loader.batch_size, workers),
            "epochs": len(history),
            "cells_per_s": statistics.median(steady), "wall_s": wall, "held_out_elbo": history[-1].validation_elbo,
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print("| workers | per-worker batch | cells/s (median, epochs 2+) | wall (s) | held-out -ELBO |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['workers']} | {r['per_worker_batch']} | {r['cells_per_s']:,.0f} | {r['wall_s']:.0f}"
            f" | {r['held_out_elbo']:.1f} |"
        )


if __name__ == "__main__":
    main()
