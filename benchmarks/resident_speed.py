"""Training throughput of the device-resident loader against streaming: paired runs on one synthetic store.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/resident_speed.py                 # 20k x 2000, 3 epochs, 3 pairs
    PYTHONPATH=$PWD .venv/bin/python benchmarks/resident_speed.py --pairs 1 --cells 5000 --out /tmp/rs

The store: `atlasvi.bench.perf.cached_store` (synthetic counts fitted to Kang, 8% non-zeros, zstd; cached under
benchmarks/.cache). Each run is its own process with `threads` torch threads and OMP_WAIT_POLICY=PASSIVE: scVI with
scvi-tools' defaults, `make_loaders` (the store's seeded 90/10 split) and `fit`, with `LoaderConfig.resident` true
or false; the two runs of a pair go back to back, their order alternating from pair to pair. Per run: cells/s
(training cells of an epoch over its wall time; median of the epochs after the first, and the first apart),
the seconds `make_loaders` took (reading the rows into memory, when resident), the wall time and peak RSS of the
process, and the per-step losses, which must be identical within a pair (the two loaders cut the same
minibatches): the script fails otherwise. Reported: medians over pairs, and the median of the per-pair ratios.
Writes `results/resident_speed.md` and `.json` (or `--out`). `worker` is also run by `gpu_check.py`.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REFERENCE = REPO.parent / "shared" / "data" / "kang2018_pbmc_ifnb_muscat.h5ad"


def worker(spec: dict) -> dict:
    """One training run as `spec` says (store, batch_size, epochs, resident, device, threads, amp, seed)."""
    import torch

    torch.set_num_threads(spec["threads"])
    from atlasvi.data import LoaderConfig, open_store
    from atlasvi.train import TrainConfig, fit
    from atlasvi.train.job import TrainJobConfig, build_module, make_loaders, module_spec

    device = torch.device(spec["device"])
    store = open_store(spec["store"], backend=spec.get("backend", "auto"))
    train = TrainConfig(max_epochs=spec["epochs"], seed=spec["seed"], amp=spec.get("amp", True))
    loader = LoaderConfig(batch_size=spec["batch_size"], seed=spec["seed"], resident=spec["resident"])
    job = TrainJobConfig(store=spec["store"], train=train, loader=loader)
    built = module_spec(job, store)
    module = build_module(job.model, built.schema, spec["seed"]).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    train_loader, validation = make_loaders(
        store, loader, train.validation_fraction, code_maps=built.code_maps, modalities=built.modalities,
        device=device,
    )  # fmt: skip
    loaders_s = time.perf_counter() - started
    with train_loader, validation:
        history = fit(module, train_loader, validation, train)
    wall_s = time.perf_counter() - started
    rates = [r.cells_per_second for r in history]
    return {
        "resident": type(train_loader).__name__ == "ResidentLoader",
        "loaders_s": loaders_s,
        "first_epoch_cells_per_s": rates[0],
        "cells_per_s": statistics.median(rates[1:]) if len(rates) > 1 else rates[0],
        "epoch_s": [r.seconds for r in history],
        "train_cells": train_loader.sampler.rows_per_rank,
        "wall_s": wall_s,
        "validation_elbo": history[-1].validation_elbo,
        "step_losses": [loss for r in history for loss in r.step_losses],
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
    }


def run_worker(spec: dict) -> dict:
    """`worker(spec)` in a fresh process (peak RSS and wall time of the process added)."""
    from atlasvi.bench.perf import run_child

    env = os.environ | {"OMP_NUM_THREADS": str(spec["threads"]), "OMP_WAIT_POLICY": "PASSIVE"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result, rss_mb, seconds = run_child([sys.executable, __file__, "--worker", json.dumps(spec)], env, cwd=REPO)
    return result | {"peak_rss_mb": rss_mb, "process_s": seconds}


def store_of(n_cells: int, n_genes: int, cache: Path, reference: Path) -> Path:
    """The cached synthetic store of n_cells x n_genes (generated and built on first use)."""
    from atlasvi.bench.perf import BenchConfig, cached_store

    config = BenchConfig(n_genes=n_genes, cache_dir=str(cache), reference=str(reference))
    return cached_store(n_cells, config)


def markdown(report: dict) -> str:
    lines = [
        "# Device-resident loader vs streaming: scVI training throughput",
        "",
        f"`{report['command']}`",
        "",
        f"{report['cells']:,} synthetic cells x {report['genes']} genes (`atlasvi.bench.perf.cached_store`, zstd), "
        f"{report['epochs']} epochs, {report['pairs']} pairs per batch size, {report['threads']} torch thread, "
        f"device {report['device']}, streaming reader {report.get('backend', 'zarr')} (`--backend`); "
        f"machine: {report['machine']}. cells/s: median over epochs 2.. of a run, "
        "then over pairs; ratio: median of the per-pair ratios resident / streaming. Per-step losses of the two "
        "runs of every pair identical: " + ("yes" if report["identical_losses"] else "NO") + ".",
        "",
        "| batch | streaming cells/s | resident cells/s | ratio | first epoch ratio | load into memory (s) "
        "| wall s streaming / resident | peak RSS MB streaming / resident |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['batch_size']} | {row['streaming']:.0f} | {row['resident']:.0f} | {row['ratio']:.2f} "
            f"| {row['first_epoch_ratio']:.2f} | {row['loaders_s']:.2f} "
            f"| {row['wall_streaming']:.1f} / {row['wall_resident']:.1f} "
            f"| {row['rss_streaming']:.0f} / {row['rss_resident']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto", help="the store reader streaming uses (LoaderConfig.backend)")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "resident_speed")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    store = store_of(args.cells, args.genes, args.cache, args.reference)
    runs, rows, identical = [], [], True
    for batch_size in args.batch_sizes:
        pairs = []
        for pair in range(args.pairs):
            spec = {"store": str(store), "batch_size": batch_size, "epochs": args.epochs, "device": args.device,
                    "threads": args.threads, "seed": 0, "backend": args.backend}  # fmt: skip
            order = (False, True) if pair % 2 == 0 else (True, False)
            done = {mode: run_worker(spec | {"resident": mode}) for mode in order}
            if done[True]["step_losses"] != done[False]["step_losses"] or not done[True]["resident"]:
                identical = False
            for mode, result in done.items():
                runs.append({"batch_size": batch_size, "pair": pair, "mode": "resident" if mode else "streaming"}
                            | {k: v for k, v in result.items() if k != "step_losses"})  # fmt: skip
                print(f"batch {batch_size} pair {pair} {'resident' if mode else 'streaming'}: "
                      f"{result['cells_per_s']:.0f} cells/s", file=sys.stderr, flush=True)  # fmt: skip
            pairs.append(done)
        median = statistics.median
        rows.append({
            "batch_size": batch_size,
            "streaming": median(p[False]["cells_per_s"] for p in pairs),
            "resident": median(p[True]["cells_per_s"] for p in pairs),
            "ratio": median(p[True]["cells_per_s"] / p[False]["cells_per_s"] for p in pairs),
            "first_epoch_ratio": median(
                p[True]["first_epoch_cells_per_s"] / p[False]["first_epoch_cells_per_s"] for p in pairs
            ),
            "loaders_s": median(p[True]["loaders_s"] for p in pairs),
            "wall_streaming": median(p[False]["wall_s"] for p in pairs),
            "wall_resident": median(p[True]["wall_s"] for p in pairs),
            "rss_streaming": median(p[False]["peak_rss_mb"] for p in pairs),
            "rss_resident": median(p[True]["peak_rss_mb"] for p in pairs),
        })  # fmt: skip
    import platform

    report = {
        "command": "PYTHONPATH=$PWD .venv/bin/python benchmarks/resident_speed.py " + " ".join(argv or sys.argv[1:]),
        "cells": args.cells, "genes": args.genes, "epochs": args.epochs, "pairs": args.pairs,
        "threads": args.threads, "device": args.device, "identical_losses": identical, "backend": args.backend,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared and under load (paired runs)",
        "rows": rows, "runs": runs,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    if not identical:
        raise SystemExit("the per-step losses of resident and streaming runs differ")


if __name__ == "__main__":
    main()
