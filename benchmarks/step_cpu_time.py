"""CPU time of one scVI training step (the thread's own CPU seconds, not wall time), this checkout vs another.

    .venv/bin/python benchmarks/step_cpu_time.py --baseline-src ../atlasvi-before          # batch 128, 5 pairs
    .venv/bin/python benchmarks/step_cpu_time.py --batch-sizes 128 1024 --pairs 3

On a shared machine wall-clock throughput mostly measures the other processes; the training thread's own CPU time
(`time.thread_time`) is far less sensitive to them (cache and memory-bandwidth sharing remain). Each measurement is
a fresh process (this checkout's atlasvi, or `--baseline-src`'s on its PYTHONPATH), the two alternated `--pairs`
times: scVI (defaults) on synth10k's training store held in RAM (`ResidentLoader`, as `atlasvi train` holds it),
the step as `fit` takes it (`module.unpack`, loss, zero_grad, backward, the optimizer `fit` builds), 1 torch thread,
10 warm-up steps, then CPU ms per step over each of 3 passes through the epoch's minibatches (median). Prints and
writes (`--out`) the median over pairs per side and their ratio.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(batch_size: int) -> float:
    """Median CPU ms per training step of this process's atlasvi (see the module docstring)."""
    import torch

    sys.path.insert(0, str(HERE))
    from train_speed import open_loader, stores

    from atlasvi.data import LoaderConfig, open_store
    from atlasvi.models.scvi import SCVIModule
    from atlasvi.train import TrainConfig
    from atlasvi.train.loop import _optimizer

    torch.set_num_threads(1)
    train_store, _ = stores("synth10k")
    loader = open_loader(train_store, LoaderConfig(batch_size=batch_size, resident=True))
    torch.manual_seed(0)
    module = SCVIModule(open_store(train_store).schema)
    optimizer = _optimizer(module, TrainConfig())

    def epoch(limit: int | None = None) -> int:
        steps = 0
        for batch in loader:
            output = module(module.unpack(batch), kl_weight=0.5)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            optimizer.step()
            steps += 1
            if limit is not None and steps >= limit:
                break
        return steps

    epoch(10)
    passes = []
    for _ in range(3):
        started = time.thread_time()
        steps = epoch()
        passes.append((time.thread_time() - started) / steps * 1000)
    return statistics.median(passes)


def measure(source: Path, batch_size: int) -> float:
    """CPU ms per step of the atlasvi at `source`, in a fresh process."""
    env = os.environ | {"PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-W", "ignore", __file__, "--worker", str(batch_size)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--baseline-src", type=Path, default=None, help="another atlasvi checkout to compare with")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(worker(args.worker))
        return
    sides = {"atlasvi": HERE.parent} | ({"baseline": args.baseline_src.resolve()} if args.baseline_src else {})
    rows = []
    for batch_size in args.batch_sizes:
        ms: dict[str, list[float]] = {name: [] for name in sides}
        load = [os.getloadavg()[0]]
        for pair in range(args.pairs):
            for name in sides if pair % 2 == 0 else reversed(sides):
                ms[name].append(measure(sides[name], batch_size))
        load.append(os.getloadavg()[0])
        row = {"batch_size": batch_size, "load_1min": load} | {f"{k}_cpu_ms_per_step": v for k, v in ms.items()}
        medians = {name: statistics.median(v) for name, v in ms.items()}
        row |= {f"{k}_median_cpu_ms": round(v, 2) for k, v in medians.items()}
        row |= {f"{k}_cells_per_cpu_s": round(batch_size / v * 1000) for k, v in medians.items()}
        if "baseline" in medians:
            row["baseline_over_atlasvi"] = round(medians["baseline"] / medians["atlasvi"], 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out is not None:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
