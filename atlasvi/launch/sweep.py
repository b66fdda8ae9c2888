"""Hyperparameter sweeps: Ray Tune + ASHA over any TrainJobConfig field, each trial a Ray Train run.

The Tune trial function calls `train_distributed` (TorchTrainer.fit) with Tune's `TuneReportCallback`, as the
current Ray docs prescribe (Tuner(TorchTrainer) is gone): rank 0's per-epoch figures reach Tune, and ASHA stops
the trials whose held-out -ELBO falls behind. A trial that raises (a NaN loss, an invalid value, out of memory)
ends as an error and the sweep goes on. The sweep lives under `storage_path/name`; running it again resumes it
(finished trials are not run again).
"""

import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import ray
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError
from ray import tune
from ray.tune import Checkpoint
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from atlasvi.data import open_store
from atlasvi.data.store import is_url
from atlasvi.launch.ray_train import MODEL_DIR, DistributedConfig, train_distributed
from atlasvi.models.registry import get_entry
from atlasvi.models.saving import save_model, saved_config
from atlasvi.train import EpochRecord, fit
from atlasvi.train.job import TrainJobConfig, build_module, make_loaders, module_spec, pretrained_train
from atlasvi.train.loop import CHECKPOINT_NAME

TRIAL_CPU = 0.01  # a trial's function only drives its Ray Train workers


class SearchSpec(BaseModel):
    """One dimension: exactly one of grid (every value), choice (sampled), uniform / loguniform [low, high]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one(self) -> "SearchSpec":
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform (got {given or 'none'})")
        values = self.grid if self.grid is not None else self.choice
        if values is not None and not values:
            raise ValueError(f"{given[0]} is empty: give at least one value")
        bounds = self.uniform or self.loguniform
        if bounds is not None:
            low, high = bounds
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"{given[0]} [{low}, {high}]: give finite bounds with low < high")
            if self.loguniform is not None and low <= 0:
                raise ValueError(f"loguniform [{low}, {high}]: the low bound must be > 0")
        return self

    def domain(self):
        if self.grid is not None:
            return tune.grid_search(self.grid)
        if self.choice is not None:
            return tune.choice(self.choice)
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        return tune.loguniform(*self.loguniform)


def _horizon(job: TrainJobConfig) -> int:
    """The epochs a trial trains at most: job.train.max_epochs (None: scvi-tools' cap, 400)."""
    return job.train.max_epochs or job.train.epochs_for(1)


class SweepConfig(BaseModel):
    """`atlasvi sweep`: the base job, the search space (dotted TrainJobConfig fields) and the ASHA schedule.

    num_samples: repeats of the grid (or samples of the other dimensions); the objective is the held-out
    -ELBO per cell (minimised); ASHA stops trials at grace_period, grace_period x reduction_factor, ... epochs.
    max_concurrent_trials None: as many as the cluster's CPUs (or GPUs) hold trials of workers_per_trial.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: TrainJobConfig = TrainJobConfig()
    search_space: dict[str, SearchSpec] = {
        "model.n_latent": SearchSpec(grid=[10, 20, 30]),
        "model.n_layers": SearchSpec(grid=[1, 2, 3]),
    }
    num_samples: int = Field(default=1, gt=0)
    metric: Literal["validation_elbo", "validation_reconstruction"] = "validation_elbo"
    grace_period: int = Field(default=10, gt=0)
    reduction_factor: float = Field(default=2, gt=1)
    workers_per_trial: int = Field(default=1, gt=0)
    max_concurrent_trials: int | None = Field(default=None, gt=0)
    name: str = "sweep"
    storage_path: str | None = None

    @property
    def horizon(self) -> int:
        """ASHA's max_t: the epochs a trial trains at most."""
        return _horizon(self.job)

    def rungs(self) -> list[int]:
        """The epochs at which ASHA compares trials: grace_period x reduction_factor^k below the horizon."""
        rungs, epoch = [], float(self.grace_period)
        while epoch < self.horizon:
            rungs.append(round(epoch))
            epoch *= self.reduction_factor
        return rungs

    @field_validator("grace_period")
    @classmethod
    def _first_rung_in_horizon(cls, grace_period: int, info: ValidationInfo) -> int:
        """Ray's ASHAScheduler asserts grace_period <= max_t: checked here, before Ray or MLflow starts."""
        job = info.data.get("job")
        if job is not None and grace_period > _horizon(job):
            raise PydanticCustomError(
                "asha_schedule",
                "{grace} > job.train.max_epochs {horizon}: ASHA's first rung would come after a trial's last epoch; "
                "set grace_period <= {horizon} or max_epochs >= {grace}",
                {"grace": grace_period, "horizon": _horizon(job)},
            )
        return grace_period

    @model_validator(mode="after")
    def _fields_exist(self) -> "SweepConfig":
        for path in self.search_space:  # walks the job itself: `model` is the config of the job's model
            owner: Any = self.job
            for part in path.split("."):
                if part not in getattr(type(owner), "model_fields", {}):
                    raise ValueError(f"search_space: {path!r} is not a TrainJobConfig field ({part!r} unknown)")
                owner = getattr(owner, part)
        return self

    def schedule_warnings(self) -> list[str]:
        """What makes ASHA's early comparisons unfair for this job (printed by `atlasvi sweep`)."""
        warmup, max_epochs = self.job.train.n_epochs_kl_warmup, self.job.train.max_epochs
        if warmup and max_epochs and warmup < max_epochs and self.grace_period < warmup:
            return [
                f"grace_period {self.grace_period} is before the end of the KL warm-up ({warmup} epochs): ASHA will "
                "compare trials on a held-out ELBO they are not yet trained for, and deeper or wider models, which "
                "start slower, will be stopped before they overtake (set grace_period >= n_epochs_kl_warmup)"
            ]
        return []


def with_overrides(job: TrainJobConfig, overrides: dict[str, Any]) -> TrainJobConfig:
    """The job with dotted fields replaced ("model.n_latent": 20), validated (a bad value raises)."""
    values = job.model_dump(mode="json")
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        target = values
        for part in parents:
            target = target[part]
        target[leaf] = value
    return TrainJobConfig.model_validate(values)


def best_job(sweep: SweepConfig, overrides: dict[str, Any], output: str) -> TrainJobConfig:
    """The job of a trial as `atlasvi train` runs it, into its own results: `output`, run name
    `<sweep>-best`, latent key `<base key>_<sweep>` (none if the base writes none), so training it replaces
    neither the base job's model and latent nor the demo's."""
    job = with_overrides(sweep.job, overrides)
    own = {
        "output": output,
        "run_name": f"{sweep.name}-best",
        "latent_key": f"{job.latent_key}_{sweep.name}" if job.latent_key else None,
    }
    return TrainJobConfig.model_validate(job.model_dump(mode="json") | own)


TrialLogger = Callable[[str, dict[str, Any]], Callable[[EpochRecord], None]]
"""(trial id, the trial's overrides) -> a per-epoch callback, e.g. logging into the trial's MLflow child run."""


TRIAL_MODEL = MODEL_DIR  # a trial's saved model (model.json, model.pt) in its checkpoint


def _trial(config: dict, trial_logger: TrialLogger | None = None) -> None:
    """One Tune trial: the job with this trial's values, trained by Ray Train, reporting every epoch to Tune.

    A one-worker trial runs the loop in the trial itself, checkpointing through Tune (a resumed sweep continues
    an interrupted trial from its last epoch; the checkpoint also holds the model saved as `atlasvi train` saves it,
    `TRIAL_MODEL`, which the sweep logs as the trial's MLflow Model), and reports with tune.report: Ray 2.60 keeps
    the placement group of a Train V2 run whose Tune trial is stopped (ray-project/ray#54305), which would starve
    the next trials. A multi-worker trial's rank 0 writes the same saved model into its Ray Train checkpoints.
    """
    job = with_overrides(TrainJobConfig.model_validate(config["job"]), config["overrides"])
    trial_id = tune.get_context().get_trial_id()
    log_epoch = trial_logger(trial_id, config["overrides"]) if trial_logger else None
    store = open_store(config["store"], backend=job.loader.backend)
    path = store.path if is_url(store.path) else str(Path(store.path).resolve())
    saved = saved_config(job.model.model_dump(), path, store.n_cells, store.nnz, job.train.model_dump())
    if config["workers"] > 1:
        run = DistributedConfig(
            num_workers=config["workers"],
            storage_path=config["storage_path"],
            name=f"{config['name']}-{trial_id}",
            use_gpu=job.use_gpu,
            cpu_threads=1,
        )
        train_distributed(
            job, config["store"], run, on_epoch_end=log_epoch, callbacks=[TuneReportCallback()], saved=saved
        )
        return
    torch.set_num_threads(1)
    spec = module_spec(job, store)
    module = build_module(job.model, spec.schema, job.train.seed, spec.init_state)
    train, validation = make_loaders(
        store, job.loader, job.train.validation_fraction, code_maps=spec.code_maps, modalities=spec.modalities
    )
    with tempfile.TemporaryDirectory(prefix="atlasvi-trial-") as scratch:
        checkpoint_dir = Path(scratch)
        restored = tune.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as directory:
                shutil.copy(Path(directory) / CHECKPOINT_NAME, checkpoint_dir / CHECKPOINT_NAME)

        def report(record: EpochRecord) -> None:
            if log_epoch is not None:
                log_epoch(record)  # before tune.report: ASHA may stop the trial there
            # the model as `atlasvi train` saves it, in the checkpoint: the sweep logs it as the trial's MLflow Model
            state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
            save_model(checkpoint_dir / TRIAL_MODEL, get_entry(job.model.name).saved_name, saved, spec.schema, state)
            metrics = {k: v for k, v in asdict(record).items() if k not in ("step_losses", "extra_metrics")}
            metrics |= {f"train_{k}": v for k, v in record.extra_metrics.items()}
            tune.report({**metrics, "epochs_done": record.epoch + 1}, checkpoint=Checkpoint.from_directory(scratch))

        with train, validation:
            fit(
                module,
                train,
                validation,
                pretrained_train(job, store),
                checkpoint_dir=checkpoint_dir,
                on_epoch_end=report,
            )


def concurrent_trials(sweep: SweepConfig) -> int:
    """How many trials the cluster holds at once (its CPUs, or GPUs, over the workers of a trial)."""
    if sweep.max_concurrent_trials is not None:
        return sweep.max_concurrent_trials
    resources = ray.cluster_resources()
    if sweep.job.use_gpu:
        return max(1, math.floor(resources.get("GPU", 0) / sweep.workers_per_trial))
    return max(1, math.floor(resources.get("CPU", 1) / _trial_cpus(sweep)))


def _trial_cpus(sweep: SweepConfig) -> float:
    """CPUs a trial holds: its own (a one-worker trial trains in itself) and its Ray Train workers'."""
    return 1 if sweep.workers_per_trial == 1 else sweep.workers_per_trial + TRIAL_CPU


def run_sweep(
    sweep: SweepConfig, store: str, storage_path: str, trial_logger: TrialLogger | None = None
) -> tuple[tune.ResultGrid, bool]:
    """Run (or resume) the sweep; Ray must be initialised. Returns Tune's results, one per trial, and whether
    the sweep was interrupted (Ctrl-C: Tune saves its state and stops; running it again resumes it)."""
    path = f"{storage_path.rstrip('/')}/{sweep.name}"
    # a one-worker trial checkpoints every epoch and keeps the last: Tune then snapshots the experiment each time
    # (cheap here, and what makes a resume continue from the last epoch); its warning about it is noise
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trainable = tune.with_resources(
        tune.with_parameters(_trial, trial_logger=trial_logger),
        {"cpu": 1 if sweep.workers_per_trial == 1 else TRIAL_CPU},
    )
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False)
    else:
        job = sweep.job
        if job.init_from is not None:  # a trial's working directory is its own
            job = job.model_copy(update={"init_from": str(Path(job.init_from).resolve())})
        param_space = {
            "job": job.model_dump(mode="json"),
            "overrides": {k: spec.domain() for k, spec in sweep.search_space.items()},
            "workers": sweep.workers_per_trial,
            "store": store,
            "storage_path": f"{storage_path.rstrip('/')}/{sweep.name}-trials",
            "name": sweep.name,
        }
        scheduler = ASHAScheduler(
            time_attr="epochs_done", max_t=sweep.horizon, grace_period=sweep.grace_period,
            reduction_factor=sweep.reduction_factor,
        )  # fmt: skip
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode="min",
                scheduler=scheduler,
                num_samples=sweep.num_samples,
                max_concurrent_trials=concurrent_trials(sweep),
            ),  # fmt: skip
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=storage_path,
                failure_config=tune.FailureConfig(fail_fast=False),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )
    previous = signal.getsignal(signal.SIGINT)

    def interrupted_marker(signum, frame):  # Tune puts back the handler it found when Ctrl-C stops it
        signal.default_int_handler(signum, frame)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, interrupted_marker)
    try:
        results = tuner.fit()
    finally:
        stopped_by_signal = signal.getsignal(signal.SIGINT) is interrupted_marker
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
    unfinished = results.num_terminated + results.num_errors < len(results) or len(results) < _n_trials(sweep)
    return results, stopped_by_signal or unfinished


def _n_trials(sweep: SweepConfig) -> int:
    """Trials the sweep makes: num_samples times the grid (sampled dimensions do not multiply)."""
    return sweep.num_samples * math.prod(len(s.grid) for s in sweep.search_space.values() if s.grid is not None)


def _trial_model(result: Any) -> str | None:
    """The saved model folder in a trial's last checkpoint, where it is a local folder: a one-worker trial's Tune
    checkpoint, or a multi-worker trial's last Ray Train checkpoint (Tune's TuneReportCallback passes its path as
    the metric "checkpoint_path"); None otherwise."""
    checkpoint = result.checkpoint
    path = checkpoint.path if checkpoint is not None else (result.metrics or {}).get("checkpoint_path")
    if path is None or is_url(path):
        return None
    folder = Path(path) / TRIAL_MODEL
    return str(folder) if (folder / "model.json").exists() else None


def summarise(results: tune.ResultGrid, sweep: SweepConfig) -> list[dict]:
    """One plain record per trial, ranked (`rank_trials`): overrides, status, error, epochs run, the objective
    at the last epoch and its best, stopped early (by ASHA, before the configured epochs), per-epoch figures, the
    saved model of its last epoch (`_trial_model`)."""
    max_epochs = sweep.job.train.max_epochs
    trials = []
    for result in results:
        history = result.metrics_dataframe
        if history is not None and "epochs_done" in history:  # an epoch recomputed after a resume counts once
            history = history.drop_duplicates("epochs_done", keep="last")
        epochs = [] if history is None else history.to_dict("records")
        values = [e[sweep.metric] for e in epochs if sweep.metric in e]
        trials.append(
            {
                "trial_id": (result.metrics or {}).get("trial_id") or result.path.rsplit("/", 1)[-1],
                "overrides": dict(result.config["overrides"]) if result.config else {},
                "status": "FAILED" if result.error is not None else "FINISHED",
                "error": None if result.error is None else str(result.error)[:2000],
                "epochs": len(values),
                "last": values[-1] if values else math.nan,
                "best": min(values) if values else math.nan,
                "stopped_early": result.error is None and max_epochs is not None and len(values) < max_epochs,
                "history": epochs,
                "model": _trial_model(result),
            }
        )
    return rank_trials(trials, sweep.metric)


def rank_trials(trials: list[dict], metric: str) -> list[dict]:
    """Rank as ASHA judged: finished trials that trained longer first (ASHA stopped the others because they
    were behind at a rung), then by the objective at their last epoch; failed trials last. Each record gains
    `common_epochs`, the epochs every finished trial reached, and `at_common`, its objective there: the one
    column that compares every trial at equal training."""
    finished = {id(t) for t in trials if t["status"] == "FINISHED" and t["epochs"] > 0}
    common = min((t["epochs"] for t in trials if id(t) in finished), default=0)
    for t in trials:
        t["common_epochs"] = common
        t["at_common"] = t["history"][common - 1].get(metric, math.nan) if id(t) in finished else math.nan
    return sorted(
        trials,
        key=lambda t: (id(t) not in finished, -t["epochs"], t["last"] if math.isfinite(t["last"]) else math.inf),
    )
