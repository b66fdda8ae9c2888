"""One atlasvi benchmark row, in its own process: `python -m atlasvi.bench.worker '<json spec>'`.

Trains scVI on an atlas store for a fixed number of epochs, in this process (`workers` 1) or in Ray Train
workers, and prints one JSON object on the last stdout line: per-epoch training wall times (the validation pass
is outside them), the wall time of the whole `fit` (validation included), training cells, the peak GPU memory
on a GPU and, for Ray rows, rank 0's peak RSS (the parent measures this process's own peak RSS).
"""

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from atlasvi.data import LoaderConfig, open_store, split_rows
from atlasvi.train import EpochRecord, TrainConfig, fit
from atlasvi.train.job import TrainJobConfig, build_module, make_loaders, module_spec
from atlasvi.train.loop import read_checkpoint


def peak_rss_mb() -> float:
    """This process's peak resident set size, MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RankZeroProbe:
    """Ray Train's on_epoch_end hook (runs in rank 0): writes that worker's peak RSS and GPU memory to `path`."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, record: EpochRecord) -> None:
        gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        Path(self.path).write_text(json.dumps({"peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": gpu}))


def run(spec: dict) -> dict:
    """spec: store, batch_size (global), epochs, workers, threads, loader_threads, use_gpu, seed."""
    store = open_store(spec["store"])
    train_rows, _ = split_rows(store.n_cells, TrainConfig().validation_fraction)
    workers = spec["workers"]
    train = TrainConfig(max_epochs=spec["epochs"], seed=spec["seed"])
    loader = LoaderConfig(batch_size=spec["batch_size"], num_threads=spec["loader_threads"])  # global batch
    device = torch.device("cuda" if spec["use_gpu"] else "cpu")
    torch.set_num_threads(spec["threads"])
    rank_zero: dict = {}
    started = time.perf_counter()
    if workers == 1:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        job = TrainJobConfig(store=spec["store"], train=train, loader=loader)
        built = module_spec(job, store)
        module = build_module(job.model, built.schema, spec["seed"]).to(device)
        train_loader, validation = make_loaders(
            store,
            loader,
            train.validation_fraction,
            code_maps=built.code_maps,
            modalities=built.modalities,
            device=device,
        )
        with train_loader, validation:
            history = fit(module, train_loader, validation, train)
        if device.type == "cuda":
            rank_zero["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        from atlasvi.launch import DistributedConfig, connect, train_distributed

        job = TrainJobConfig(store=spec["store"], train=train, loader=loader, use_gpu=spec["use_gpu"])
        connect(None)
        rank_zero["ray_start_s"] = time.perf_counter() - started
        started = (
            time.perf_counter()
        )  # the Ray rows' wall time starts once Ray runs (it includes the worker group's start)
        with tempfile.TemporaryDirectory(prefix="atlasvi-bench-") as tmp:
            run_config = DistributedConfig(
                num_workers=workers, storage_path=tmp, name="bench", use_gpu=spec["use_gpu"],
                cpu_threads=spec["threads"],
            )  # fmt: skip
            probe = Path(tmp) / "rank0.json"
            checkpoint, _ = train_distributed(
                job, str(Path(spec["store"]).resolve()), run_config, RankZeroProbe(str(probe))
            )
            history = read_checkpoint(checkpoint)[1]
            rank_zero |= json.loads(probe.read_text())
    return {
        "epoch_s": [r.seconds for r in history],
        "train_cells": train_rows[1] - train_rows[0],
        "n_genes": store.schema.n_genes,
        "wall_s": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
        "device": device.type,
        "held_out_elbo": history[-1].validation_elbo,
        **{f"rank0_{k}" if k == "peak_rss_mb" else k: v for k, v in rank_zero.items()},
    }


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
