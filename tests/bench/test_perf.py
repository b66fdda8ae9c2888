"""`atlasvi bench`: the 10K-cell row as a smoke test (table, JSON, chart, MLflow rows; no timing assertion).

The comparison with scvi-tools (benchmarks/perf_compare.py) is tested in tests/benchmarks/test_perf_compare.py.
"""

import json

import anndata as ad
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from atlasvi.bench import BenchConfig, cached_store, default_rule_epochs, make_synthetic_h5ad
from atlasvi.cli.bench import _counts
from atlasvi.cli.main import app
from tests.conftest import KANG

runner = CliRunner()


def test_synthetic_counts_are_sparse_nb_with_batches_and_no_empty_cell(tmp_path):
    first = make_synthetic_h5ad(tmp_path / "a.h5ad", 600, 300, seed=3, reference=KANG, chunk_cells=250)
    again = make_synthetic_h5ad(tmp_path / "b.h5ad", 600, 300, seed=3, reference=KANG, chunk_cells=600)
    a, b = ad.read_h5ad(tmp_path / "a.h5ad"), ad.read_h5ad(tmp_path / "b.h5ad")
    assert (a.X != b.X).nnz == 0  # the output depends on the seed only, not on the write chunks
    assert first["nnz"] == again["nnz"] and abs(first["nnz_fraction"] - 0.08) < 0.02
    assert np.asarray(a.X.sum(axis=1)).min() >= 1
    assert a.obs["batch"].nunique() == 4 and set(a.obs["cell_type"]) <= set(ad.read_h5ad(KANG).obs["cell_type"])


def test_default_rule_and_count_flags():
    assert [default_rule_epochs(n) for n in (9_000, 90_000, 900_000)] == [400, 89, 9]
    assert _counts("10k,100K,1m,2500", "--sizes") == [10_000, 100_000, 1_000_000, 2500]


def test_bench_10k_row_table_chart_and_mlflow_runs(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [
        "bench", "--sizes", "10k", "--epochs", "1", "--batch-sizes", "1024", "--workers", "1", "--no-loaders",
        "--output", str(out), "--cache-dir", str(cache), "--reference", str(KANG),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output

    report = json.loads((out / "perf_table.json").read_text())
    (row,) = report["rows"]
    assert (row["cells"], row["tool"], row["device"], row["workers"], row["batch_size"]) == (
        10_000,
        "atlasvi",
        "cpu",
        1,
        1024,
    )
    assert row["train_cells"] == 9000 and row["epochs"] == 1 and row["default_rule_epochs"] == 400
    assert row["cells_per_s"] > 0 and row["epoch_s"] > 0 and row["wall_s"] >= row["epoch_s"]
    assert 100 < row["peak_rss_mb"] < 4000  # a Python + torch process, measured, not made up
    assert not any(k.startswith("x_") for k in row)  # no other tool configured: no ratio columns
    assert report["skipped"] == ["GPU rows: not asked for (`--use-gpu`)"] and report["other_versions"] == {}
    assert report["machine"]["cores"] >= 1 and report["machine"]["versions"]["torch"]

    table = (out / "perf_table.md").read_text()
    assert f"| 10,000 | atlasvi | cpu | 1024 | 1 | {row['epoch_s']:.2f} | {row['cells_per_s']:,.0f} |" in table
    assert "scvi-tools" not in table and "Headline" not in table
    assert (out / "perf_chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("benchmarks")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 1
    child = children[0]
    assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    params = child.data.params
    assert (params["size"], params["device"], params["workers"], params["batch_size"], params["genes"]) == (
        "10000", "cpu", "1", "1024", "2000",
    )  # fmt: skip
    assert child.data.metrics["cells_per_s"] == pytest.approx(row["cells_per_s"])
    assert child.data.metrics["peak_rss_mb"] == pytest.approx(row["peak_rss_mb"])
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert artifacts == {"perf_table.md", "perf_table.json", "perf_chart.png"}

    store = cache / "atlas_10k_zstd.zarr"
    stamp = (store / "zarr.json").stat().st_mtime_ns
    config = BenchConfig(cache_dir=str(cache), reference=str(KANG))
    assert cached_store(10_000, config) == store and (store / "zarr.json").stat().st_mtime_ns == stamp  # reused
