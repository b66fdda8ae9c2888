"""Synthetic raw-count ``.h5ad`` inputs for the benchmarks: a thin script over `atlasvi.bench.synthetic`.

    python benchmarks/synthetic.py --n-cells 1000000 --n-genes 2000 --out benchmarks/.cache/synth_1m.h5ad --seed 0

The generator (NB counts from per-cell-type profiles and dispersions fitted to a real dataset, batches, library
sizes, ~8% non-zeros; out of core) lives in the package so that `atlasvi bench` can build its stores; see its
docstring. The reference is `shared/data/kang2018_pbmc_ifnb_muscat.h5ad` beside the repo, or
`ATLASVI_SYNTH_REFERENCE`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from atlasvi.bench.synthetic import REFERENCE_NAME, fit_reference, sample_block  # noqa: F401 (re-exported)
from atlasvi.bench.synthetic import make_synthetic_h5ad as _make_synthetic_h5ad

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REFERENCE = REPO_ROOT.parent / "shared" / "data" / REFERENCE_NAME
REFERENCE_ENV = "ATLASVI_SYNTH_REFERENCE"  # override the reference h5ad path


def reference_path() -> Path:
    env = os.environ.get(REFERENCE_ENV)
    if env:
        return Path(env)
    if DEFAULT_REFERENCE.exists():
        return DEFAULT_REFERENCE
    raise FileNotFoundError(f"{REFERENCE_NAME} not found in shared/data beside the repo; set {REFERENCE_ENV}")


def make_synthetic_h5ad(path, n_cells: int, n_genes: int, seed: int, *args, reference=None, **kwargs) -> dict:
    """`atlasvi.bench.synthetic.make_synthetic_h5ad` with the reference found beside the repo by default."""
    return _make_synthetic_h5ad(path, n_cells, n_genes, seed, *args, reference=reference or reference_path(), **kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-cells", type=int, required=True)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--out", required=True, help="output .h5ad path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-batches", type=int, default=4)
    p.add_argument("--chunk-cells", type=int, default=50_000)
    p.add_argument("--target-nnz", type=float, default=0.08)
    p.add_argument("--layout", choices=["contiguous", "chunked"], default="contiguous")
    p.add_argument("--reference", default=None, help=f"reference h5ad (default: shared/data/{REFERENCE_NAME})")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    stats = make_synthetic_h5ad(
        a.out, a.n_cells, a.n_genes, a.seed, n_batches=a.n_batches, chunk_cells=a.chunk_cells,
        target_nnz=a.target_nnz, layout=a.layout, reference=a.reference, verbose=not a.quiet,
    )  # fmt: skip
    print(f"non-zero fraction: {stats['nnz_fraction']:.4f} (target {stats['target_nnz']})", file=sys.stderr)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
