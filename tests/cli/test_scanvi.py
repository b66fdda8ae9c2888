"""`atlasvi scanvi` as a user runs it: a store whose query batches are unlabeled, a saved scVI, then scANVI."""

import shutil

import anndata as ad
import numpy as np
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from atlasvi.api import SCANVI, SCVI
from atlasvi.cli.main import app
from atlasvi.tracking import local_tracking_uri
from atlasvi.train import TrainConfig
from tests.conftest import KANG

runner = CliRunner(env={"COLUMNS": "200"})


def test_scanvi_transfers_labels_into_the_store_and_logs_a_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "kang.zarr"
    build = ["build", str(KANG), "-o", str(store), "--batch-key", "sample", "--labels-key", "cell_type"]
    built = runner.invoke(app, [*build, "--unlabeled-batch", "stim101", "--unlabeled-batch", "stim107"])
    assert built.exit_code == 0, built.output
    torch.manual_seed(0)
    scvi = SCVI(store, device="cpu")
    scvi.fit(TrainConfig(max_epochs=8, n_epochs_kl_warmup=4))
    scvi.save(tmp_path / "run" / "model")
    args = ["scanvi", "--scvi-model", str(tmp_path / "run" / "model"), "--max-epochs", "3", "--seed", "4"]
    result = runner.invoke(app, [*args, "--run-name", "transfer", "--experiment", "labels"])
    assert result.exit_code == 0, result.output
    assert "scANVI trained" in result.output
    written = ad.read_zarr(store)
    truth = ad.read_h5ad(KANG).obs["cell_type"].astype(str)
    is_query = written.obs["sample"].astype(str).str.startswith("stim").to_numpy()
    predicted = written.obs["scanvi_prediction"].astype(str).to_numpy()
    assert set(predicted) <= set(truth) and written.obsm["X_scanvi"].shape == (1556, 10)
    np.testing.assert_allclose(written.obsm["scanvi_probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    accuracy = np.mean(predicted[is_query] == truth.loc[written.obs_names].to_numpy()[is_query])
    assert accuracy > 0.6  # unlabeled stim cells, after 8 + 3 epochs on 750 labelled ctrl cells
    model = SCANVI.load(tmp_path / "run" / "scanvi" / "model", store, device="cpu")
    np.testing.assert_allclose(model.get_latent_representation(), written.obsm["X_scanvi"], rtol=1e-5, atol=1e-6)
    client = MlflowClient(local_tracking_uri(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("labels").experiment_id])
    assert run.info.run_name == "transfer" and run.data.tags["method"] == "SCANVI" and run.info.status == "FINISHED"
    params = run.data.params  # the whole config, as `atlasvi train` logs it
    assert params["scvi_model"] == str(tmp_path / "run" / "model") and params["store"] == str(store)
    assert (params["model.n_latent"], params["model.gene_likelihood"], params["model.n_layers"]) == ("10", "zinb", "1")
    assert (params["model.classification_ratio"], params["model.unlabeled_category"]) == ("50.0", "Unknown")
    assert (params["train.max_epochs"], params["train.seed"], params["train.lr"]) == ("3", "4", "0.001")
    assert (params["loader.batch_size"], params["loader.seed"]) == ("128", "4")
    assert (params["n_cells"], params["latent_key"], params["prediction_key"]) == (
        "1556",
        "X_scanvi",
        "scanvi_prediction",
    )
    for metric in ("validation_elbo", "train_loss", "train_classification_loss", "kl_weight"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [0, 1, 2]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "figures")] == ["figures/loss_curves.png"]
    again = runner.invoke(app, ["scanvi", "--scvi-model", str(tmp_path / "run" / "scanvi" / "model")])
    assert again.exit_code == 1 and "a saved scANVI model; give the scVI it was trained from" in again.output


def test_a_failing_scanvi_run_ends_failed_with_its_error(tmp_path, monkeypatch, kang_store):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    SCVI(kang_store, device="cpu").save(tmp_path / "model")

    def failing_fit(self, *args, **kwargs):
        raise RuntimeError("forced failure in training")

    monkeypatch.setattr(SCANVI, "fit", failing_fit)
    result = runner.invoke(app, ["scanvi", "--scvi-model", str(tmp_path / "model"), "--output", str(tmp_path / "s")])
    assert result.exit_code != 0 and "forced failure in training" in str(result.exception)
    client = MlflowClient(local_tracking_uri(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("atlasvi").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["error"] == "RuntimeError: forced failure in training"
    assert run.data.params["model.n_latent"] == "10"


def test_scanvi_never_replaces_a_latent_a_train_run_wrote(tmp_path, monkeypatch, kang_store):
    """obsm['X_scanvi'] recorded as an `atlasvi train` run's own is refused before training (it was silently
    replaced, and that run's resume then refused the key as another writer's); another --latent-key trains."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = shutil.copytree(kang_store, tmp_path / "store.zarr")
    scvi = SCVI(store, device="cpu")
    scvi.save(tmp_path / "model")
    writer = {"atlasvi_writer": {"output": "/somewhere/runs/scanvi", "folder_id": "f", "mlflow_run_id": "r1"}}
    scvi.write_latent_representation(key="X_scanvi", attrs=writer)
    before = ad.read_zarr(store).obsm["X_scanvi"]
    args = ["scanvi", "--scvi-model", str(tmp_path / "model"), "--output", str(tmp_path / "s"), "--max-epochs", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "obsm['X_scanvi'] was written by the run of output folder /somewhere/runs/scanvi" in result.output
    np.testing.assert_array_equal(ad.read_zarr(store).obsm["X_scanvi"], before)
    assert not (tmp_path / "s").exists() and not (tmp_path / "mlruns").exists()
    other = runner.invoke(app, [*args, "--latent-key", "X_scanvi_2"])
    assert other.exit_code == 0, other.output
    before = (tmp_path / "s" / "model" / "model.pt").read_bytes()
    again = runner.invoke(app, [*args, "--latent-key", "X_scanvi_2", "--seed", "3"])  # a re-run into OUTPUT
    assert again.exit_code == 1 and "holds a saved model already; pass --overwrite" in again.output, again.output
    assert (tmp_path / "s" / "model" / "model.pt").read_bytes() == before
    replaced = runner.invoke(app, [*args, "--latent-key", "X_scanvi_2", "--seed", "3", "--overwrite"])
    assert replaced.exit_code == 0 and (tmp_path / "s" / "model" / "model.pt").read_bytes() != before
