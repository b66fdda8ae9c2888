"""A trained model as an MLflow Model (pyfunc, registrable) and its store as the run's dataset input."""

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from atlasvi.api import SCVI
from atlasvi.data.store import read_store_attrs
from atlasvi.models.scvi import SCVIConfig
from atlasvi.tracking import MlflowRun
from atlasvi.train import TrainConfig


@pytest.fixture
def uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # mlflow.pyfunc.load_model and register_model read it
    return uri


def test_the_model_loads_as_a_pyfunc_giving_the_latent_and_registers(kang_store, tmp_path, uri):
    torch.manual_seed(0)
    model = SCVI(kang_store, SCVIConfig(n_latent=3, n_hidden=16), device="cpu")
    model.fit(TrainConfig(max_epochs=1))
    saved = model.save(tmp_path / "model")
    with MlflowRun(uri, "atlasvi", run_name="pyfunc") as run:
        run.log_store_input(str(kang_store))
        run.log_store_input(str(kang_store))  # a resumed run: recorded once
        model_id = run.log_model(saved, step=0)
    client = MlflowClient(uri)
    (used,) = client.get_run(run.run_id).inputs.dataset_inputs
    assert used.dataset.name == "kang.zarr" and str(kang_store.resolve()) in used.dataset.source
    assert len(used.dataset.digest) == 32 and [t.value for t in used.tags] == ["training"]
    assert f'"n_cells": {read_store_attrs(kang_store)["n_cells"]}' in used.dataset.profile
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == run.run_id and logged.status.to_int() == logged.status.READY.to_int()
    assert [o.model_id for o in client.get_run(run.run_id).outputs.model_outputs] == [model_id]

    expected = model.get_latent_representation()
    pyfunc = mlflow.pyfunc.load_model(f"models:/{model_id}")
    latent = pyfunc.predict(pd.DataFrame({"store": [str(kang_store)]}), params={"device": "cpu"})
    assert list(latent.columns) == ["z0", "z1", "z2"] and latent.index[0] == _first_cell(kang_store)
    np.testing.assert_allclose(latent.to_numpy(), expected, rtol=1e-6, atol=1e-6)
    version = mlflow.register_model(f"models:/{model_id}", "atlasvi-kang")
    registered = mlflow.pyfunc.load_model(f"models:/atlasvi-kang/{version.version}")
    np.testing.assert_allclose(registered.predict([str(kang_store)]).to_numpy(), expected, rtol=1e-6, atol=1e-6)


def _first_cell(store) -> str:
    import anndata as ad

    return str(ad.read_zarr(store).obs_names[0])


def test_a_model_that_fails_to_log_ends_failed_and_leaves_no_run_running(kang_store, tmp_path, uri, monkeypatch):
    saved = SCVI(kang_store, SCVIConfig(n_latent=2, n_hidden=8), device="cpu").save(tmp_path / "model")

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(MlflowClient, "log_model_artifacts", failing_save)  # the upload fails
    with pytest.raises(OSError, match="disk full"), MlflowRun(uri, "atlasvi") as run:
        run.log_model(saved)
    client = MlflowClient(uri)
    finished = client.get_run(run.run_id)
    assert finished.info.status == "FAILED" and finished.data.tags["error"] == "OSError: disk full"
    (logged,) = client.search_logged_models(experiment_ids=[run.experiment_id])
    assert logged.status.to_int() == logged.status.FAILED.to_int() and logged.source_run_id == run.run_id
