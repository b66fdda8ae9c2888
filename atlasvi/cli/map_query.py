"""`atlasvi map-query`: scArches query mapping of a new study onto a saved reference model (any registered method)."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

from atlasvi.analysis.plots import loss_curves_png, scanvi_loss_curves_png
from atlasvi.analysis.protocols import HasClassifier
from atlasvi.api import AtlasModel, saved_model_class
from atlasvi.cli.common import check_store_writable, check_writable, console, progress_bars, tracking_uri
from atlasvi.data import LoaderConfig, open_store
from atlasvi.errors import AtlasviError
from atlasvi.models.saving import META_NAME
from atlasvi.models.surgery import SurgeryConfig
from atlasvi.tracking import MlflowRun
from atlasvi.train import EpochRecord, TrainConfig
from atlasvi.train.job import loader_config_for, train_config_for


def _query_model(reference: Path, query: Path, device: str, surgery: SurgeryConfig, seed: int) -> AtlasModel:
    """The reference extended to the query's batches; an error names the problem."""
    try:
        return saved_model_class(reference).load_query_data(
            open_store(query), reference, device, surgery=surgery, seed=seed
        )
    except AtlasviError:
        raise
    except (FileNotFoundError, ValueError) as err:  # the model layer's plain errors name the file at fault
        raise AtlasviError(str(err)) from err


def fit_tracked(
    model: AtlasModel, train: TrainConfig, loader: LoaderConfig, run: MlflowRun, what: str, n_epochs: int | None
) -> list[EpochRecord]:
    """model.fit with a progress bar of epochs (`what`, the last held-out -ELBO) and each epoch logged to `run`."""
    with progress_bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()) as bars:
        task = bars.add_task(f"{what} (epochs)", total=n_epochs)

        def on_epoch_end(record: EpochRecord) -> None:
            run.log_epoch(record)
            bars.update(task, completed=record.epoch + 1, description=f"{what}, -ELBO {record.validation_elbo:.1f}")

        return model.fit(train, loader, on_epoch_end=on_epoch_end)


def map_query_command(
    reference: Annotated[Path, typer.Option(help="saved reference model (any registered method: model.json names it)")],
    query: Annotated[Path, typer.Option(help="query store, with the reference's genes")],
    output: Annotated[Path | None, typer.Option(help="query model folder (default: QUERY_model)")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="epochs (default: scvi-tools' rule)")] = None,
    latent_key: Annotated[
        str | None, typer.Option(help="obsm key (default: the method's, e.g. X_scvi, X_totalvi)")
    ] = None,
    prediction_key: Annotated[str, typer.Option(help="scANVI: obs column")] = "scanvi_prediction",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    seed: Annotated[int, typer.Option(help="seed of new columns and shuffling")] = 0,
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "atlasvi",
    run_name: Annotated[str | None, typer.Option(help="MLflow run name (default: OUTPUT's name)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace a model saved in OUTPUT")] = False,
) -> None:
    """Map a query store onto a reference model by scArches surgery.

    Only the query's new batch columns train (weight decay 0). Writes the query latent (and scANVI's
    predicted labels and probabilities) into the query store, saves the query model with its loss
    curves, and leaves an MLflow run with the whole config and per-epoch metrics."""
    surgery = SurgeryConfig()
    out = output or query.parent / f"{query.name.removesuffix('.zarr')}_model"
    model = _query_model(reference, query, device, surgery, seed)
    method, key = model.method, latent_key or model.entry.latent_key
    classifies = isinstance(model.module, HasClassifier)  # predictions and the classification-loss figure
    if out.resolve() == reference.resolve():
        raise AtlasviError(f"{out}: is the reference model; map the query into another --output")
    if (out / META_NAME).exists() and not overwrite:  # an earlier query model is not replaced unasked
        raise AtlasviError(f"{out}: holds a saved model already; pass --overwrite to replace it, or another --output")
    check_writable(out, "the query model")  # before training, as the query store's
    check_store_writable(str(query))
    query_batches = list(model.store.schema.batch_categories)
    console.print(f"{method} reference {reference}; query {model.schema.batch_key}: {query_batches}")
    # the model's training defaults (its registry entry's) under these; decay would move frozen weights
    train = train_config_for(model.config, TrainConfig(max_epochs=max_epochs, seed=seed, weight_decay=0.0))
    loader = loader_config_for(model.config, None, seed)
    params = {
        "reference": str(reference),
        "reference_method": method,
        "query": str(query),
        "n_cells": model.store.n_cells,
        "n_genes": model.schema.n_genes,
        "query_batches": ", ".join(query_batches),
        "output": str(out),
        "latent_key": key,
        "device": device,
        "model": model.config.model_dump(mode="json"),
        "surgery": surgery.model_dump(mode="json"),
        "train": train.model_dump(mode="json"),
        "loader": loader.model_dump(mode="json"),
    }
    if classifies:
        params["prediction_key"] = prediction_key
    n_epochs = train.epochs_for(round(model.store.n_cells * (1 - train.validation_fraction)))
    with MlflowRun(tracking_uri(), experiment, run_name or out.name, tags={"method": method, "query": "true"}) as run:
        run.log_params(params)
        run.log_store_input(str(query), context="query")
        history = fit_tracked(model, train, loader, run, "query training", n_epochs)
        written = [model.write_latent_representation(key=key)]
        if classifies:
            written.append(model.write_predictions(key=prediction_key))
        saved = model.save(out)
        run.log_artifact(saved, "model")
        run.log_model(saved, history[-1].epoch)
        if classifies:
            figure = scanvi_loss_curves_png(history, model.config.classification_ratio, out / "loss_curves.png")
        else:
            figure = loss_curves_png(history, out / "loss_curves.png")
        run.log_artifact(figure, "figures")
        last = history[-1]
        run.log_metrics({"final_validation_elbo": last.validation_elbo, "epochs": len(history)}, last.epoch)
    for path in [*written, saved, figure]:
        Console().print(f"wrote {path}")
    Console().print(f"MLflow run {run.run_id} in experiment {experiment!r}")
