"""`atlasvi map-query`: scArches query mapping of a new study onto a saved reference model (SCVI or SCANVI)."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from atlasvi.api import SCANVI, saved_model_class
from atlasvi.cli.common import console
from atlasvi.data import StoreError, open_store
from atlasvi.models.saving import IncompatibleStoreError
from atlasvi.train import EpochRecord, TrainConfig

LATENT_KEYS = {"SCVI": "X_scvi", "SCANVI": "X_scanvi"}


def map_query_command(
    reference: Annotated[Path, typer.Option(help="the saved reference model folder (SCVI or SCANVI)")],
    query: Annotated[Path, typer.Option(help="the query atlas store, built with the reference's genes")],
    output: Annotated[Path | None, typer.Option(help="where the query model is saved (default QUERY_model)")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="query training epochs (default: scvi-tools' rule)")] = None,
    latent_key: Annotated[str | None, typer.Option(help="obsm key of the latent (default X_scvi / X_scanvi)")] = None,
    prediction_key: Annotated[
        str, typer.Option(help="scANVI: obs column of the predicted labels")
    ] = "scanvi_prediction",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    seed: Annotated[int, typer.Option(help="seed of the new columns' initialisation and of training")] = 0,
) -> None:
    """Map a query store onto a reference model by scArches surgery: only the query's new batch columns train
    (weight decay 0); writes the query latent (and scANVI's predicted labels and probabilities) into the query
    store and saves the query model."""
    try:
        model_class = saved_model_class(reference)
        method = model_class.method
        model = model_class.load_query_data(open_store(query), reference, device, seed=seed)
    except (IncompatibleStoreError, StoreError, FileNotFoundError, ValueError) as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    query_batches = list(model.store.schema.batch_categories)
    console.print(f"{method} reference {reference}; query {model.schema.batch_key}: {query_batches}")
    train = TrainConfig(max_epochs=max_epochs, seed=seed)
    n_epochs = train.epochs_for(round(model.store.n_cells * (1 - train.validation_fraction)))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bars:
        task = bars.add_task("query training (epochs)", total=n_epochs)

        def advance(record: EpochRecord) -> None:
            bars.update(
                task, completed=record.epoch + 1, description=f"query training, -ELBO {record.validation_elbo:.1f}"
            )

        model.fit(train, on_epoch_end=advance)
    written = [model.write_latent_representation(key=latent_key or LATENT_KEYS[method])]
    if isinstance(model, SCANVI):
        written.append(model.write_predictions(key=prediction_key))
    saved = model.save(output or query.parent / f"{query.name.removesuffix('.zarr')}_model")
    for path in [*written, saved]:
        Console().print(f"wrote {path}")
