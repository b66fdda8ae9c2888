"""`atlasvi train` and `atlasvi latent`: the main job and writing a saved model's results into a store."""

import importlib
import json
import os
import warnings
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
from rich.table import Table

from atlasvi.analysis.plots import loss_curves_png, umap_png
from atlasvi.api import AtlasModel, saved_model_class
from atlasvi.cli.common import (
    EMBEDDED_BUILD,
    build_with_progress,
    check_store_writable,
    console,
    load_yaml,
    make_config,
    progress_bars,
    refuse_without,
    status,
    tracking_uri,
    write_atomic,
)
from atlasvi.cli.train_output import RUN_RECORD, Plan, check_latent_key, plan_output, writer_attrs
from atlasvi.data import BuildConfig, LoaderConfig, open_store, split_rows
from atlasvi.data.resident import choose_resident
from atlasvi.data.store import AtlasStore, is_url
from atlasvi.models.registry import DEFAULT_MODEL, REGISTRY, ModelEntry, entry_of, get_entry
from atlasvi.models.saving import META_NAME, load_init_state, read_meta
from atlasvi.tracking import LOCAL_FOLDER, EpochLogger, MlflowRun, end_abandoned, local_tracking_uri
from atlasvi.train import EpochRecord
from atlasvi.train.job import ModuleSpec, TrainJobConfig, module_spec, pretrained_train
from atlasvi.train.lock import OutputLock, describe
from atlasvi.train.loop import KLWarmupWarning, kl_warmup_shortfall, read_checkpoint


def _embedded_store() -> str:
    """The embedded CellBench store, built on first use."""
    path = Path(EMBEDDED_BUILD["output"])
    if not (path / "zarr.json").exists():
        console.print("no store given: building the embedded CellBench store first")
        build_with_progress(BuildConfig(**EMBEDDED_BUILD))
    return str(path)


def _warn_kl_warmup(job: TrainJobConfig, n_train_cells: int, n_epochs: int) -> None:
    """One line when the KL warm-up outlasts the run (it would end at a KL weight below max_kl_weight)."""
    steps = -(-n_train_cells // job.loader.batch_size)  # per epoch (the batch is global), for a warm-up in steps
    shortfall = kl_warmup_shortfall(job.train, n_epochs, max(1, steps))
    if shortfall is not None:
        console.print(f"[yellow]warning:[/yellow] {shortfall}")


def _umap(model: AtlasModel, store: AtlasStore, n_cells: int, path: Path) -> Path | None:
    """UMAP of the first n_cells rows (a random sample: a store's rows are shuffled at build)."""
    n = min(n_cells, store.n_cells)
    if n < 20 or not model.has_latent:
        return None
    latent = model.get_latent_representation(rows=(0, n))
    codes = store.read_rows(0, n).categorical
    keys = [k for k in (store.schema.batch_key, store.schema.labels_key) if k]
    names = {k: [store.schema.categorical[k][c] for c in codes[k]] for k in keys}
    return umap_png(latent, names, path)


def _user_class(entry: ModelEntry) -> type[AtlasModel]:
    """The user-facing class of a registry entry ("module:Class")."""
    module, name = entry.user_class.split(":")
    return getattr(importlib.import_module(module), name)


def train_command(
    config: Annotated[
        Path | None, typer.Option(help="YAML of TrainJobConfig (store, model, train, loader, ...)")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help=f"the model ({', '.join(REGISTRY)}); default {DEFAULT_MODEL}")
    ] = None,
    init_from: Annotated[
        Path | None, typer.Option(help="saved model folder whose weights the model starts from")
    ] = None,
    store: Annotated[
        str | None, typer.Option(help="atlas store path or URL (default: --init-from's, else the embedded one)")
    ] = None,
    output: Annotated[str | None, typer.Option(help="folder for the model, checkpoints and figures")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="epochs (default: the model's; scVI's rule)")] = None,
    n_epochs_kl_warmup: Annotated[int | None, typer.Option(help="epochs of linear KL warm-up")] = None,
    n_latent: Annotated[int | None, typer.Option(help="latent dimensions")] = None,
    n_layers: Annotated[int | None, typer.Option(help="hidden layers of encoder and decoder")] = None,
    n_hidden: Annotated[int | None, typer.Option(help="units per hidden layer")] = None,
    gene_likelihood: Annotated[str | None, typer.Option(help="zinb, nb or poisson")] = None,
    batch_size: Annotated[int | None, typer.Option(help="cells a step (global: workers split it)")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of initialisation and shuffling")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment")] = None,
    run_name: Annotated[str | None, typer.Option(help="MLflow run name (default: the output folder's name)")] = None,
    latent_key: Annotated[str | None, typer.Option(help="obsm key the latent is written to")] = None,
    overwrite: Annotated[
        bool, typer.Option(help="start afresh instead of resuming OUTPUT; replace another run's latent key")
    ] = False,
    num_workers: Annotated[int | None, typer.Option(help="Ray Train DDP workers (1: this process)")] = None,
    use_gpu: Annotated[bool | None, typer.Option("--use-gpu/--no-gpu", help="one GPU per worker (NCCL)")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address ('auto': this node's cluster)")] = None,
    storage_path: Annotated[str | None, typer.Option(help="where Ray persists checkpoints (absolute / URI)")] = None,
    max_failures: Annotated[int | None, typer.Option(help="worker-group restarts Ray may make")] = None,
) -> None:
    """Train a model (scVI by default) on a store; save it, write the latent back, leave an MLflow run with plots."""
    sources: list[tuple[str, dict[str, Any]]] = []
    if config is not None:
        sources.append((str(config), load_yaml(config)))
    flags = {
        "store": store,
        "output": output,
        "device": device,
        "experiment": experiment,
        "run_name": run_name,
        "latent_key": latent_key,
        "num_workers": num_workers,
        "use_gpu": use_gpu,
        "storage_path": storage_path,
        "max_failures": max_failures,
        "init_from": str(init_from) if init_from is not None else None,
        "model": {
            "name": model,
            "n_latent": n_latent,
            "n_layers": n_layers,
            "n_hidden": n_hidden,
            "gene_likelihood": gene_likelihood,
        },
        "train": {"max_epochs": max_epochs, "n_epochs_kl_warmup": n_epochs_kl_warmup, "lr": lr, "seed": seed},
        "loader": {"batch_size": batch_size, "seed": seed},
    }
    sources.append(("flags", flags))
    job = make_config(TrainJobConfig, sources)
    if job.init_from is not None:  # the saved model's architecture and store, under the YAML and the flags
        saved = Path(job.init_from)
        fields = type(job.model).model_fields  # the saved model's fields this model has (DestVI: CondSCVI's decoder)
        section = {k: v for k, v in read_meta(saved)["config"]["model"].items() if k != "name" and k in fields}
        defaults = {"model": section} | ({} if job.store is not None else {"store": AtlasModel.saved_store(saved)})
        job = make_config(TrainJobConfig, [(f"{saved}/{META_NAME}", defaults), *sources])
    opened = open_store(job.store or _embedded_store(), backend=job.loader.backend)
    split_rows(opened.n_cells, job.train.validation_fraction)  # a split that holds out no cell fails before MLflow
    spec = module_spec(job, opened)  # so does an init_from the model cannot start from
    if job.latent_key:  # a store the results cannot go into is refused before training, not after
        check_store_writable(opened.path)
    out, uri, ray = Path(job.output), tracking_uri(), job.num_workers > 1 or address is not None
    with OutputLock(out) as lock:  # one writer per output folder
        if lock.taken_over:
            console.print(f"took over the lock its holder left when it ended ({describe(lock.taken_over)})")
        plan = plan_output(job, out, opened, ray, overwrite, uri)
        check_latent_key(opened, job.latent_key, plan.record["folder_id"], overwrite)
        if plan.replaced_run_id and end_abandoned(
            uri, plan.replaced_run_id, f"{out}: its command ended without closing the run; the folder started afresh"
        ):
            console.print(
                f"MLflow run {plan.replaced_run_id}, left RUNNING by a command that was killed, is now KILLED"
            )
        tags = {
            "method": entry_of(job.model).saved_name,
            "atlasvi.output": plan.record["output"],
            "atlasvi.folder_id": plan.record["folder_id"],
        }
        with MlflowRun(uri, job.experiment, job.run_name or out.name, plan.resume_run_id, tags) as tracker:
            plan.record["mlflow_run_id"] = tracker.run_id
            write_atomic(out / RUN_RECORD, json.dumps(plan.record, indent=1))
            _train(job, spec, opened, tracker, out, plan, address)


def _train(
    job: TrainJobConfig,
    spec: ModuleSpec,
    opened: AtlasStore,
    tracker: MlflowRun,
    out: Path,
    plan: Plan,
    address: str | None,
):
    """Train (resuming plan's checkpoint), then save, write back and log everything (`_finish`)."""
    checkpoints = Path(plan.checkpoints)
    shape = {"n_cells": opened.n_cells, "n_genes": opened.schema.n_genes}
    changed = tracker.log_params(job.model_dump(mode="json") | {"store": opened.path} | shape)
    tracker.log_store_input(opened.path)
    if changed:
        console.print(f"resumed with changed settings (kept as MLflow tags): {changed}")
    logged = set(tracker.logged_epochs())
    entry = entry_of(job.model)
    model = _user_class(entry)(opened, job.model, job.device, registry=spec.schema, seed=job.train.seed)
    if spec.init_state is not None:
        load_init_state(model.module, spec.init_state, f"init_from {job.init_from}")
    job = job.model_copy(update={"train": pretrained_train(job, opened)})
    if model.device.type == "cpu":
        torch.set_num_threads(job.cpu_threads(os.cpu_count() or 1))
    n_train_cells = opened.n_cells - (model.validation_rows[1] - model.validation_rows[0])
    n_epochs = job.train.epochs_for(n_train_cells)
    _warn_kl_warmup(job, n_train_cells, n_epochs)
    if plan.resuming:
        console.print(f"resuming from {checkpoints} (MLflow run {tracker.run_id})")
    loader = _place_rows(job, opened, model, tracker)
    if plan.record["runner"]["ray"]:
        ray_job = job.model_copy(update={"loader": loader})
        history = _train_on_ray(ray_job, spec, model, opened, tracker, plan.checkpoints, address)
        _finish(job, model, opened, history, tracker, out)
        return
    with progress_bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()) as bars:
        task = bars.add_task(f"training {entry.saved_name}", total=n_epochs)

        def on_epoch_end(record: EpochRecord) -> None:
            if record.epoch not in logged:  # a resumed run recomputes, never re-logs, an epoch
                tracker.log_epoch(record)
                logged.add(record.epoch)
            bars.update(
                task,
                completed=record.epoch + 1,
                description=f"training {entry.saved_name}  held-out -ELBO {record.validation_elbo:9.1f}"
                f"  {record.cells_per_second:8.0f} cells/s",
            )

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KLWarmupWarning)  # said once above, as one line
            history = model.fit(job.train, loader, checkpoint_dir=checkpoints, on_epoch_end=on_epoch_end)
    for record in history:  # epochs checkpointed by a run that died before logging them
        if record.epoch not in logged:
            tracker.log_epoch(record)
    _finish(job, model, opened, history, tracker, out)


def _place_rows(job: TrainJobConfig, store: AtlasStore, model: AtlasModel, tracker: MlflowRun) -> LoaderConfig:
    """The job's loader config with `resident` decided once (see `choose_resident`): said on the console and logged
    (MLflow param loader.placement and tag loader_placement). GPU Ray workers decide "auto" each on its own GPU."""
    if job.num_workers > 1 and job.use_gpu and job.loader.resident == "auto":
        placement, loader = "auto per worker", job.loader
        said = "loader: each worker holds the store's rows on its GPU if they fit (auto), else streams"
    else:
        device = model.device if job.num_workers == 1 else torch.device("cpu")
        residency = choose_resident(store, job.loader, device, model.module.used_modalities, job.num_workers)
        placement, said = residency.mode, residency.describe()
        loader = job.loader.model_copy(update={"resident": residency.resident})
    console.print(said)
    tracker.log_params({"loader.placement": placement})
    tracker.set_tags({"loader_placement": placement})
    return loader


def _train_on_ray(
    job: TrainJobConfig,
    spec: ModuleSpec,
    model: AtlasModel,
    store: AtlasStore,
    tracker: MlflowRun,
    checkpoints: str,
    address: str | None,
) -> list[EpochRecord]:
    """The same loop in job.num_workers Ray Train workers, persisting checkpoints in `checkpoints` (Ray's
    storage_path/name: a run there is resumed); rank 0 logs into this MLflow run."""
    from atlasvi.launch import DistributedConfig, connect, train_distributed

    storage, name = checkpoints.rsplit("/", 1)
    run = DistributedConfig(
        num_workers=job.num_workers, storage_path=storage, name=name, use_gpu=job.use_gpu,
        max_failures=job.max_failures, cpu_threads=job.cpu_threads(max(1, (os.cpu_count() or 1) // job.num_workers)),
    )  # fmt: skip
    path_for_workers = store.path if is_url(store.path) else str(Path(store.path).resolve())  # workers' cwd differs
    logger = EpochLogger(tracker.tracking_uri, job.experiment, tracker.run_id)
    tracker.set_tags({"workers": str(job.num_workers), "ray_storage": checkpoints})
    console.print(f"training in {job.num_workers} Ray Train workers; checkpoints in {checkpoints}")
    connect(address)
    with status(
        f"training {entry_of(job.model).saved_name} in {job.num_workers} workers (per-epoch figures go to MLflow)"
    ):
        checkpoint, metrics = train_distributed(
            job, path_for_workers, run, on_epoch_end=logger, on_restart=logger.restarted, spec=spec
        )
    weights, history = read_checkpoint(checkpoint)
    model.module.load_state_dict(weights)
    model.train_config, model.history = job.train, history
    audit = {k: v for k, v in metrics.items() if k.startswith("rows_read")}
    tracker.log_metrics(audit, step=history[-1].epoch)
    tracker.set_tags(
        {"rank_nodes": ",".join(metrics.get("rank_nodes", [])), "rank_rows_read": str(metrics.get("rank_rows_read"))}
    )
    for record in history:
        logger(record)
    return history


def _finish(job: TrainJobConfig, model: AtlasModel, store: AtlasStore, history: list[EpochRecord], tracker, out: Path):
    """Results first (the model, the latent in the store, the final metrics), then the figures, whose failure
    is a warning: a figure cannot lose a result. Ends the MLflow run FINISHED; print where everything is."""
    model_dir = model.save(out / "model")
    config_yaml = write_atomic(out / "config.yaml", yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
    written: list[Path] = []
    if job.latent_key and not is_url(store.path):
        with status(f"writing the results into the store (the latent: obsm[{job.latent_key!r}])"):
            written = model.write_results(key=job.latent_key, attrs=writer_attrs(out))
    last = history[-1]
    seconds = sum(r.seconds for r in history)
    final = {
        "final_validation_elbo": last.validation_elbo,
        "final_validation_reconstruction": last.validation_reconstruction,
        "final_validation_kl": last.validation_kl,
        "train_seconds": seconds,
        "train_cells_per_second": sum(r.cells_per_second * r.seconds for r in history) / max(seconds, 1e-9),
        "epochs": len(history),
    }
    tracker.log_metrics(final, step=last.epoch)
    tracker.log_artifact(config_yaml)
    tracker.log_artifact(model_dir, "model")
    with status("logging the MLflow Model"):
        tracker.log_model(model_dir, last.epoch)
    figures = _figures(job, model, store, history, tracker, out / "figures")
    tracker.finish()
    table = Table(title=f"{entry_of(job.model).saved_name} trained", show_header=False)
    table.add_row("epochs", f"{len(history)} ({seconds:.1f} s, {final['train_cells_per_second']:.0f} cells/s)")
    table.add_row("held-out -ELBO", f"{last.validation_elbo:.2f} nats per cell")
    table.add_row("model", str(model_dir))
    table.add_row(
        "written", "\n".join(str(p) for p in written) if written else "nothing (no latent key, or a URL store)"
    )
    table.add_row("figures", ", ".join(str(f) for f in figures) or "none")
    table.add_row("MLflow run", f"{tracker.run_id} in experiment {job.experiment!r} at {tracker.tracking_uri}")
    Console().print(table)
    if tracker.tracking_uri.startswith("sqlite:///"):  # a server has its own UI
        local = tracker.tracking_uri == local_tracking_uri(Path.cwd())
        uri = f"sqlite:///{LOCAL_FOLDER}/mlflow.db" if local else tracker.tracking_uri
        Console().print(f"open the MLflow UI: mlflow ui --backend-store-uri {uri}")


def _figures(
    job: TrainJobConfig, model: AtlasModel, store: AtlasStore, history: list[EpochRecord], tracker, folder: Path
) -> list[Path]:
    """The loss curves and the latent UMAP, logged into the run; one that fails is a warning (and a
    `figure_error.NAME` tag), never an error: the results are already written."""
    folder.mkdir(parents=True, exist_ok=True)
    drawn = []
    for name, draw in (
        ("loss_curves", lambda: loss_curves_png(history, folder / "loss_curves.png")),
        ("latent_umap", lambda: _umap(model, store, job.umap_cells, folder / "latent_umap.png")),
        *model.figures(folder),
    ):
        try:
            with status(f"figure {name}"):
                path = draw()
            if path is not None:
                tracker.log_artifact(path, "figures")
                drawn.append(path)
        except Exception as err:  # noqa: BLE001 - any failure of a figure is reported, none loses the run
            message = f"{type(err).__name__}: {err}".splitlines()[0][:500]
            console.print(f"[yellow]warning:[/yellow] figure {name} not drawn ({message}); the results are saved")
            tracker.set_tags({f"figure_error.{name}": message})
    return drawn


def latent_command(
    model: Annotated[Path, typer.Option(help="a saved model folder (OUTPUT/model of `atlasvi train`)")],
    store: Annotated[str | None, typer.Option(help="store to annotate (default: the model's training store)")] = None,
    key: Annotated[str | None, typer.Option(help="obsm key of the latent (default: the model's)")] = None,
    normalized_layer: Annotated[str | None, typer.Option(help="also write normalized expression here")] = None,
    library_size: Annotated[float, typer.Option(help="normalized expression per this many counts")] = 1e4,
    transform_batch: Annotated[str | None, typer.Option(help="decode every cell as this batch")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
) -> None:
    """Write a saved model's latent (and normalized expression) into a store, chunk by chunk."""
    model_class = saved_model_class(model)
    entry = get_entry(read_meta(model)["method"])
    if normalized_layer:
        what = "normalized expression (--normalized-layer)"
        refuse_without(model, model_class, "write_normalized_expression", what, "it is written for")
    scvi = model_class.load(model, open_store(store or model_class.saved_store(model)), device)
    key = key or (scvi.latent_key if scvi.has_latent else entry.latent_key)  # DestVI: X_destvi, or its proportions
    check_store_writable(scvi.store.path)
    if not scvi.has_latent:  # a DestVI without n_latent_amortization: what `atlasvi train` writes, its proportions
        console.print(f"this {entry.saved_name} has no latent: writing its results into obsm[{key!r}] instead")
    # the model of a train run's folder (OUTPUT/model): its latent is that run's, recorded as such, so that the run
    # still resumes into its latent key afterwards (an unrecorded writer's key would be refused)
    run_folder = model.parent if model.name == "model" and (model.parent / RUN_RECORD).exists() else None
    attrs = writer_attrs(run_folder) if run_folder is not None else None
    with torch.no_grad(), status(f"writing obsm[{key!r}]"):
        if scvi.has_latent:
            written = [scvi.write_latent_representation(key=key, attrs=attrs)]
        else:
            written = scvi.write_results(key=key, attrs=attrs)
        if normalized_layer:
            written.append(
                scvi.write_normalized_expression(
                    layer=normalized_layer, library_size=library_size, transform_batch=transform_batch
                )
            )
    for path in written:
        Console().print(f"wrote {path}")
