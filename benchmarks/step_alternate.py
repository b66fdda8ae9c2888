"""One process, steps alternating between this checkout's fused kernels and a baseline's: CPU time and per-step losses.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/step_alternate.py --baseline-src ../wt-speed-base   # batch 128, 300
    PYTHONPATH=$PWD .venv/bin/python benchmarks/step_alternate.py --baseline-src ../wt-speed-base --steps 100 --rtol 0

For a change confined to the two hand-written autograd Functions of the scVI step, the fused NB / ZINB rows
(`atlasvi.distributions._NBRows`) and the sparse first layer (`atlasvi.nn._SparseLinear`): the baseline's versions
are loaded from `--baseline-src` (another atlasvi checkout) under other module names, and two copies of scVI
(defaults, the same initial weights) train on synth10k's training store held in RAM (`ResidentLoader`), 1 torch
thread, fused Adam as `fit` builds it, the same minibatches and draws (seeded per step), one step of each in turn
(the order alternating), so that the load of a shared machine falls on both alike. Per side: CPU ms per step
(`time.thread_time`, the median and mean after 10 warm-up steps); per step: the relative difference of the two
losses. Exits non-zero (one line) where a step's losses differ by more than `--rtol`. Writes `--out` as JSON.
"""

import argparse
import copy
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

HERE = Path(__file__).resolve().parent
WARMUP = 10


def _load(name: str, path: Path) -> ModuleType:
    """The module at `path`, imported as `name` (its own `atlasvi.*` imports resolve to this checkout)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def alternate(baseline_src: Path, batch_size: int, steps: int) -> dict:
    """CPU ms per step of each side and the per-step losses (see the module docstring)."""
    sys.path.insert(0, str(HERE))
    from train_speed import open_loader, stores

    import atlasvi.distributions as distributions
    import atlasvi.nn as nn
    from atlasvi.data import LoaderConfig, open_store
    from atlasvi.models.scvi import SCVIModule
    from atlasvi.train import TrainConfig
    from atlasvi.train.loop import _optimizer

    torch.set_num_threads(1)
    old_distributions = _load("baseline_distributions", baseline_src / "atlasvi" / "distributions" / "__init__.py")
    old_nn = _load("baseline_nn", baseline_src / "atlasvi" / "nn" / "__init__.py")
    kernels = {
        "atlasvi": (distributions._NBRows, nn._SparseLinear),
        "baseline": (old_distributions._NBRows, old_nn._SparseLinear),
    }
    train_store, _ = stores("synth10k")
    loader = open_loader(train_store, LoaderConfig(batch_size=batch_size, resident=True))
    torch.manual_seed(0)
    modules = {"atlasvi": SCVIModule(open_store(train_store).schema)}
    modules["baseline"] = copy.deepcopy(modules["atlasvi"])
    optimizers = {side: _optimizer(module, TrainConfig()) for side, module in modules.items()}
    ms: dict[str, list[float]] = {side: [] for side in modules}
    losses: dict[str, list[float]] = {side: [] for side in modules}
    step = 0
    while step < steps:
        for batch in loader:
            for side in ("atlasvi", "baseline") if step % 2 == 0 else ("baseline", "atlasvi"):
                distributions._NBRows, nn._SparseLinear = kernels[side]
                module, optimizer = modules[side], optimizers[side]
                torch.manual_seed(step)
                started = time.thread_time()
                output = module(module.unpack(batch), kl_weight=0.5)
                optimizer.zero_grad(set_to_none=True)
                output.loss.backward()
                optimizer.step()
                ms[side].append((time.thread_time() - started) * 1000)
                losses[side].append(output.loss.item())
            step += 1
            if step >= steps:
                break
    distributions._NBRows, nn._SparseLinear = kernels["atlasvi"]
    relative = [abs(a - b) / abs(b) for a, b in zip(losses["atlasvi"], losses["baseline"], strict=True)]
    medians = {side: statistics.median(v[WARMUP:]) for side, v in ms.items()}
    return {
        "batch_size": batch_size,
        "steps": steps,
        "median_cpu_ms": {side: round(v, 3) for side, v in medians.items()},
        "mean_cpu_ms": {side: round(statistics.mean(v[WARMUP:]), 3) for side, v in ms.items()},
        "baseline_over_atlasvi": round(medians["baseline"] / medians["atlasvi"], 3),
        "identical_losses": sum(r == 0 for r in relative),
        "max_relative_loss_difference": max(relative),
        "max_relative_loss_difference_first_10": max(relative[:10]),
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-src", type=Path, required=True, help="another atlasvi checkout")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rtol", type=float, default=1e-5, help="largest relative difference of a step's losses")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    if not (args.baseline_src / "atlasvi" / "distributions" / "__init__.py").is_file():
        sys.exit(f"step_alternate: {args.baseline_src} is not an atlasvi checkout")
    load = [os.getloadavg()[0]]
    result = alternate(args.baseline_src.resolve(), args.batch_size, args.steps)
    result["load_1min"] = load + [os.getloadavg()[0]]
    summary = {k: v for k, v in result.items() if k != "losses"}
    print(json.dumps(summary))
    if args.out is not None:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), **result}, indent=1) + "\n")
    if result["max_relative_loss_difference"] > args.rtol:
        sys.exit(f"step_alternate: losses differ by {result['max_relative_loss_difference']:.2e} > rtol {args.rtol}")


if __name__ == "__main__":
    main()
