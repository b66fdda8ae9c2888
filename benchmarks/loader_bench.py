"""Loader and build benchmark: atlasvi vs annbatch on the same synthetic cells, in one run.

    python benchmarks/loader_bench.py                      # 10K, 100K, 200K, 1M cells; annbatch if its venv exists
    python benchmarks/loader_bench.py --sizes 10000 200000 --no-annbatch

For each size: a synthetic input (benchmarks/synthetic.py: NB counts from profiles fitted to real
data, 2000 genes, ~8% non-zeros) is built into an atlas store by `build_store` (validation, HVG,
library prior and permutation included); then, on a warm page cache, a plain sequential block read
of the store (the ceiling), atlasvi's StreamingLoader per backend and batch size, and annbatch
(its own venv, benchmarks/setup_annbatch_venv.sh; with zarrs, `--annbatch-zarrs on off` adds without) on
its store written with lz4 (its default, and atlasvi's) and with zstd, so both compare on the same codec.
Every measurement runs in a child process, so its peak RSS is its own. `--repeats` rounds each measure
every reader once, interleaved, so a shared machine's load falls on all alike: cells/s are medians over
rounds, atlasvi / annbatch ratios medians of ratios paired within a round; the load average is recorded.
Results go to benchmarks/results/loader.{json,md} with the machine, the command and the commit.

    python benchmarks/loader_bench.py --sizes 200000 --reuse-stores --min-cells 200000  # quicker rounds
    python benchmarks/loader_bench.py --combine results/a.json results/b.json --out results/ab  # pooled ratios

Each loader measurement is one fresh process: cells/s from the first batch's request (the loader built, its
setup timed apart), and the steady state, cells/s after its first batch, in the same rounds for both tools.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
ANNBATCH_PYTHON = CACHE / "annbatch-venv" / "bin" / "python"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(kind: str, src: str | None = None, **kwargs) -> dict:
    """Run one measurement in a fresh process (importing atlasvi from the checkout `src` if given); returns its
    JSON result."""
    command = [sys.executable, str(Path(__file__)), "--child", kind, json.dumps(kwargs)]
    env = os.environ | {"PYTHONPATH": str(Path(src).resolve())} if src else None
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} {kwargs} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def child_build(source: str, store: str, compressor: str) -> dict:
    import warnings

    from atlasvi.data import BuildConfig, build_store

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = BuildConfig(
            inputs=[source], output=store, batch_key="batch", labels_key="cell_type",
            n_top_genes=1000, hvg_subset=False, overwrite=True, compressor=compressor,
        )  # fmt: skip
        build_store(config)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb()}


def child_sequential(store: str, backend: str, repeats: int, block: int = 16384) -> dict:
    from atlasvi.data import open_store

    opened = open_store(store, backend=backend)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for a in range(0, opened.n_cells, block):
            opened.read_rows(a, min(a + block, opened.n_cells))
        rates.append(opened.n_cells / (time.perf_counter() - start))
    return {"cells_per_s": statistics.median(rates), "all": rates}


def child_loader(store: str, backend: str, batch_size: int, repeats: int, min_cells: int) -> dict:
    """cells/s from the first `next` on (the loader built: store open, kernel loaded; `setup_s`), and the steady state:
    cells after the first batch over the time after it (`first_batch_s`)."""
    from atlasvi.data import LoaderConfig, StreamingLoader

    start = time.perf_counter()
    loader = StreamingLoader(store, LoaderConfig(batch_size=batch_size, backend=backend))
    setup = time.perf_counter() - start
    rates, steady, first = [], [], []
    for _ in range(repeats):
        cells, start = 0, time.perf_counter()
        while cells < min_cells or cells == 0:
            for batch in loader:
                if cells == 0:
                    first_at, first_cells = time.perf_counter(), len(batch)
                cells += len(batch)
        end = time.perf_counter()
        rates.append(cells / (end - start))
        steady.append((cells - first_cells) / (end - first_at))
        first.append(first_at - start)
    return {
        "cells_per_s": statistics.median(rates), "all": rates, "steady_all": steady, "first_batch_s_all": first,
        "setup_s": setup, "peak_rss_mb": _peak_rss_mb(),
    }  # fmt: skip


def child_consumer_wait(store: str, backend: str, batch_size: int, compute_s: float) -> dict:
    """A consumer that computes `compute_s` per batch off the CPU (like a GPU step): time spent waiting."""
    from atlasvi.data import LoaderConfig, StreamingLoader

    loader = StreamingLoader(store, LoaderConfig(batch_size=batch_size, backend=backend))
    waited, batches, iterator = 0.0, 0, iter(loader)
    next(iterator)  # the first window is a cold start, not steady state
    while True:
        start = time.perf_counter()
        batch = next(iterator, None)
        if batch is None:
            break
        waited += time.perf_counter() - start
        batches += 1
        time.sleep(compute_s)
    return {"batches": batches, "wait_fraction": waited / (waited + batches * compute_s)}


def child_epoch_rss(store: str, backend: str) -> dict:
    from atlasvi.data import LoaderConfig, StreamingLoader

    loader = StreamingLoader(store, LoaderConfig(batch_size=1024, backend=backend))
    cells = sum(len(b) for b in loader)
    return {"cells": cells, "peak_rss_mb": _peak_rss_mb()}


CHILDREN = {
    "build": child_build,
    "sequential": child_sequential,
    "loader": child_loader,
    "consumer_wait": child_consumer_wait,
    "epoch_rss": child_epoch_rss,
}


def machine() -> dict:
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    packages = ["atlasvi", "zarr", "zarrs", "tensorstore", "numcodecs", "anndata", "torch", "numpy"]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram, 1),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in packages},
        "note": "shared VM: cells/s are medians of repeats; page cache warm",
    }


def synthetic_input(n_cells: int) -> Path:
    sys.path.insert(0, str(HERE))
    from synthetic import make_synthetic_h5ad

    path = CACHE / f"synth_{n_cells // 1000}k.h5ad"
    if not path.exists():
        make_synthetic_h5ad(path, n_cells=n_cells, n_genes=2000, seed=0)
    return path


def _load() -> float:
    return os.getloadavg()[0]


def _size_mb(path: str | Path) -> float:
    """Bytes on disk of a store (every file under it), in MB."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def _merge(parts: list[dict]) -> dict:
    """One measurement's interleaved repeats: median cells/s, every repeat, peak RSS of the largest; where measured,
    the steady state (cells/s after the first batch), the first batch's and the setup's seconds, every repeat."""
    rates = [p["cells_per_s"] for p in parts]
    merged = {"cells_per_s": statistics.median(rates), "all": rates}
    if "peak_rss_mb" in parts[0]:
        merged["peak_rss_mb"] = max(p["peak_rss_mb"] for p in parts)
    if "steady_all" in parts[0]:
        merged["steady_all"] = [p["steady_all"][0] for p in parts]
        merged["steady_cells_per_s"] = statistics.median(merged["steady_all"])
        merged["first_batch_s_all"] = [p["first_batch_s_all"][0] for p in parts]
        merged["setup_s_all"] = [p["setup_s"] for p in parts]
    return merged


def run(args: argparse.Namespace) -> dict:
    """Per size: build the stores, then `--repeats` rounds, each measuring every reader once (interleaved, so the
    shared machine's load falls on all of them alike); medians over the rounds, ratios paired within a round."""
    results: dict = {"machine": machine(), "command": " ".join(sys.argv), "commit": _commit(), "sizes": {}}
    results["baseline"] = args.baseline_src
    for n_cells in args.sizes:
        source = synthetic_input(n_cells)
        row: dict = {"build": {}, "sequential": {}, "loader": {}, "annbatch": {}, "load": []}
        stores = {}
        for compressor in args.compressors:
            store = stores[compressor] = str(CACHE / f"atlas_{n_cells // 1000}k_{compressor}.zarr")
            if args.reuse_stores and Path(store, "zarr.json").exists():
                continue
            built = row["build"][compressor] = _child("build", source=str(source), store=store, compressor=compressor)
            print(f"{n_cells:>8} cells  {compressor} build {built['seconds']:.1f} s, {built['peak_rss_mb']:.0f} MB")
        row["store_mb"] = {compressor: _size_mb(store) for compressor, store in stores.items()}
        first = stores[args.compressors[0]]
        row["epoch_rss"] = _child("epoch_rss", store=first, backend=args.backends[0])
        if n_cells < args.min_throughput_cells:
            results["sizes"][str(n_cells)] = row
            continue
        sequential, loader, ann, baseline = {}, {}, {}, {}
        for rep in range(args.repeats):
            row["load"].append(_load())
            for compressor, store in stores.items():
                for b in args.backends:
                    key = f"{compressor}/{b}"
                    sequential.setdefault(key, []).append(_child("sequential", store=store, backend=b, repeats=1))
                    for bs in args.batch_sizes:
                        rate = _child(
                            "loader", store=store, backend=b, batch_size=bs, repeats=1,
                            min_cells=min(n_cells, args.min_cells),
                        )  # fmt: skip
                        loader.setdefault(f"{key}/{bs}", []).append(rate)
                        print(f"round {rep} loader {key}/{bs:<6} {rate['cells_per_s']:>10,.0f} cells/s", flush=True)
                        if args.baseline_src:
                            rate = _child(
                                "loader", src=args.baseline_src, store=store, backend=b, batch_size=bs, repeats=1,
                                min_cells=min(n_cells, args.min_cells),
                            )  # fmt: skip
                            baseline.setdefault(f"{key}/{bs}", []).append(rate)
                            print(f"round {rep} baseline {key}/{bs:<6} {rate['cells_per_s']:>10,.0f} cells/s")
            if args.annbatch and ANNBATCH_PYTHON.exists():
                for compressor in args.annbatch_compressors:
                    out = annbatch(source, args, compressor)
                    if "error" in out:
                        row["annbatch_error"] = out["error"]
                        continue
                    row.setdefault("annbatch_store", {})[compressor] = {
                        k: out[k] for k in ("write_s", "write_peak_rss_mb")
                    }
                    for entry in out["rows"]:
                        key = f"{compressor}/{'zarrs' if entry['zarrs'] else 'zarr'}/{entry['batch_size']}"
                        ann.setdefault(key, []).append(
                            {
                                "cells_per_s": entry["cells_per_s_median"],
                                "steady_all": entry["steady_cells_per_s_all"][:1],
                                "first_batch_s_all": entry["first_batch_s_all"][:1],
                                "setup_s": entry["setup_s_all"][0],
                            }
                        )
                        print(f"round {rep} annbatch {key:<16} {entry['cells_per_s_median']:>10,.0f} cells/s")
            row["load"].append(_load())
        row["sequential"] = {k: _merge(v) for k, v in sequential.items()}
        row["loader"] = {k: _merge(v) for k, v in loader.items()}
        row["annbatch"] = {k: _merge(v) for k, v in ann.items()}
        row["baseline"] = {k: _merge(v) for k, v in baseline.items()}
        compressor = args.compressors[0]
        best = max(args.backends, key=lambda b: row["loader"][f"{compressor}/{b}/1024"]["cells_per_s"])
        rate = row["loader"][f"{compressor}/{best}/1024"]["cells_per_s"]
        row["consumer_wait"] = _child(
            "consumer_wait", store=first, backend=best, batch_size=1024, compute_s=1024 / (0.8 * rate)
        )
        row["consumer_wait"]["reader"] = f"{compressor}/{best}"
        results["sizes"][str(n_cells)] = row
    return results


def _commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    return result.stdout.strip() or "?"


def annbatch(source: Path, args: argparse.Namespace, compressor: str) -> dict:
    """One repeat of annbatch's loader (its venv) on its store of `source` written with `compressor`."""
    repo = HERE.parent
    command = [
        str(ANNBATCH_PYTHON), str(HERE / "annbatch_loader.py"), "--h5ad", str(source.relative_to(repo)),
        "--workdir", str((CACHE / "annbatch").relative_to(repo)), "--batch-sizes", *map(str, args.batch_sizes),
        "--zarrs", *args.annbatch_zarrs, "--repeats", "1", "--epochs-cells", str(args.min_cells),
        "--compressor", compressor,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=repo)
    if result.returncode != 0:
        return {"error": result.stderr[-2000:]}
    return json.loads(result.stdout)


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Loader and build benchmark",
        "",
        f"`{results['command']}` at commit {results['commit']}.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Python {m['python']}; {m['note']}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
    ]
    builds = [(n, codec, b) for n, row in results["sizes"].items() for codec, b in row["build"].items()]
    if builds:
        lines += ["", "| cells | codec | build s | build peak RSS MB |", "|---:|---|---:|---:|"]
        lines += [f"| {int(n):,} | {c} | {b['seconds']:.1f} | {b['peak_rss_mb']:.0f} |" for n, c, b in builds]
    for n, row in results["sizes"].items():
        lines.append(
            f"\n{int(n):,} cells: one epoch of the loader peaks at {row['epoch_rss']['peak_rss_mb']:.0f} MB RSS."
        )
        if "store_mb" in row:
            sizes = ", ".join(f"{codec} {mb:,.0f} MB" for codec, mb in row["store_mb"].items())
            lines.append(f"\nStore size on disk: {sizes}.")
        if not row["loader"]:
            continue
        load = row["load"]
        lines += [
            "",
            f"## {int(n):,} cells x 2000 genes: cells/s, median of {len(next(iter(row['loader'].values()))['all'])} "
            "interleaved rounds",
            "",
            f"Load average (1 min) at the rounds' starts and ends: {min(load):.1f}-{max(load):.1f} on "
            f"{m['cores']} cores.",
            "",
            "| reader (store codec / backend) | batch | cells/s | / sequential read |",
            "|---|---:|---:|---:|",
        ]
        for key, seq in row["sequential"].items():
            lines.append(f"| sequential block read ({key}) | - | {seq['cells_per_s']:,.0f} | 1.00 |")
        for key, value in row["loader"].items():
            codec, backend, batch = key.split("/")
            ratio = value["cells_per_s"] / row["sequential"][f"{codec}/{backend}"]["cells_per_s"]
            lines.append(
                f"| atlasvi StreamingLoader ({codec}/{backend}) | {batch} | {value['cells_per_s']:,.0f} | {ratio:.2f} |"
            )
        for key, value in row.get("baseline", {}).items():
            codec, backend, batch = key.split("/")
            ratio = value["cells_per_s"] / row["sequential"][f"{codec}/{backend}"]["cells_per_s"]
            lines.append(
                f"| baseline StreamingLoader ({codec}/{backend}; atlasvi from `{results['baseline']}`) | {batch} "
                f"| {value['cells_per_s']:,.0f} | {ratio:.2f} |"
            )
        for key, value in row["annbatch"].items():
            codec, pipeline, batch = key.split("/")
            zarrs = "with zarrs" if pipeline == "zarrs" else "without zarrs"
            lines.append(f"| annbatch 0.3.1, {codec} store ({zarrs}) | {batch} | {value['cells_per_s']:,.0f} | |")
        lines += _versus_annbatch(row) + _versus_baseline(row)
        for codec, store in row.get("annbatch_store", {}).items():
            lines.append(
                f"\nannbatch {codec} store write: {store['write_s']:.1f} s, "
                f"peak RSS {store['write_peak_rss_mb']:.0f} MB."
            )
        if "annbatch_error" in row:
            lines.append(f"\nannbatch failed: {row['annbatch_error'][-300:]}")
        wait = row["consumer_wait"]
        lines.append(
            f"\nRead-ahead ({wait['reader']}): a consumer computing off-CPU at 80% of the loader's rate waited "
            f"{100 * wait['wait_fraction']:.1f}% of its time ({wait['batches']} batches of 1024)."
        )
    return "\n".join(lines) + "\n"


def _pairs(row: dict, field: str) -> list[tuple[str, str, list[float]]]:
    """(name, batch, ratios paired by round) of atlasvi / annbatch-with-zarrs per batch size, each atlasvi store
    codec against annbatch's on the same codec and against annbatch's default (lz4); `field`: "all" (cells/s from
    the first batch's request) or "steady_all" (after the first batch)."""
    pairs = []
    for key, mine in row["loader"].items():
        codec, backend, batch = key.split("/")
        for other in dict.fromkeys([codec, "lz4"]):
            theirs = row["annbatch"].get(f"{other}/zarrs/{batch}")
            if theirs and field in mine and field in theirs:
                ratios = [a / b for a, b in zip(mine[field], theirs[field], strict=True)]
                pairs.append((f"atlasvi {codec}/{backend} vs annbatch+zarrs {other}", batch, ratios))
    return pairs


def _ratio_table(title: str, pairs: list[tuple[str, str, list[float]]]) -> list[str]:
    """Median, lowest and rounds below 1 of each paired ratio."""
    if not pairs:
        return []
    lines = ["", f"| {title} | batch | median ratio | lowest round | rounds below 1 |", "|---|---:|---:|---:|---:|"]
    return lines + [
        f"| {name} | {batch} | {statistics.median(r):.2f} | {min(r):.2f} | {sum(x < 1 for x in r)} of {len(r)} |"
        for name, batch, r in pairs
    ]


def _versus_annbatch(row: dict) -> list[str]:
    """atlasvi / annbatch-with-zarrs per batch size (`_pairs`): one fresh process's cells/s from its first batch's
    request, then the steady state after each one's first batch (same rounds), and what the first batch and the
    setup before it took."""
    lines = _ratio_table("atlasvi / annbatch (paired by round)", _pairs(row, "all"))
    steady = _pairs(row, "steady_all")
    if not steady:
        return lines
    lines += ["", "Steady state: cells/s after each reader's first batch, in the same rounds and processes."]
    lines += _ratio_table("atlasvi / annbatch, steady state (paired by round)", steady)
    lines += [
        "",
        "| reader | batch | steady cells/s | first batch s | setup s (open, build; not timed above) |",
        "|---|---:|---:|---:|---:|",
    ]
    readers = [(f"atlasvi {k.rsplit('/', 1)[0]}", k, v) for k, v in row["loader"].items()]
    readers += [(f"annbatch {k.rsplit('/', 1)[0]}", k, v) for k, v in row["annbatch"].items()]
    readers += [(f"baseline {k.rsplit('/', 1)[0]}", k, v) for k, v in row.get("baseline", {}).items()]
    return lines + [
        f"| {name} | {key.rsplit('/', 1)[1]} | {statistics.median(v['steady_all']):,.0f} | "
        f"{statistics.median(v['first_batch_s_all']):.2f} | {statistics.median(v['setup_s_all']):.2f} |"
        for name, key, v in readers
        if "steady_all" in v
    ]


def _versus_baseline(row: dict) -> list[str]:
    """This checkout's loader / the baseline checkout's per reader and batch size: medians of paired ratios."""
    pairs = [
        (key, statistics.median(a / b for a, b in zip(row["loader"][key]["all"], theirs["all"], strict=False)))
        for key, theirs in row.get("baseline", {}).items()
    ]
    if not pairs:
        return []
    lines = ["", "| atlasvi / baseline (paired by round) | ratio |", "|---|---:|"]
    return lines + [f"| {key} | {ratio:.2f} |" for key, ratio in pairs]


def combine(paths: list[Path]) -> str:
    """The paired atlasvi / annbatch ratios of several runs' results, pooled over all their rounds, per size."""
    runs = [json.loads(p.read_text()) for p in paths]
    lines = ["# Loader vs annbatch, pooled over runs", "", "Runs: " + ", ".join(f"`{p}`" for p in paths) + "."]
    lines += [f"- `{r['command']}` at commit {r['commit']}" for r in runs]
    for size in dict.fromkeys(n for r in runs for n in r["sizes"]):
        rows = [r["sizes"][size] for r in runs if r["sizes"].get(size, {}).get("loader")]
        load = [x for row in rows for x in row["load"]]
        lines += ["", f"## {int(size):,} cells: {len(rows)} runs, load average (1 min) {min(load):.1f}-{max(load):.1f}"]
        for field, title in [("all", "atlasvi / annbatch"), ("steady_all", "atlasvi / annbatch, steady state")]:
            pooled: dict[tuple[str, str], list[float]] = {}
            for row in rows:
                for name, batch, ratios in _pairs(row, field):
                    pooled.setdefault((name, batch), []).extend(ratios)
            lines += _ratio_table(f"{title} (paired by round, all rounds)", [(n, b, r) for (n, b), r in pooled.items()])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 200_000, 1_000_000])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument(
        "--backends", nargs="+", default=["auto", "tensorstore", "zarrs", "zarr"], help="auto: the default"
    )
    parser.add_argument("--compressors", nargs="+", default=["lz4", "zstd"], help="the first: the default's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-throughput-cells", type=int, default=200_000, help="throughput rows from this size on")
    parser.add_argument("--min-cells", type=int, default=400_000, help="cells read per loader measurement (at least)")
    parser.add_argument("--reuse-stores", action="store_true", help="keep atlas stores an earlier run built")
    parser.add_argument("--annbatch-compressors", nargs="+", default=["lz4", "zstd"], choices=["lz4", "zstd"])
    parser.add_argument("--annbatch-zarrs", nargs="+", default=["on"], choices=["on", "off"])
    parser.add_argument("--no-annbatch", dest="annbatch", action="store_false")
    parser.add_argument("--out", type=Path, default=RESULTS / "loader")
    parser.add_argument("--baseline-src", default=None, help="an atlasvi checkout whose loader runs in each round too")
    parser.add_argument("--combine", type=Path, nargs="+", help="pool these results' (.json) paired ratios to --out.md")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](**json.loads(args.child[1]))))
        return
    if args.combine:
        missing = [str(p) for p in args.combine if not p.is_file()]
        if missing:
            sys.exit(f"--combine: no such results file: {', '.join(missing)}")
        text = combine(args.combine)
        args.out.with_suffix(".md").write_text(text)
        print(text)
        return
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
