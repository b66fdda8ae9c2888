"""`atlasvi train` / `atlasvi latent` as a user runs them: the model, the latent, the MLflow run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from atlasvi.bench import make_synthetic_h5ad
from atlasvi.cli.main import app
from atlasvi.data import BuildConfig, build_store
from atlasvi.models.saving import load_weights
from atlasvi.train.job import TrainJobConfig
from atlasvi.train.loop import read_checkpoint
from tests.conftest import KANG

runner = CliRunner()


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
    (store,) = run.inputs.dataset_inputs  # the store as the run's dataset, the model as its MLflow Model
    assert store.dataset.name == "store.zarr" and [t.value for t in store.tags] == ["training"]
    (logged,) = run.outputs.model_outputs
    assert client.get_logged_model(logged.model_id).source_run_id == run.info.run_id
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {"figures/loss_curves.png", "figures/latent_umap.png"}
    assert (workdir / "out" / "figures" / "latent_umap.png").read_bytes()[:4] == b"\x89PNG"
    assert "mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db" in result.output


def test_the_mlflow_ui_hint_names_the_store_the_run_went_to(workdir, monkeypatch):
    elsewhere = f"sqlite:///{workdir / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    result = _train("--max-epochs", "1")
    assert result.exit_code == 0, result.output
    assert f"mlflow ui --backend-store-uri {elsewhere}" in result.output.replace("\n", "")


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
    (workdir / "broken.yaml").write_text("model:\n  n_latent: 5\n train: [1\n")
    result = runner.invoke(app, ["train", "--config", "broken.yaml"])
    assert result.exit_code == 2 and "broken.yaml, line 3, column 2: malformed YAML" in result.output
    (workdir / "kl.yaml").write_text("train:\n  min_kl_weight: 0.5\n  max_kl_weight: 0.2\n")
    result = runner.invoke(app, ["train", "--config", "kl.yaml"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "min_kl_weight (0.5) is above max_kl_weight (0.2)" in said
    assert not (workdir / "mlruns").exists()  # refused before any run


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
    said = " ".join(result.output.split())
    assert said.count("warning: the KL warm-up (2 epochs) outlasts the run (1 epochs): it ends at KL weight 0,") == 1
    assert "warning: figure latent_umap not drawn (AttributeError: 'csr_array'" in " ".join(result.output.split())
    assert ad.read_zarr(workdir / "store.zarr").obsm["X_scvi"].shape == (1408, 10)
    assert (workdir / "out" / "model" / "model.pt").exists()
    client, run = _run(workdir)
    assert run.info.status == "FINISHED" and "getnnz" in run.data.tags["figure_error.latent_umap"]
    assert run.data.metrics["final_validation_elbo"] > 0
    assert {a.path for a in client.list_artifacts(run.info.run_id, "figures")} == {"figures/loss_curves.png"}


QUICK = ["--store", "store.zarr", "--config", "quick.yaml", "--n-epochs-kl-warmup", "2"]


@pytest.fixture
def quick(workdir):
    """The working folder with a config that skips the UMAP (these tests are about the model, not the figure)."""
    (workdir / "quick.yaml").write_text("umap_cells: 0\n")
    return workdir


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_weights(folder / "model")


def test_the_same_seed_gives_the_same_run_whatever_the_global_rng(quick):
    runs = {}
    for out, noise in (("a", 1), ("b", 7), ("other", 1)):
        torch.manual_seed(noise)  # global state another library could have left: the run must not read it
        torch.rand(noise)
        before = torch.get_rng_state()
        seed = "4" if out == "other" else "3"
        args = ["train", *QUICK, "--output", out, "--latent-key", f"X_{out}", "--max-epochs", "2", "--seed", seed]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert torch.equal(torch.get_rng_state(), before)  # nor change it
        runs[out] = read_checkpoint(quick / out / "checkpoints" / "last.pt")[1]
    a, b, other = runs["a"], runs["b"], runs["other"]
    assert [r.step_losses for r in a] == [r.step_losses for r in b] and len(a[0].step_losses) == 10
    assert a[-1].validation_elbo == b[-1].validation_elbo
    assert all(torch.equal(v, _weights(quick / "b")[k]) for k, v in _weights(quick / "a").items())
    obsm = ad.read_zarr(quick / "store.zarr").obsm
    np.testing.assert_array_equal(obsm["X_a"], obsm["X_b"])
    assert a[0].step_losses[0] != other[0].step_losses[0]  # another seed, another run


def test_a_run_killed_mid_epoch_and_rerun_ends_bit_identical_to_an_uninterrupted_one(quick):
    args = [*QUICK, "--max-epochs", "8", "--seed", "5"]
    assert runner.invoke(app, ["train", *args, "--output", "full", "--latent-key", "X_full"]).exit_code == 0
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    command = [str(Path(sys.executable).with_name("atlasvi")), "train", *args, "--output", "killed"]
    process = subprocess.Popen(
        [*command, "--latent-key", "X_killed"], cwd=quick, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    checkpoint = quick / "killed" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # after the first checkpoint: in the epoch that follows it
    assert process.wait() == -signal.SIGKILL, process.stderr.read().decode()
    assert len(read_checkpoint(checkpoint)[1]) < 8 and not (quick / "killed" / "model").exists()
    result = runner.invoke(app, ["train", *args, "--output", "killed", "--latent-key", "X_killed"])
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output
    full, resumed = (read_checkpoint(quick / out / "checkpoints" / "last.pt")[1] for out in ("full", "killed"))
    assert [r.step_losses for r in resumed] == [r.step_losses for r in full]
    assert resumed[-1].validation_elbo == full[-1].validation_elbo
    assert all(torch.equal(v, _weights(quick / "killed")[k]) for k, v in _weights(quick / "full").items())


def test_latent_finds_the_training_store_from_any_folder_and_refuses_another_one_there(
    quick, embedded_store, kang_store, monkeypatch
):
    assert runner.invoke(app, ["train", *QUICK, "--output", "out", "--max-epochs", "1"]).exit_code == 0
    elsewhere = quick / "elsewhere"
    shutil.copytree(embedded_store, elsewhere / "store.zarr")  # the same relative name, the same genes
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(app, ["latent", "--model", "../out/model", "--key", "X_again"])
    assert result.exit_code == 0, result.output
    assert "X_again" in ad.read_zarr(quick / "store.zarr").obsm
    assert "X_again" not in ad.read_zarr(elsewhere / "store.zarr").obsm
    shutil.rmtree(quick / "store.zarr")
    shutil.copytree(kang_store, quick / "store.zarr")  # another store where the training store was
    result = runner.invoke(app, ["latent", "--model", "../out/model", "--key", "X_again"])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "not the store ../out/model was trained on" in said, result.output
    assert "records 1408 cells" in said and "this store has 1556 cells" in said
    meta_path = quick / "out" / "model" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["store"] = "store.zarr"  # as models saved before recorded it
    meta_path.write_text(json.dumps(meta))
    result = runner.invoke(app, ["latent", "--model", "../out/model"])
    assert result.exit_code == 1 and "relative to the folder training ran in" in " ".join(result.output.split())


class _RunsCode:
    """Unpickling this would call open(path, "w"): a model.pt must never get that far."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_broken_model_files_are_one_line_naming_file_and_field(quick):
    assert runner.invoke(app, ["train", *QUICK, "--output", "out", "--max-epochs", "1"]).exit_code == 0
    saved = quick / "out" / "model"
    good = json.loads((saved / "model.json").read_text())

    def latent_with(meta: dict | str) -> str:
        (saved / "model.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
        result = runner.invoke(app, ["latent", "--model", "out/model", "--key", "X_bad"])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        return " ".join(result.output.split())

    assert "model.json: not valid JSON (line 1, column 2" in latent_with("{")
    no_genes = json.loads(json.dumps(good))
    del no_genes["registry"]["gene_ids"]
    assert "model.json: missing field 'registry.gene_ids'" in latent_with(no_genes)
    for field, value, problem in (
        ("n_latent", 5, "n_latent=5"),
        ("gene_likelihood", "nb", "gene_likelihood='nb'"),
        ("n_latent", -1, "field 'config.model.n_latent'"),
    ):
        changed = json.loads(json.dumps(good))
        changed["config"]["model"][field] = value
        said = latent_with(changed)
        assert problem in said and "model.json" in said, said
        if value != -1:
            assert "does not describe the weights in model.pt" in said
    (saved / "model.json").write_text(json.dumps(good))
    marker = quick / "code_ran"
    torch.save({"w": torch.zeros(2), "payload": _RunsCode(str(marker))}, saved / "model.pt")
    said = latent_with(good)
    assert "model.pt: not a weights-only model file; loading it would run code from the file, refused" in said
    assert "weights_only" not in said and not marker.exists()


def test_train_scanvi_from_a_saved_scvi_is_atlasvi_scanvi(workdir):
    """init_from in YAML: the saved scVI's architecture (n_latent 6) and training store, no flag needed; the latent
    and the predictions are atlasvi scanvi's."""
    assert _train("--max-epochs", "2", "--n-latent", "6").exit_code == 0
    (workdir / "scanvi.yaml").write_text(
        yaml.safe_dump({"model": {"name": "scanvi"}, "init_from": "out/model", "output": "sc"})
    )
    result = runner.invoke(app, ["train", "--config", "scanvi.yaml", "--max-epochs", "2"])
    assert result.exit_code == 0, result.output
    assert "SCANVI trained" in result.output, result.output
    saved = json.loads((workdir / "sc" / "model" / "model.json").read_text())
    assert saved["method"] == "SCANVI" and saved["config"]["model"]["n_latent"] == 6
    assert saved["config"]["store"] == str((workdir / "store.zarr").resolve())
    reference = ["scanvi", "--scvi-model", "out/model", "--output", "ref", "--latent-key", "X_ref", "--max-epochs", "2"]
    assert runner.invoke(app, [*reference, "--prediction-key", "ref_prediction"]).exit_code == 0
    again = runner.invoke(app, ["latent", "--model", "sc/model", "--key", "X_again"])
    assert again.exit_code == 0, again.output
    adata = ad.read_zarr(workdir / "store.zarr")
    assert adata.obsm["X_scanvi"].shape == (1408, 6)
    np.testing.assert_allclose(adata.obsm["X_scanvi"], adata.obsm["X_ref"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adata.obsm["X_again"], adata.obsm["X_scanvi"], rtol=1e-5, atol=1e-6)
    assert adata.obsm["scanvi_probabilities"].shape == (1408, 5)  # the 5 cell lines
    assert (adata.obs["scanvi_prediction"] == adata.obs["ref_prediction"]).mean() > 0.99


def test_init_from_a_model_the_target_cannot_start_from_is_one_error_line(workdir):
    assert _train("--max-epochs", "1").exit_code == 0
    result = runner.invoke(app, ["train", "--store", "store.zarr", "--init-from", "out/model", "--output", "o2"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: init_from out/model: a saved scvi model; scvi starts only from no saved model"
    ]
    assert not (workdir / "o2" / "model").exists()


@pytest.mark.parametrize("amortization", [None, 3])
def test_latent_of_a_destvi_writes_its_latent_beside_or_its_proportions(tmp_path, monkeypatch, amortization):
    """A DestVI trained without n_latent_amortization has no latent: `atlasvi latent` writes what `train` writes
    (the proportions, its registry key), not a ZeroDivisionError traceback; the API's writer says why it cannot.
    With one, the latent goes to obsm['X_destvi'], not over the proportions (the registry key)."""
    from atlasvi.api.condscvi import CondSCVI
    from atlasvi.api.destvi import DestVI
    from atlasvi.data import LoaderConfig
    from atlasvi.models.condscvi import CondSCVIConfig
    from atlasvi.train import TrainConfig
    from tests.models.test_destvi import _kang_pair

    monkeypatch.chdir(tmp_path)
    ref_store, spot_store, _ = _kang_pair(tmp_path, n_genes=60, n_spots=40)
    reference = CondSCVI(ref_store, CondSCVIConfig(n_hidden=16), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.fit(TrainConfig(max_epochs=1), LoaderConfig(seed=0))
        model = DestVI.from_rna_model(spot_store, reference, device="cpu", n_latent_amortization=amortization)
        model.fit(TrainConfig(max_epochs=1), LoaderConfig(seed=0))
    model.save(tmp_path / "destvi")
    if amortization is not None:
        proportions = model.write_results()[0]  # as `atlasvi train` leaves them
        before = ad.read_zarr(spot_store).obsm["proportions"]
        result = runner.invoke(app, ["latent", "--model", str(tmp_path / "destvi"), "--store", str(spot_store)])
        assert result.exit_code == 0, result.output
        written = ad.read_zarr(spot_store)
        assert proportions.name == "proportions" and written.obsm["X_destvi"].shape == (40, amortization)
        np.testing.assert_array_equal(written.obsm["proportions"], before)
        np.testing.assert_allclose(written.obsm["X_destvi"], model.get_latent_representation(), rtol=1e-5, atol=1e-6)
        return
    assert not model.has_latent
    with pytest.raises(ValueError, match="no latent"):
        model.write_latent_representation(key="X_destvi")
    result = runner.invoke(app, ["latent", "--model", str(tmp_path / "destvi"), "--store", str(spot_store)])
    assert result.exit_code == 0, result.output
    assert "no latent" in result.output
    written = ad.read_zarr(spot_store).obsm["proportions"]
    np.testing.assert_allclose(written, model.get_proportions().to_numpy(), rtol=1e-5, atol=1e-6)


def test_a_run_still_resumes_after_latent_rewrote_its_key(workdir):
    """`atlasvi latent --model OUTPUT/model` (the README's command) re-wrote obsm['X_scvi'] without the run's
    record, and resuming that run (a longer --max-epochs) was then refused as "written by another command"."""
    assert _train("--max-epochs", "1").exit_code == 0
    latent = runner.invoke(app, ["latent", "--model", "out/model"])
    assert latent.exit_code == 0, latent.output
    resumed = _train("--max-epochs", "2")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output


def test_latent_normalized_layer_of_a_model_without_it_is_one_line_before_any_write(kang_store, tmp_path):
    """SysVI (like PEAKVI, CondSCVI, DestVI) has no normalized expression: `atlasvi latent --normalized-layer` is
    one error line naming the model and the methods that have it, before the latent is written (it wrote the
    latent, then raised an AttributeError traceback)."""
    from atlasvi.api.sysvi import SysVI
    from atlasvi.train import TrainConfig

    store = tmp_path / "kang.zarr"
    shutil.copytree(kang_store, store)
    model = SysVI(store, device="cpu")
    model.fit(TrainConfig(max_epochs=1))
    model.save(tmp_path / "model")
    args = ["latent", "--model", str(tmp_path / "model"), "--store", str(store), "--normalized-layer", "norm"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: {tmp_path / 'model'}: a SysVI model has no normalized expression")
    assert "SCVI" in result.output and "SysVI" not in result.output.split("written for")[1]
    assert result.output.count("\n") == 1
    written = ad.read_zarr(store)
    assert model.latent_key not in written.obsm and "norm" not in written.layers
