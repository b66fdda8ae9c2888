"""The performance table of the README: `atlasvi bench` next to scvi-tools and annbatch (`make bench`).

    python benchmarks/perf_compare.py --config configs/bench.yaml --update-readme README.md

Runs `atlasvi.bench.run_bench` (the atlasvi rows, stores, MLflow runs) with a `Comparison` that adds, each in the
Python of its own environment (absent: skipped with the reason):

- scvi-tools: SCVI on the same training rows as an in-memory AnnData (`scvi_tools_side.py`, run with the Python
  of an environment that has scvi-tools; `bash benchmarks/setup_scvi_venv.sh`), same architecture (n_latent 10,
  n_hidden 128, 1 layer, ZINB, gene dispersion), batch size and epochs; skipped where the cells would not fit in
  memory;
- annbatch's Loader over the same cells (its own venv and store, through `annbatch_loader.py`);

then the ratios to scvi-tools, the method's documented table next to the runs, and the README's bench section.
"""

import argparse
import json
import os
import shlex
import statistics
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from atlasvi.bench import BenchConfig, Comparison, OtherTool, run_bench
from atlasvi.bench.perf import (
    duration,
    fmt,
    label,
    loader_table,
    row_key,
    run_child,
    summarise,
)
from atlasvi.cli.bench import _counts
from atlasvi.cli.common import load_yaml, make_config, tracking_uri
from atlasvi.errors import AtlasviError

HERE = Path(__file__).resolve().parent
SCVI_SIDE = HERE / "scvi_tools_side.py"
ANNBATCH_SCRIPT = HERE / "annbatch_loader.py"
README_START = "<!-- atlasvi-bench:start -->"
README_END = "<!-- atlasvi-bench:end -->"
LoaderRows = Callable[[Path, Path, int, int, BenchConfig, Mapping[str, str]], list[dict]]
# The table of the method's documentation: full scVI training, CPU time, GPU time, memory
DOCUMENTED = {
    10_000: ("5 min", "1 min", "8 GB"),
    100_000: ("45 min", "5 min", "16 GB"),
    1_000_000: ("6 h", "40 min", "32 GB"),
}


def scvi_tools(python: str | None) -> OtherTool:
    """scvi-tools' SCVI run by `python` (an interpreter of an environment with scvi-tools)."""

    def command(spec: dict) -> list[str]:
        spec = spec | {"batch_key": "batch", "n_latent": 10, "n_hidden": 128, "n_layers": 1}
        spec["n_epochs_kl_warmup"] = 400  # scvi-tools' default, as atlasvi's TrainConfig
        return [str(python), str(SCVI_SIDE), json.dumps(spec)]

    def skip_reason(config: BenchConfig, nnz: int) -> str | None:
        if not python or not Path(python).exists():
            return f"no scvi-tools environment at {python} (benchmarks/setup_scvi_venv.sh makes one)"
        need = 24 * nnz + 2 * 2**30  # float32 data + int32 indices, read and copied, plus the process itself
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        if need > available:
            return f"the in-memory AnnData needs ~{need / 2**30:.0f} GiB, {available / 2**30:.0f} GiB are free"
        return None

    return OtherTool("scvi-tools", command, skip_reason, versions=("scvi-tools", "lightning"))


def annbatch_loader_rows(python: str | None) -> LoaderRows:
    """Comparison.loader_rows: annbatch's Loader (zarrs) over the same cells, where its environment exists."""

    def rows(
        store: Path, h5ad: Path, n_cells: int, target: int, config: BenchConfig, env: Mapping[str, str]
    ) -> list[dict]:
        if not python or not Path(python).exists():
            return []
        command = [
            python, str(ANNBATCH_SCRIPT), "--h5ad", str(h5ad), "--workdir", str(Path(config.cache_dir) / "annbatch"),
            "--batch-sizes", *map(str, config.batch_sizes), "--zarrs", "on", "--repeats", "1",
            "--epochs-cells", str(target),
        ]  # fmt: skip
        result, _, _ = run_child(command, env)
        version_ = result["versions"].get("annbatch")
        return [
            {"tool": f"annbatch {version_} Loader (zarrs)", "batch_size": entry["batch_size"],
             "cells": entry["cells_per_rep"], "cells_per_s": entry["cells_per_s_median"], "peak_rss_mb": None,
             "versions": {"annbatch": version_}}
            for entry in result["rows"]
        ]  # fmt: skip

    return rows


def with_ratios(runs: list[dict]) -> list[dict]:
    """`summarise`'s rows plus x_scvi_tools (cells/s over scvi-tools' of the same cells, device and batch) and
    x_scvi_tools_paired (the same ratio within each repeat, median over repeats)."""
    rows = summarise(runs)
    for row in rows:
        ref = [r for r in rows if r["tool"] == "scvi-tools" and (r["cells"], r["device"], r["batch_size"]) ==
               (row["cells"], row["device"], row["batch_size"])]  # fmt: skip
        row["x_scvi_tools"] = row["cells_per_s"] / ref[0]["cells_per_s"] if ref else None
        # the same ratio within each repeat (rows of one repeat ran back to back), median over repeats
        pairs = []
        for mine in [r for r in runs if row_key(r) == row_key(row)]:
            same = (mine["cells"], mine["device"], mine["batch_size"], mine["repeat"], "scvi-tools")
            theirs = [r for r in runs if (r["cells"], r["device"], r["batch_size"], r["repeat"], r["tool"]) == same]
            pairs += [mine["cells_per_s"] / theirs[0]["cells_per_s"]] if theirs else []
        row["x_scvi_tools_paired"] = float(statistics.median(pairs)) if pairs else None

    return rows


def headline(report: dict) -> list[str]:
    """The ratio table: atlasvi (one process) against scvi-tools, per size, device and batch size."""
    lines = [
        "| cells | device | batch | atlasvi cells/s | scvi-tools cells/s | atlasvi / scvi-tools | same, paired by "
        "repeat | atlasvi s / epoch | atlasvi peak RSS | scvi-tools peak RSS | other processes (cores) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        if row["tool"] != "atlasvi" or row["workers"] != 1:
            continue
        ref = next((r for r in report["rows"] if r["tool"] == "scvi-tools" and (r["cells"], r["device"],
                    r["batch_size"]) == (row["cells"], row["device"], row["batch_size"])), None)  # fmt: skip
        lines.append(
            f"| {row['cells']:,} | {row['device']} | {row['batch_size']} | {fmt(row['cells_per_s'])} "
            f"| {fmt(ref and ref['cells_per_s'])} | {fmt(row['x_scvi_tools'], 2)} "
            f"| {fmt(row['x_scvi_tools_paired'], 2)} | {row['epoch_s']:.1f} | {fmt(row['peak_rss_mb'])} MB "
            f"| {fmt(ref and ref['peak_rss_mb'])} MB | {fmt(row['other_cpu_cores'], 1)} |"
        )
    return lines


def markdown(report: dict) -> str:
    """perf_table.md: the headline ratios, every row, loaders and the documentation's table."""
    m, c = report["machine"], report["config"]
    versions = {**m["versions"], **report.get("other_versions", {})}
    lines = [
        "# scVI training: 10K / 100K / 1M cells, atlasvi vs scvi-tools",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}, Python {m['python']}; "
        f"torch threads {c['threads']} in every training process (both tools), OMP_WAIT_POLICY=PASSIVE, atlasvi "
        f"loader read threads {c['loader_threads']}; devices: {', '.join(c['devices'])}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".",
        f"Command: `{report['command']}`; {c['repeats']} interleaved repeat(s) per row, each in its own process.",
        "",
        "Data: synthetic NB counts fitted to a real dataset (`atlasvi.bench.synthetic`), "
        f"{c['n_genes']} genes, ~8% non-zeros, 4 batches, built with `build_store`; the last 10% of the store's "
        "rows are atlasvi's held-out cells and neither tool trains on them. Model on both sides: n_latent 10, "
        "n_hidden 128, 1 layer, ZINB, gene dispersion, Adam (lr 1e-3, eps 0.01), KL warm-up 400 epochs. "
        "s / epoch: median epoch wall time after the first (steady state), training only (atlasvi's validation "
        "pass is outside it; scvi-tools has none, `train_size=1.0`); cells/s: training cells over it. "
        "Default rule: scvi-tools' min(round(20000 / n_train x 400), 400) epochs, projected as rule epochs x "
        "s / epoch (not run). Peak RSS: the training process's own (Ray rows: rank 0's worker). Other processes: "
        "CPU cores the rest of the machine kept busy during the row (median over repeats); the machine is shared, "
        "so compare tools within a repeat (the paired ratio).",
        "",
        "## Headline: atlasvi / scvi-tools",
        "",
        *headline(report),
        "",
        "## Every row",
        "",
        "| cells | tool | device | batch | epochs run | s / epoch | cells/s | x scvi-tools | wall, epochs run "
        "| default rule: epochs | projected | peak RSS MB | peak GPU MB | cells/s per repeat | other processes "
        "(cores) |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['cells']:,} | {label(row)} | {row['device']} | {row['batch_size']} | {row['epochs']} "
            f"| {row['epoch_s']:.2f} | {fmt(row['cells_per_s'])} | {fmt(row['x_scvi_tools'], 2)} "
            f"| {duration(row['wall_s'])} | {row['default_rule_epochs']} "
            f"| {duration(row['default_rule_projected_s'])} | {fmt(row['peak_rss_mb'])} | {fmt(row['peak_gpu_mb'])} "
            f"| {', '.join(f'{x:,}' for x in row['repeats_cells_per_s'])} | {fmt(row['other_cpu_cores'], 1)} |"
        )
    lines += loader_table(report, "same cells; annbatch reads its own store of them; warm page cache")
    lines += ["", "## The method's documentation table (full training) next to these runs", ""]
    lines += [
        "| cells | documented CPU time | atlasvi CPU, default rule, smallest batch run (projected) | scvi-tools, same "
        "| documented GPU time | documented memory | atlasvi peak RSS | scvi-tools peak RSS |",
        "|---:|---|---:|---:|---|---|---:|---:|",
    ]
    for size in sorted({r["cells"] for r in report["rows"]}):
        doc = DOCUMENTED.get(size, ("-", "-", "-"))
        batch = min(r["batch_size"] for r in report["rows"] if r["cells"] == size)  # 128 where it ran
        a, s = (next((r for r in report["rows"] if row_key(r) == (size, tool, "cpu", 1, batch)), None)
                for tool in ("atlasvi", "scvi-tools"))  # fmt: skip
        lines.append(
            f"| {size:,} | {doc[0]} | {duration(a['default_rule_projected_s']) if a else '-'} "
            f"| {duration(s['default_rule_projected_s']) if s else '-'} | {doc[1]} | {doc[2]} "
            f"| {fmt(a and a['peak_rss_mb'])} MB | {fmt(s and s['peak_rss_mb'])} MB |"
        )
    if report["skipped"]:
        lines += ["", "Not run:", *[f"- {s}" for s in report["skipped"]]]
    return "\n".join(lines) + "\n"


def readme_section(report: dict, table_path: str) -> str:
    m = report["machine"]
    runs = {r["cells"]: r for r in report["rows"] if r["tool"] == "atlasvi" and r["workers"] == 1}
    schedule = "; ".join(f"{n:,} cells: {r['epochs']} epochs x {len(r['repeats_cells_per_s'])} repeat(s)"
                         for n, r in sorted(runs.items()))  # fmt: skip
    return "\n".join(
        [
            README_START,
            f"`make bench` (`benchmarks/perf_compare.py`) on {m['cpu']} ({m['cores']} cores, {m['ram_gib']} GiB RAM, "
            f"CPU only, {report['config']['threads']} torch thread per training process on both sides); steady-state "
            f"training cells/s, same cells, architecture and batch size; full table, loaders and the documentation's "
            f"table side by side: `{table_path}`. Epochs per row: {schedule}. The last column is the CPU other "
            "processes took meanwhile (a shared machine: compare within a row).",
            "",
            *headline(report),
            README_END,
        ]
    )


def update_readme(readme: Path, section: str) -> None:
    """Replace the README's bench section (between the two markers), atomically."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme}: no {README_START} ... {README_END} section to update")
    before, rest = text.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    partial = readme.with_name(f".{readme.name}.partial")
    partial.write_text(before + section + after)
    os.replace(partial, readme)


def comparison(scvi_python: str | None, annbatch_python: str | None, loaders: bool, readme: Path | None) -> Comparison:
    """scvi-tools and annbatch next to atlasvi; the README's bench section rewritten when `readme` is given."""

    def skipped(config: BenchConfig) -> list[str]:
        lines = []
        if loaders and not (annbatch_python and Path(annbatch_python).exists()):
            lines.append(f"annbatch: no annbatch environment at {annbatch_python}")
        return lines + [
            "annbatch feeding the model: annbatch 0.3.1 needs Python >= 3.12 and its environment has no torch "
            "(nor atlasvi); its loader's throughput on the same cells is shown instead"
        ]

    def finish(report: dict, table: Path) -> None:
        if readme:
            update_readme(readme, readme_section(report, str(table)))

    return Comparison(
        tools=[scvi_tools(scvi_python)] if scvi_python else [],
        loader_rows=annbatch_loader_rows(annbatch_python),
        skipped=skipped,
        summarise=with_ratios,
        markdown=markdown,
        finish=finish,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="YAML of BenchConfig fields (configs/bench.yaml)")
    parser.add_argument("--sizes", help="cells per store, comma-separated: 10k,100k,1m")
    parser.add_argument("--batch-sizes", help="batch sizes, comma-separated")
    parser.add_argument("--workers", help="worker counts, comma-separated; 1: the plain process")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--output", help="folder of perf_table.md / .json and perf_chart.png")
    parser.add_argument("--cache-dir")
    parser.add_argument("--reference", help="raw-count h5ad the synthetic counts are fitted to")
    parser.add_argument("--use-gpu", action="store_true", help="GPU rows next to the CPU rows")
    parser.add_argument("--threads", type=int, help="torch threads per training process, both tools")
    parser.add_argument("--no-loaders", action="store_true", help="no loader-only rows")
    parser.add_argument("--merge", action="store_true", help="keep the output's other size/batch rows")
    parser.add_argument("--scvi-python", default="benchmarks/.cache/scvi-venv/bin/python")
    parser.add_argument("--no-scvi", action="store_true", help="no scvi-tools rows")
    parser.add_argument("--annbatch-python", default="benchmarks/.cache/annbatch-venv/bin/python")
    parser.add_argument("--update-readme", type=Path, help="rewrite this README's performance section")
    args = parser.parse_args(argv)
    sources = [(str(args.config), load_yaml(args.config))] if args.config else []
    flags = {
        "sizes": _counts(args.sizes, "--sizes"), "batch_sizes": _counts(args.batch_sizes, "--batch-sizes"),
        "workers": _counts(args.workers, "--workers"), "epochs": args.epochs, "repeats": args.repeats,
        "threads": args.threads, "devices": ["cpu", "cuda"] if args.use_gpu else None,
        "output": args.output, "cache_dir": args.cache_dir, "reference": args.reference,
        "loaders": False if args.no_loaders else None, "merge": args.merge or None,
    }  # fmt: skip
    config = make_config(BenchConfig, [*sources, ("flags", flags)])
    scvi_python = None if args.no_scvi else args.scvi_python
    extra = comparison(scvi_python, args.annbatch_python, config.loaders, args.update_readme)
    command = shlex.join(["python", "benchmarks/perf_compare.py", *(sys.argv[1:] if argv is None else argv)])

    def progress(what: str, done: int, total: int) -> None:
        print(f"[{done}/{total}] {what}", file=sys.stderr, flush=True)

    report = run_bench(config, tracking_uri(), os.environ, command, progress, extra)
    print((Path(config.output) / "perf_table.md").read_text())
    return report


if __name__ == "__main__":
    try:
        main()
    except AtlasviError as err:  # one line, as the CLI prints it
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
