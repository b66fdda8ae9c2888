"""`atlasvi sweep` end to end on the embedded store: Ray Tune + ASHA, MLflow parent / children, ranked table.

Slow (Ray Tune starts trials; a minute or two on 2 cores): `make test-slow` runs them; the config checks run in the
default suite.
"""

import csv
import math

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from atlasvi.cli.main import app
from atlasvi.launch.sweep import SearchSpec, SweepConfig

runner = CliRunner()


@pytest.fixture
def workdir(tmp_path, embedded_store, monkeypatch):
    import ray

    ray.shutdown()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path
    ray.shutdown()


def _sweep(workdir, embedded_store, space: dict, name: str) -> dict:
    config = {
        "name": name,
        "grace_period": 1,
        "reduction_factor": 2,
        "search_space": space,
        "job": {"store": str(embedded_store), "train": {"max_epochs": 4, "n_epochs_kl_warmup": 2}},
    }
    (workdir / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return config


@pytest.mark.slow
def test_four_trial_sweep_ranks_logs_and_writes_a_best_config_that_trains(workdir, embedded_store):
    space = {"model.n_latent": {"grid": [10, 5]}, "model.n_layers": {"grid": [1, 2]}}
    _sweep(workdir, embedded_store, space, "four")
    result = runner.invoke(app, ["sweep", "--config", "four.yaml"])
    assert result.exit_code == 0, result.output
    with (workdir / "outputs/sweeps/four/ranked.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"FINISHED"}
    objective = [float(r["best_validation_elbo"]) for r in rows]
    assert objective == sorted(objective) and all(math.isfinite(v) for v in objective)
    assert any(r["stopped_early"] == "True" for r in rows)  # ASHA cut at least one trial short of 4 epochs
    assert (workdir / "outputs/sweeps/four/heatmap.png").read_bytes()[:4] == b"\x89PNG"
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("atlasvi").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    assert {(c.data.params["model.n_latent"], c.data.params["model.n_layers"]) for c in children} == {
        ("10", "1"),
        ("10", "2"),
        ("5", "1"),
        ("5", "2"),
    }
    assert all(client.get_metric_history(c.info.run_id, "validation_elbo") for c in children)
    assert "ranked.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    best = workdir / "outputs/sweeps/four/best.yaml"
    trained = runner.invoke(app, ["train", "--config", str(best), "--max-epochs", "1", "--output", "best"])
    assert trained.exit_code == 0, trained.output


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(workdir, embedded_store):
    _sweep(workdir, embedded_store, {"model.dropout_rate": {"grid": [0.1, 1.5]}}, "failing")  # 1.5 is invalid
    result = runner.invoke(app, ["sweep", "--config", "failing.yaml"])
    assert result.exit_code == 0, result.output
    with (workdir / "outputs/sweeps/failing/ranked.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["FINISHED", "FAILED"]
    assert "dropout_rate" in rows[1]["error"]


def test_search_space_fields_are_checked():
    with pytest.raises(ValueError, match="'model.n_latnt' is not a TrainJobConfig field"):
        SweepConfig(search_space={"model.n_latnt": SearchSpec(grid=[1])})
    with pytest.raises(ValueError, match="exactly one of grid, choice"):
        SearchSpec(grid=[1], choice=[2])
