"""`atlasvi scanvi`: scANVI from a saved scVI (scvi-tools' from_scvi_model), label transfer into the store."""

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from atlasvi.analysis.plots import scanvi_loss_curves_png
from atlasvi.api import SCANVI, SCVI, saved_model_class
from atlasvi.cli.common import check_store_writable, check_writable, status, tracking_uri
from atlasvi.cli.map_query import fit_tracked
from atlasvi.cli.train_output import refuse_a_run_latent
from atlasvi.data import LoaderConfig, open_store
from atlasvi.data.store import is_url
from atlasvi.errors import AtlasviError
from atlasvi.models.saving import META_NAME
from atlasvi.tracking import MlflowRun
from atlasvi.train import TrainConfig


def _from_scvi(scvi_model: Path, store: str | None, device: str, seed: int, unlabeled: str, ratio: float) -> SCANVI:
    """scANVI initialised from the saved scVI, on `store` (default: the scVI's); an error names the problem."""
    try:
        if saved_model_class(scvi_model) is not SCVI:
            raise AtlasviError(f"{scvi_model}: a saved scANVI model; give the scVI it was trained from")
        scvi = SCVI.load(scvi_model, open_store(store or SCVI.saved_store(scvi_model)), device)
        return SCANVI.from_scvi_model(scvi, unlabeled, ratio, seed=seed)
    except AtlasviError:
        raise
    except (FileNotFoundError, ValueError) as err:  # the model layer's plain errors name the file at fault
        raise AtlasviError(str(err)) from err


def scanvi_command(
    scvi_model: Annotated[Path, typer.Option(help="saved scVI model folder")],
    store: Annotated[str | None, typer.Option(help="store with the labels (default: the scVI's)")] = None,
    output: Annotated[Path | None, typer.Option(help="folder (default: SCVI_MODEL/../scanvi)")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="epochs (default: scvi-tools' rule, <= 10)")] = None,
    unlabeled_category: Annotated[str, typer.Option(help="label of unlabeled cells")] = "Unknown",
    classification_ratio: Annotated[float, typer.Option(help="weight of the cross-entropy")] = 50.0,
    prediction_key: Annotated[str, typer.Option(help="obs column")] = "scanvi_prediction",
    latent_key: Annotated[str | None, typer.Option(help="obsm key of the latent (default: X_scanvi)")] = None,
    seed: Annotated[int, typer.Option(help="seed of init and shuffling")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "atlasvi",
    run_name: Annotated[str | None, typer.Option(help="MLflow run name (default: OUTPUT's name)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace a model saved in OUTPUT/model")] = False,
) -> None:
    """Train scANVI from a saved scVI on a store whose labels mark some cells unlabeled.

    Writes the predicted labels (obs), class probabilities and latent (obsm) into the store, saves the
    model in OUTPUT/model and leaves an MLflow run with the whole config, per-epoch metrics and figures."""
    model = _from_scvi(scvi_model, store, device, seed, unlabeled_category, classification_ratio)
    out = output or scvi_model.parent / "scanvi"
    if (out / "model" / META_NAME).exists() and not overwrite:  # an earlier scANVI is not replaced unasked
        raise AtlasviError(f"{out}: holds a saved model already; pass --overwrite to replace it, or another --output")
    check_writable(out, "the scANVI model")  # before training, as the store's
    check_store_writable(model.store.path)
    latent_key = latent_key or model.entry.latent_key
    refuse_a_run_latent(model.store.path, latent_key)
    train, loader = TrainConfig(max_epochs=max_epochs, seed=seed), LoaderConfig(seed=seed)
    params = {
        "scvi_model": str(scvi_model),
        "store": str(model.store.path),
        "n_cells": model.store.n_cells,
        "n_genes": model.schema.n_genes,
        "classes": ", ".join(model.labels),
        "output": str(out),
        "prediction_key": prediction_key,
        "latent_key": latent_key,
        "device": device,
        "model": model.config.model_dump(mode="json"),
        "train": train.model_dump(mode="json"),
        "loader": loader.model_dump(mode="json"),
    }
    with MlflowRun(tracking_uri(), experiment, run_name or out.name, tags={"method": model.method}) as tracker:
        tracker.log_params(params)
        history = fit_tracked(model, train, loader, tracker, "training scANVI", None)
        out.mkdir(parents=True, exist_ok=True)
        figure = scanvi_loss_curves_png(history, classification_ratio, out / "loss_curves.png")
        tracker.log_artifact(figure, "figures")
        written = []
        if is_url(model.store.path):
            classes, counts = np.unique(model.predict(), return_counts=True)
        else:
            with status("writing predictions and latent into the store"):
                written = [
                    model.write_predictions(key=prediction_key),
                    model.write_latent_representation(key=latent_key),
                ]
            codes, classes = model.store.read_obs_categorical(prediction_key)  # counted from the column just written
            counts = np.bincount(codes, minlength=len(classes))
        saved = model.save(out / "model")
        tracker.log_artifact(saved, "model")
        last = history[-1]
        final = {"final_validation_elbo": last.validation_elbo, "epochs": len(history)}
        tracker.log_metrics(final | {"final_" + k: v for k, v in last.extra_metrics.items()}, last.epoch)
    table = Table(title="scANVI trained", show_header=False)
    table.add_row("epochs", f"{len(history)}; held-out -ELBO {last.validation_elbo:.2f} nats per cell")
    table.add_row("predicted", ", ".join(f"{c}: {n}" for c, n in zip(classes, counts, strict=True)))
    table.add_row("model", str(saved))
    for path in written:
        table.add_row("wrote", str(path))
    table.add_row("figures", str(figure))
    table.add_row("MLflow run", f"{tracker.run_id} in experiment {experiment!r}")
    Console().print(table)
