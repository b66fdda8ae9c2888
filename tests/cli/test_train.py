"""`atlasvi train` / `atlasvi latent` as a user runs them: the model, the latent, the MLflow run."""

import shutil
import warnings

import anndata as ad
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from atlasvi.bench import make_synthetic_h5ad
from atlasvi.cli.main import app
from atlasvi.data import BuildConfig, build_store
from atlasvi.train.job import TrainJobConfig
from tests.conftest import KANG

runner = CliRunner()


@pytest.fixture
def workdir(tmp_path, embedded_store, monkeypatch):
    """A working folder with a copy of the embedded store; MLflow's default local store lands in it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copytree(embedded_store, tmp_path / "store.zarr")
    return tmp_path


def _run(workdir):
    """The one MLflow run of the working folder's local tracking store."""
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("atlasvi").experiment_id])
    return client, run


def _train(*flags: str):
    args = ["train", "--store", "store.zarr", "--output", "out", "--n-epochs-kl-warmup", "2"]
    return runner.invoke(app, [*args, *flags])


def test_train_leaves_model_latent_figures_and_one_mlflow_run(workdir):
    result = _train("--max-epochs", "3", "--n-latent", "6", "--run-name", "first")
    assert result.exit_code == 0, result.output
    assert (workdir / "out" / "model" / "model.pt").exists()
    assert ad.read_zarr(workdir / "store.zarr").obsm["X_scvi"].shape == (1408, 6)
    assert TrainJobConfig(**yaml.safe_load((workdir / "out" / "config.yaml").read_text())).model.n_latent == 6
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("atlasvi").experiment_id])
    assert run.info.run_name == "first" and run.info.status == "FINISHED"
    assert run.data.params["model.n_latent"] == "6" and run.data.params["n_cells"] == "1408"
    history = client.get_metric_history(run.info.run_id, "validation_elbo")
    assert [m.step for m in history] == [0, 1, 2] and history[-1].value < history[0].value
    assert run.data.metrics["cells_per_second"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "figures", "model"} <= artifacts
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {"figures/loss_curves.png", "figures/latent_umap.png"}
    assert (workdir / "out" / "figures" / "latent_umap.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_resumes_the_checkpoint_and_the_same_mlflow_run(workdir):
    assert _train("--max-epochs", "2").exit_code == 0
    result = _train("--max-epochs", "4")
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("atlasvi").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "validation_elbo")] == [0, 1, 2, 3]


def test_latent_command_writes_a_saved_model_into_a_store(workdir):
    assert _train("--max-epochs", "1").exit_code == 0
    result = runner.invoke(
        app, ["latent", "--model", "out/model", "--key", "X_again", "--normalized-layer", "scvi_norm"]
    )
    assert result.exit_code == 0, result.output
    adata = ad.read_zarr(workdir / "store.zarr")
    np.testing.assert_allclose(adata.obsm["X_again"], adata.obsm["X_scvi"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adata.layers["scvi_norm"].sum(axis=1), 1e4, rtol=1e-3)


def test_config_errors_name_the_field(workdir):
    (workdir / "bad.yaml").write_text("model:\n  n_latnt: 5\n")
    result = runner.invoke(app, ["train", "--config", "bad.yaml"])
    assert result.exit_code == 2 and "unknown field 'model.n_latnt'" in result.output
    assert "n_latent" in result.output  # the allowed fields of the model section are listed
    result = _train("--gene-likelihood", "gauss")
    assert result.exit_code == 2 and "model.gene_likelihood" in result.output


def test_a_store_without_the_batch_key_or_a_missing_store_is_a_clear_error(workdir):
    result = runner.invoke(app, ["train", "--store", "nowhere.zarr"])
    assert result.exit_code == 1 and "nowhere.zarr: no atlas store here" in result.output
    result = runner.invoke(app, ["latent", "--model", "out/model"])
    assert result.exit_code == 1 and "no saved model here" in result.output


def test_resuming_with_another_model_config_is_refused(workdir):
    assert _train("--max-epochs", "1").exit_code == 0
    result = _train("--max-epochs", "2", "--n-latent", "5")
    assert result.exit_code == 2 and "trained with another model config" in result.output
    assert _train("--max-epochs", "1", "--n-latent", "5", "--overwrite").exit_code == 0


@pytest.fixture(scope="module")
def store_20k(tmp_path_factory) -> str:
    """A synthetic store of 20,000 cells x 40 genes (4 batches, 5 cell types): above the ~10,000 cells at
    which the latent UMAP used to fail; few genes keep its training to a second."""
    folder = tmp_path_factory.mktemp("store_20k")
    make_synthetic_h5ad(folder / "cells.h5ad", 20000, 40, seed=0, reference=KANG, chunk_cells=20000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inputs = [str(folder / "cells.h5ad")]
        config = BuildConfig(inputs=inputs, output=str(folder / "s.zarr"), batch_key="batch", labels_key="cell_type")
        return str(build_store(config))


def test_train_on_20000_cells_ends_with_latent_model_figures_and_a_finished_run(store_20k, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copytree(store_20k, tmp_path / "s.zarr")
    result = runner.invoke(app, ["train", "--store", "s.zarr", "--output", "out", "--max-epochs", "1"])
    assert result.exit_code == 0, result.output
    assert ad.read_zarr(tmp_path / "s.zarr").obsm["X_scvi"].shape == (20000, 10)
    assert (tmp_path / "out" / "model" / "model.pt").exists()
    assert (tmp_path / "out" / "figures" / "latent_umap.png").read_bytes()[:4] == b"\x89PNG"
    client, run = _run(tmp_path)
    assert run.info.status == "FINISHED" and not any(k.startswith("figure_error") for k in run.data.tags)
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {"figures/loss_curves.png", "figures/latent_umap.png"}


def test_a_failing_figure_is_a_warning_and_the_run_keeps_its_results(workdir, monkeypatch):
    def broken(*args, **kwargs):
        raise AttributeError("'csr_array' object has no attribute 'getnnz'")

    monkeypatch.setattr("atlasvi.cli.train.umap_png", broken)
    result = _train("--max-epochs", "1")
    assert result.exit_code == 0, result.output
    assert "warning: figure latent_umap not drawn (AttributeError: 'csr_array'" in " ".join(result.output.split())
    assert ad.read_zarr(workdir / "store.zarr").obsm["X_scvi"].shape == (1408, 10)
    assert (workdir / "out" / "model" / "model.pt").exists()
    client, run = _run(workdir)
    assert run.info.status == "FINISHED" and "getnnz" in run.data.tags["figure_error.latent_umap"]
    assert run.data.metrics["final_validation_elbo"] > 0
    assert {a.path for a in client.list_artifacts(run.info.run_id, "figures")} == {"figures/loss_curves.png"}
