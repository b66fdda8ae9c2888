"""`atlasvi build` on 1 and 2 workers: wall time, peak RSS per process, scaling, the store's checksum.

    .venv/bin/python benchmarks/build_scaling.py --n-cells 1000000 --workers 1 2 --repeats 3
    .venv/bin/python benchmarks/build_scaling.py --n-cells 1000000 --workers 1 --repeats 3 --baseline-src before=../old
    .venv/bin/python benchmarks/build_scaling.py --n-cells 10000000 --workers 1 2 --repeats 1 --merge

Input: `synthetic.py`'s counts (2,000 genes, ~8% non-zeros, 4 batches; cached in `.cache/synth_<size>.h5ad`), built
as every benchmark store is (`atlasvi.bench.perf`: batch and cell-type keys, 1,000 Seurat v3 HVG flags, every gene
kept, zstd, default chunk size). Every build runs in its own process, as `atlasvi build --workers N` does (a
local dask cluster of N single-threaded worker processes, its start-up included; N = 1: no dask, one process);
the repeats are paired (each repeat runs every configuration, in rotated order) because the machine is shared.
Peak RSS is each process's maximum resident set (`getrusage`): the driver's, and each worker's. Scaling
efficiency = t(1 worker) / (N x t(N workers)), from medians. With --baseline-src LABEL=CHECKOUT, other checkouts
of atlasvi (e.g. before the build moved to dask, or before a change) run the same build in the same repeats
(one process each; with --baseline-workers N > 1, on N dask workers, for checkouts that have them), with their
paired ratio to this checkout's time on as many workers.
With --copies K the input is a folder of K studies, copies of the cached input with their own cell names (10M =
10 x 1M: generating 10M cells takes about an hour on this machine).
The projection to 100M cells extrapolates linearly in cells from the largest size measured (the passes are
linear in cells), its CPU time as well, and peak RSS from the slope between the two largest sizes.
Results: `results/build_scaling.json` and `results/build_scaling.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"


def _size_name(n: int) -> str:
    return f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k"


def _input(n_cells: int) -> Path:
    path = CACHE / f"synth_{_size_name(n_cells)}.h5ad"
    if not path.exists():
        sys.path.insert(0, str(HERE))
        from synthetic import make_synthetic_h5ad

        print(f"generating {n_cells:,} synthetic cells -> {path}", file=sys.stderr, flush=True)
        make_synthetic_h5ad(path, n_cells, 2000, 0)
    return path


def _studies(n_cells: int, copies: int) -> Path:
    """A folder of `copies` studies: copies of the n_cells input, each with its own cell names (study<i>-NAME)."""
    import h5py
    import numpy as np

    source = _input(n_cells)
    folder = CACHE / f"synth_{_size_name(n_cells)}_x{copies}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        path = folder / f"study{i}.h5ad"
        if path.exists():
            continue
        partial = path.with_suffix(".partial")
        shutil.copyfile(source, partial)
        with h5py.File(partial, "r+") as handle:
            names = handle["obs/_index"].asstr()[:]
            attrs = dict(handle["obs/_index"].attrs)
            del handle["obs/_index"]
            renamed = np.array([f"study{i}-{name}" for name in names], dtype=object)
            handle["obs"].create_dataset("_index", data=renamed, dtype=h5py.string_dtype())
            handle["obs/_index"].attrs.update(attrs)
        partial.rename(path)
    return folder


def _one(args: argparse.Namespace) -> None:
    """One build in this process (run by the parent in a fresh process); prints a JSON line."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from atlasvi.data import BuildConfig, build_store

    config = BuildConfig(
        inputs=[args.input], output=args.output, batch_key="batch", labels_key="cell_type", n_top_genes=1000,
        hvg_subset=False, seed=0, compressor="zstd", overwrite=True,
    )  # fmt: skip
    workers = args.workers[0]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    workers_rss: list[float] = []
    workers_cpu: list[float] = []
    if args.baseline and workers == 1:  # checkouts from before dask have no executor
        build_store(config)
    else:
        from atlasvi.data.executor import BuildExecutor

        executor = BuildExecutor.local(workers) if workers > 1 else BuildExecutor()
        with executor:
            build_store(config, executor=executor)
            if executor.client is not None:
                peaks = executor.run_on_workers(_peak_rss_mb)
                workers_rss = sorted(peaks.values())
                workers_cpu = sorted(executor.run_on_workers(_cpu_seconds).values())
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "seconds": seconds,
                "driver_peak_rss_mb": _peak_rss_mb(),
                "worker_peak_rss_mb": workers_rss,
                "driver_cpu_seconds": _cpu_seconds(),
                "worker_cpu_seconds": workers_cpu,
                "load_1min_before": load,
                "load_1min_after": os.getloadavg()[0],
            }
        )
    )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run(kind: str, workers: int, h5ad: Path, output: Path, baselines: dict[str, str]) -> dict:
    from atlasvi.data.store import store_checksum

    baseline = kind.removeprefix("baseline:") if kind.startswith("baseline:") else None
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) if baseline is None else baselines[baseline])
    command = [sys.executable, __file__, "--one", "--input", str(h5ad), "--output", str(output)]
    command += ["--workers", str(workers)] + (["--baseline"] if baseline is not None else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} {workers} workers failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["checksum"] = store_checksum(output)  # here: the baseline's atlasvi has no store_checksum
    shutil.rmtree(output, ignore_errors=True)
    return {"kind": kind, "workers": workers} | result


def _summary(runs: list[dict]) -> list[dict]:
    rows = []
    for n_cells in sorted({r["n_cells"] for r in runs}):
        at = [r for r in runs if r["n_cells"] == n_cells]
        base = [r["seconds"] for r in at if r["kind"] == "dask" and r["workers"] == 1]
        for kind, workers in sorted({(r["kind"], r["workers"]) for r in at}):
            mine = [r for r in at if (r["kind"], r["workers"]) == (kind, workers)]
            seconds = statistics.median(r["seconds"] for r in mine)
            rss_workers = [max(r["worker_peak_rss_mb"]) for r in mine if r["worker_peak_rss_mb"]]
            row = {
                "n_cells": n_cells,
                "kind": kind,
                "workers": workers,
                "repeats": len(mine),
                "median_seconds": seconds,
                "seconds": [round(r["seconds"], 1) for r in mine],
                "driver_peak_rss_mb": max(r["driver_peak_rss_mb"] for r in mine),
                "worker_peak_rss_mb": max(rss_workers) if rss_workers else None,
                "load_1min": [round(r["load_1min_before"], 1) for r in mine],
                "checksums": sorted({r["checksum"] for r in mine}),
            }
            cpu = [_cpu_total(r) for r in mine if "driver_cpu_seconds" in r]
            if cpu:
                row["median_cpu_seconds"] = statistics.median(cpu)
                row["cores_used"] = statistics.median(_cpu_total(r) / r["seconds"] for r in mine)
            if base:  # against this checkout's 1-worker build (a baseline's 1-worker work is the same build)
                row["scaling_efficiency"] = statistics.median(base) / (workers * seconds)
                base_cpu = [
                    _cpu_total(r) for r in at if r["kind"] == "dask" and r["workers"] == 1 and "driver_cpu_seconds" in r
                ]
                if cpu and base_cpu:
                    row["cpu_efficiency"] = statistics.median(base_cpu) / statistics.median(cpu)
            if kind.startswith("baseline"):
                pairs = [
                    b["seconds"] / d["seconds"]
                    for b in mine
                    for d in at
                    if d["kind"] == "dask" and d["workers"] == workers and d["repeat"] == b["repeat"]
                ]
                if pairs:
                    row["baseline_over_dask"] = statistics.median(pairs)
            rows.append(row)
    return rows


def _projection(summary: list[dict], cells: int = 100_000_000) -> dict:
    """Time and memory at `cells`, linear in cells: time (wall here, and CPU) from the largest size measured;
    peak RSS from the two largest sizes (their slope), else proportional."""
    dask = [s for s in summary if s["kind"] == "dask"]
    largest = max(s["n_cells"] for s in dask)
    projection: dict = {"from_cells": largest, "cells": cells, "seconds": {}, "cpu_seconds": {}, "memory_gb": {}}
    for row in (s for s in dask if s["n_cells"] == largest):
        workers = str(row["workers"])
        projection["seconds"][workers] = row["median_seconds"] * cells / largest
        if "median_cpu_seconds" in row:
            projection["cpu_seconds"][workers] = row["median_cpu_seconds"] * cells / largest
        smaller = [s for s in dask if s["workers"] == row["workers"] and s["n_cells"] < largest]
        memory = {}
        for key in ("driver_peak_rss_mb", "worker_peak_rss_mb"):
            if not row[key]:
                continue
            if smaller:
                other = max(smaller, key=lambda s: s["n_cells"])
                slope = (row[key] - other[key]) / (largest - other["n_cells"])
                memory[key.removesuffix("_peak_rss_mb")] = (row[key] + slope * (cells - largest)) / 1000
            else:
                memory[key.removesuffix("_peak_rss_mb")] = row[key] * cells / largest / 1000
        projection["memory_gb"][workers] = memory
    return projection


def _cpu_total(run: dict) -> float:
    """The build's CPU seconds: the driver's and every worker's (user + system)."""
    return run["driver_cpu_seconds"] + sum(run["worker_cpu_seconds"])


def _markdown(result: dict) -> str:
    lines = [
        "# atlasvi build: 1 and 2 workers",
        "",
        f"Machine: {result['machine']}. Command: `{result['command']}`.",
        "",
        "| cells | build | workers | median s (runs) | scaling eff. | CPU s | cores used | CPU eff. | "
        "driver peak RSS | worker peak RSS | load (1-min, per run) | store checksum |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in result["summary"]:
        efficiency = f"{row['scaling_efficiency']:.2f}" if "scaling_efficiency" in row else ""
        cpu = f"{row['median_cpu_seconds']:.1f}" if "median_cpu_seconds" in row else ""
        cores = f"{row['cores_used']:.2f}" if "cores_used" in row else ""
        cpu_efficiency = f"{row['cpu_efficiency']:.2f}" if "cpu_efficiency" in row else ""
        worker = f"{row['worker_peak_rss_mb']:.0f} MB" if row["worker_peak_rss_mb"] else "(the driver)"
        name = row["kind"].replace("baseline:", "baseline ") if row["kind"].startswith("baseline") else "dask"
        if "baseline_over_dask" in row:
            name += f", {row['baseline_over_dask']:.2f}x this checkout's time on as many workers (paired median)"
        checksums = ", ".join(c[:12] for c in row["checksums"])
        lines.append(
            f"| {row['n_cells']:,} | {name} | {row['workers']} | {row['median_seconds']:.1f} "
            f"({', '.join(str(s) for s in row['seconds'])}) | {efficiency} | {cpu} | {cores} | {cpu_efficiency} | "
            f"{row['driver_peak_rss_mb']:.0f} MB | "
            f"{worker} | {', '.join(str(x) for x in row['load_1min'])} | {checksums} |"
        )
    lines += [
        "",
        "Scaling eff. = t(1 worker) / (N x t(N workers)), wall time. CPU s = user + system seconds of the driver and "
        "every worker; cores used = CPU s / wall s (what the build got of the shared machine); CPU eff. = CPU s "
        "(1 worker) / CPU s (N workers): the share of the N-worker build's CPU that is the 1-worker build's work, so "
        "1 - CPU eff. is what splitting the build costs, apart from waiting for a core.",
    ]
    projection = result.get("projection_100m")
    if projection and "memory_gb" in projection:
        lines += ["", "Projection to 100M cells (linear in cells from the largest size measured):", ""]
        for workers, seconds in projection["seconds"].items():
            line = f"- {workers} worker(s): {seconds / 60:.0f} min on this shared machine"
            cpu = projection.get("cpu_seconds", {}).get(workers)
            if cpu is not None:
                line += (
                    f"; {cpu / 60:.0f} CPU min in all, so about {cpu / 60 / int(workers):.0f} min on "
                    f"{workers} core(s) of its own (the CPU split evenly, the driver's serial parts ignored)"
                )
            lines.append(line)
            memory = projection["memory_gb"].get(workers, {})
            if memory:
                parts = [f"{name} ~{gb:.1f} GB" for name, gb in memory.items()]
                lines.append(f"  peak RSS (linear in cells from the two largest sizes): {', '.join(parts)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-cells", type=int, default=1_000_000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--copies", type=int, default=1, help="build a folder of this many copies of the input (own cell names)"
    )
    p.add_argument(
        "--baseline-src", nargs="*", default=[], help="LABEL=CHECKOUT: other atlasvi checkouts to time alongside"
    )
    p.add_argument(
        "--baseline-workers", type=int, nargs="+", default=[1], help="workers of the baselines (> 1: with dask)"
    )
    p.add_argument("--merge", action="store_true", help="add to the committed runs instead of replacing them")
    p.add_argument("--out", default=str(RESULTS / "build_scaling.json"))
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        _one(args)
        return 0
    h5ad = _input(args.n_cells) if args.copies == 1 else _studies(args.n_cells, args.copies)
    n_cells = args.n_cells * args.copies
    baselines = dict(item.split("=", 1) for item in args.baseline_src)
    configs = [("dask", w) for w in args.workers]
    configs += [(f"baseline:{label}", w) for label in baselines for w in args.baseline_workers]
    out = Path(args.out)
    previous = json.loads(out.read_text())["runs"] if args.merge and out.exists() else []
    runs = [r for r in previous if r["n_cells"] != n_cells]
    for repeat in range(args.repeats):
        for kind, workers in configs[repeat % len(configs) :] + configs[: repeat % len(configs)]:
            output = CACHE / f"build_scaling_{_size_name(n_cells)}.zarr"
            run = _run(kind, workers, h5ad, output, baselines)
            run |= {"n_cells": n_cells, "repeat": repeat, "inputs": args.copies}
            runs.append(run)
            print(json.dumps(run), file=sys.stderr, flush=True)
    result = {
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, shared with other work (load averages per run)",
        "command": " ".join(["python benchmarks/build_scaling.py", *(argv if argv is not None else sys.argv[1:])]),
        "runs": runs,
        "summary": _summary(runs),
    }
    result["projection_100m"] = _projection(result["summary"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
