"""CPU per trained cell of the streaming loader against the resident one, alternating epochs in one process.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/streaming_cpu.py --batch-sizes 128 1024 --pairs 10

Separate processes of the same code differ by up to a fifth in CPU per cell on the shared VM (benchmarks/README.md,
train_speed), more than the 5% that the goal "streaming >= 95% of resident" is about. Here one process trains one
scVI module (the store's `atlasvi train` defaults, seed 0) for single epochs (`fit`, max_epochs 1), alternating
between a resident and a streaming training loader of the same training rows (`make_loaders` with resident true /
false), which loader goes first alternating from pair to pair. Measured per epoch: the process's CPU seconds over the
training pass (every thread: training and read-ahead; validation not included) per training cell. The first pair
warms both up and is not counted. Reported: per pair, resident's CPU per cell over streaming's (the goal: >= 0.95),
its median and range over the pairs, and each loader's median cells per CPU second.

Even within one process the training steps' CPU varies by ~10% from epoch to epoch, so each pass is also taken
apart by thread (`PassCPU`, from /proc/self/task: ns resolution): the training thread's CPU, split into receiving
minibatches (inside the loader's `next`) and the steps; streaming's read-ahead threads (training and validation
loader apart); any other thread. The steps are the same work with both loaders (the same minibatches: identical
per-step losses, `resident_speed.py`), so `decompose` compares the loaders' own CPU on top of the same steps
(`structural`, `bound`) and reports the steps' ratio, which is 1 but for noise and any effect of the loader on them.
The store is `atlasvi.bench.perf.cached_store` (synthetic counts fitted to Kang, 8% non-zeros), as `resident_speed.py`
uses. Writes results/streaming_cpu.md and .json (or --out).
"""

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from resident_speed import REFERENCE, store_of  # noqa: E402
from scvi_reference import _busy_cpu_s, _own_cpu_s  # noqa: E402

TASKS = Path("/proc/self/task")


def thread_cpu_s(tasks: Path = TASKS) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process by native id: the scheduler's run time from
    /proc/self/task/<tid>/schedstat, in nanoseconds (the clock `time.thread_time` reads); {} without it (off Linux)."""
    out = {}
    try:
        entries = list(tasks.iterdir())
    except OSError:
        return out
    for task in entries:
        try:
            out[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return out


@dataclass
class Pass:
    """CPU seconds of one pass through a loader (a training epoch of `fit`): the process's; the thread that
    iterated it (the training thread), and of that the part spent in the loader's `next` (receiving minibatches);
    every other thread's by native id; the training thread's kernel CPU and minor page faults; the median of its CPU
    per step (between two minibatches: robust to a few slow steps)."""

    process_s: float
    training_s: float
    receive_s: float
    threads_s: dict[int, float]
    training_kernel_s: float = 0.0
    training_faults: int = 0
    step_median_s: float = 0.0

    @property
    def step_s(self) -> float:
        """The training thread's CPU outside the loader: the training steps (forward, backward, optimizer)."""
        return self.training_s - self.receive_s


class PassCPU:
    """`loader` with a `Pass` recorded for each pass through it, i.e. for each training epoch of `fit`."""

    def __init__(self, loader, clock: Callable[[], dict[int, float]] = thread_cpu_s):
        self.loader, self.clock, self.passes = loader, clock, []

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        before, usage = self.clock(), resource.getrusage(resource.RUSAGE_THREAD)
        process, training, receive, steps = time.process_time(), time.thread_time(), 0.0, []
        batches = iter(self.loader)
        while True:
            started = time.thread_time()
            batch = next(batches, None)
            received = time.thread_time()
            receive += received - started
            if batch is None:
                break
            yield batch
            steps.append(time.thread_time() - received)
        training, process = time.thread_time() - training, time.process_time() - process
        now = resource.getrusage(resource.RUSAGE_THREAD)
        me, after = threading.get_native_id(), self.clock()
        others = {tid: s - before.get(tid, 0.0) for tid, s in after.items() if tid != me}
        kernel, faults = now.ru_stime - usage.ru_stime, now.ru_minflt - usage.ru_minflt
        step = statistics.median(steps) if steps else 0.0
        self.passes.append(Pass(process, training, receive, others, kernel, faults, step))


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


GROUPS = ("read_ahead", "validation_read_ahead", "other")


def grouped(record: Pass, groups: dict[int, str]) -> dict:
    """A pass as JSON: its CPU seconds, the other threads' summed by group (`groups`: native id -> one of GROUPS;
    unnamed threads are "other"), and `ended_s`, what no thread alive at the pass's end accounts for."""
    out = {
        "process_s": record.process_s,
        "training_s": record.training_s,
        "receive_s": record.receive_s,
        "training_kernel_s": record.training_kernel_s,
        "training_faults": record.training_faults,
        "step_median_s": record.step_median_s,
    }
    out |= {f"{g}_s": 0.0 for g in GROUPS}
    for tid, seconds in record.threads_s.items():
        out[f"{groups.get(tid, 'other')}_s"] += seconds
    out["ended_s"] = record.process_s - record.training_s - sum(out[f"{g}_s"] for g in GROUPS)
    return out


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "lowest": min(values), "highest": max(values)}


def decompose(resident: list[dict], streaming: list[dict], cells: int, warmup: int = 1) -> dict:
    """Per-thread CPU of paired passes (`grouped` records; the first `warmup` pairs left out).

    The two loaders feed one module the same minibatches, so the training steps are the same work: the per-pair
    ratio of the steps' CPU (the training thread outside the loader) is 1 but for noise and any effect of the
    loader on the steps. Each loader's own CPU: resident, the training thread's receiving (the window gather and
    the cutting) plus other threads'; streaming, its receiving, its read-ahead threads (those of the training loader,
    including what spilled into the paired resident pass) and other threads'. The streaming validation loader's
    read-ahead (reading held-out windows, landing in whichever pass follows a validation) counts for neither: the
    resident loader's held-out gather runs in the validation, outside the passes. `structural`: per pair, resident's
    step CPU plus each loader's own, resident's over streaming's (the steps' noise cancels); us figures per cell."""
    pairs = list(zip(resident, streaming, strict=True))[warmup:]
    if not pairs:
        raise ValueError("need as many resident as streaming passes, more than the warm-up")
    own_r = [r["receive_s"] + r["other_s"] for r, _ in pairs]
    own_s = [s["receive_s"] + s["other_s"] + s["read_ahead_s"] + r["read_ahead_s"] for r, s in pairs]
    step_r = [r["training_s"] - r["receive_s"] for r, _ in pairs]
    step_s = [s["training_s"] - s["receive_s"] for _, s in pairs]
    total_r = statistics.median(r["process_s"] for r, _ in pairs)

    def us(values: list[float]) -> float:
        return 1e6 * statistics.median(values) / cells

    extra = statistics.median(o_s - o_r for o_r, o_s in zip(own_r, own_s, strict=True))
    return {
        "training_ratio": _spread([r["training_s"] / s["training_s"] for r, s in pairs]),
        "step_ratio": _spread([a / b for a, b in zip(step_r, step_s, strict=True)]),
        "step_median_ratio": _spread([r["step_median_s"] / s["step_median_s"] for r, s in pairs]),
        "streaming_steps_dearer": sum(b > a for a, b in zip(step_r, step_s, strict=True)),
        "structural": _spread([(a + o_r) / (a + o_s) for a, o_r, o_s in zip(step_r, own_r, own_s, strict=True)]),
        "bound": total_r / (total_r + extra),
        "extra_fraction": extra / total_r,
        "us_per_cell": {
            "resident_total": 1e6 * total_r / cells,
            "resident_receive": us([r["receive_s"] for r, _ in pairs]),
            "resident_other": us([r["other_s"] for r, _ in pairs]),
            "resident_read_ahead_spill": us([r["read_ahead_s"] for r, _ in pairs]),
            "streaming_total": us([s["process_s"] for _, s in pairs]),
            "streaming_receive": us([s["receive_s"] for _, s in pairs]),
            "streaming_read_ahead": us([s["read_ahead_s"] + r["read_ahead_s"] for r, s in pairs]),
            "streaming_other": us([s["other_s"] for _, s in pairs]),
            "validation_read_ahead": us(
                [r["validation_read_ahead_s"] + s["validation_read_ahead_s"] for r, s in pairs]
            ),
            "ended": us([r["ended_s"] + s["ended_s"] for r, s in pairs]),
        },
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
            timed[name] = PassCPU(loaders[name][0])
        module = build_module(job.model, built.schema, 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the KL warm-up outlasts a 1-epoch fit, by design here
            for i in range(pairs + 1):
                for name in ("resident", "streaming") if i % 2 == 0 else ("streaming", "resident"):
                    fit(module, timed[name], loaders[name][1], train)
        groups = {tid: "read_ahead" for tid in loaders["streaming"][0].read_ahead_thread_ids()}
        groups |= {tid: "validation_read_ahead" for tid in loaders["streaming"][1].read_ahead_thread_ids()}
    kinds = {name: type(pair[0]).__name__ for name, pair in loaders.items()}
    if kinds != {"resident": "ResidentLoader", "streaming": "StreamingLoader"}:
        raise RuntimeError(f"the loaders are not one resident and one streaming: {kinds}")
    cells = loaders["resident"][0].sampler.rows_per_rank
    passes = {name: [grouped(p, groups) for p in timed[name].passes] for name in timed}
    cpu_s = {name: [p["process_s"] for p in passes[name]] for name in passes}
    return {
        "cells_per_pass": cells,
        "resident_cpu_s": cpu_s["resident"],
        "streaming_cpu_s": cpu_s["streaming"],
        **summary(cpu_s["resident"], cpu_s["streaming"], cells),
        "resident_passes": passes["resident"],
        "streaming_passes": passes["streaming"],
        "decomposition": decompose(passes["resident"], passes["streaming"], cells),
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
    rows = [row for row in report["rows"] if "decomposition" in row]
    if rows:
        lines += [
            "",
            "Per thread (`decompose`; us of CPU per training cell, medians over the pairs). Training thread: the one "
            "that calls `fit`; its steps: its CPU outside the loader's `next`; receive: inside it. Streaming's "
            "read-ahead: its training loader's reader threads (decoding and placing the windows), what spilled into "
            "the paired resident pass included. Structural: per pair, resident's steps plus each loader's own CPU "
            "(receive, read-ahead, other threads), resident's over streaming's. Bound: resident's total over "
            "resident's total plus streaming's median extra own CPU.",
            "",
            "| batch | training thread, resident / streaming (range) | steps (range; pairs streaming dearer) "
            "| receive: resident / streaming | streaming read-ahead (of resident's total) "
            "| other threads: resident / streaming | validation read-ahead | structural (range) | bound |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for row in rows:
        d, us = row["decomposition"], row["decomposition"]["us_per_cell"]
        lines.append(
            f"| {row['batch_size']} | {_ranged(d['training_ratio'])} | {_ranged(d['step_ratio'])}; "
            f"{d['streaming_steps_dearer']} of {len(row['ratios'])} "
            f"| {us['resident_receive']:.2f} / {us['streaming_receive']:.2f} "
            f"| {us['streaming_read_ahead']:.2f} ({100 * us['streaming_read_ahead'] / us['resident_total']:.1f}% "
            f"of {us['resident_total']:.1f}) "
            f"| {us['resident_other']:.2f} / {us['streaming_other']:.2f} | {us['validation_read_ahead']:.2f} "
            f"| {_ranged(d['structural'])} | {d['bound']:.3f} |"
        )
    busy = [f"{row['other_cpu_cores']:.2f} at batch {row['batch_size']}" for row in rows if "other_cpu_cores" in row]
    if busy:
        lines += ["", f"Cores the machine's other processes kept busy meanwhile: {', '.join(busy)}."]
    return "\n".join(lines) + "\n"


def _ranged(spread: dict) -> str:
    return f"{spread['median']:.3f} ({spread['lowest']:.3f}-{spread['highest']:.3f})"


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
    parser.add_argument("--machine", default=f"{platform.machine()}, {os.cpu_count()} CPU cores, CPU only")
    args = parser.parse_args(argv)
    store = store_of(args.cells, args.genes, args.cache, args.reference)
    load_before = os.getloadavg()[0]
    rows = []
    for batch_size in args.batch_sizes:
        busy, own, started = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
        row = {"batch_size": batch_size, **measure(store, batch_size, args.pairs, args.threads)}
        if busy is not None:  # cores the machine's other processes kept busy meanwhile
            others = _busy_cpu_s() - busy - (_own_cpu_s() - own)
            row["other_cpu_cores"] = max(0.0, others) / (time.perf_counter() - started)
        rows.append(row)
        print(f"batch {batch_size}: median {rows[-1]['median']:.3f}", file=sys.stderr)
    report = {
        "command": shlex.join(["python", "benchmarks/streaming_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "cells": args.cells,
        "genes": args.genes,
        "pairs": args.pairs,
        "threads": args.threads,
        "machine": args.machine,
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
