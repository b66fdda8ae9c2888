"""One process, whole scVI training steps alternating between this checkout and a baseline: CPU time and losses.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/step_pair.py --baseline-src ../wt-base --steps 300 --rtol 0

Unlike `step_alternate.py` (which swaps the two hand-written autograd Functions only), the whole baseline package is
imported beside this one: a copy of `--baseline-src`'s `atlasvi/` in a temporary folder, renamed
`atlasvi_baseline` (its own imports rewritten to it). Two copies of scVI (defaults, the same initial weights, checked)
train on synth10k's training store held in RAM (`ResidentLoader`, each package its own), 1 torch thread, each step
as `fit` takes it (unpack, loss, zero_grad, backward, the optimizer `fit` builds and its step), the same minibatches
and draws (seeded per step), one step of each in turn (the order alternating), so that the load of a shared machine
falls on both alike. Per side: CPU ms per step (`time.thread_time`, the median after 10 warm-up steps); per step:
the relative difference of the two losses. Exits non-zero (one line) where a step's losses differ by more than
`--rtol`. Writes `--out` as JSON.
"""

import argparse
import importlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WARMUP = 10
BASELINE = "atlasvi_baseline"


def import_baseline(source: Path, folder: Path) -> None:
    """Copy `source`/atlasvi into `folder` as the package `atlasvi_baseline` (imports rewritten), importable."""
    target = folder / BASELINE
    shutil.copytree(source / "atlasvi", target, ignore=shutil.ignore_patterns("__pycache__"))
    for path in target.rglob("*.py"):
        text = re.sub(r"\b(from|import) atlasvi\b", rf"\1 {BASELINE}", path.read_text())
        path.write_text(text.replace("atlasvi.", f"{BASELINE}."))
    sys.path.insert(0, str(folder))


def side(package: str, batch_size: int) -> dict:
    """A package's scVI (initial weights from torch seed 0), its resident loader of synth10k, optimizer and step."""
    from train_speed import stores

    data = importlib.import_module(f"{package}.data")
    resident = importlib.import_module(f"{package}.data.resident")
    scvi = importlib.import_module(f"{package}.models.scvi")
    loop = importlib.import_module(f"{package}.train.loop")
    store = data.open_store(stores("synth10k")[0])
    loader = resident.ResidentLoader(
        store, resident.ResidentRows(store, 0, store.n_cells), data.LoaderConfig(batch_size=batch_size, resident=True)
    )
    torch.manual_seed(0)
    module = scvi.SCVIModule(store.schema)
    optimizer = loop._optimizer(module, loop.TrainConfig())
    step = getattr(loop, "_step", None) or (lambda o: o.step())  # the baseline may predate `_step`
    return {"module": module, "loader": loader, "optimizer": optimizer, "step": step, "batches": iter(loader)}


def pair(batch_size: int, steps: int) -> dict:
    """CPU ms per step of each side and the per-step losses (see the module docstring)."""
    sys.path.insert(0, str(HERE))
    torch.set_num_threads(1)
    sides = {"atlasvi": side("atlasvi", batch_size), "baseline": side(BASELINE, batch_size)}
    weights = [s["module"].state_dict() for s in sides.values()]
    if not all(torch.equal(a, b) for a, b in zip(weights[0].values(), weights[1].values(), strict=True)):
        raise SystemExit("step_pair: the two scVI modules do not start from the same weights")
    ms: dict[str, list[float]] = {name: [] for name in sides}
    losses: dict[str, list[float]] = {name: [] for name in sides}
    for step in range(steps):
        for name in ("atlasvi", "baseline") if step % 2 == 0 else ("baseline", "atlasvi"):
            s = sides[name]
            batch = next(s["batches"], None)
            if batch is None:  # a new epoch
                s["batches"] = iter(s["loader"])
                batch = next(s["batches"])
            module, optimizer = s["module"], s["optimizer"]
            torch.manual_seed(step)
            started = time.thread_time()
            output = module(module.unpack(batch), kl_weight=0.5)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            s["step"](optimizer)
            ms[name].append((time.thread_time() - started) * 1000)
            losses[name].append(output.loss.item())
    relative = [abs(a - b) / abs(b) for a, b in zip(losses["atlasvi"], losses["baseline"], strict=True)]
    medians = {name: statistics.median(v[WARMUP:]) for name, v in ms.items()}
    return {
        "batch_size": batch_size,
        "steps": steps,
        "median_cpu_ms": {name: round(v, 3) for name, v in medians.items()},
        "baseline_over_atlasvi": round(medians["baseline"] / medians["atlasvi"], 4),
        "identical_losses": sum(r == 0 for r in relative),
        "max_relative_loss_difference": max(relative),
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-src", type=Path, required=True, help="another atlasvi checkout")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rtol", type=float, default=1e-5, help="largest relative difference of a step's losses")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    if not (args.baseline_src / "atlasvi" / "train" / "loop.py").is_file():
        sys.exit(f"step_pair: {args.baseline_src} is not an atlasvi checkout")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        import_baseline(args.baseline_src.resolve(), Path(folder))
        for batch_size in args.batch_sizes:
            load = [os.getloadavg()[0]]
            result = pair(batch_size, args.steps)
            result["load_1min"] = load + [os.getloadavg()[0]]
            print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
            results.append(result)
    if args.out is not None:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "runs": results}, indent=1) + "\n")
    worst = max(r["max_relative_loss_difference"] for r in results)
    if worst > args.rtol:
        sys.exit(f"step_pair: losses differ by {worst:.2e} > rtol {args.rtol}")


if __name__ == "__main__":
    main()
