"""`atlasvi bench`: the 10K / 100K / 1M performance table of atlasvi, in MLflow.

The comparison with scvi-tools and annbatch (their own environments) is benchmarks/perf_compare.py (`make bench`).
"""

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

from atlasvi.bench import BenchConfig, run_bench
from atlasvi.cli.common import console, load_yaml, make_config, progress_bars, tracking_uri
from atlasvi.errors import AtlasviError, ConfigError


def _counts(text: str | None, option: str) -> list[int] | None:
    """ "10k,100k,1m" -> [10000, 100000, 1000000]; None stays None."""
    if text is None:
        return None
    values = []
    for part in text.split(","):
        part = part.strip().lower()
        scale = {"k": 1_000, "m": 1_000_000}.get(part[-1:], 1)
        try:
            values.append(int(float(part[:-1] if scale > 1 else part) * scale))
        except ValueError:
            raise typer.BadParameter(f"{option}: {part!r} is not a count (e.g. 10k,100k,1m)") from None
    return values


def bench_command(
    config: Annotated[Path | None, typer.Option(help="YAML of BenchConfig fields; flags override it")] = None,
    sizes: Annotated[str | None, typer.Option(help="cells per store, comma-separated: 10k,100k,1m")] = None,
    batch_sizes: Annotated[str | None, typer.Option(help="batch sizes, comma-separated (default 128,1024)")] = None,
    workers: Annotated[str | None, typer.Option(help="worker counts, comma-separated; 1: this process")] = None,
    epochs: Annotated[int | None, typer.Option(help="epochs per row (default: 5 / 3 / 2 by size)")] = None,
    repeats: Annotated[int | None, typer.Option(help="interleaved repeats of every row")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads per training process, both tools")] = None,
    use_gpu: Annotated[bool, typer.Option("--use-gpu", help="GPU rows next to the CPU rows")] = False,
    output: Annotated[str | None, typer.Option(help="folder of perf_table.md / .json and perf_chart.png")] = None,
    cache_dir: Annotated[str | None, typer.Option(help="where synthetic inputs and stores are cached")] = None,
    reference: Annotated[str | None, typer.Option(help="raw-count h5ad the synthetic counts are fitted to")] = None,
    no_loaders: Annotated[bool, typer.Option("--no-loaders", help="no loader-only rows")] = False,
    merge: Annotated[bool, typer.Option("--merge", help="keep the output's other size/batch rows")] = False,
) -> None:
    """Train scVI on synthetic 10K / 100K / 1M-cell stores; table, chart, MLflow runs."""
    sources: list[tuple[str, dict[str, Any]]] = []
    if config is not None:
        sources.append((str(config), load_yaml(config)))
    flags = {
        "sizes": _counts(sizes, "--sizes"),
        "batch_sizes": _counts(batch_sizes, "--batch-sizes"),
        "workers": _counts(workers, "--workers"),
        "epochs": epochs,
        "repeats": repeats,
        "threads": threads,
        "devices": ["cpu", "cuda"] if use_gpu else None,
        "output": output,
        "cache_dir": cache_dir,
        "reference": reference,
        "loaders": False if no_loaders else None,
        "merge": merge or None,
    }
    sources.append(("flags", flags))
    job = make_config(BenchConfig, sources)
    if use_gpu:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--use-gpu: torch sees no CUDA device")
    uri = tracking_uri()
    command = shlex.join(["atlasvi", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else "atlasvi bench"
    with progress_bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()) as bars:
        task = bars.add_task("benchmark", total=None)

        def progress(what: str, done: int, total: int) -> None:
            bars.update(task, description=what, completed=done, total=total)

        try:
            report = run_bench(job, uri, os.environ, command, progress)
        except (FileNotFoundError, RuntimeError, ValueError) as err:
            raise AtlasviError(f"bench failed: {err}") from err
    out = Path(job.output)
    console.print((out / "perf_table.md").read_text())
    for line in report["skipped"]:
        console.print(f"[yellow]not run:[/yellow] {line}")
    console.print(f"wrote {out / 'perf_table.md'}, {out / 'perf_table.json'}, {out / 'perf_chart.png'}")
    console.print(f"MLflow: {len(report['mlflow_run_ids'])} row runs in experiment {job.experiment!r} at {uri}")
