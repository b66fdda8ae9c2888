"""MLflow: the record of every run (the only package that imports mlflow). Used on rank 0 alone.

The embedded default is a SQLite store in the working folder, `mlruns/mlflow.db`, with artifacts in
`mlruns/artifacts/`: MLflow 3 refuses its old file store, and SQLite needs no server and is one file a
person can copy. A tracking URI (`MLFLOW_TRACKING_URI`, read by the CLI) points everything at a server.
`MlflowRun` uses an explicit client and run id (no global active run), so a restarted or distributed
run logs into the same MLflow run by passing its id back. Used as a context manager it closes the run
on every exit path, so no failing command leaves a run RUNNING:

    with MlflowRun(uri, "atlasvi", run_name="x") as run:
        ...   # the end of the block, or run.finish(): FINISHED; an exception: FAILED, its message in the
              # `error` tag; Ctrl-C: KILLED; SystemExit / typer.Exit with code 0: FINISHED
"""

from collections.abc import Mapping
from dataclasses import asdict
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from atlasvi.data.store import read_store_attrs
from atlasvi.train import EpochRecord

LOCAL_FOLDER = "mlruns"


def local_tracking_uri(workdir: Path) -> str:
    """The embedded default: SQLite at <workdir>/mlruns/mlflow.db."""
    folder = (workdir / LOCAL_FOLDER).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment `name`, created if absent (a local SQLite store keeps artifacts beside it)."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"model": {"n_latent": 10}} -> {"model.n_latent": "10"} (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = str(value)
    return flat


class MlflowRun:
    """One MLflow run: params, per-epoch metrics, artifacts. Resumes the run `run_id` when given (renamed to
    `run_name` when that is given too).

    A context manager: leaving the block ends the run unless `finish` already did (see the module's
    docstring): FINISHED, or FAILED / KILLED with the error as the `error` tag.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ):
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.ended = False
        if run_id is not None:
            info = self.client.get_run(run_id).info
            self.run_id, self.experiment_id = info.run_id, info.experiment_id
            self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING), name=run_name)
            self.set_tags(tags or {})
        else:
            self.experiment_id = ensure_experiment(tracking_uri, experiment)
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags or {}))
            self.run_id = run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> dict[str, str]:
        """Nested params flattened to dotted names. MLflow params cannot change: a resumed run's changed
        values are kept as `changed.<name>` tags and returned ({} when nothing changed)."""
        logged = self.client.get_run(self.run_id).data.params
        flat = {k: v[:6000] for k, v in flatten(params).items()}
        new = [Param(k, v) for k, v in flat.items() if k not in logged]
        for start in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[start : start + 100])
        changed = {k: v for k, v in flat.items() if k in logged and logged[k] != v}
        self.set_tags({f"changed.{k}": f"{logged[k]} -> {v}" for k, v in changed.items()})
        return changed

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        stamp = mlflow.utils.time.get_current_time_millis()
        batch = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_epoch(self, record: EpochRecord) -> None:
        """Every figure of the epoch record (not the step losses) at step = epoch."""
        figures = {k: v for k, v in asdict(record).items() if k not in ("epoch", "step_losses", "extra_metrics")}
        figures |= {f"train_{k}": v for k, v in record.extra_metrics.items()}
        self.log_metrics(figures, step=record.epoch)

    def logged_epochs(self, metric: str = "validation_elbo") -> list[int]:
        """Epochs already logged (a resumed run continues after them)."""
        return [m.step for m in self.client.get_metric_history(self.run_id, metric)]

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's files, under the run's artifacts."""
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_store_input(self, path: str, context: str = "training") -> None:
        """The atlas store at `path` as the run's dataset input (name, path, digest of its attrs; once per run)."""
        pyfunc = _mlflow_model()
        pyfunc.log_dataset(self.client, self.run_id, pyfunc.store_dataset(path, read_store_attrs(path)), context)

    def log_model(self, model_dir: Path, step: int = 0) -> str:
        """The saved model folder as an MLflow Model of the run (pyfunc: the latent of a store's cells), registrable
        as models:/<returned id>."""
        return _mlflow_model().log_latent_model(self.client, self.experiment_id, self.run_id, model_dir, step)

    def finish(self, failed: bool = False, error: BaseException | str | None = None) -> None:
        """End the run: FINISHED; FAILED when `failed` or an `error` is given (kept as the `error` tag);
        KILLED when the error is a KeyboardInterrupt (Ctrl-C)."""
        status = RunStatus.FAILED if failed or error is not None else RunStatus.FINISHED
        if isinstance(error, KeyboardInterrupt):
            status, error = RunStatus.KILLED, "interrupted (KeyboardInterrupt: Ctrl-C)"
        elif isinstance(error, BaseException):
            code = _exit_code(error)
            bare = str(error) in ("", str(code))  # SystemExit(3), typer.Exit(2): the code is all they say
            error = f"{type(error).__name__} (exit code {code})" if bare else f"{type(error).__name__}: {error}"
        if error is not None:
            self.set_tags({"error": error[:5000]})
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))
        self.ended = True

    def __enter__(self) -> "MlflowRun":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: Any) -> None:
        if not self.ended:
            self.finish(error=None if exc is None or _exit_code(exc) == 0 else exc)


def _mlflow_model() -> ModuleType:
    """atlasvi.tracking.mlflow_model, imported when first used (mlflow.pyfunc takes a while to import)."""
    return import_module("atlasvi.tracking.mlflow_model")


def end_abandoned(tracking_uri: str, run_id: str, reason: str) -> bool:
    """End run `run_id` KILLED with `reason` as its `error` tag if it is still RUNNING while nothing runs it
    (its command was killed: SIGKILL, a lost node); True when it was. A run that is gone is left alone."""
    client = MlflowClient(tracking_uri)
    try:
        status = client.get_run(run_id).info.status
    except mlflow.exceptions.MlflowException:
        return False
    if status != RunStatus.to_string(RunStatus.RUNNING):
        return False
    client.set_tag(run_id, "error", reason[:5000])
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
    return True


def _exit_code(exc: BaseException) -> int | None:
    """The exit code an exception ends the command with: SystemExit's, or an `exit_code` attribute (click's
    Exit, typer.Exit, AtlasviError); None for any other exception."""
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    code = getattr(exc, "exit_code", None)
    return code if isinstance(code, int) else None


class EpochLogger:
    """Logs epoch records into one MLflow run from wherever it is called (picklable: Ray ships it to rank 0).

    An epoch already in the run is not logged again, so a restarted worker group that recomputes an
    epoch, or a resumed run, leaves one value per epoch; `restarted` records each restart.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_id: str):
        self.tracking_uri, self.experiment, self.run_id = tracking_uri, experiment, run_id
        self._run: MlflowRun | None = None
        self._logged: set[int] = set()

    def _open(self) -> MlflowRun:
        if self._run is None:
            self._run = MlflowRun(self.tracking_uri, self.experiment, run_id=self.run_id)
            self._logged = set(self._run.logged_epochs())
        return self._run

    def __call__(self, record: EpochRecord) -> None:
        run = self._open()
        if record.epoch not in self._logged:
            run.log_epoch(record)
            self._logged.add(record.epoch)

    def restarted(self, from_epoch: int) -> None:
        """One more restart of the worker group, resuming at `from_epoch`."""
        run = self._open()
        restarts = len(run.client.get_metric_history(self.run_id, "restarts")) + 1
        run.log_metrics({"restarts": restarts, "resumed_at_epoch": from_epoch}, step=restarts)
        run.set_tags({"restarts": str(restarts)})

    def __getstate__(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "experiment": self.experiment, "run_id": self.run_id}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


class SweepChildRuns:
    """The child runs of a sweep's parent run, one per trial, found again by the `trial_id` tag (picklable: Ray
    ships it to every trial, which logs its epochs live into its own child)."""

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str):
        self.tracking_uri, self.experiment, self.parent_run_id = tracking_uri, experiment, parent_run_id

    def _runs(self) -> list:
        client = MlflowClient(self.tracking_uri)
        return client.search_runs(
            [ensure_experiment(self.tracking_uri, self.experiment)],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}'",
        )

    def existing(self) -> dict[str, str]:
        """trial id -> child run id."""
        return {r.data.tags["trial_id"]: r.info.run_id for r in self._runs() if "trial_id" in r.data.tags}

    def closed(self) -> set[str]:
        """Trial ids whose child run was closed with its outcome (a `status` tag)."""
        return {r.data.tags["trial_id"] for r in self._runs() if "trial_id" in r.data.tags and "status" in r.data.tags}

    def child(self, trial_id: str, params: Mapping[str, Any]) -> MlflowRun:
        """The trial's child run (created with its params on first use; resumed after)."""
        run_id = self.existing().get(trial_id)
        if run_id is not None:
            return MlflowRun(self.tracking_uri, self.experiment, run_id=run_id)
        tags = {"mlflow.parentRunId": self.parent_run_id, "trial_id": trial_id}
        run = MlflowRun(self.tracking_uri, self.experiment, run_name=f"trial-{trial_id}", tags=tags)
        run.log_params(params)
        return run

    def __call__(self, trial_id: str, params: Mapping[str, Any]) -> EpochLogger:
        """An epoch logger into the trial's child run."""
        return EpochLogger(self.tracking_uri, self.experiment, self.child(trial_id, params).run_id)
