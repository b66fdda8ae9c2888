"""`atlasvi map-query` as a user runs it: a saved scANVI reference, a query store with new batches."""

import anndata as ad
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from atlasvi.api import SCANVI, SCVI
from atlasvi.cli.main import app
from atlasvi.tracking import local_tracking_uri
from atlasvi.train import TrainConfig
from tests.data.helpers import build_ctrl_stim_stores

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def reference_and_query(tmp_path_factory, kang):
    """A saved scANVI (2 + 2 epochs) on Kang's ctrl samples, and a store of its stim samples (no labels)."""
    folder = tmp_path_factory.mktemp("map_query")
    stores = build_ctrl_stim_stores(kang, 200, folder)
    torch.manual_seed(0)
    scvi = SCVI(stores[0], device="cpu")
    scvi.fit(TrainConfig(max_epochs=2))
    scanvi = SCANVI.from_scvi_model(scvi)
    scanvi.fit(TrainConfig(max_epochs=2))
    return scanvi.save(folder / "reference_model"), stores[0], stores[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder: MLflow's default local store lands in it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _runs(workdir, experiment: str) -> list:
    client = MlflowClient(local_tracking_uri(workdir))
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def test_map_query_writes_latent_predictions_and_the_query_model(reference_and_query, workdir):
    tmp_path = workdir
    reference, reference_store, query = reference_and_query
    args = ["map-query", "--reference", str(reference), "--query", str(query), "--max-epochs", "2", "--seed", "3"]
    result = runner.invoke(app, [*args, "--output", str(tmp_path / "query_model"), "--run-name", "stim"])
    assert result.exit_code == 0, result.output
    (run,) = _runs(workdir, "atlasvi")
    assert run.info.run_name == "stim" and run.info.status == "FINISHED" and run.data.tags["method"] == "SCANVI"
    params = run.data.params  # the whole config, as `atlasvi train` logs it
    assert (params["reference"], params["query"]) == (str(reference), str(query))
    assert (params["reference_method"], params["query_batches"]) == ("SCANVI", "stim101, stim107")
    assert (params["model.n_latent"], params["model.classification_ratio"]) == ("10", "50.0")
    assert (params["train.max_epochs"], params["train.weight_decay"], params["train.seed"]) == ("2", "0.0", "3")
    assert (params["loader.batch_size"], params["surgery.freeze_dropout"]) == ("128", "False")
    assert (params["n_cells"], params["latent_key"], params["prediction_key"]) == (
        "806",
        "X_scanvi",
        "scanvi_prediction",
    )
    client = MlflowClient(local_tracking_uri(workdir))
    for metric in ("validation_elbo", "train_loss", "train_classification_loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [0, 1]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "figures")] == ["figures/loss_curves.png"]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {"model/model.json", "model/model.pt"}
    written = ad.read_zarr(query)
    assert written.obsm["X_scanvi"].shape == (806, 10) and np.isfinite(written.obsm["X_scanvi"]).all()
    assert set(written.obs["scanvi_prediction"].astype(str)) <= set(
        ad.read_zarr(reference_store).obs["cell_type"].astype(str)
    )
    np.testing.assert_allclose(written.obsm["scanvi_probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    model = SCANVI.load(tmp_path / "query_model", query, device="cpu")
    assert model.schema.batch_categories == ("ctrl101", "ctrl107", "stim101", "stim107")
    np.testing.assert_allclose(model.get_latent_representation(), written.obsm["X_scanvi"], rtol=1e-5, atol=1e-6)


def test_map_query_errors_name_the_problem(reference_and_query, workdir):
    reference, reference_store, _ = reference_and_query
    missing = runner.invoke(app, ["map-query", "--reference", str(workdir), "--query", str(reference_store)])
    assert missing.exit_code == 1 and "no saved model here" in missing.output
    nothing_new = runner.invoke(app, ["map-query", "--reference", str(reference), "--query", str(reference_store)])
    assert nothing_new.exit_code == 1 and "every sample of the query is in the reference" in nothing_new.output
    assert _runs(workdir, "atlasvi") == []  # refused before any MLflow run


def test_map_query_never_replaces_a_saved_model_unasked(reference_and_query, workdir):
    """A re-run into the same OUTPUT is refused before training (the earlier query model and its MLflow run's
    artifacts stay), --overwrite replaces it; the reference itself is never an OUTPUT."""
    reference, _, query = reference_and_query
    args = ["map-query", "--reference", str(reference), "--query", str(query), "--max-epochs", "1"]
    out = workdir / "query_model"
    assert runner.invoke(app, [*args, "--output", str(out)]).exit_code == 0
    before = (out / "model.pt").read_bytes()
    again = runner.invoke(app, [*args, "--output", str(out), "--seed", "5"])
    assert again.exit_code == 1 and "holds a saved model already; pass --overwrite" in again.output, again.output
    assert (out / "model.pt").read_bytes() == before and len(_runs(workdir, "atlasvi")) == 1
    onto = runner.invoke(app, [*args, "--output", str(reference), "--overwrite"])
    assert onto.exit_code == 1 and "is the reference model" in onto.output, onto.output
    replaced = runner.invoke(app, [*args, "--output", str(out), "--seed", "5", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert (out / "model.pt").read_bytes() != before and len(_runs(workdir, "atlasvi")) == 2


def test_a_failing_map_query_run_ends_failed_with_its_error(reference_and_query, workdir, monkeypatch):
    reference, _, query = reference_and_query

    def failing_fit(self, *args, **kwargs):
        raise RuntimeError("forced failure in query training")

    monkeypatch.setattr(SCANVI, "fit", failing_fit)
    args = ["map-query", "--reference", str(reference), "--query", str(query), "--output", str(workdir / "q")]
    result = runner.invoke(app, args)
    assert result.exit_code != 0 and "forced failure in query training" in str(result.exception)
    (run,) = _runs(workdir, "atlasvi")
    assert run.info.status == "FAILED" and run.data.tags["error"] == "RuntimeError: forced failure in query training"


def test_de_and_latent_load_a_saved_scanvi(reference_and_query):
    reference, reference_store, _ = reference_and_query
    args = ["de", "--model", str(reference), "--groupby", "cell_type", "--group1", "B cells"]
    de = runner.invoke(app, [*args, "--n-samples-overall", "100"])
    assert de.exit_code == 0, de.output
    assert "B cells vs Rest: top 10" in de.output
    latent = runner.invoke(app, ["latent", "--model", str(reference), "--key", "X_scanvi"])
    assert latent.exit_code == 0, latent.output
    expected = SCANVI.load(reference, reference_store, device="cpu").get_latent_representation()
    np.testing.assert_allclose(ad.read_zarr(reference_store).obsm["X_scanvi"], expected, rtol=1e-5, atol=1e-6)
