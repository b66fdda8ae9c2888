"""`atlasvi build` and `atlasvi info`: an atlas store from h5ad / 10x inputs, and what a store holds."""

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from atlasvi.cli.common import EMBEDDED_BUILD, build_with_progress, console, load_yaml, make_config
from atlasvi.data.config import BuildConfig
from atlasvi.data.store import read_store_attrs
from atlasvi.datasets import CELLBENCH
from atlasvi.errors import AtlasviError


def build_command(
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(
            help=".h5ad, .h5mu or 10x .h5 files, 10x matrix folders, folders of those or quoted glob patterns"
        ),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="the atlas store to write (.zarr)")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML with BuildConfig fields; flags override it")] = None,
    batch_key: Annotated[str | None, typer.Option(help="obs column of the batch; default: one batch per file")] = None,
    labels_key: Annotated[str | None, typer.Option(help="obs column of cell-type labels")] = None,
    unlabeled_batch: Annotated[
        list[str] | None, typer.Option(help="a batch whose cells are stored unlabeled (scANVI's query); repeatable")
    ] = None,
    unlabeled_category: Annotated[str | None, typer.Option(help="label of unlabeled cells (default Unknown)")] = None,
    categorical_covariate_key: Annotated[list[str] | None, typer.Option(help="extra categorical obs key")] = None,
    continuous_covariate_key: Annotated[list[str] | None, typer.Option(help="continuous obs key")] = None,
    annotation_key: Annotated[
        list[str] | None, typer.Option(help="obs column kept in the store, not a covariate (e.g. for de); repeatable")
    ] = None,
    layer: Annotated[str | None, typer.Option(help="h5ad layer holding the raw counts (default X)")] = None,
    gene_id_key: Annotated[str | None, typer.Option(help="var column of gene ids (default var_names)")] = None,
    protein_key: Annotated[
        str | None,
        typer.Option(
            help="obsm key of CITE-seq protein counts in .h5ad inputs (10x .h5: its Antibody Capture features)"
        ),
    ] = None,
    atac_key: Annotated[
        str | None,
        typer.Option(help="scATAC peak counts: obsm key in .h5ad inputs, modality in .h5mu (10x .h5: Peaks)"),
    ] = None,
    spatial_key: Annotated[
        str | None,
        typer.Option(help="obsm key of spatial coordinates in .h5ad inputs, kept as obsm['spatial'] (default spatial)"),
    ] = None,
    gene_join: Annotated[str | None, typer.Option(help="inner (genes in every input) or outer (union)")] = None,
    n_top_genes: Annotated[int | None, typer.Option(help="keep the top Seurat v3 HVGs (batch-aware)")] = None,
    genes: Annotated[
        Path | None,
        typer.Option(help="store exactly these genes, in order: a model folder (atlasvi or scvi-tools) or a text file"),
    ] = None,
    hvg_subset: Annotated[bool | None, typer.Option("--hvg-subset/--no-hvg-subset", help="store only HVGs")] = None,
    drop_empty_cells: Annotated[bool, typer.Option(help="drop zero-count cells with a warning")] = False,
    seed: Annotated[int | None, typer.Option(help="seed of the global cell permutation")] = None,
    chunk_size: Annotated[int | None, typer.Option(help="cells read at a time (bounds memory)")] = None,
    compressor: Annotated[str | None, typer.Option(help="Blosc codec: lz4 (faster) or zstd (smaller)")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite/--no-overwrite", help="replace output")] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="local dask worker processes (default: every core; 1: no dask, this process)"),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(help="address of a dask.distributed scheduler to build on (its workers see the same paths)"),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="build on a Ray cluster instead: its address ('auto': this node's; 'local': start one here); "
            "--workers actors (default: one per CPU)",
        ),
    ] = None,
    dashboard: Annotated[
        bool, typer.Option(help="local workers serve dask's dashboard (its link printed; ~1 CPU s to start)")
    ] = False,
) -> None:
    """Build one atlas store (AnnData Zarr v3) from inputs. With no inputs: the embedded CellBench dataset."""
    sources: list[tuple[str, dict[str, Any]]] = []
    if config is not None:
        sources.append((str(config), load_yaml(config)))
    elif not inputs:
        console.print(f"no inputs given: building the embedded dataset {CELLBENCH.name}")
        sources.append(("embedded default", EMBEDDED_BUILD))
    flags = {
        "inputs": [str(p) for p in inputs] if inputs else None,
        "output": str(output) if output else None,
        "batch_key": batch_key,
        "labels_key": labels_key,
        "unlabeled_batches": unlabeled_batch or None,
        "unlabeled_category": unlabeled_category,
        "categorical_covariate_keys": categorical_covariate_key or None,
        "continuous_covariate_keys": continuous_covariate_key or None,
        "annotation_keys": annotation_key or None,
        "layer": layer,
        "gene_id_key": gene_id_key,
        "protein_key": protein_key,
        "atac_key": atac_key,
        "spatial_key": spatial_key,
        "gene_join": gene_join,
        "n_top_genes": n_top_genes,
        "genes": _gene_list(genes) if genes is not None else None,
        "hvg_subset": hvg_subset,
        "zero_count_cells": "drop" if drop_empty_cells else None,
        "seed": seed,
        "chunk_size": chunk_size,
        "compressor": compressor,
        "overwrite": overwrite,
    }
    sources.append(("flags", flags))
    build_config = make_config(BuildConfig, sources)
    path = build_with_progress(build_config, workers, scheduler, ray, dashboard)
    _print_summary(path)


def _gene_list(path: Path) -> list[str]:
    """Gene ids in order: a saved model's (atlasvi model.json, scvi-tools model.pt) or a text file's, one a line."""
    if path.is_dir():
        from atlasvi.api.interop import model_genes  # torch only when a model names the genes

        return model_genes(path)
    if not path.is_file():
        raise AtlasviError(f"{path}: no such file or model folder (--genes)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _print_summary(path: Path) -> None:
    meta = read_store_attrs(path)
    table = Table(title=f"atlas store {path}", show_header=False)
    table.add_row("cells x genes", f"{meta['n_cells']} x {meta['n_genes']} ({meta['nnz']} non-zeros)")
    for key, categories in meta["categorical"].items():
        shown = ", ".join(categories[:6]) + (" ..." if len(categories) > 6 else "")
        table.add_row(f"obs[{key!r}]", f"{len(categories)}: {shown}")
    for key, categories in meta.get("annotations", {}).items():
        shown = ", ".join(categories[:6]) + (" ..." if len(categories) > 6 else "")
        table.add_row(f"obs[{key!r}] (annotation)", f"{len(categories)}: {shown}")
    means = ", ".join(f"{m:.2f}" for m in meta["library_log_means"])
    table.add_row("library prior", f"log-library means per {meta['batch_key']}: {means}")
    for name, modality in (meta.get("modalities") or {}).items():
        features = modality["features"]
        shown = ", ".join(features[:6]) + (" ..." if len(features) > 6 else "")
        if modality.get("kind") == "mask":
            panels = ", ".join("yes" if row[0] else "no" for row in modality["batch_mask"])
            what = f"presence mask, {modality['n_measured']} of {meta['n_cells']} cells measured"
        elif modality.get("kind", "dense") == "csr":
            panels = ", ".join("yes" if row[0] else "no" for row in modality["batch_mask"])
            what = f"{len(features)} (sparse, {modality['nnz']} non-zeros): {shown}"
        else:
            panels = ", ".join(str(sum(row)) for row in modality["batch_mask"])
            what = f"{len(features)}: {shown}"
        key = modality["obsm_key"] + ("_mask" if modality.get("kind") == "mask" else "")
        table.add_row(f"{name} (obsm[{key!r}])", f"{what}; measured per {meta['batch_key']}: {panels}")
    if meta.get("spatial"):
        table.add_row(
            "spatial coordinates", f"obsm[{meta['spatial']['obsm_key']!r}]: {meta['spatial']['n_dims']} per cell"
        )
    table.add_row("inputs", ", ".join(Path(i["path"]).name for i in meta["provenance"]["inputs"]))
    Console().print(table)


def info_command(
    store: Path, as_json: Annotated[bool, typer.Option("--json", help="print the attrs as JSON")] = False
) -> None:
    """Describe an atlas store: cells, genes, covariates, library prior, provenance."""
    if as_json:
        print(json.dumps(read_store_attrs(store), indent=1))
    else:
        _print_summary(store)
