"""`atlasvi sweep` end to end on the embedded store: Ray Tune + ASHA, MLflow parent / children, ranked table.

Slow (Ray Tune starts trials; a minute or two on 2 cores): `make test-slow` runs them; the config checks run in the
default suite.
"""

import csv
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import anndata as ad
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from atlasvi.cli.main import app
from atlasvi.launch.sweep import SearchSpec, SweepConfig, rank_trials
from atlasvi.train import EpochRecord
from atlasvi.train.job import TrainJobConfig

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


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
def test_four_trial_sweep_ranks_logs_and_writes_a_best_config_that_trains(workdir, embedded_store, monkeypatch):
    space = {"model.n_latent": {"grid": [10, 5]}, "model.n_layers": {"grid": [1, 2]}}
    _sweep(workdir, embedded_store, space, "four")
    result = runner.invoke(app, ["sweep", "--config", "four.yaml"])
    assert result.exit_code == 0, result.output
    with (workdir / "outputs/sweeps/four/ranked.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"FINISHED"}
    ranking = [(-int(r["epochs"]), float(r["validation_elbo"])) for r in rows]
    assert ranking == sorted(ranking) and all(math.isfinite(v) for _, v in ranking)  # as ASHA judged
    assert any(r["stopped_early"] == "True" for r in rows)  # ASHA cut at least one trial short of 4 epochs
    assert int(rows[0]["epochs"]) == 4 and all(math.isfinite(float(r["validation_elbo_at_epoch_1"])) for r in rows)
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
    for child in children:  # epochs logged live by the trial, one value per epoch; closed with its outcome
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "validation_elbo")]
        assert sorted(steps) == list(range(len(steps))) and steps
        assert child.data.tags["status"] == "FINISHED" and child.data.tags["stopped_early"] in ("True", "False")
        assert (child.data.tags["stopped_early"] == "True") == (len(steps) < 4)
        assert any(a.path.startswith("loss_curves_") for a in client.list_artifacts(child.info.run_id))
        (logged,) = child.outputs.model_outputs  # the last epoch's model as an MLflow Model, as `atlasvi train` logs
        assert client.get_logged_model(logged.model_id).source_run_id == child.info.run_id
        assert logged.step == len(steps) - 1
    best_child = next(c for c in children if c.data.tags["trial_id"] == rows[0]["trial_id"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")  # load_model reads it
    pyfunc = mlflow.pyfunc.load_model(f"models:/{best_child.outputs.model_outputs[0].model_id}")
    latent = pyfunc.predict(pd.DataFrame({"store": [str(embedded_store)]}), params={"device": "cpu"})
    n_cells = ad.read_zarr(embedded_store).n_obs
    assert latent.shape == (n_cells, int(best_child.data.params["model.n_latent"])) and np.isfinite(latent).all().all()
    assert "ranked.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    best = workdir / "outputs/sweeps/four/best.yaml"
    trained = runner.invoke(app, ["train", "--config", str(best), "--max-epochs", "1"])
    assert trained.exit_code == 0, trained.output
    assert (workdir / "outputs/sweeps/four/best/model/model.pt").exists() and not (workdir / "outputs/scvi").exists()

    again = runner.invoke(app, ["sweep", "--config", "four.yaml"])  # a finished sweep: nothing runs again
    assert again.exit_code == 0, again.output
    runs = client.search_runs([client.get_experiment_by_name("atlasvi").experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}


@pytest.mark.slow
def test_a_multi_worker_trial_logs_the_model_its_rank_0_saved(workdir, embedded_store, monkeypatch):
    """A trial that runs a two-worker Ray Train job: rank 0 writes the model into each epoch's checkpoint, and the
    trial's child run has one MLflow Model, at its last epoch, whose pyfunc gives a finite (cells, n_latent) latent."""
    import ray

    config = _sweep(workdir, embedded_store, {"model.n_latent": {"grid": [3]}}, "workers")
    config["workers_per_trial"] = 2
    config["job"]["train"]["max_epochs"] = 2
    (workdir / "workers.yaml").write_text(yaml.safe_dump(config))
    ray.init(num_cpus=3, logging_level="WARNING", log_to_driver=False)  # two workers and the trial on a small machine
    result = runner.invoke(app, ["sweep", "--config", "workers.yaml"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("atlasvi").experiment_id])
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "validation_elbo")]
    assert sorted(steps) == [0, 1] and child.data.tags["status"] == "FINISHED"
    (logged,) = child.outputs.model_outputs
    assert client.get_logged_model(logged.model_id).source_run_id == child.info.run_id and logged.step == 1
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    pyfunc = mlflow.pyfunc.load_model(f"models:/{logged.model_id}")
    latent = pyfunc.predict(pd.DataFrame({"store": [str(embedded_store)]}), params={"device": "cpu"})
    assert latent.shape == (ad.read_zarr(embedded_store).n_obs, 3) and np.isfinite(latent).all().all()


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


def _epochs_reported(trial_dir) -> list[int]:
    result = trial_dir / "result.json"
    if not result.exists():
        return []
    return [json.loads(line)["epochs_done"] for line in result.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(workdir, embedded_store):
    config = _sweep(workdir, embedded_store, {"model.n_latent": {"grid": [5, 10, 15]}}, "resumed")
    config |= {"grace_period": 6, "max_concurrent_trials": 1}  # no early stops: every trial trains 6 epochs
    config["job"]["train"]["max_epochs"] = 6
    (workdir / "resumed.yaml").write_text(yaml.safe_dump(config))
    command = [str(Path(sys.executable).with_name("atlasvi")), "sweep", "--config", "resumed.yaml"]
    sweep = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    experiment = workdir / "outputs/sweeps/ray_results/resumed"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # interrupt (Ctrl-C) once one trial ended and the next is half-way
        progress = sorted(len(_epochs_reported(d)) for d in experiment.glob("_trial*"))
        if progress[-2:] and progress[-1] == 6 and len(progress) >= 2 and 2 <= progress[-2] < 6:
            break
        assert sweep.poll() is None, sweep.stdout.read()
        time.sleep(0.2)
    sweep.send_signal(signal.SIGINT)
    output = sweep.communicate(timeout=120)[0]
    assert sweep.returncode == 130, output
    assert "Run the same command again to resume" in " ".join(output.split())
    assert not (workdir / "outputs/sweeps/resumed/ranked.csv").exists()
    before = {d.name: _epochs_reported(d) for d in experiment.glob("_trial*")}
    (done,) = [name for name, epochs in before.items() if epochs == [1, 2, 3, 4, 5, 6]]
    (cut,) = [name for name, epochs in before.items() if 2 <= len(epochs) < 6]

    resumed = runner.invoke(app, ["sweep", "--config", "resumed.yaml"])
    assert resumed.exit_code == 0, resumed.output
    after = {d.name: _epochs_reported(d) for d in experiment.glob("_trial*")}
    assert len(after) == 3 and after[done] == before[done]  # the finished trial did not run again
    assert after[cut] == [1, 2, 3, 4, 5, 6]  # the cut trial went on from its checkpoint, no epoch run twice
    with (workdir / "outputs/sweeps/resumed/ranked.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["FINISHED"] * 3 and {r["epochs"] for r in rows} == {"6"}
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("atlasvi").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.tags["interrupted"] == "false" and parent.info.status == "FINISHED"
    assert "error" not in parent.data.tags  # the interruption's, cleared by the resume
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3
    for child in children:  # one value per epoch, whether the trial was cut or not
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "validation_elbo")]
        assert sorted(steps) == list(range(6))


def test_trials_rank_as_asha_judged_and_compare_at_the_common_epoch():
    def trial(name: str, curve: list[float], status: str = "FINISHED") -> dict:
        history = [{"epochs_done": i + 1, "validation_elbo": v} for i, v in enumerate(curve)]
        last = curve[-1] if curve else math.nan
        return {"trial_id": name, "status": status, "epochs": len(curve), "last": last, "history": history}

    trials = [
        trial("stopped-at-2", [900.0, 800.0]),
        trial("failed", [], status="FAILED"),
        trial("full-worse", [950.0, 850.0, 700.0, 690.0]),
        trial("full-better", [990.0, 870.0, 680.0, 650.0]),
    ]
    ranked = rank_trials(trials, "validation_elbo")
    assert [t["trial_id"] for t in ranked] == ["full-better", "full-worse", "stopped-at-2", "failed"]
    assert {t["common_epochs"] for t in ranked} == {2}
    assert [t["at_common"] for t in ranked[:3]] == [870.0, 850.0, 800.0] and math.isnan(ranked[3]["at_common"])


def test_a_first_rung_before_the_end_of_the_kl_warmup_is_warned_about():
    job = {"train": {"max_epochs": 40, "n_epochs_kl_warmup": 20}}
    early = SweepConfig.model_validate({"grace_period": 10, "job": job})
    assert "before the end of the KL warm-up (20 epochs)" in early.schedule_warnings()[0]
    assert SweepConfig.model_validate({"grace_period": 20, "job": job}).schedule_warnings() == []


def test_search_space_bounds_and_the_asha_schedule_are_checked():
    for spec, message in [
        ({"grid": []}, "grid is empty"),
        ({"choice": []}, "choice is empty"),
        ({"uniform": (1.0, 0.5)}, "low < high"),
        ({"uniform": (0.0, math.inf)}, "finite bounds"),
        ({"loguniform": (0.0, 1.0)}, "low bound must be > 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            SearchSpec(**spec)
    with pytest.raises(ValueError, match="grace_period\n.*30 > job.train.max_epochs 4: ASHA's first rung"):
        SweepConfig.model_validate({"grace_period": 30, "job": {"train": {"max_epochs": 4}}})
    sweep = SweepConfig.model_validate({"grace_period": 4, "reduction_factor": 3, "job": {"train": {"max_epochs": 40}}})
    assert sweep.horizon == 40 and sweep.rungs() == [4, 12, 36]
    assert SweepConfig.model_validate({"grace_period": 400}).horizon == 400  # max_epochs None: scvi-tools' cap


def test_a_schedule_ray_would_refuse_is_refused_before_ray_and_mlflow(workdir, embedded_store):
    config = str(REPO / "configs/sweep_scvi.yaml")  # grace_period 30
    result = runner.invoke(app, ["sweep", "--config", config, "--store", str(embedded_store), "--max-epochs", "4"])
    assert result.exit_code == 2, result.output
    assert "grace_period: 30 > job.train.max_epochs 4" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not (workdir / "mlruns").exists() and not (workdir / "outputs").exists()  # no MLflow run, no folder


def _record(epoch: int, elbo: float) -> dict:
    figures = EpochRecord(epoch, 1.0, elbo, elbo - 20, 20.0, elbo, elbo - 20, 20.0, 1000.0, 0.5)
    return {k: v for k, v in asdict(figures).items() if k not in ("step_losses", "extra_metrics")} | {
        "epochs_done": epoch + 1,
        "validation_elbo": elbo,
    }


def _no_ray(monkeypatch, run_sweep, trials: list[dict] | None = None) -> None:
    """The sweep command without Ray: `run_sweep` (and `summarise`) replaced."""
    import atlasvi.launch
    import atlasvi.launch.sweep

    monkeypatch.setattr(atlasvi.launch, "connect", lambda address: None)
    monkeypatch.setattr(atlasvi.launch.sweep, "run_sweep", run_sweep)
    monkeypatch.setattr(atlasvi.launch.sweep, "summarise", lambda results, sweep: rank_trials(trials, sweep.metric))


def _runs(workdir) -> list:
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("atlasvi").experiment_id])


def test_a_failing_sweep_leaves_neither_its_parent_nor_a_child_run_running(workdir, embedded_store, monkeypatch):
    def failing(sweep, store, storage, trial_logger):
        log = trial_logger("t1", {"model.n_latent": 5})  # a trial started and logged an epoch, then Ray failed
        log(EpochRecord(**{k: v for k, v in _record(0, 900.0).items() if k != "epochs_done"}))
        raise RuntimeError("forced failure under Ray")

    _no_ray(monkeypatch, failing)
    _sweep(workdir, embedded_store, {"model.n_latent": {"grid": [5, 10]}}, "broken")
    result = runner.invoke(app, ["sweep", "--config", "broken.yaml"])
    assert result.exit_code != 0 and "forced failure under Ray" in str(result.exception)
    runs = _runs(workdir)
    assert sorted(r.info.run_name for r in runs) == ["sweep-broken", "trial-t1"]
    assert {r.info.status for r in runs} == {"FAILED"}
    (parent,) = [r for r in runs if r.info.run_name == "sweep-broken"]
    assert parent.data.tags["error"] == "RuntimeError: forced failure under Ray"


def test_the_best_config_trains_as_is_into_its_own_folder_and_latent_key(workdir, embedded_store, monkeypatch):
    shutil.copytree(embedded_store, workdir / "store.zarr")
    trials = [
        {
            "trial_id": f"t{n_latent}{n_layers}",
            "overrides": {"model.n_latent": n_latent, "model.n_layers": n_layers},
            "status": "FINISHED",
            "error": None,
            "epochs": 2,
            "last": elbo,
            "best": elbo,
            "stopped_early": False,
            "history": [_record(0, elbo + 50), _record(1, elbo)],
            "model": None,
        }
        for n_latent, n_layers, elbo in [(4, 1, 910.0), (4, 2, 905.5), (6, 1, 899.25), (6, 2, 920.0)]
    ]
    _no_ray(monkeypatch, lambda sweep, store, storage, trial_logger: (None, False), trials)
    space = {"model.n_latent": {"grid": [4, 6]}, "model.n_layers": {"grid": [1, 2]}}
    config = _sweep(workdir, embedded_store, space, "best-of-four")
    config["job"] |= {"store": "store.zarr", "umap_cells": 0}
    (workdir / "best-of-four.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["sweep", "--config", "best-of-four.yaml"])
    assert result.exit_code == 0, result.output
    folder = workdir / "outputs/sweeps/best-of-four"
    assert (folder / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    best = TrainJobConfig.model_validate(yaml.safe_load((folder / "best.yaml").read_text()))
    base = TrainJobConfig.model_validate(config["job"])
    assert (best.model.n_latent, best.model.n_layers) == (6, 1)
    assert best.output == "outputs/sweeps/best-of-four/best" != base.output
    assert best.latent_key == "X_scvi_best-of-four" and best.run_name == "best-of-four-best"
    assert {r.info.status for r in _runs(workdir)} == {"FINISHED"}
    trained = runner.invoke(app, ["train", "--config", str(folder / "best.yaml"), "--max-epochs", "1"])
    assert trained.exit_code == 0, trained.output
    assert (folder / "best/model/model.pt").exists() and not (workdir / "outputs/scvi").exists()
    obsm = ad.read_zarr(workdir / "store.zarr").obsm
    assert "X_scvi" not in obsm and obsm["X_scvi_best-of-four"].shape == (1408, 6)
