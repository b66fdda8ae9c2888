"""`atlasvi scanvi`: scANVI from a saved scVI (scvi-tools' from_scvi_model), label transfer into the store."""

from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from atlasvi.analysis.plots import loss_curves_png
from atlasvi.api import SCANVI, SCVI, saved_model_class
from atlasvi.cli.common import console, tracking_uri
from atlasvi.data import StoreError, open_store
from atlasvi.data.store import is_url
from atlasvi.models.saving import IncompatibleStoreError
from atlasvi.tracking import MlflowRun
from atlasvi.train import EpochRecord, TrainConfig


def scanvi_command(
    scvi_model: Annotated[Path, typer.Option(help="a saved scVI model folder (OUTPUT/model of `atlasvi train`)")],
    store: Annotated[
        str | None, typer.Option(help="store with the labels (default: the scVI's training store)")
    ] = None,
    output: Annotated[Path | None, typer.Option(help="folder of the scANVI model (default: beside the scVI's)")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="epochs (default: scvi-tools' rule, <= 10)")] = None,
    unlabeled_category: Annotated[str, typer.Option(help="the label of unlabeled cells")] = "Unknown",
    classification_ratio: Annotated[float, typer.Option(help="weight of the labelled cells' cross-entropy")] = 50.0,
    prediction_key: Annotated[str, typer.Option(help="obs column of the predicted labels")] = "scanvi_prediction",
    latent_key: Annotated[str, typer.Option(help="obsm key of the scANVI latent")] = "X_scanvi",
    seed: Annotated[int, typer.Option(help="seed of initialisation and shuffling")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "atlasvi",
) -> None:
    """Train scANVI from a saved scVI on a store whose labels key marks some cells unlabeled; write the predicted
    labels (obs), class probabilities and latent (obsm) into the store, save the model, log an MLflow run."""
    try:
        if saved_model_class(scvi_model) is not SCVI:
            raise ValueError(f"{scvi_model}: a saved scANVI model; give the scVI it was trained from")
        scvi = SCVI.load(scvi_model, open_store(store or SCVI.saved_store(scvi_model)), device)
        torch.manual_seed(seed)  # the classifier and the z2 levels start from this seed
        model = SCANVI.from_scvi_model(scvi, unlabeled_category, classification_ratio)
    except (IncompatibleStoreError, StoreError, FileNotFoundError, ValueError) as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    out = output or scvi_model.parent / "scanvi"
    train = TrainConfig(max_epochs=max_epochs, seed=seed)
    uri = tracking_uri()
    tracker = MlflowRun(uri, experiment, out.name, tags={"method": "SCANVI"})
    tracker.log_params(
        {
            "scvi_model": str(scvi_model),
            "store": model.store.path,
            "seed": seed,
            "classes": ", ".join(model.labels),
            "classification_ratio": classification_ratio,
            "unlabeled_category": unlabeled_category,
        }
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bars:
        task = bars.add_task("training scANVI (epochs)", total=None)

        def on_epoch_end(record: EpochRecord) -> None:
            tracker.log_epoch(record)
            bars.update(
                task, completed=record.epoch + 1, description=f"training scANVI, -ELBO {record.validation_elbo:.1f}"
            )

        try:
            history = model.fit(train, on_epoch_end=on_epoch_end)
        except BaseException:
            tracker.finish(failed=True)
            raise
    out.mkdir(parents=True, exist_ok=True)
    tracker.log_artifact(loss_curves_png(history, out / "loss_curves.png"), "figures")
    written = []
    if is_url(model.store.path):
        classes, counts = np.unique(model.predict(), return_counts=True)
    else:
        with console.status("writing predictions and latent into the store"):
            written = [model.write_predictions(key=prediction_key), model.write_latent_representation(key=latent_key)]
        codes, classes = model.store.read_obs_categorical(prediction_key)  # counted from the column just written
        counts = np.bincount(codes, minlength=len(classes))
    saved = model.save(out / "model")
    tracker.log_artifact(saved, "model")
    tracker.log_metrics(
        {"final_validation_elbo": history[-1].validation_elbo, "epochs": len(history)}, history[-1].epoch
    )
    tracker.finish()
    table = Table(title="scANVI trained", show_header=False)
    table.add_row("epochs", f"{len(history)}; held-out -ELBO {history[-1].validation_elbo:.2f} nats per cell")
    table.add_row("predicted", ", ".join(f"{c}: {n}" for c, n in zip(classes, counts, strict=True)))
    table.add_row("model", str(saved))
    for path in written:
        table.add_row("wrote", str(path))
    table.add_row("MLflow run", f"{tracker.run_id} in experiment {experiment!r}")
    Console().print(table)
