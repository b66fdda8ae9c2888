"""`atlasvi sweep`: a Ray Tune + ASHA sweep, recorded in MLflow (a parent run, a child run per trial), ending
with a ranked table (printed, CSV), a heatmap over n_latent x n_layers and the best config as a train YAML."""

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from rich import box
from rich.console import Console
from rich.table import Table

from atlasvi.analysis.plots import loss_curves_png, sweep_heatmap_png
from atlasvi.cli.common import console, load_yaml, make_config, status, tracking_uri, write_atomic
from atlasvi.cli.train import _embedded_store
from atlasvi.data.store import is_url
from atlasvi.tracking import MlflowRun, SweepChildRuns
from atlasvi.train import EpochRecord

if TYPE_CHECKING:
    from atlasvi.launch.sweep import SweepConfig


def _finish_children(children: SweepChildRuns, trials: list[dict], metric: str, folder: Path) -> None:
    """Close each trial's child run (its epochs were logged live by the trial): final figures, stopped-early and
    status tags, the error of a failed trial, its loss curves, the model of its last epoch as an MLflow Model (as
    `atlasvi train` logs one). A child already closed (a resumed sweep) is kept."""
    closed = children.closed()
    for trial in trials:
        if trial["trial_id"] in closed:
            continue
        child = children.child(trial["trial_id"], trial["overrides"])
        final = {
            f"final_{metric}": trial["last"],
            f"best_{metric}": trial["best"],
            "epochs": trial["epochs"],
            f"{metric}_at_epoch_{trial['common_epochs']}": trial["at_common"],
        }
        child.log_metrics({k: v for k, v in final.items() if math.isfinite(v)}, step=max(trial["epochs"] - 1, 0))
        child.set_tags({"stopped_early": str(trial["stopped_early"]), "status": trial["status"]})
        if trial["error"]:
            child.set_tags({"error": trial["error"]})
        if trial["history"]:
            fields = set(EpochRecord.__dataclass_fields__) - {"step_losses", "extra_metrics"}
            records = [EpochRecord(**{k: e[k] for k in fields}) for e in trial["history"]]
            child.log_artifact(loss_curves_png(records, folder / f"loss_curves_{trial['trial_id']}.png"))
        if trial["model"] is not None:
            child.log_model(Path(trial["model"]), max(trial["epochs"] - 1, 0))
        child.finish(failed=trial["status"] == "FAILED")


def _close_open_children(parent: MlflowRun, children: SweepChildRuns, status: str) -> None:
    """End with `status` every child run still RUNNING (its trial, or the sweep, was cut short)."""
    for run_id in children.existing().values():
        if parent.client.get_run(run_id).info.status == "RUNNING":
            parent.client.set_terminated(run_id, status)


def sweep_command(
    config: Annotated[Path | None, typer.Option(help="YAML of a SweepConfig")] = None,
    store: Annotated[str | None, typer.Option(help="store path or URL (default: embedded)")] = None,
    num_samples: Annotated[int | None, typer.Option(help="repeats of the grid / samples")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="epochs per trial (ASHA's horizon)")] = None,
    name: Annotated[str | None, typer.Option(help="sweep name (the same name resumes)")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address ('auto': local)")] = None,
    output: Annotated[Path, typer.Option(help="results folder")] = Path("outputs/sweeps"),
) -> None:
    """Sweep n_latent x n_layers (or any config field) with ASHA; rank the trials; write the best config.

    An invalid schedule or search space is refused before Ray or MLflow starts. The best trial's
    config, OUTPUT/NAME/best.yaml, trains with `atlasvi train --config` into OUTPUT/NAME/best."""
    from atlasvi.launch import connect  # Ray is imported by the commands that use it, not by `atlasvi --help`
    from atlasvi.launch.sweep import SweepConfig, run_sweep, summarise

    sources: list[tuple[str, dict[str, Any]]] = []
    if config is not None:
        sources.append((str(config), load_yaml(config)))
    flags = {"num_samples": num_samples, "name": name, "job": {"store": store, "train": {"max_epochs": max_epochs}}}
    sources.append(("flags", flags))
    sweep = make_config(SweepConfig, sources)
    rungs = ", ".join(map(str, sweep.rungs())) or "none"
    console.print(f"ASHA compares trials at epochs {rungs} (of {sweep.horizon}); {sweep.metric}, lower is better")
    for warning in sweep.schedule_warnings():
        console.print(f"[yellow]warning: {warning}[/yellow]")
    store_path = sweep.job.store or _embedded_store()
    if not is_url(store_path):
        store_path = str(Path(store_path).resolve())
    folder = output / sweep.name
    folder.mkdir(parents=True, exist_ok=True)
    storage = sweep.storage_path or str((output / "ray_results").resolve())
    record = folder / "sweep.json"
    previous = json.loads(record.read_text()) if record.exists() else {}
    uri = tracking_uri()
    experiment = sweep.job.experiment
    resume_id = previous.get("mlflow_run_id") if previous.get("tracking_uri") == uri else None
    connect(address)
    tags = {"sweep": sweep.name}
    with MlflowRun(uri, experiment, run_name=f"sweep-{sweep.name}", run_id=resume_id, tags=tags) as parent:
        children = SweepChildRuns(uri, experiment, parent.run_id)
        if "error" in parent.client.get_run(parent.run_id).data.tags:  # an interrupted sweep resumed: no error now
            parent.client.delete_tag(parent.run_id, "error")
        try:
            write_atomic(record, json.dumps({"mlflow_run_id": parent.run_id, "tracking_uri": uri}))
            space = {k: v.model_dump(exclude_none=True) for k, v in sweep.search_space.items()}
            parent.log_params({"search_space": space})
            parent.log_params(
                {k: v for k, v in sweep.model_dump(mode="json").items() if k not in ("job", "search_space")}
            )
            with status(f"sweep {sweep.name}: trials run under Ray Tune (ASHA); results in {storage}/{sweep.name}"):
                results, interrupted = run_sweep(sweep, store_path, storage, trial_logger=children)
            parent.set_tags({"interrupted": str(interrupted).lower()})
            if interrupted:
                _close_open_children(parent, children, "KILLED")
                parent.finish(error=KeyboardInterrupt())
                console.print(
                    f"[yellow]sweep {sweep.name} interrupted: {results.num_terminated + results.num_errors} of "
                    f"{len(results)} trials ended. Run the same command again to resume it (ended trials are kept, "
                    "unfinished ones continue from their last epoch).[/yellow]"
                )
                raise typer.Exit(code=130)
            trials = summarise(results, sweep)
            _finish_children(children, trials, sweep.metric, folder)
            if not _report(sweep, trials, folder, parent):
                parent.finish(error="no trial finished (see ranked.csv)")
        except BaseException as err:  # the parent ends FAILED (KILLED for Ctrl-C) as it leaves the block
            _close_open_children(parent, children, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise


def _report(sweep: "SweepConfig", trials: list[dict], folder: Path, parent: MlflowRun) -> bool:
    """The ranked table (printed, CSV), the heatmap and the best config, logged into the parent run;
    whether any trial finished."""
    from atlasvi.launch.sweep import best_job

    keys = list(sweep.search_space)
    common = trials[0]["common_epochs"] if trials else 0
    table = Table(
        title=f"sweep {sweep.name}: held-out {sweep.metric} (lower is better), ranked as ASHA judged",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
    )
    short = [k.rsplit(".", 1)[-1] for k in keys]
    for column in ["rank", *short, "epochs", "last", "best", f"at ep {common}", "outcome"]:
        table.add_column(column, no_wrap=True)
    handle = io.StringIO()
    writer = csv.writer(handle)
    writer.writerow(
            ["rank", *keys, "epochs", f"{sweep.metric}", f"best_{sweep.metric}", f"{sweep.metric}_at_epoch_{common}",
             "stopped_early", "status", "trial_id", "error"]
    )  # fmt: skip
    for rank, t in enumerate(trials, start=1):
        values = [str(t["overrides"].get(k)) for k in keys]
        figures = [f"{t[k]:.1f}" if math.isfinite(t[k]) else "-" for k in ("last", "best", "at_common")]
        outcome = "FAILED" if t["status"] == "FAILED" else "ASHA stop" if t["stopped_early"] else "finished"
        table.add_row(str(rank), *values, str(t["epochs"]), *figures, outcome)
        writer.writerow(
            [rank, *values, t["epochs"], *figures, t["stopped_early"], t["status"], t["trial_id"], t["error"] or ""]
        )
    csv_path = write_atomic(folder / "ranked.csv", handle.getvalue())
    Console().print(table)
    parent.log_artifact(csv_path)
    if {"model.n_latent", "model.n_layers"} <= set(keys):
        heatmap = sweep_heatmap_png(trials, "model.n_latent", "model.n_layers", sweep.metric, folder / "heatmap.png")
        parent.log_artifact(heatmap)
    finished = [t for t in trials if t["status"] == "FINISHED"]
    if finished:
        best = best_job(sweep, finished[0]["overrides"], str(folder / "best"))
        best_yaml = write_atomic(folder / "best.yaml", yaml.safe_dump(best.model_dump(mode="json"), sort_keys=False))
        parent.log_artifact(best_yaml)
        parent.log_metrics({f"best_{sweep.metric}": finished[0]["last"]})
        Console().print(f"best config: {best_yaml}  (atlasvi train --config {best_yaml}; results in {best.output})")
    return bool(finished)
