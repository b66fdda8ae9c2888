"""The performance table of `atlasvi bench`: scVI training on 10K / 100K / 1M synthetic cells.

For each size a realistic synthetic input (`atlasvi.bench.synthetic`, NB counts fitted to a real dataset) is
written out of core and built into an atlas store by `build_store`, the path real data takes; both are cached in
`cache_dir` and reused while their parameters match. Then, interleaved over `repeats` (the order rotated every
repeat) and each in its own process, so that its peak RSS is its own:

- atlasvi: `fit` of SCVIModule on a StreamingLoader of the store's training rows, in the process (workers 1) or
  in Ray Train workers (the global batch is the batch size; its peak RSS is rank 0's), per batch size and device;
- the rows of other tools a `Comparison` adds (benchmarks/perf_compare.py adds scvi-tools and annbatch);
- loaders without a model: atlasvi's StreamingLoader over the same cells, one pass.

Time per epoch is the median epoch wall time after the first epoch (steady state; the validation pass is outside
it), cells/s the training cells over it. scvi-tools' default epoch rule, min(round(20000 / n_train * 400), 400)
epochs, is reported as a projection: rule epochs x time per epoch. Outputs: `perf_table.md`, `perf_table.json`
(machine, versions, every run), `perf_chart.png` (cells/s and peak RSS against cells, log scales) and one MLflow
run per row in the experiment `benchmarks`, under a parent run that holds the three files.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from atlasvi.bench.synthetic import make_synthetic_h5ad
from atlasvi.data import BuildConfig, build_store, open_store, split_rows
from atlasvi.data.errors import StoreError
from atlasvi.data.store import read_store_attrs
from atlasvi.tracking import MlflowRun
from atlasvi.train import default_max_epochs

Progress = Callable[[str, int, int], None]


class BenchConfig(BaseModel):
    """`atlasvi bench`. Paths are relative to the working folder.

    sizes: cells per synthetic store; epochs: training epochs per row (None: 5 up to 20K cells, 3 up to 200K,
    2 above); workers: 1 is the plain process, N > 1 Ray Train workers; devices: "cuda" adds GPU rows;
    threads: torch intra-op threads of every training process (both tools); reference: the real raw-count h5ad
    the synthetic counts are fitted to (obs "cell_type"); merge: keep the runs of `output`'s perf_table.json of
    the other sizes and batch sizes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sizes: list[int] = Field(default=[10_000], min_length=1)
    n_genes: int = Field(default=2000, gt=0)
    batch_sizes: list[int] = Field(default=[128, 1024], min_length=1)
    epochs: int | None = Field(default=None, gt=0)
    workers: list[int] = Field(default=[1, 2], min_length=1)
    devices: list[Literal["cpu", "cuda"]] = ["cpu"]
    repeats: int = Field(default=1, gt=0)
    threads: int = Field(default=1, gt=0)
    loader_threads: int = Field(default=2, gt=0)
    seed: int = 0
    reference: str = "../shared/data/kang2018_pbmc_ifnb_muscat.h5ad"
    cache_dir: str = "benchmarks/.cache"
    output: str = "outputs/bench"
    loaders: bool = True
    experiment: str = "benchmarks"
    merge: bool = False

    def epochs_for(self, n_cells: int) -> int:
        return self.epochs or (5 if n_cells <= 20_000 else 3 if n_cells <= 200_000 else 2)


default_rule_epochs = default_max_epochs  # the table's "default rule" column: scvi-tools' rule on training cells


@dataclass(frozen=True)
class OtherTool:
    """A training tool run next to atlasvi on the same store's training rows, one process per row.

    command(spec): the command that trains it as `spec` says (store, n_train, batch_size, epochs, threads,
    use_gpu, seed) and prints the worker's JSON on its last stdout line; skip_reason(config, nnz): why it cannot
    run at this size (None: it can); versions: the package versions of its result the report keeps.
    """

    name: str
    command: Callable[[dict], list[str]]
    skip_reason: Callable[[BenchConfig, int], str | None]
    versions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Comparison:
    """What a comparison harness adds to `run_bench` (benchmarks/perf_compare.py); the default adds nothing.

    tools: other training tools; loader_rows(store, h5ad, n_cells, target_cells, config, env): other loaders'
    rows; skipped(config): lines for the report's "not run"; summarise(runs): the rows (default `summarise`);
    markdown(report): perf_table.md (default `markdown`); finish(report, table_path): runs last.
    """

    tools: Sequence[OtherTool] = ()
    loader_rows: Callable[[Path, Path, int, int, BenchConfig, Mapping[str, str]], list[dict]] | None = None
    skipped: Callable[[BenchConfig], list[str]] = field(default=lambda config: [])
    summarise: Callable[[list[dict]], list[dict]] | None = None
    markdown: Callable[[dict], str] | None = None
    finish: Callable[[dict, Path], None] | None = None


# ----------------------------------------------------------------------------------------------------------------
# Stores


def _size_name(n_cells: int) -> str:
    return f"{n_cells // 1000}k" if n_cells % 1000 == 0 else str(n_cells)


def _build_config(h5ad: Path, store: Path, seed: int) -> BuildConfig:
    """The build every benchmark store gets (Seurat v3 HVG flags computed, every gene kept, zstd)."""
    return BuildConfig(
        inputs=[str(h5ad)], output=str(store), batch_key="batch", labels_key="cell_type", n_top_genes=1000,
        hvg_subset=False, seed=seed, compressor="zstd", overwrite=True,
    )  # fmt: skip


def _same_build(store: Path, wanted: BuildConfig, n_cells: int) -> bool:
    """The cached store was built from a same-named input of n_cells cells with the same parameters."""
    try:
        provenance = read_store_attrs(store)["provenance"]
    except (StoreError, OSError, KeyError):
        return False
    ignore = ("inputs", "output", "overwrite")
    built = provenance["parameters"]
    # a field BuildConfig gained after the store was built counts as equal when the new build uses its default
    defaults = BuildConfig(inputs=["-"], output="-").model_dump(mode="json")
    params = {k: built.get(k, defaults[k]) for k in defaults if k not in ignore}
    inputs = provenance["inputs"]
    return (
        params == {k: v for k, v in wanted.model_dump(mode="json").items() if k not in ignore}
        and len(inputs) == 1
        and Path(inputs[0]["path"]).name == Path(wanted.inputs[0]).name
        and inputs[0]["n_cells"] == n_cells
    )


def _same_input(h5ad: Path, n_cells: int, n_genes: int, seed: int) -> bool:
    import h5py

    try:
        with h5py.File(h5ad, "r") as f:
            shape = tuple(int(x) for x in f["X"].attrs["shape"])
            stored_seed = int(f["uns/synthetic/seed"][()])
    except (OSError, KeyError):
        return False
    return shape == (n_cells, n_genes) and stored_seed == seed


def cached_store(n_cells: int, config: BenchConfig, progress: Progress | None = None) -> Path:
    """The atlas store of `n_cells` synthetic cells: reused from `cache_dir`, else generated and built."""
    cache = Path(config.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    genes = "" if config.n_genes == 2000 else f"_{config.n_genes}g"
    h5ad = cache / f"synth_{_size_name(n_cells)}{genes}.h5ad"
    store = cache / f"atlas_{_size_name(n_cells)}{genes}_zstd.zarr"
    wanted = _build_config(h5ad, store, config.seed)
    if store.exists() and _same_build(store, wanted, n_cells):
        return store
    if not _same_input(h5ad, n_cells, config.n_genes, config.seed):
        reference = Path(config.reference)
        if not reference.exists():
            raise FileNotFoundError(f"reference dataset {reference} not found (set `reference` to a raw-count h5ad)")
        if progress:
            progress(f"generating {n_cells:,} synthetic cells", 0, 1)
        make_synthetic_h5ad(h5ad, n_cells, config.n_genes, config.seed, reference=reference)
    if progress:
        progress(f"building the {n_cells:,}-cell store", 0, 1)
    return build_store(wanted)


# ----------------------------------------------------------------------------------------------------------------
# Runs


def _busy_cpu_s() -> float | None:
    """CPU seconds every process of the machine has used (from /proc/stat), None off Linux."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def run_child(command: list[str], env: Mapping[str, str], cwd: Path | None = None) -> tuple[dict, float, float]:
    """(the JSON of the command's last stdout line, its peak RSS in MB, its wall time in s); raises on failure.

    The peak RSS is the child's own (os.wait4), whatever Python it runs. The result gets `other_cpu_cores`: the
    cores other processes of the machine kept busy meanwhile (the child's own CPU time taken out).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started, busy = time.perf_counter(), _busy_cpu_s()
        child = subprocess.Popen(command, stdout=out, stderr=err, env=dict(env), cwd=cwd, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        if busy is not None:
            others = (_busy_cpu_s() - busy - usage.ru_utime - usage.ru_stime) / seconds
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed ({child.returncode}):\n{stderr[-3000:]}")
    lines = stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{' '.join(command[:3])} ... printed no result:\n{stderr[-3000:]}")
    result = json.loads(lines[-1])
    if isinstance(result, dict) and busy is not None:
        result["other_cpu_cores"] = max(0.0, others)
    return result, usage.ru_maxrss / 1024, seconds


def _tasks(config: BenchConfig, others: Sequence[str]) -> list[dict]:
    """atlasvi's rows per device, batch size and worker count, then one row of each tool in `others`."""
    tasks = []
    for device in config.devices:
        for batch_size in config.batch_sizes:
            for workers in config.workers:
                tasks.append({"tool": "atlasvi", "device": device, "workers": workers, "batch_size": batch_size})
            for name in others:
                tasks.append({"tool": name, "device": device, "workers": 1, "batch_size": batch_size})
    return tasks


def _measure(
    task: dict,
    store: Path,
    n_train: int,
    epochs: int,
    config: BenchConfig,
    env: Mapping[str, str],
    tools: Mapping[str, OtherTool],
) -> dict:
    spec = {
        "store": str(store), "batch_size": task["batch_size"], "epochs": epochs, "threads": config.threads,
        "use_gpu": task["device"] == "cuda", "seed": config.seed,
    }  # fmt: skip
    if task["tool"] == "atlasvi":
        spec |= {"workers": task["workers"], "loader_threads": config.loader_threads}
        command = [sys.executable, "-m", "atlasvi.bench.worker", json.dumps(spec)]
    else:
        command = tools[task["tool"]].command(spec | {"n_train": n_train})
    result, peak_rss, process_s = run_child(command, env)
    steady = result["epoch_s"][1:] or result["epoch_s"]
    epoch_s = statistics.median(steady)
    rank0 = result.get("rank0_peak_rss_mb")
    return task | {
        "epochs": len(result["epoch_s"]),
        "epoch_s_all": result["epoch_s"],
        "epoch_s": epoch_s,
        "cells_per_s": result["train_cells"] / epoch_s,
        "train_cells": result["train_cells"],
        "wall_s": result["wall_s"],
        "process_s": process_s,
        "peak_rss_mb": rank0 if rank0 is not None else peak_rss,
        "peak_gpu_mb": result.get("peak_gpu_mb"),
        "threads": result["threads"],
        "versions": result.get("versions"),
        "load_s": result.get("load_s"),
        "ray_start_s": result.get("ray_start_s"),
        "other_cpu_cores": result.get("other_cpu_cores"),
    }


def loader_target(n_cells: int) -> int:
    """Cells every loader reads (whole passes, at least 500K, so that small stores still time well)."""
    return max(n_cells, 500_000)


def _loader_rows(store: Path, n_cells: int, config: BenchConfig, env: Mapping[str, str]) -> list[dict]:
    """Loader throughput without a model: atlasvi's StreamingLoader, zarr and tensorstore backends."""
    rows = []
    code = (
        "import json, sys, time\nfrom atlasvi.data import LoaderConfig, StreamingLoader\n"
        "store, bs, threads, backend, target = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], "
        "int(sys.argv[5])\n"
        "loader = StreamingLoader(store, LoaderConfig(batch_size=bs, num_threads=threads, backend=backend))\n"
        "sum(len(b) for b in loader)\n"  # a first pass: store opened, page cache warm
        "n, t = 0, time.perf_counter()\n"
        "while n < target:\n    n += sum(len(b) for b in loader)\n"
        "print(json.dumps({'cells': n, 'seconds': time.perf_counter() - t}))\n"
    )
    target = str(loader_target(n_cells))
    for backend in ("zarr", "tensorstore"):
        for batch_size in config.batch_sizes:
            command = [sys.executable, "-c", code, str(store), str(batch_size), str(config.loader_threads), backend]
            result, peak, _ = run_child([*command, target], env)
            rows.append(
                {"tool": f"atlasvi StreamingLoader ({backend})", "batch_size": batch_size, "cells": result["cells"],
                 "cells_per_s": result["cells"] / result["seconds"], "peak_rss_mb": peak}
            )  # fmt: skip
    return rows


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (cells, tool, device, workers, batch size): medians over repeats."""
    keys = []
    for r in runs:
        key = (r["cells"], r["tool"], r["device"], r["workers"], r["batch_size"])
        if key not in keys:
            keys.append(key)
    rows = []
    for key in sorted(keys, key=lambda k: (k[0], k[2], k[4], k[1] != "atlasvi", k[3])):
        mine = [r for r in runs if (r["cells"], r["tool"], r["device"], r["workers"], r["batch_size"]) == key]
        first = mine[0]
        row = {k: first[k] for k in ("cells", "tool", "device", "workers", "batch_size", "epochs", "train_cells")}
        for name in ("epoch_s", "cells_per_s", "wall_s", "peak_rss_mb"):
            row[name] = float(statistics.median(r[name] for r in mine))
        gpu = [r["peak_gpu_mb"] for r in mine if r["peak_gpu_mb"] is not None]
        row["peak_gpu_mb"] = max(gpu) if gpu else None
        row["repeats_cells_per_s"] = [round(r["cells_per_s"]) for r in mine]
        others = [r["other_cpu_cores"] for r in mine if r.get("other_cpu_cores") is not None]
        row["other_cpu_cores"] = float(statistics.median(others)) if others else None
        row["default_rule_epochs"] = default_rule_epochs(row["train_cells"])
        row["default_rule_projected_s"] = row["default_rule_epochs"] * row["epoch_s"]
        rows.append(row)
    return rows


def row_key(r: dict) -> tuple:
    return r["cells"], r["tool"], r["device"], r["workers"], r["batch_size"]


# ----------------------------------------------------------------------------------------------------------------
# Reports


def machine(env: Mapping[str, str]) -> dict:
    """CPU model, cores, RAM, OS and package versions of this machine."""
    cpu = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, env=dict(env), check=False).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), cpu)
    except OSError:
        pass
    packages = {}
    for name in ("atlasvi", "torch", "numpy", "zarr", "anndata", "ray", "mlflow"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": packages,
    }


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def duration(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 120
        else f"{seconds / 60:.1f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )


def label(row: dict) -> str:
    return row["tool"] if row["workers"] == 1 else f"{row['tool']} ({row['workers']} Ray workers)"


def markdown(report: dict) -> str:
    """perf_table.md of atlasvi's own rows: every row, loaders, what was not run."""
    m, c = report["machine"], report["config"]
    lines = [
        "# scVI training: 10K / 100K / 1M cells, atlasvi",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}, Python {m['python']}; "
        f"torch threads {c['threads']} per training process, OMP_WAIT_POLICY=PASSIVE, loader read threads "
        f"{c['loader_threads']}; devices: {', '.join(c['devices'])}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".",
        f"Command: `{report['command']}`; {c['repeats']} interleaved repeat(s) per row, each in its own process.",
        "",
        "Data: synthetic NB counts fitted to a real dataset (`atlasvi.bench.synthetic`), "
        f"{c['n_genes']} genes, ~8% non-zeros, 4 batches, built with `build_store`; the last 10% of the store's "
        "rows are held out. Model: n_latent 10, n_hidden 128, 1 layer, ZINB, gene dispersion. s / epoch: median "
        "epoch wall time after the first (steady state), training only; cells/s: training cells over it. Default "
        "rule: min(round(20000 / n_train x 400), 400) epochs, projected as rule epochs x s / epoch (not run).",
        "",
        "| cells | tool | device | batch | epochs run | s / epoch | cells/s | wall, epochs run | default rule: epochs "
        "| projected | peak RSS MB | peak GPU MB | cells/s per repeat | other processes (cores) |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['cells']:,} | {label(row)} | {row['device']} | {row['batch_size']} | {row['epochs']} "
            f"| {row['epoch_s']:.2f} | {fmt(row['cells_per_s'])} | {duration(row['wall_s'])} "
            f"| {row['default_rule_epochs']} | {duration(row['default_rule_projected_s'])} "
            f"| {fmt(row['peak_rss_mb'])} | {fmt(row['peak_gpu_mb'])} "
            f"| {', '.join(f'{x:,}' for x in row['repeats_cells_per_s'])} | {fmt(row['other_cpu_cores'], 1)} |"
        )
    lines += loader_table(report)
    if report["skipped"]:
        lines += ["", "Not run:", *[f"- {s}" for s in report["skipped"]]]
    return "\n".join(lines) + "\n"


def loader_table(report: dict, note: str = "same cells; warm page cache") -> list[str]:
    """The loaders-without-a-model section (empty without loader rows); `note` goes in its heading."""
    if not report["loaders"]:
        return []
    lines = [
        "",
        f"## Loaders without a model ({note})",
        "",
        "| cells | loader | batch | cells/s | peak RSS MB |",
        "|---:|---|---:|---:|---:|",
    ]
    for row in report["loaders"]:
        lines.append(
            f"| {row['cells']:,} | {row['tool']} | {row['batch_size']} | {fmt(row['cells_per_s'])} "
            f"| {fmt(row['peak_rss_mb'])} |"
        )
    return lines


def chart(report: dict, path: Path) -> Path:
    """Two log-log panels: training cells/s and peak RSS against cells, one line per tool / workers / batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[dict]] = {}
    for row in report["rows"]:
        series.setdefault(f"{label(row)}, {row['device']}, batch {row['batch_size']}", []).append(row)
    for name, rows in series.items():
        rows = sorted(rows, key=lambda r: r["cells"])
        style = "-" if rows[0]["tool"] == "atlasvi" else "--"
        x = [r["cells"] for r in rows]
        speed.plot(x, [r["cells_per_s"] for r in rows], style, marker="o", label=name)
        memory.plot(x, [r["peak_rss_mb"] for r in rows], style, marker="o", label=name)
    speed.set(xscale="log", yscale="log", xlabel="cells in the store", ylabel="training cells / s", title="speed")
    memory.set(xscale="log", yscale="log", xlabel="cells in the store", ylabel="peak RSS (MB)", title="memory")
    memory.axhline(2000, color="grey", linestyle=":", label="goal: atlasvi under 2 GB")
    for ax in (speed, memory):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    m = report["machine"]
    fig.suptitle(
        f"scVI training, {m['cpu']}, {m['cores']} cores ({', '.join(report['config']['devices'])})", fontsize=9
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial.png")
    fig.savefig(partial, dpi=120)
    plt.close(fig)
    os.replace(partial, path)
    return path


def log_mlflow(
    report: dict, files: list[Path], tracking_uri: str, experiment: str, measured: set[tuple[int, int]]
) -> list[str]:
    """A parent run with the files, and a child run per row measured now, (cells, batch size) in `measured`
    (rows merged from an earlier run already have theirs); returns the child run ids."""
    m, c = report["machine"], report["config"]
    machine_text = f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB"
    sizes = ",".join(str(s) for s in sorted({r["cells"] for r in report["rows"]}))
    parent = MlflowRun(tracking_uri, experiment, f"perf_table {sizes}", tags={"benchmark": "perf_table"})
    parent.log_params({"sizes": sizes, "machine": machine_text, "command": report["command"]} | c)
    for path in files:
        parent.log_artifact(path)
    ids = []
    for row in (r for r in report["rows"] if (r["cells"], r["batch_size"]) in measured):
        name = f"{row['cells']} {label(row)} {row['device']} bs{row['batch_size']}"
        tags = {"mlflow.parentRunId": parent.run_id, "benchmark": "perf_table"}
        run = MlflowRun(tracking_uri, experiment, name, tags=tags)
        run.log_params(
            {"size": row["cells"], "train_cells": row["train_cells"], "genes": c["n_genes"], "tool": row["tool"],
             "device": row["device"], "workers": row["workers"], "batch_size": row["batch_size"],
             "epochs": row["epochs"], "threads": c["threads"], "repeats": c["repeats"], "machine": machine_text}
        )  # fmt: skip
        metrics = {
            "time_per_epoch_s": row["epoch_s"], "cells_per_s": row["cells_per_s"], "wall_s": row["wall_s"],
            "peak_rss_mb": row["peak_rss_mb"], "default_rule_epochs": row["default_rule_epochs"],
            "default_rule_projected_s": row["default_rule_projected_s"],
        }  # fmt: skip
        # the ratios a comparison adds ("x_<tool>") are logged with the rest
        optional = [k for k in row if k in ("peak_gpu_mb", "other_cpu_cores") or k.startswith("x_")]
        metrics |= {k: row[k] for k in optional if row[k] is not None}
        run.log_metrics(metrics)
        for step, value in enumerate(row["repeats_cells_per_s"]):
            run.log_metrics({"cells_per_s_repeat": value}, step=step)
        run.finish()
        ids.append(run.run_id)
    parent.finish()
    return ids


def run_bench(
    config: BenchConfig,
    tracking_uri: str,
    env: Mapping[str, str],
    command: str = "atlasvi bench",
    progress: Progress | None = None,
    comparison: Comparison = Comparison(),
) -> dict:
    """Every size: the store, the interleaved rows, then the table, chart, JSON and MLflow runs; the report.

    `comparison` adds other tools' rows and its own table (benchmarks/perf_compare.py); by default atlasvi only.
    """
    tools = {tool.name: tool for tool in comparison.tools}
    env = dict(env) | {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(config.threads)}
    runs, loaders, skipped, other_versions = [], [], [], {}
    for n_cells in sorted(config.sizes):
        store = cached_store(n_cells, config, progress)
        opened = open_store(store)
        train_rows, _ = split_rows(opened.n_cells, 0.1)
        n_train = train_rows[1] - train_rows[0]
        nnz, running = int(read_store_attrs(store)["nnz"]), []
        for tool in comparison.tools:
            reason = tool.skip_reason(config, nnz)
            if reason:
                skipped.append(f"{tool.name} at {n_cells:,} cells: {reason}")
            else:
                running.append(tool.name)
        tasks = _tasks(config, running)
        epochs = config.epochs_for(n_cells)
        total = len(tasks) * config.repeats
        for repeat in range(config.repeats):
            shift = repeat % len(tasks)
            for i, task in enumerate(tasks[shift:] + tasks[:shift]):
                if progress:
                    what = (
                        f"{n_cells:,} cells: {task['tool']} x{task['workers']} {task['device']} bs {task['batch_size']}"
                    )
                    progress(what, repeat * len(tasks) + i, total)
                result = _measure(task, store, n_train, epochs, config, env, tools)
                if task["tool"] in tools and result["versions"]:
                    keep = tools[task["tool"]].versions
                    other_versions |= {k: v for k, v in result["versions"].items() if k in keep}
                runs.append(result | {"cells": n_cells, "repeat": repeat})
        if config.loaders:
            if progress:
                progress(f"{n_cells:,} cells: loaders without a model", total, total)
            rows = _loader_rows(store, n_cells, config, env)
            if comparison.loader_rows:
                h5ad = Path(read_store_attrs(store)["provenance"]["inputs"][0]["path"])
                rows += comparison.loader_rows(store, h5ad, n_cells, loader_target(n_cells), config, env)
            for row in rows:
                other_versions |= row.pop("versions", {})  # a comparison's loader names its package versions
                loaders.append(row | {"cells": n_cells})
    skipped += comparison.skipped(config)
    if "cuda" not in config.devices:
        skipped.append("GPU rows: not asked for (`--use-gpu`)")
    out = Path(config.output)
    fresh = {(n, b) for n in config.sizes for b in config.batch_sizes}
    previous = out / "perf_table.json"
    if config.merge and previous.exists():
        before = json.loads(previous.read_text())
        sizes = set(config.sizes)
        runs = [r for r in before["runs"] if (r["cells"], r["batch_size"]) not in fresh] + runs
        loaders = [r for r in before["loaders"] if (r["cells"], r["batch_size"]) not in fresh] + loaders
        skipped = list(dict.fromkeys(before["skipped"] + skipped))
        command = f"{before['command']}; {command}"
        other_versions = before.get("other_versions", {}) | other_versions
        config = config.model_copy(update={"sizes": sorted(sizes | {r["cells"] for r in runs})})
    report = {
        "command": command,
        "machine": machine(env),
        "other_versions": other_versions,
        "config": config.model_dump(mode="json"),
        "rows": (comparison.summarise or summarise)(runs),
        "loaders": loaders,
        "skipped": skipped,
        "runs": runs,
    }
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "perf_table.md", out / "perf_table.json"]
    table = (comparison.markdown or markdown)(report)
    for path, text in zip(files, (table, json.dumps(report, indent=1) + "\n"), strict=True):
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(text)
        os.replace(partial, path)
    files.append(chart(report, out / "perf_chart.png"))
    report["mlflow_run_ids"] = log_mlflow(report, files, tracking_uri, config.experiment, fresh)
    if comparison.finish:
        comparison.finish(report, files[0])
    return report
