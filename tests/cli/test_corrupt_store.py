"""`atlasvi train` / `latent` / `de` on a damaged or edited store: one line naming the chunk or field, exit code 1,
no MLflow run left RUNNING, nothing written into the store."""

import json
import shutil
from pathlib import Path

import anndata as ad
import pytest
import yaml
from typer.testing import CliRunner

from atlasvi.api import SCVI
from atlasvi.cli.main import app
from atlasvi.train import TrainConfig

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def model(embedded_store, tmp_path_factory) -> Path:
    """A model of the embedded store (1408 cells, 300 genes) trained one epoch."""
    scvi = SCVI(embedded_store, device="cpu")
    scvi.fit(TrainConfig(max_epochs=1, n_epochs_kl_warmup=1))
    return scvi.save(tmp_path_factory.mktemp("model") / "model")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _n_cells_200(store: Path) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["atlasvi"]["n_cells"] = 200
    (store / "zarr.json").write_text(json.dumps(meta))


DAMAGES = {
    "truncated X/data shard": (lambda s: _truncate(s / "X/data/c/0"), ["X/data[", "shard file X/data/c/0"]),
    "deleted X/indices shard": (lambda s: (s / "X/indices/c/0").unlink(), ["X/indices", "shard file X/indices/c/0"]),
    "n_cells edited": (_n_cells_200, ["attrs n_cells = 200 but len(X/indptr) - 1 = 1408"]),
}


def _one_error_line(result, patterns: list[str], store: Path) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(store) in errors[0], result.output
    for pattern in patterns:
        assert pattern in errors[0], errors[0]


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_train_and_latent_on_a_damaged_store_print_one_line(embedded_store, model, tmp_path, monkeypatch, damage):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = Path(shutil.copytree(embedded_store, tmp_path / "store.zarr"))
    apply, patterns = DAMAGES[damage]
    apply(store)
    trained = runner.invoke(app, ["train", "--store", str(store), "--output", "out", "--max-epochs", "1"])
    _one_error_line(trained, patterns, store)
    latent = runner.invoke(app, ["latent", "--model", str(model), "--store", str(store), "--key", "X_test"])
    _one_error_line(latent, patterns, store)
    assert not (store / "obsm" / "X_test").exists() and not (store / "obsm" / "X_scvi").exists()
    assert not list(tmp_path.glob(".store.zarr.*"))  # no write-back staging left
    if damage == "n_cells edited":
        de = runner.invoke(app, ["de", "--model", str(model), "--store", str(store), "--groupby", "cell_line"])
        assert de.exit_code == 1 and patterns[0] in " ".join(de.output.split()), de.output  # cli/de.py's own print
        assert ad.read_zarr(store).n_obs == 1408  # nothing written: anndata still reads the store


def test_a_validation_fraction_that_holds_out_no_cell_fails_before_any_mlflow_run(
    embedded_store, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = {"store": str(embedded_store), "output": "out", "train": {"validation_fraction": 0.0003}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["train", "--config", "job.yaml"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "validation_fraction 0.0003 holds out round(1408 x 0.0003) = 0 of the store's 1408 cells" in result.output
    assert "the smallest fraction that holds out a cell is 0.00072" in result.output
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "out").exists()
