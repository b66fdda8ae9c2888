"""Benchmarks a user can run from the installed package: the 10K / 100K / 1M performance table (`atlasvi bench`).

Above training, Ray and MLflow (it trains, launches Ray Train workers and logs every row), beside `api`.
"""

from atlasvi.bench.perf import BenchConfig, cached_store, default_rule_epochs, run_bench
from atlasvi.bench.synthetic import make_synthetic_h5ad

__all__ = ["BenchConfig", "cached_store", "default_rule_epochs", "make_synthetic_h5ad", "run_bench"]
