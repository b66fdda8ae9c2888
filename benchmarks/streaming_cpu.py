"""CPU per trained cell of the streaming loader against the resident one, alternating epochs in one process.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/streaming_cpu.py --batch-size 128 --pairs 10

Separate processes of the same code differ by up to a fifth in CPU per cell on the shared VM (benchmarks/README.md,
train_speed), more than the 5% that the goal "streaming >= 95% of resident" is about. Here one process trains one
scVI module (the store's `atlasvi train` defaults, seed 0) for single epochs (`fit`, max_epochs 1), alternating
between a resident and a streaming training loader of the same training rows (`make_loaders` with resident true /
false), which loader goes first alternating from pair to pair. Measured per epoch: the process's CPU seconds over the
training pass (every thread: training and read-ahead; validation not included) per training cell. The first pair
warms both up and is not counted. Reported: per pair, resident's CPU per cell over streaming's (the goal: >= 0.95),
its median and range over the pairs, and each loader's median cells per CPU second. The store is
`atlasvi.bench.perf.cached_store` (synthetic counts fitted to Kang, 8% non-zeros), as `resident_speed.py` uses.
Writes results/streaming_cpu.md and .json (or --out).
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from resident_speed import REFERENCE, store_of  # noqa: E402
from train_speed import EpochCPU  # noqa: E402


def summary(resident_cpu_s: list[float], streaming_cpu_s: list[float], cells: int, warmup: int = 1) -> dict:
    """Per-pair resident / streaming CPU per cell (CPU seconds of the training pass each, `cells` trained per pass),
    the first `warmup` pairs left out: ratios, median, range, and each loader's median cells per CPU second."""
    resident, streaming = resident_cpu_s[warmup:], streaming_cpu_s[warmup:]
    if not resident or len(resident) != len(streaming):
        raise ValueError("need as many resident as streaming passes, more than the warm-up")
    ratios = [r / s for r, s in zip(resident, streaming, strict=True)]
    return {
        "ratios": ratios,
        "median": statistics.median(ratios),
        "lowest": min(ratios),
        "highest": max(ratios),
        "below_0_95": sum(r < 0.95 for r in ratios),
        "resident_cells_per_cpu_s": statistics.median(cells / c for c in resident),
        "streaming_cells_per_cpu_s": statistics.median(cells / c for c in streaming),
    }


def measure(store_path: Path, batch_size: int, pairs: int, threads: int) -> dict:
    """Alternate 1-epoch fits of one module between the resident and streaming loaders (`pairs` + 1 pairs)."""
    import torch

    from atlasvi.data import LoaderConfig, open_store
    from atlasvi.train import TrainConfig, fit
    from atlasvi.train.job import TrainJobConfig, build_module, make_loaders, module_spec

    torch.set_num_threads(threads)
    store = open_store(store_path)
    train = TrainConfig(max_epochs=1, seed=0)
    timed, loaders = {}, {}
    with contextlib.ExitStack() as stack:
        for resident in (True, False):
            config = LoaderConfig(batch_size=batch_size, seed=0, resident=resident)
            job = TrainJobConfig(store=str(store_path), train=train, loader=config)
            built = module_spec(job, store)
            pair = make_loaders(
                store, config, train.validation_fraction, code_maps=built.code_maps, modalities=built.modalities
            )
            name = "resident" if resident else "streaming"
            loaders[name] = tuple(stack.enter_context(loader) for loader in pair)
            timed[name] = EpochCPU(loaders[name][0])
        module = build_module(job.model, built.schema, 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the KL warm-up outlasts a 1-epoch fit, by design here
            for i in range(pairs + 1):
                for name in ("resident", "streaming") if i % 2 == 0 else ("streaming", "resident"):
                    fit(module, timed[name], loaders[name][1], train)
    kinds = {name: type(pair[0]).__name__ for name, pair in loaders.items()}
    if kinds != {"resident": "ResidentLoader", "streaming": "StreamingLoader"}:
        raise RuntimeError(f"the loaders are not one resident and one streaming: {kinds}")
    cells = loaders["resident"][0].sampler.rows_per_rank
    return {
        "cells_per_pass": cells,
        "resident_cpu_s": timed["resident"].cpu_s,
        "streaming_cpu_s": timed["streaming"].cpu_s,
        **summary(timed["resident"].cpu_s, timed["streaming"].cpu_s, cells),
    }


def markdown(report: dict) -> str:
    """The report: one table row per batch size."""
    lines = [
        "# Streaming vs resident loader: CPU per trained cell, alternating epochs in one process",
        "",
        f"`{report['command']}`",
        "",
        f"{report['cells']:,} synthetic cells x {report['genes']} genes (`atlasvi.bench.perf.cached_store`), scVI "
        f"with the store's defaults, {report['threads']} torch thread; {report['pairs']} counted pairs of 1-epoch "
        "fits after one warm-up pair, the order alternating; machine: "
        f"{report['machine']}; load {report['load_before']:.2f} before, {report['load_after']:.2f} after. Ratio: "
        "resident's CPU seconds per training cell over streaming's, per pair (goal >= 0.95).",
        "",
        "| batch | median ratio | lowest / highest | pairs below 0.95 | cells per CPU s: resident / streaming |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['batch_size']} | {row['median']:.3f} | {row['lowest']:.3f} / {row['highest']:.3f} "
            f"| {row['below_0_95']} of {len(row['ratios'])} "
            f"| {row['resident_cells_per_cpu_s']:,.0f} / {row['streaming_cells_per_cpu_s']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "streaming_cpu")
    args = parser.parse_args(argv)
    store = store_of(args.cells, args.genes, args.cache, args.reference)
    load_before = os.getloadavg()[0]
    rows = []
    for batch_size in args.batch_sizes:
        rows.append({"batch_size": batch_size, **measure(store, batch_size, args.pairs, args.threads)})
        print(f"batch {batch_size}: median {rows[-1]['median']:.3f}", file=sys.stderr)
    report = {
        "command": " ".join(["python", "benchmarks/streaming_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "cells": args.cells,
        "genes": args.genes,
        "pairs": args.pairs,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, CPU only",
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
