"""MultiVI at atlas scale: a synthetic multiome h5ad for `atlasvi build --atac-key` / `atlasvi train --model multivi`,
and the loader's peak memory with 52,761 peaks (bounded by its buffer, not by the store's cells).

    # 20,000 cells: synthetic RNA (atlasvi.bench.make_synthetic_h5ad, Kang-like) + real sci-CAR A549 peak profiles
    # (52,761 peaks, each cell's drawn from a random sci-CAR cell); a quarter ATAC-only (no RNA), a quarter RNA-only
    .venv/bin/python benchmarks/multivi_atlas.py make --cells 20000 --out /tmp/multiome20k.h5ad
    .venv/bin/atlasvi build /tmp/multiome20k.h5ad --atac-key atac --batch-key batch -o /tmp/multiome20k.zarr
    .venv/bin/atlasvi train --model multivi --store /tmp/multiome20k.zarr --max-epochs 1 --output /tmp/multivi20k
    # peak RSS of one epoch of the loader (atac + rna modalities), one fresh process per store and buffer
    .venv/bin/python benchmarks/multivi_atlas.py memory --store A.zarr --store B.zarr --block-size 1024

Output of `memory`: results/multivi_memory.json and .md (`--out NAME`).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
SCICAR = SHARED / "scicar_a549_multivi_concat_scai.h5ad"
KANG = SHARED / "kang2018_pbmc_ifnb_muscat.h5ad"


def make(out: Path, n_cells: int, seed: int = 0) -> dict:
    """Write the synthetic multiome h5ad: X synthetic RNA (2000 genes), obsm["atac"] sci-CAR peak rows, zero rows
    where a cell's modality is missing (scvi-tools' concatenated layout, which `atlasvi build --atac-key` reads)."""
    import anndata as ad
    import scipy.sparse as sp

    from atlasvi.bench import make_synthetic_h5ad

    rna_path = out.with_suffix(".rna.h5ad")
    make_synthetic_h5ad(rna_path, n_cells, 2000, seed=seed, reference=KANG)
    adata = ad.read_h5ad(rna_path)
    full = ad.read_h5ad(SCICAR)
    peaks = (full.var["modality"] == "Peaks").to_numpy()
    source = sp.csr_matrix(full.X[:, peaks])
    rng = np.random.default_rng(seed)
    atac = source[rng.integers(0, source.shape[0], n_cells)].tolil()
    group = rng.choice(["paired", "rna_only", "atac_only"], n_cells, p=[0.5, 0.25, 0.25])
    x = sp.csr_matrix(adata.X).tolil()
    x[group == "atac_only"] = 0
    atac[group == "rna_only"] = 0
    adata.X = sp.csr_matrix(x)
    adata.obs["group"] = group
    adata.obsm["atac"] = sp.csr_matrix(atac)
    adata.uns["atac_names"] = np.asarray(full.var_names[peaks], dtype=str)
    adata.write_h5ad(out)
    rna_path.unlink()
    groups = {str(g): int((group == g).sum()) for g in np.unique(group)}
    return {"cells": n_cells, "peaks": int(peaks.sum()), "groups": groups}


def _measure(store: str, block_size: int, buffer_blocks: int) -> dict:
    """One epoch of the loader with the atac and rna modalities; peak RSS (MiB) over the process's baseline."""
    import resource
    import time

    from atlasvi.data import LoaderConfig, StreamingLoader, open_store

    opened = open_store(store)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config = LoaderConfig(batch_size=128, block_size=block_size, buffer_blocks=buffer_blocks)
    started, cells, nnz = time.perf_counter(), 0, 0
    with StreamingLoader(opened, config, modalities=("atac", "rna")) as loader:
        for batch in loader:
            cells += len(batch)
            nnz += int(batch.obsm["atac"].values().numel())
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "store": Path(store).name,
        "cells": opened.n_cells,
        "peaks": len(opened.schema.modalities["atac"].features),
        "peak_nnz": opened.schema.modalities["atac"].nnz,
        "block_size": block_size,
        "buffer_blocks": buffer_blocks,
        "window_rows": loader.window_rows,
        "cells_read": cells,
        "baseline_rss_mib": baseline,
        "peak_rss_mib": peak,
        "loader_rss_mib": peak - baseline,
        "cells_per_s": cells / seconds,
    }


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# MultiVI store and loader memory with 52,761 peaks",
        "",
        f"Command: `{command}`. Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared, under load).",
        "",
        "One epoch of `StreamingLoader(modalities=('atac', 'rna'))`, batch 128, one fresh process per row; peak RSS "
        "(ru_maxrss) over the process's RSS after opening the store. The window (buffer) is block_size x "
        "buffer_blocks rows: the loader's memory follows it, not the store's cells.",
        "",
        "| store cells | peaks | stored peak counts | window rows | loader peak RSS (MiB) | process peak RSS (MiB) "
        "| cells/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cells']} | {r['peaks']} | {r['peak_nnz']} | {r['window_rows']} | {r['loader_rss_mib']:.0f} | "
            f"{r['peak_rss_mib']:.0f} | {r['cells_per_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write the synthetic multiome h5ad")
    m.add_argument("--cells", type=int, default=20000)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("memory", help="the loader's peak memory per store")
    r.add_argument("--store", action="append", required=True)
    r.add_argument("--block-size", type=int, nargs="+", default=[1024])
    r.add_argument("--buffer-blocks", type=int, default=2)
    r.add_argument("--out", default="multivi_memory")
    r.add_argument("--one", action="store_true", help="internal: measure one store in this process")
    args = parser.parse_args()
    if args.command == "make":
        print(json.dumps(make(args.out, args.cells, args.seed)))
        return
    if args.one:
        print(json.dumps(_measure(args.store[0], args.block_size[0], args.buffer_blocks)))
        return
    rows = []
    for store in args.store:
        for block in args.block_size:
            command = [sys.executable, __file__, "memory", "--one", "--store", store, "--block-size", str(block)]
            command += ["--buffer-blocks", str(args.buffer_blocks)]
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    text = " ".join(["python", "benchmarks/multivi_atlas.py", *sys.argv[1:]])
    results = HERE / "results"
    (results / f"{args.out}.json").write_text(json.dumps({"command": text, "rows": rows}, indent=1) + "\n")
    (results / f"{args.out}.md").write_text(markdown(rows, text))
    print(markdown(rows, text))


if __name__ == "__main__":
    main()
