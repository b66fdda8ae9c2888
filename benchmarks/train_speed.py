"""scVI training throughput: atlasvi (from the store, and from RAM) vs scvi-tools, side by side in one run.

    .venv/bin/python benchmarks/train_speed.py                     # synth10k and cellbench, batch 128 and 1024
    .venv/bin/python benchmarks/train_speed.py --dataset synth10k --batch-sizes 128 --repeats 1 --epochs 4
    .venv/bin/python benchmarks/train_speed.py --dataset synth10k --baseline-src ../atlasvi-before   # before/after

For each dataset, repeat and batch size (interleaved, the order rotated every repeat), each in its own
process with the same torch thread count and `OMP_WAIT_POLICY=PASSIVE`:
- atlasvi/store: `fit` on a `StreamingLoader` of the training store (the default reader, read-ahead threads);
- atlasvi/memory: the same module and `fit` on `InMemoryLoader`, the training store's CSR held in RAM and
  cut into the very same minibatches (same sampler, windows and window shuffles): only the store differs;
- scvi-tools: `scvi_reference.py` in the scvi-tools venv on the same cells (same h5ad, filters, 2000 HVGs
  and held-out cells as `fidelity.py`), architecture (n_latent 10, n_hidden 128, 1 layer, ZINB, gene
  dispersion), batch size and epochs; `train_size=1.0`, so no validation inside its epochs either.
With --baseline-src (a checkout of atlasvi from before a change) its atlasvi runs the same two atlasvi workers
("baseline/store", "baseline/memory") in the same rotation: before and after in one run, on the same machine.
cells/s are steady state: training cells per epoch over the epoch's wall time, the first epoch excluded,
median over epochs, then median over repeats. Validation (atlasvi) is outside the timed epoch.

Datasets: `synth10k` (10,000 synthetic NB cells x 2000 genes from `synthetic.py`, 9,000 training cells;
the steadier figure) and `cellbench` (CellBench sc_mixology SNG cells, 2000 HVGs, 827 training cells).
Writes `results/train_speed.md` and `.json` (or `--out`) and logs one MLflow run per row (experiment
`benchmarks`; `MLFLOW_TRACKING_URI`, else the repo's local store `mlruns/mlflow.db`).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity
import fidelity_data
from scvi_reference import _busy_cpu_s, _own_cpu_s

from atlasvi.data import LoaderConfig, Minibatch, StreamingLoader, open_store
from atlasvi.models.scvi import SCVIModule
from atlasvi.train import TrainConfig, fit

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / ".cache"
SCVI_PYTHON = CACHE / "scvi-venv" / "bin" / "python"
SYNTH_10K = CACHE / "synth_10k.h5ad"
# fidelity.prepare() reads DATASETS[name] = (h5ad under shared/data, or an absolute path; batch key; labels key;
# obs filters) and the held-out cell names from .cache/heldout_<h5ad stem>.txt
fidelity.DATASETS.setdefault("synth10k", (str(SYNTH_10K), "batch", "cell_type", {}))
DEFAULT_EPOCHS = {"synth10k": 10, "cellbench": 60}
TOOLS = ("atlasvi/store", "atlasvi/memory", "scvi-tools")
BASELINE_TOOLS = ("baseline/store", "baseline/memory")


class InMemoryLoader:
    """The minibatches of a `StreamingLoader` (one rank), cut from the store's CSR matrix held in RAM.

    Same sampler, windows and window shuffles, hence identical minibatches; no store reads, no threads:
    each window is gathered from RAM in the training thread when the previous one is used up.
    """

    def __init__(self, store: Path, config: LoaderConfig):
        streaming = StreamingLoader(store, config)
        self.sampler, self.window_rows, self.config = streaming.sampler, streaming.window_rows, config
        opened = streaming.store
        self.n_genes = opened.schema.n_genes
        block = opened.read_ranges([(0, opened.n_cells)])[0]
        self.matrix = sp.csr_matrix(
            (block.data.astype(np.float32), block.indices.astype(np.int32), block.indptr.astype(np.int32)),
            shape=(opened.n_cells, self.n_genes),
        )
        self.categorical = {k: v.astype(np.int64) for k, v in block.categorical.items()}
        self.continuous = {k: v.astype(np.float32) for k, v in block.continuous.items()}
        self.epoch = 0

    def __len__(self) -> int:
        return self.sampler.batches_per_rank

    def __iter__(self) -> Iterator[Minibatch]:
        rows = np.concatenate([np.arange(a, z) for a, z in self.sampler.rank_ranges(self.epoch)])
        size = self.config.batch_size
        for index, start in enumerate(range(0, len(rows), self.window_rows)):
            window = rows[start : start + self.window_rows]
            window = window[np.random.default_rng([self.config.seed, self.epoch, 0, index]).permutation(len(window))]
            counts = self.matrix[window]
            for a in range(0, len(window), size):
                z = min(a + size, len(window))
                lo, hi = counts.indptr[a], counts.indptr[z]
                yield Minibatch(
                    torch.from_numpy(counts.indptr[a : z + 1] - lo),
                    torch.from_numpy(counts.indices[lo:hi]),
                    torch.from_numpy(counts.data[lo:hi]),
                    self.n_genes,
                    {k: torch.from_numpy(v[window[a:z]]) for k, v in self.categorical.items()},
                    {k: torch.from_numpy(v[window[a:z]]) for k, v in self.continuous.items()},
                    torch.from_numpy(window[a:z]),
                )
        self.epoch += 1


def stores(dataset: str) -> tuple[Path, Path]:
    """(train store, held-out store) of `dataset`, built by `fidelity.prepare` on first use."""
    if dataset == "synth10k":
        if not SYNTH_10K.exists():
            cmd = [sys.executable, str(HERE / "synthetic.py"), "--n-cells", "10000", "--out", str(SYNTH_10K), "-q"]
            subprocess.run(cmd, check=True)
        heldout = CACHE / f"heldout_{SYNTH_10K.stem}.txt"
        if not heldout.exists():
            names = ad.read_h5ad(SYNTH_10K, backed="r").obs_names
            heldout.write_text("\n".join(fidelity_data.make_heldout(names, 0.1, 0)) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fidelity.prepare(dataset, CACHE / "train_speed" / dataset)


def atlasvi_worker(args: argparse.Namespace) -> dict:
    """One atlasvi training run (in this process), as a JSON-able dict."""
    torch.set_num_threads(args.threads)
    train_store, heldout_store = stores(args.dataset)
    config = LoaderConfig(batch_size=args.batch_size, num_threads=args.loader_threads)
    if args.worker == "store":
        train, heldout = StreamingLoader(train_store, config), StreamingLoader(heldout_store, config)
    else:
        train, heldout = InMemoryLoader(train_store, config), InMemoryLoader(heldout_store, config)
    module = SCVIModule(open_store(train_store).schema)
    busy0, own0, started = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
    history = fit(module, train, heldout, TrainConfig(max_epochs=args.epochs, n_epochs_kl_warmup=args.epochs))
    wall = time.perf_counter() - started
    others = None if busy0 is None else max(0.0, _busy_cpu_s() - busy0 - (_own_cpu_s() - own0)) / wall
    steady = history[1:] or history
    return {
        "epoch_s": [r.seconds for r in history],
        "cells_per_epoch": round(history[-1].cells_per_second * history[-1].seconds),
        "cells_per_s": statistics.median(r.cells_per_second for r in steady),
        "threads": torch.get_num_threads(),
        "other_processes_cpu_cores": None if others is None else round(others, 3),
    }


def scvi_run(dataset: str, batch_size: int, epochs: int, threads: int, env: dict) -> dict:
    """One scvi-tools training run through `scvi_reference.py` in the scvi-tools venv."""
    file, batch_key, labels_key, filters = fidelity.DATASETS[dataset]
    h5ad = fidelity.SHARED / file
    cmd = [
        str(SCVI_PYTHON), str(HERE / "scvi_reference.py"), "--h5ad", str(h5ad), "--batch-key", batch_key,
        "--labels-key", labels_key, "--n-top-genes", "2000", "--heldout", str(CACHE / f"heldout_{h5ad.stem}.txt"),
        "--seed", "0", "--max-epochs", str(epochs), "--n-epochs-kl-warmup", str(epochs), "--batch-size",
        str(batch_size), "--threads", str(threads), "--elbo-passes", "1", "--no-latent",
    ]  # fmt: skip
    cmd += [arg for key, value in filters.items() for arg in ("--filter-obs", f"{key}={value}")]
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([*cmd, "--out", out], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"scvi_reference.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    timing = result["timing"]
    steady = timing["cells_per_s_steady"]
    return {
        "epoch_s": None,
        "cells_per_epoch": result["n_train"],
        "cells_per_s": steady,
        "threads": result["schedule"]["threads"],
        "other_processes_cpu_cores": timing["other_processes_cpu_cores"],
        "versions": result["versions"],
        "n_genes": result["n_genes"],
    }


def atlasvi_run(tool: str, args: argparse.Namespace, dataset: str, batch_size: int, env: dict) -> dict:
    """One atlasvi worker in its own process; a baseline/ tool imports atlasvi from --baseline-src."""
    if tool.startswith("baseline/"):
        env = env | {"PYTHONPATH": str(Path(args.baseline_src).resolve())}
    cmd = [
        sys.executable, __file__, "--worker", tool.split("/")[1], "--dataset", dataset, "--batch-sizes",
        str(batch_size), "--epochs", str(args.epochs or DEFAULT_EPOCHS[dataset]), "--threads", str(args.threads),
        "--loader-threads", str(args.loader_threads),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{tool} worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """CPU model, cores, RAM and versions of this machine."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    kib = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal")), 0)
    packages = ("atlasvi", "torch", "numpy", "scipy", "zarr", "anndata")
    return {
        "cpu": models[0] if models else platform.processor(),
        "cores": os.cpu_count(),
        "ram_gib": round(kib / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in packages},
    }


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (dataset, batch size, tool): median cells/s over repeats and the ratios."""
    rows = []
    keys = sorted({(r["dataset"], r["batch_size"]) for r in runs}, key=lambda k: (k[0] != "synth10k", k))
    tools = [t for t in (*TOOLS, *BASELINE_TOOLS) if any(r["tool"] == t for r in runs)]
    for dataset, batch_size in keys:
        mine = {tool: [r for r in runs if (r["dataset"], r["batch_size"], r["tool"]) == (dataset, batch_size, tool)]
                for tool in tools}  # fmt: skip
        cells = {tool: median([r["cells_per_s"] for r in mine[tool]]) for tool in tools}
        for tool in tools:
            before = "baseline/" + tool.split("/")[1] if tool.startswith("atlasvi/") else None
            rows.append(
                {
                    "dataset": dataset,
                    "batch_size": batch_size,
                    "tool": tool,
                    "cells_per_s": cells[tool],
                    "repeats": [round(r["cells_per_s"]) for r in mine[tool]],
                    "vs_scvi_tools": cells[tool] / cells["scvi-tools"],
                    "store_vs_memory": cells[tool] / cells["atlasvi/memory"] if tool == "atlasvi/store" else None,
                    "vs_baseline": cells[tool] / cells[before] if before in cells else None,
                    "other_processes_cpu_cores": median([r["other_processes_cpu_cores"] or 0.0 for r in mine[tool]]),
                    "load_1min": median([r.get("load_1min", float("nan")) for r in mine[tool]]),
                }
            )
    return rows


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# scVI training throughput: atlasvi vs scvi-tools",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Python {m['python']}; "
        f"torch threads {report['threads']} on both sides, OMP_WAIT_POLICY=PASSIVE, atlasvi loader read threads "
        f"{report['loader_threads']}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in {**m["versions"], **report["scvi_versions"]}.items()) + ".",
        f"Command: `{report['command']}`",
        "",
        "Same cells, genes, architecture (n_latent 10, n_hidden 128, 1 layer, ZINB, gene dispersion), batch size "
        "and epochs on both sides. cells/s: steady-state training (first epoch excluded, median over epochs), "
        f"median of {report['repeats']} interleaved repeats, each in its own process. Goals: atlasvi/scvi-tools "
        ">= 3x at batch 128 and >= 2x at 1024; store/in-memory >= 0.95."
        + (f" baseline/: atlasvi from `{report['baseline']}` in the same run." if report.get("baseline") else ""),
        "",
        "| dataset | training cells x genes | epochs | batch | tool | cells/s (median) | repeats | x scvi-tools "
        "| store / in-memory | x baseline | other processes (cores) | load (1 min) |",
        "|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        info = report["datasets"][row["dataset"]]
        store = "" if row["store_vs_memory"] is None else f"{row['store_vs_memory']:.2f}"
        baseline = "" if row.get("vs_baseline") is None else f"{row['vs_baseline']:.2f}"
        lines.append(
            f"| {row['dataset']} | {info['cells']:,} x {info['genes']} | {info['epochs']} | {row['batch_size']} "
            f"| {row['tool']} | {row['cells_per_s']:,.0f} | {', '.join(f'{x:,}' for x in row['repeats'])} "
            f"| {row['vs_scvi_tools']:.2f} | {store} | {baseline} | {row['other_processes_cpu_cores']:.2f} "
            f"| {row['load_1min']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def log_mlflow(report: dict, md_path: Path, json_path: Path) -> None:
    """One MLflow run per row under a parent run holding the table and the JSON as artifacts."""
    import mlflow

    from atlasvi.tracking import ensure_experiment, local_tracking_uri

    uri = os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri(REPO)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=ensure_experiment(uri, "benchmarks"))
    m = report["machine"]
    with mlflow.start_run(run_name="train_speed"):
        mlflow.log_params({"benchmark": "train_speed", "threads": report["threads"], "repeats": report["repeats"]})
        mlflow.log_params({"machine": f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB"})
        mlflow.log_artifact(str(md_path))
        mlflow.log_artifact(str(json_path))
        for row in report["rows"]:
            info = report["datasets"][row["dataset"]]
            name = f"train_speed {row['dataset']} {row['tool']} bs{row['batch_size']}"
            with mlflow.start_run(run_name=name, nested=True):
                mlflow.log_params(
                    {
                        "tool": row["tool"], "batch_size": row["batch_size"], "dataset": row["dataset"],
                        "cells": info["cells"], "genes": info["genes"], "epochs": info["epochs"],
                        "threads": report["threads"],
                    }
                )  # fmt: skip
                mlflow.log_metric("cells_per_s", row["cells_per_s"])
                mlflow.log_metric("x_scvi_tools", row["vs_scvi_tools"])
                if row["store_vs_memory"] is not None:
                    mlflow.log_metric("store_vs_memory", row["store_vs_memory"])
                for step, value in enumerate(row["repeats"]):
                    mlflow.log_metric("cells_per_s_repeat", value, step=step)


def run(args: argparse.Namespace) -> None:
    env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(args.threads)}
    datasets, runs, scvi_versions = {}, [], {}
    for dataset in args.dataset:
        train_store, _ = stores(dataset)
        schema = open_store(train_store).schema
        epochs = args.epochs or DEFAULT_EPOCHS[dataset]
        datasets[dataset] = {"cells": open_store(train_store).n_cells, "genes": schema.n_genes, "epochs": epochs}
        tools = TOOLS + (BASELINE_TOOLS if args.baseline_src else ())
        for repeat in range(args.repeats):
            for batch_size in args.batch_sizes:
                shift = (repeat + args.batch_sizes.index(batch_size)) % len(tools)
                for tool in tools[shift:] + tools[:shift]:
                    if tool == "scvi-tools":
                        result = scvi_run(dataset, batch_size, epochs, args.threads, env)
                        versions = result.pop("versions")
                        scvi_versions = {k: versions[k] for k in ("scvi-tools", "lightning")}
                        if result.pop("n_genes") != schema.n_genes:
                            raise SystemExit(f"{dataset}: scvi-tools saw other genes than the store holds")
                    else:
                        result = atlasvi_run(tool, args, dataset, batch_size, env)
                    load = os.getloadavg()[0]  # the machine's 1-minute load average as the run ends
                    key = {"dataset": dataset, "batch_size": batch_size, "tool": tool, "repeat": repeat}
                    runs.append(key | {"load_1min": load} | result)
                    print(
                        f"{dataset} bs {batch_size} repeat {repeat} {tool}: {result['cells_per_s']:,.0f} cells/s "
                        f"(others {result['other_processes_cpu_cores']} cores)",
                        file=sys.stderr,
                        flush=True,
                    )
    report = {
        "command": " ".join(["python", "benchmarks/train_speed.py", *sys.argv[1:]]),
        "machine": machine(),
        "scvi_versions": scvi_versions,
        "threads": args.threads,
        "loader_threads": args.loader_threads,
        "repeats": args.repeats,
        "baseline": args.baseline_src,
        "datasets": datasets,
        "rows": summarise(runs),
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out.with_suffix(".md"), out.with_suffix(".json")
    md_path.write_text(markdown(report))
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(md_path.read_text())
    if not args.no_mlflow:
        log_mlflow(report, md_path, json_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", nargs="+", choices=sorted(DEFAULT_EPOCHS), default=["synth10k", "cellbench"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help=f"default per dataset: {DEFAULT_EPOCHS}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both tools")
    parser.add_argument("--loader-threads", type=int, default=2, help="atlasvi StreamingLoader read threads")
    parser.add_argument("--out", default=str(HERE / "results" / "train_speed"), help="writes OUT.md and OUT.json")
    parser.add_argument("--baseline-src", default=None, help="an atlasvi checkout to run as baseline/ (before/after)")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--worker", choices=["store", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.dataset, args.batch_size = args.dataset[0], args.batch_sizes[0]
        print(json.dumps(atlasvi_worker(args)))
    else:
        run(args)


if __name__ == "__main__":
    main()
