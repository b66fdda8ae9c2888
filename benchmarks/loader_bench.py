"""Loader and build benchmark: atlasvi vs annbatch on the same synthetic cells, in one run.

    python benchmarks/loader_bench.py                      # 10K, 100K, 200K, 1M cells; annbatch if its venv exists
    python benchmarks/loader_bench.py --sizes 10000 200000 --no-annbatch

For each size: a synthetic input (benchmarks/synthetic.py: NB counts from profiles fitted to real
data, 2000 genes, ~8% non-zeros) is built into an atlas store by `build_store` (validation, HVG,
library prior and permutation included); then, on a warm page cache, a plain sequential block read
of the store (the ceiling), atlasvi's StreamingLoader per backend and batch size, and annbatch
(its own venv, benchmarks/setup_annbatch_venv.sh) with and without zarrs. Every measurement runs in
a child process, so its peak RSS is its own; cells/s are medians of `--repeats` runs. Results go to
benchmarks/results/loader.{json,md} with a description of the machine.
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


def _child(kind: str, **kwargs) -> dict:
    """Run one measurement in a fresh process; returns its JSON result."""
    command = [sys.executable, str(Path(__file__)), "--child", kind, json.dumps(kwargs)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
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
    from atlasvi.data import LoaderConfig, StreamingLoader

    loader = StreamingLoader(store, LoaderConfig(batch_size=batch_size, backend=backend))
    rates = []
    for _ in range(repeats):
        cells, start = 0, time.perf_counter()
        while cells < min_cells or cells == 0:
            for batch in loader:
                cells += len(batch)
        rates.append(cells / (time.perf_counter() - start))
    return {"cells_per_s": statistics.median(rates), "all": rates, "peak_rss_mb": _peak_rss_mb()}


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


def run(args: argparse.Namespace) -> dict:
    results: dict = {"machine": machine(), "sizes": {}}
    for n_cells in args.sizes:
        source = synthetic_input(n_cells)
        row: dict = {"build": {}, "sequential": {}, "loader": {}}
        for compressor in args.compressors:
            store = str(CACHE / f"atlas_{n_cells // 1000}k_{compressor}.zarr")
            built = row["build"][compressor] = _child("build", source=str(source), store=store, compressor=compressor)
            print(f"{n_cells:>8} cells  {compressor} build {built['seconds']:.1f} s, {built['peak_rss_mb']:.0f} MB")
            if compressor == args.compressors[0]:
                row["epoch_rss"] = _child("epoch_rss", store=store, backend=args.backends[0])
            if n_cells < args.min_throughput_cells:
                continue
            for b in args.backends:
                key = f"{compressor}/{b}"
                row["sequential"][key] = _child("sequential", store=store, backend=b, repeats=args.repeats)
                for bs in args.batch_sizes:
                    rate = row["loader"][f"{key}/{bs}"] = _child(
                        "loader", store=store, backend=b, batch_size=bs, repeats=args.repeats,
                        min_cells=min(n_cells, 400_000),
                    )  # fmt: skip
                    print(f"{'':>8}        loader {key}/{bs:<8} {rate['cells_per_s']:>10,.0f} cells/s")
            if compressor == args.compressors[0]:
                best = max(args.backends, key=lambda b: row["loader"][f"{compressor}/{b}/1024"]["cells_per_s"])
                rate = row["loader"][f"{compressor}/{best}/1024"]["cells_per_s"]
                row["consumer_wait"] = _child(
                    "consumer_wait", store=store, backend=best, batch_size=1024, compute_s=1024 / (0.8 * rate)
                )
                row["consumer_wait"]["reader"] = f"{compressor}/{best}"
        if n_cells >= args.min_throughput_cells and args.annbatch and ANNBATCH_PYTHON.exists():
            row["annbatch"] = annbatch(source, args)
        results["sizes"][str(n_cells)] = row
    return results


def annbatch(source: Path, args: argparse.Namespace) -> dict:
    repo = HERE.parent
    command = [
        str(ANNBATCH_PYTHON), str(HERE / "annbatch_loader.py"), "--h5ad", str(source.relative_to(repo)),
        "--workdir", str((CACHE / "annbatch").relative_to(repo)), "--batch-sizes", *map(str, args.batch_sizes),
        "--zarrs", "on", "off", "--repeats", str(args.repeats), "--epochs-cells", "1000000",
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
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Python {m['python']}; {m['note']}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        "",
        "| cells | codec | build s | build peak RSS MB | loader epoch peak RSS MB |",
        "|---:|---|---:|---:|---:|",
    ]
    for n, row in results["sizes"].items():
        for codec, b in row["build"].items():
            epoch = row["epoch_rss"]["peak_rss_mb"] if codec == next(iter(row["build"])) else float("nan")
            lines.append(f"| {int(n):,} | {codec} | {b['seconds']:.1f} | {b['peak_rss_mb']:.0f} | {epoch:.0f} |")
    for n, row in results["sizes"].items():
        if not row["loader"]:
            continue
        lines += ["", f"## {int(n):,} cells x 2000 genes: cells/s (median of repeats)", ""]
        lines += ["| reader (store codec / backend) | batch | cells/s | / sequential read |", "|---|---:|---:|---:|"]
        for key, seq in row["sequential"].items():
            lines.append(f"| sequential block read ({key}) | - | {seq['cells_per_s']:,.0f} | 1.00 |")
        for key, value in row["loader"].items():
            codec, backend, batch = key.split("/")
            ratio = value["cells_per_s"] / row["sequential"][f"{codec}/{backend}"]["cells_per_s"]
            lines.append(
                f"| atlasvi StreamingLoader ({codec}/{backend}) | {batch} | {value['cells_per_s']:,.0f} | {ratio:.2f} |"
            )
        annbatch_rows = row.get("annbatch", {})
        for entry in annbatch_rows.get("rows", []):
            zarrs = "with zarrs" if entry["zarrs"] else "without zarrs"
            rate = entry["cells_per_s_median"]
            lines.append(f"| annbatch 0.3.1, lz4 store ({zarrs}) | {entry['batch_size']} | {rate:,.0f} | |")
        if "write_s" in annbatch_rows:
            write_s, write_mb = annbatch_rows["write_s"], annbatch_rows["write_peak_rss_mb"]
            lines.append(f"\nannbatch store write: {write_s:.1f} s, peak RSS {write_mb:.0f} MB.")
        elif "error" in annbatch_rows:
            lines.append(f"\nannbatch failed: {annbatch_rows['error'][-300:]}")
        wait = row["consumer_wait"]
        lines.append(
            f"\nRead-ahead ({wait['reader']}): a consumer computing off-CPU at 80% of the loader's rate waited "
            f"{100 * wait['wait_fraction']:.1f}% of its time ({wait['batches']} batches of 1024)."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 200_000, 1_000_000])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--backends", nargs="+", default=["tensorstore", "zarrs", "zarr"])
    parser.add_argument("--compressors", nargs="+", default=["zstd", "lz4"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-throughput-cells", type=int, default=200_000, help="throughput rows from this size on")
    parser.add_argument("--no-annbatch", dest="annbatch", action="store_false")
    parser.add_argument("--out", type=Path, default=RESULTS / "loader")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](**json.loads(args.child[1]))))
        return
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
