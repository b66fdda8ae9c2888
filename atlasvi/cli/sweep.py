"""`atlasvi sweep`: a Ray Tune + ASHA sweep, recorded in MLflow (a parent run, a child run per trial), ending
with a ranked table (printed, CSV), a heatmap over n_latent x n_layers and the best config as a train YAML."""

import csv
import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from atlasvi.analysis.plots import sweep_heatmap_png
from atlasvi.cli.common import console, load_yaml, make_config
from atlasvi.cli.train import _embedded_store, _tracking_uri
from atlasvi.data.store import is_url
from atlasvi.tracking import MlflowRun


def _rank(trials: list[dict]) -> list[dict]:
    """Finished trials by best objective (lowest first), then failed ones."""
    return sorted(trials, key=lambda t: (t["status"] != "FINISHED", t["best"] if math.isfinite(t["best"]) else 1e300))


def _log_children(parent: MlflowRun, experiment: str, trials: list[dict]) -> None:
    """One child run per trial (found again by its trial id on a resumed sweep, never duplicated)."""
    existing = {
        r.data.tags.get("trial_id"): r.info.run_id
        for r in parent.client.search_runs(
            [parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'"
        )
    }
    for trial in trials:
        if trial["trial_id"] in existing:
            continue
        child = MlflowRun(
            parent.tracking_uri, experiment, run_name=f"trial-{trial['trial_id']}",
            tags={"mlflow.parentRunId": parent.run_id, "trial_id": trial["trial_id"]},
        )  # fmt: skip
        child.log_params(trial["overrides"])
        for epoch in trial["history"]:
            figures = {
                k: v for k, v in epoch.items() if isinstance(v, int | float) and k.startswith(("train_", "valid"))
            }
            child.log_metrics(figures, step=int(epoch.get("epoch", epoch.get("training_iteration", 1) - 1)))
        final = {"best_objective": trial["best"], "last_objective": trial["last"], "epochs": trial["epochs"]}
        child.log_metrics({k: v for k, v in final.items() if math.isfinite(v)}, step=max(trial["epochs"] - 1, 0))
        child.set_tags({"stopped_early": str(trial["stopped_early"]), "status": trial["status"]})
        if trial["error"]:
            child.set_tags({"error": trial["error"]})
        child.finish(failed=trial["status"] == "FAILED")


def sweep_command(
    config: Annotated[Path | None, typer.Option(help="YAML of SweepConfig (job, search_space, ASHA, ...)")] = None,
    store: Annotated[str | None, typer.Option(help="atlas store path or URL (default: the embedded one)")] = None,
    num_samples: Annotated[int | None, typer.Option(help="repeats of the grid / samples")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="epochs per trial (ASHA's horizon)")] = None,
    name: Annotated[str | None, typer.Option(help="sweep name (a second run of the same name resumes it)")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address ('auto': this node's cluster)")] = None,
    output: Annotated[Path, typer.Option(help="folder of the ranked table, heatmap and best config")] = Path(
        "outputs/sweeps"
    ),
) -> None:
    """Sweep n_latent x n_layers (or any config field) with ASHA; rank the trials; write the best config."""
    from atlasvi.launch import connect  # Ray is imported by the commands that use it, not by `atlasvi --help`
    from atlasvi.launch.sweep import SweepConfig, run_sweep, summarise, with_overrides

    sources: list[tuple[str, dict[str, Any]]] = []
    if config is not None:
        sources.append((str(config), load_yaml(config)))
    flags = {"num_samples": num_samples, "name": name, "job": {"store": store, "train": {"max_epochs": max_epochs}}}
    sources.append(("flags", flags))
    sweep = make_config(SweepConfig, sources)
    store_path = sweep.job.store or _embedded_store()
    if not is_url(store_path):
        store_path = str(Path(store_path).resolve())
    folder = output / sweep.name
    folder.mkdir(parents=True, exist_ok=True)
    storage = sweep.storage_path or str((output / "ray_results").resolve())
    record = folder / "sweep.json"
    previous = json.loads(record.read_text()) if record.exists() else {}
    uri = _tracking_uri()
    experiment = sweep.job.experiment
    resume_id = previous.get("mlflow_run_id") if previous.get("tracking_uri") == uri else None
    parent = MlflowRun(uri, experiment, run_name=f"sweep-{sweep.name}", run_id=resume_id, tags={"sweep": sweep.name})
    record.write_text(json.dumps({"mlflow_run_id": parent.run_id, "tracking_uri": uri}))
    parent.log_params({"search_space": {k: v.model_dump(exclude_none=True) for k, v in sweep.search_space.items()}})
    parent.log_params({k: v for k, v in sweep.model_dump(mode="json").items() if k not in ("job", "search_space")})
    connect(address)
    with console.status(f"sweep {sweep.name}: trials run under Ray Tune (ASHA); results in {storage}/{sweep.name}"):
        results = run_sweep(sweep, store_path, storage)
    trials = _rank(summarise(results, sweep))
    _log_children(parent, experiment, trials)
    keys = list(sweep.search_space)
    table = Table(title=f"sweep {sweep.name}: held-out {sweep.metric} (lower is better)")
    for column in ["rank", *keys, sweep.metric, "epochs", "stopped early", "status"]:
        table.add_column(column)
    csv_path = folder / "ranked.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", *keys, f"best_{sweep.metric}", "epochs", "stopped_early", "status", "error"])
        for rank, t in enumerate(trials, start=1):
            values = [str(t["overrides"].get(k)) for k in keys]
            best = f"{t['best']:.2f}" if math.isfinite(t["best"]) else "-"
            table.add_row(str(rank), *values, best, str(t["epochs"]), str(t["stopped_early"]), t["status"])
            writer.writerow([rank, *values, best, t["epochs"], t["stopped_early"], t["status"], t["error"] or ""])
    Console().print(table)
    parent.log_artifact(csv_path)
    if {"model.n_latent", "model.n_layers"} <= set(keys):
        heatmap = sweep_heatmap_png(trials, "model.n_latent", "model.n_layers", sweep.metric, folder / "heatmap.png")
        parent.log_artifact(heatmap)
    finished = [t for t in trials if t["status"] == "FINISHED"]
    if finished:
        best = with_overrides(sweep.job, finished[0]["overrides"])
        best_yaml = folder / "best.yaml"
        best_yaml.write_text(yaml.safe_dump(best.model_dump(mode="json"), sort_keys=False))
        parent.log_artifact(best_yaml)
        parent.log_metrics({f"best_{sweep.metric}": finished[0]["best"]})
        Console().print(f"best config: {best_yaml}  (atlasvi train --config {best_yaml})")
    parent.finish(failed=not finished)
