"""scVI training step: the sparse fast path vs the dense path, alternated step by step in ONE process.

    .venv/bin/python benchmarks/sparse_path_speed.py                  # synth10k, batch 128 and 1024
    .venv/bin/python benchmarks/sparse_path_speed.py --steps 30 --batch-sizes 128

Two copies of the same scVI module (same weights) train on the same minibatches, one step each in turn, so a
shared machine's load falls on both alike:
- fast: `module.unpack` as `fit` runs it (CSR counts into the first layer, the fused NB / ZINB rows) and a fused
  Adam step (as `atlasvi.train` builds it);
- dense: the same minibatch densified (log1p over every entry, dense first layer, the likelihood's dense
  `log_prob(x).sum(-1)`, what atlasvi ran before) and torch's default Adam step.
Prints the median step time of each (forward, backward, optimizer step; 1 torch thread), their ratio, and the
largest relative difference of the two paths' losses at the first step (same weights, same draws).
"""

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import open_loader, stores

from atlasvi.data import LoaderConfig, open_store
from atlasvi.models.scvi import SCVIModule


def step_times(batch_size: int, steps: int) -> dict:
    """Median seconds per training step of the two paths, alternated over the same `steps` minibatches."""
    train_store, _ = stores("synth10k")
    batches = list(open_loader(train_store, LoaderConfig(batch_size=batch_size, resident=True)))
    batches = (batches * (steps // len(batches) + 1))[:steps]
    torch.manual_seed(0)
    fast = SCVIModule(open_store(train_store).schema)
    dense = copy.deepcopy(fast)
    optimizers = {
        "fast": torch.optim.Adam(fast.parameters(), lr=1e-3, eps=0.01, weight_decay=1e-6, fused=True),
        "dense": torch.optim.Adam(dense.parameters(), lr=1e-3, eps=0.01, weight_decay=1e-6),
    }
    times: dict[str, list[float]] = {"fast": [], "dense": []}
    first: dict[str, float] = {}
    for index, batch in enumerate(batches):
        order = (("fast", fast), ("dense", dense)) if index % 2 == 0 else (("dense", dense), ("fast", fast))
        for name, module in order:
            started = time.perf_counter()
            inputs = module.unpack(batch)
            if name == "dense":
                inputs = dataclasses.replace(inputs, x=batch.counts())
            torch.manual_seed(index)
            output = module(inputs, kl_weight=0.5)
            optimizers[name].zero_grad(set_to_none=True)
            output.loss.backward()
            optimizers[name].step()
            times[name].append(time.perf_counter() - started)
            first.setdefault(name, output.loss.item())
    fast_s, dense_s = (statistics.median(times[k][2:]) for k in ("fast", "dense"))
    return {
        "batch_size": batch_size,
        "steps": steps,
        "fast_cells_per_s": round(batch_size / fast_s),
        "dense_cells_per_s": round(batch_size / dense_s),
        "fast_over_dense": round(dense_s / fast_s, 3),
        "first_loss_relative_difference": abs(first["fast"] - first["dense"]) / abs(first["dense"]),
        "load_1min": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for batch_size in args.batch_sizes:
        print(json.dumps(step_times(batch_size, args.steps)), flush=True)


if __name__ == "__main__":
    main()
