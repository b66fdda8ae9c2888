"""scVI training throughput: atlasvi (from the store as `atlasvi train` loads it, and streamed) vs scvi-tools.

    .venv/bin/python benchmarks/train_speed.py                     # synth10k and cellbench, batch 128 and 1024
    .venv/bin/python benchmarks/train_speed.py --dataset synth10k --batch-sizes 128 --repeats 1 --epochs 4
    .venv/bin/python benchmarks/train_speed.py --dataset synth10k --baseline-src ../atlasvi-before   # before/after

For each dataset, repeat and batch size (interleaved, the order rotated every repeat), each in its own
process with the same torch thread count and `OMP_WAIT_POLICY=PASSIVE`:
- atlasvi/store: `fit` on the training store placed as `atlasvi train` places it (`choose_resident`, "auto":
  rows that fit in RAM are read once and cut there by `ResidentLoader`, else streamed); the loader is recorded;
- atlasvi/streaming: the same with `resident=False`: `StreamingLoader` (the default reader, read-ahead
  threads), the very same minibatches;
- scvi-tools: `scvi_reference.py` in the scvi-tools venv on the same cells (same h5ad, filters, 2000 HVGs
  and held-out cells as `fidelity.py`), architecture (n_latent 10, n_hidden 128, 1 layer, ZINB, gene
  dispersion), batch size and epochs; `train_size=1.0`, so no validation inside its epochs either.
With --baseline-src (a checkout of atlasvi from before a change) its atlasvi runs the same two atlasvi workers
("baseline/store", "baseline/streaming") in the same rotation: before and after in one run, on the same machine.
Steady state: training cells per epoch over the epoch's wall time and over the process's CPU time in it (every
thread), the first epoch excluded, median over epochs, then median over repeats; ratios are paired within a
repeat. Validation (atlasvi) is outside the timed epoch. On a shared machine the CPU time is the steadier figure.

Datasets: `synth10k` (10,000 synthetic NB cells x 2000 genes from `synthetic.py`, 9,000 training cells;
the steadier figure) and `cellbench` (CellBench sc_mixology SNG cells, 2000 HVGs, 827 training cells).
Writes `results/train_speed.md` and `.json` (or `--out`) and logs one MLflow run per row (experiment
`benchmarks`; `MLFLOW_TRACKING_URI`, else the repo's local store `mlruns/mlflow.db`).
"""

import argparse
import json
import os
import platform
import resource
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity
import fidelity_data
from scvi_reference import _busy_cpu_s, _own_cpu_s

from atlasvi.data import LoaderConfig, Minibatch, StreamingLoader, open_store
from atlasvi.data.resident import ResidentLoader, ResidentRows, choose_resident
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
TOOLS = ("atlasvi/store", "atlasvi/streaming", "scvi-tools")
BASELINE_TOOLS = ("baseline/store", "baseline/streaming")


def open_loader(path: Path, config: LoaderConfig) -> StreamingLoader:
    """A loader of every row of the store at `path`, placed as `atlasvi train` places a job's rows
    (`choose_resident`): held in RAM and cut there (`ResidentLoader`) when they fit the budget, else streamed."""
    store = open_store(path)
    if choose_resident(store, config).resident:
        return ResidentLoader(store, ResidentRows(store, 0, store.n_cells), config)
    return StreamingLoader(store, config)


class EpochCPU:
    """`loader` with this process's CPU seconds (every thread: training and read-ahead), the kernel's share of them
    and its minor page faults over each pass through it, i.e. over each training epoch of `fit`."""

    def __init__(self, loader: StreamingLoader):
        self.loader, self.cpu_s, self.kernel_s, self.faults = loader, [], [], []

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Minibatch]:
        started, usage = time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
        yield from self.loader
        self.cpu_s.append(time.process_time() - started)
        now = resource.getrusage(resource.RUSAGE_SELF)
        self.kernel_s.append(now.ru_stime - usage.ru_stime)
        self.faults.append(now.ru_minflt - usage.ru_minflt)


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
    resident = False if args.worker == "streaming" else "auto"  # "auto": what `atlasvi train` does
    config = LoaderConfig(batch_size=args.batch_size, num_threads=args.loader_threads, resident=resident)
    train, heldout = EpochCPU(open_loader(train_store, config)), open_loader(heldout_store, config)
    module = SCVIModule(open_store(train_store).schema)
    busy0, own0, started = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
    history = fit(module, train, heldout, TrainConfig(max_epochs=args.epochs, n_epochs_kl_warmup=args.epochs))
    wall = time.perf_counter() - started
    others = None if busy0 is None else max(0.0, _busy_cpu_s() - busy0 - (_own_cpu_s() - own0)) / wall
    steady = history[1:] or history
    cells = round(history[-1].cells_per_second * history[-1].seconds)
    return {
        "loader": type(train.loader).__name__,
        "epoch_s": [r.seconds for r in history],
        "epoch_cpu_s": train.cpu_s,
        "cells_per_epoch": cells,
        "cells_per_s": statistics.median(r.cells_per_second for r in steady),
        "cpu_s_per_cell": statistics.median(train.cpu_s[1:] or train.cpu_s) / cells,
        "kernel_s_per_cell": statistics.median(train.kernel_s[1:] or train.kernel_s) / cells,
        "page_faults_per_step": statistics.median(train.faults[1:] or train.faults) / len(train),
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
        "cpu_s_per_cell": timing["cpu_s_per_cell_steady"],
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


def _paired(runs: list[dict], tool: str, other: str, key: str, invert: bool = False) -> list[float]:
    """Per repeat, `tool`'s `key` over `other`'s (the inverse with `invert`): ratios paired within a repeat."""
    by_repeat = {r["repeat"]: r[key] for r in runs if r["tool"] == other}
    pairs = [(r[key], by_repeat[r["repeat"]]) for r in runs if r["tool"] == tool and r["repeat"] in by_repeat]
    return [b / a if invert else a / b for a, b in pairs]


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (dataset, batch size, tool): medians over repeats of cells/s and of CPU seconds per cell, and
    the ratios paired within each repeat (their median): x scvi-tools by wall time and by CPU time per cell,
    streaming / resident and x baseline by wall time."""
    rows = []
    keys = sorted({(r["dataset"], r["batch_size"]) for r in runs}, key=lambda k: (k[0] != "synth10k", k))
    tools = [t for t in (*TOOLS, *BASELINE_TOOLS) if any(r["tool"] == t for r in runs)]
    for dataset, batch_size in keys:
        here = [r for r in runs if (r["dataset"], r["batch_size"]) == (dataset, batch_size)]
        for tool in tools:
            mine = [r for r in here if r["tool"] == tool]
            side = tool.split("/")[-1]
            before = "baseline/" + side if tool.startswith("atlasvi/") else None
            wall = _paired(here, tool, "scvi-tools", "cells_per_s")
            cpu = _paired(here, tool, "scvi-tools", "cpu_s_per_cell", invert=True)
            resident = tool.replace("streaming", "store")
            streaming = _paired(here, tool, resident, "cells_per_s") if side == "streaming" else []
            streaming_cpu = _paired(here, tool, resident, "cpu_s_per_cell", invert=True) if side == "streaming" else []
            baseline = _paired(here, tool, before, "cells_per_s") if before in tools else []
            counted = [r for r in mine if "page_faults_per_step" in r]  # atlasvi's runs: kernel time and faults
            rows.append(
                {
                    "dataset": dataset,
                    "batch_size": batch_size,
                    "tool": tool,
                    "loader": ", ".join(sorted({r.get("loader", "scvi-tools AnnDataLoader") for r in mine})),
                    "cells_per_s": median([r["cells_per_s"] for r in mine]),
                    "repeats": [round(r["cells_per_s"]) for r in mine],
                    "cells_per_cpu_s": 1 / median([r["cpu_s_per_cell"] for r in mine]),
                    "cpu_repeats": [round(1 / r["cpu_s_per_cell"]) for r in mine],
                    "vs_scvi_tools": median(wall),
                    "vs_scvi_tools_repeats": [round(x, 2) for x in wall],
                    "vs_scvi_tools_cpu": median(cpu),
                    "vs_scvi_tools_cpu_repeats": [round(x, 2) for x in cpu],
                    "streaming_vs_resident": median(streaming) if streaming else None,
                    "streaming_vs_resident_repeats": [round(x, 2) for x in streaming],
                    "streaming_vs_resident_cpu": median(streaming_cpu) if streaming_cpu else None,
                    "streaming_vs_resident_cpu_repeats": [round(x, 2) for x in streaming_cpu],
                    "vs_baseline": median(baseline) if baseline else None,
                    "kernel_us_per_cell": median([1e6 * r["kernel_s_per_cell"] for r in counted]),
                    "page_faults_per_step": median([r["page_faults_per_step"] for r in counted]),
                    "other_processes_cpu_cores": median([r["other_processes_cpu_cores"] or 0.0 for r in mine]),
                    "load_1min": median([r.get("load_1min", float("nan")) for r in mine]),
                }
            )
    return rows


def _number(value: float, spec: str) -> str:
    """`value` formatted, blank where not measured (NaN: scvi-tools' rows)."""
    return "" if value != value else format(value, spec)


def _with_repeats(value: float, repeats: list[float]) -> str:
    """A paired ratio's median with each repeat's in brackets."""
    return f"{value:.2f} ({', '.join(f'{x:.2f}' for x in repeats)})"


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
        "and epochs on both sides. Steady state (first epoch excluded, median over epochs), median of "
        f"{report['repeats']} interleaved repeats, each in its own process: cells/s by wall time, and cells per CPU "
        "second of the training process (every thread, read-ahead included). Ratios are paired within a repeat "
        "(median of the repeats' ratios; each repeat's in brackets), streaming / resident by wall and by CPU seconds "
        "per cell. atlasvi/store: the store as `atlasvi train` "
        "loads it (resident when the rows fit in RAM: the loader column); atlasvi/streaming: the store streamed. "
        "Goals: atlasvi/scvi-tools >= 3x at batch 128 and >= 2x at 1024; streaming / resident >= 0.95."
        + (f" baseline/: atlasvi from `{report['baseline']}` in the same run." if report.get("baseline") else ""),
        "",
        "| dataset | training cells x genes | epochs | batch | tool | loader | cells/s (median) | repeats "
        "| cells per CPU s | x scvi-tools, wall | x scvi-tools, CPU | streaming / resident, wall "
        "| streaming / resident, CPU | x baseline | kernel CPU us per cell | page faults per step "
        "| other processes (cores) | load (1 min) |",
        "|---|---|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        info = report["datasets"][row["dataset"]]
        streaming = streaming_cpu = ""
        if row["streaming_vs_resident"] is not None:
            streaming = _with_repeats(row["streaming_vs_resident"], row["streaming_vs_resident_repeats"])
            streaming_cpu = _with_repeats(row["streaming_vs_resident_cpu"], row["streaming_vs_resident_cpu_repeats"])
        baseline = "" if row.get("vs_baseline") is None else f"{row['vs_baseline']:.2f}"
        wall = f"{row['vs_scvi_tools']:.2f} ({', '.join(f'{x:.2f}' for x in row['vs_scvi_tools_repeats'])})"
        cpu = f"{row['vs_scvi_tools_cpu']:.2f} ({', '.join(f'{x:.2f}' for x in row['vs_scvi_tools_cpu_repeats'])})"
        lines.append(
            f"| {row['dataset']} | {info['cells']:,} x {info['genes']} | {info['epochs']} | {row['batch_size']} "
            f"| {row['tool']} | {row['loader']} | {row['cells_per_s']:,.0f} "
            f"| {', '.join(f'{x:,}' for x in row['repeats'])} | {row['cells_per_cpu_s']:,.0f} | {wall} | {cpu} "
            f"| {streaming} | {streaming_cpu} | {baseline} | {_number(row['kernel_us_per_cell'], '.1f')} "
            f"| {_number(row['page_faults_per_step'], ',.0f')} | {row['other_processes_cpu_cores']:.2f} "
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
                mlflow.log_metric("cells_per_cpu_s", row["cells_per_cpu_s"])
                mlflow.log_metric("x_scvi_tools_cpu", row["vs_scvi_tools_cpu"])
                if row["streaming_vs_resident"] is not None:
                    mlflow.log_metric("streaming_vs_resident", row["streaming_vs_resident"])
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
    parser.add_argument("--worker", choices=["store", "streaming"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.dataset, args.batch_size = args.dataset[0], args.batch_sizes[0]
        print(json.dumps(atlasvi_worker(args)))
    else:
        run(args)


if __name__ == "__main__":
    main()
