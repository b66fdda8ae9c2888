"""A trained model as an MLflow Model (pyfunc) and its training store as the run's dataset input.

`LatentModel` is the pyfunc: `mlflow.pyfunc.load_model("models:/<id>").predict(pd.DataFrame({"store": [path]}))`
gives the latent of every cell of each store (a DataFrame indexed by cell, one column per latent dimension). It is
logged from code (`pyfunc_entry.py`), not pickled: loading it imports atlasvi and reads the saved model weights-only,
as `atlasvi latent` does. The user-facing class comes from the model registry (`ModelEntry.user_class`), as the CLI
finds it: a loaded MLflow model is an entry point of its own, like a command.
"""

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelOutput
from mlflow.pyfunc import PythonModel

from atlasvi.data.store import is_url
from atlasvi.models.registry import get_entry
from atlasvi.models.saving import read_meta

ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")
ARTIFACT = "atlasvi_model"  # the saved model folder (model.json, model.pt) inside the MLflow Model


class LatentModel(PythonModel):
    """The latent of a saved atlasvi model for a store's cells (posterior means, streamed one minibatch at a time)."""

    def load_context(self, context: Any) -> None:
        self.model_dir = Path(context.artifacts[ARTIFACT])
        entry = get_entry(read_meta(self.model_dir)["method"])
        module, name = entry.user_class.split(":")
        self.user_class = getattr(import_module(module), name)

    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None) -> pd.DataFrame:
        """model_input: the stores to embed (paths or URLs, each with the model's genes; a DataFrame's one column of
        them reads the same). params: {"device": "cpu"} (default "auto"). Returns (cells, n_latent), indexed by cell
        name, columns z0, z1, ...; the stores' cells in order."""
        stores = [str(s) for s in model_input]
        device = (params or {}).get("device", "auto")
        frames = []
        for store in stores:
            model = self.user_class.load(self.model_dir, store, device)
            latent = model.get_latent_representation()
            columns = [f"z{i}" for i in range(latent.shape[1])]
            frames.append(pd.DataFrame(latent, index=_cell_names(store), columns=columns))
        return pd.concat(frames)


def _cell_names(store: str) -> pd.Index:
    """The store's cell names (obs's index), read without its counts."""
    import anndata
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return anndata.io.read_elem(zarr.open_group(store, mode="r")["obs"]).index


def store_dataset(path: str, attrs: dict[str, Any]) -> Dataset:
    """The MLflow dataset of an atlas store: its folder name, its path, a digest of its atlasvi attrs (genes,
    categories, cells, non-zeros, provenance with the inputs' hashes), and cells / genes / non-zeros as profile."""
    digest = hashlib.sha256(json.dumps(attrs, sort_keys=True, default=str).encode()).hexdigest()[:32]
    where = path if is_url(path) else str(Path(path).resolve())
    profile = {k: attrs.get(k) for k in ("n_cells", "n_genes", "nnz", "batch_key", "labels_key")}
    schema = {"genes": attrs.get("n_genes"), "obs": sorted(attrs.get("categorical", {})), "layout": "AnnData zarr v3"}
    source_type = where.split("://")[0] if is_url(where) else "local"
    return Dataset(
        name=Path(path.rstrip("/")).name, digest=digest, source_type=source_type, source=json.dumps({"uri": where}),
        schema=json.dumps(schema), profile=json.dumps(profile),
    )  # fmt: skip


def log_dataset(client: mlflow.MlflowClient, run_id: str, dataset: Dataset, context: str = "training") -> bool:
    """Record `dataset` as an input of the run (once: a resumed run that already has it is left as it is)."""
    inputs = client.get_run(run_id).inputs.dataset_inputs
    if any(i.dataset.digest == dataset.digest and i.dataset.name == dataset.name for i in inputs):
        return False
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])
    return True


def log_latent_model(client: mlflow.MlflowClient, experiment_id: str, run_id: str, model_dir: Path, step: int) -> str:
    """Log the saved model folder as an MLflow Model of the run (its "Logged models"), registrable in the Model
    Registry as models:/<returned model id>. Failing after it was created, the model is marked FAILED."""
    method = read_meta(model_dir)["method"]
    logged = client.create_logged_model(
        experiment_id, name=f"atlasvi-{method.lower()}", source_run_id=run_id, tags={"atlasvi.method": method},
        model_type="atlasvi latent",
    )  # fmt: skip
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), _no_progress_bars():
            warnings.simplefilter("ignore", UserWarning)  # its advice on type hints: the input is a store path
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                local, python_model=str(ENTRY_FILE), artifacts={ARTIFACT: str(model_dir)},
                pip_requirements=[f"{p}=={_version(p)}" for p in ("atlasvi", "torch", "mlflow")],
            )  # fmt: skip
            client.log_model_artifacts(logged.model_id, str(local))
        client.finalize_logged_model(logged.model_id, "READY")
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step)])
    return logged.model_id


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow's artifact progress bars and its notes on the pyfunc's signature off while the model is logged (copying
    the model folder is quick; the command shows its own progress)."""
    name, before = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ[name] = "false"
    signature = logging.getLogger("mlflow.models.signature")
    level = signature.level
    signature.setLevel(logging.WARNING)
    try:
        yield
    finally:
        signature.setLevel(level)
        if before is None:
            os.environ.pop(name)
        else:
            os.environ[name] = before


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:  # pragma: no cover - atlasvi run from a source tree without installing it
        return "0"
