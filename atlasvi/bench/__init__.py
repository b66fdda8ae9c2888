"""Benchmarks a user can run from the installed package: the 10K / 100K / 1M performance table (`atlasvi bench`).

Above training, Ray and MLflow (it trains, launches Ray Train workers and logs every row), beside `api`. The
comparison with other tools (scvi-tools, annbatch, in their own environments) is benchmarks/perf_compare.py, which
drives `run_bench` with a `Comparison`.
"""

from atlasvi.bench.perf import BenchConfig, Comparison, OtherTool, cached_store, default_rule_epochs, run_bench
from atlasvi.bench.synthetic import make_synthetic_h5ad

__all__ = [
    "BenchConfig",
    "Comparison",
    "OtherTool",
    "cached_store",
    "default_rule_epochs",
    "make_synthetic_h5ad",
    "run_bench",
]
