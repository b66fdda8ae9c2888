"""`atlasvi export` and `atlasvi import`: models in scvi-tools 1.4.2's save format, both ways."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from atlasvi.api import export_scvi_tools, import_scvi_tools
from atlasvi.cli.common import console
from atlasvi.data import open_store
from atlasvi.errors import AtlasviError, ConfigError
from atlasvi.models.saving import META_NAME

FORMATS = ("scvi-tools",)


def _format(value: str, flag: str) -> None:
    if value not in FORMATS:
        raise ConfigError(f"{flag} {value!r}: the formats are {', '.join(FORMATS)}")


def export_command(
    output: Annotated[Path, typer.Argument(help="the folder to write (scvi-tools' model folder: model.pt)")],
    model: Annotated[Path, typer.Option(help="a saved atlasvi model folder (OUTPUT/model of `atlasvi train`)")],
    to: Annotated[str, typer.Option("--to", help="the format: scvi-tools (1.4.2's save format)")] = "scvi-tools",
    overwrite: Annotated[bool, typer.Option(help="replace OUTPUT's model.pt")] = False,
) -> None:
    """Write a saved model in scvi-tools' save format: scvi.model.<Class>.load(OUTPUT, adata) reads it.

    Methods: scvi, scanvi, ldvae (LinearSCVI), totalvi, peakvi, condscvi, sysvi (scvi.external.SysVI, whose adata.X
    is then log1p(counts / total * target_sum)), multivi (set up on a MuData: modality "rna", the store, and "atac",
    its obsm["atac"] with the peaks named by uns["atac_names"]); destvi (amortization "both") on its spots.

    adata: the cells with the model's genes (var_names, in order) and its obs keys, e.g. the training store
    opened with anndata.read_zarr. The training store is not needed to export."""
    _format(to, "--to")
    written = export_scvi_tools(model, output, overwrite=overwrite)
    Console().print(f"wrote {written}")


def import_command(
    source: Annotated[Path, typer.Argument(help="a scvi-tools model folder (model.pt) or its model.pt")],
    store: Annotated[Path, typer.Option(help="a store with the model's genes (atlasvi build --genes SOURCE)")],
    output: Annotated[Path, typer.Option(help="the atlasvi model folder to write")],
    from_format: Annotated[str, typer.Option("--from", help="the format: scvi-tools")] = "scvi-tools",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="replace a model saved in OUTPUT")] = False,
) -> None:
    """Read a scvi-tools saved SCVI, SCANVI, LinearSCVI, TOTALVI, PEAKVI, CondSCVI, SysVI, MULTIVI or DestVI (weights:
    no code from the file runs) into an atlasvi model on STORE, saved in OUTPUT; `atlasvi latent`, `de`, `scanvi`
    and `map-query --reference OUTPUT` then take it."""
    _format(from_format, "--from")
    if (output / META_NAME).exists() and not overwrite:
        raise AtlasviError(f"{output}: holds a saved model already; pass --overwrite to replace it")
    with console.status(f"importing {source}"):
        model = import_scvi_tools(source, open_store(store), device)
        saved = model.save(output)
    Console().print(
        f"imported a scvi-tools {model.method} ({model.schema.n_genes} genes, {model.n_latent} latent dimensions, "
        f"{len(model.schema.batch_categories)} {model.schema.batch_key}) on {store}"
    )
    Console().print(f"wrote {saved}")
