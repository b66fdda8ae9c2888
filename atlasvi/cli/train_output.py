"""`atlasvi train`'s output folder: whose it is, whether a re-run resumes it, who wrote a latent key.

`OUTPUT/run.json` records the run that owns the folder: the folder's absolute path and an id drawn when
the run started afresh (`folder_id`), its MLflow run, the job, the store, the device and where the runner
keeps its checkpoints. A re-run resumes only what it can continue exactly; anything else is refused with
the reason and the flag that starts afresh, so a run's record never mixes two trainings.
"""

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlasvi.data.store import AtlasStore, is_url
from atlasvi.data.writeback import array_attrs
from atlasvi.errors import ConfigError
from atlasvi.train.job import TrainJobConfig, resolve_device

RUN_RECORD = "run.json"
WRITER_ATTR = "atlasvi_writer"  # attrs of a written latent: the run that wrote it
# Settings that change nothing a resumed run computes: where results go and how they are shown, and resources.
# max_epochs may grow (the run continues); checkpoint_every_n_epochs changes how often it saves.
FREE_FIELDS = {"output", "store", "device", "latent_key", "umap_cells", "torch_threads", "run_name", "max_failures"}
FREE_FIELDS |= {"num_workers", "use_gpu", "storage_path"}  # compared as the runner (see `_runner`)
FREE_TRAIN_FIELDS = {"max_epochs", "checkpoint_every_n_epochs"}


@dataclass
class Plan:
    """What the run does with OUTPUT: `record` (run.json to write, its MLflow run id still to fill in),
    `resume_run_id` (the MLflow run to continue, None: a new one), `resuming` (a checkpoint continues),
    `replaced_run_id` (the MLflow run of the folder's last run when this one starts afresh)."""

    record: dict[str, Any]
    resume_run_id: str | None
    resuming: bool
    out: Path
    replaced_run_id: str | None = None

    @property
    def checkpoints(self) -> str:
        """Where the runner keeps its checkpoints (absolute): OUTPUT/checkpoints, or Ray's storage_path/name."""
        return _where(self.out, self.record["runner"])


def _where(out: Path, runner: dict[str, Any]) -> str:
    """A runner's checkpoint location; one inside OUTPUT is recorded relative to it (a moved folder keeps it)."""
    location = runner["checkpoints"]
    return location if "://" in location or Path(location).is_absolute() else str(out.resolve() / location)


def _runner(job: TrainJobConfig, out: Path, folder_id: str, ray: bool) -> dict[str, Any]:
    if not ray:
        return {"ray": False, "workers": 1, "checkpoints": "checkpoints"}
    storage = job.storage_path or "ray_results"
    name = f"{out.resolve().name}-{folder_id[:8]}"  # one per fresh run: --overwrite never resumes an old Ray run
    return {"ray": True, "workers": job.num_workers, "use_gpu": job.use_gpu, "checkpoints": f"{storage}/{name}"}


def _legacy_runner(previous: dict[str, Any], out: Path) -> dict[str, Any]:
    """The runner of a run.json written before runners were recorded (checkpoints where that code put them)."""
    job = previous.get("job", {})
    if job.get("num_workers", 1) <= 1:
        return {"ray": False, "workers": 1, "checkpoints": "checkpoints"}
    storage = job.get("storage_path") or "ray_results"
    name = job.get("run_name") or out.name
    workers, gpu = job["num_workers"], job.get("use_gpu", False)
    return {"ray": True, "workers": workers, "use_gpu": gpu, "checkpoints": f"{storage}/{name}"}


def _has_checkpoint(out: Path, runner: dict[str, Any]) -> bool:
    location = _where(out, runner)
    if "://" in location:
        return True  # a remote Ray storage: assume the run got that far
    if not runner["ray"]:
        return (Path(location) / "last.pt").exists()
    return Path(location).is_dir() and any(Path(location).iterdir())


def _store_id(store: AtlasStore) -> str:
    return store.path if is_url(store.path) else str(Path(store.path).resolve())


def _differences(before: dict[str, Any], now: dict[str, Any], free: set[str], prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(before) | set(now)):
        name = f"{prefix}{key}"
        if name in free:
            continue
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += _differences(old, new, free, f"{name}.")
        elif old != new:
            found.append(f"{name} {old} -> {new}")
    return found


def read_record(out: Path) -> dict[str, Any]:
    """OUTPUT/run.json ({} when absent); an unreadable one is an error naming it."""
    path = out / RUN_RECORD
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path}: not a run record ({err}); pass --overwrite to start afresh") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{path}: not a run record; pass --overwrite to start afresh")
    return record


def plan_output(
    job: TrainJobConfig, out: Path, store: AtlasStore, ray: bool, overwrite: bool, tracking_uri: str
) -> Plan:
    """Decide what a `train` on OUTPUT does (call with OUTPUT's lock held). --overwrite removes what the
    folder's last run left (its checkpoints and record) and starts afresh; a folder whose run has a
    checkpoint resumes it when nothing that changes the result changed, else is refused with the reason.
    A copied folder (its run.json belongs to another folder that still holds that run) is refused too: it
    must not resume, or touch, the original's MLflow run."""
    previous = read_record(out)
    here = str(out.resolve())
    ours = previous.get("output") == here and previous.get("tracking_uri") == tracking_uri  # never a copy's original
    replaced = previous.get("mlflow_run_id") if ours else None
    if overwrite:
        runner = previous.get("runner") or _legacy_runner(previous, out)
        for folder in (Path(_where(out, runner)), out / "checkpoints"):
            if folder.is_dir() and folder.resolve().is_relative_to(out.resolve()):  # never outside OUTPUT
                shutil.rmtree(folder)
        (out / RUN_RECORD).unlink(missing_ok=True)
        previous = {}
    device = "ray" if ray else resolve_device(job.device).type
    now = {"output": here, "job": job.model_dump(mode="json"), "store": _store_id(store), "device": device}
    resume_id, resuming = None, False
    if previous:
        origin = previous.get("output")
        if origin and origin != here and read_record(Path(origin)).get("folder_id") == previous.get("folder_id"):
            raise ConfigError(
                f"{out}: a copy of the output folder {origin} (its {RUN_RECORD} is that folder's run, MLflow run "
                f"{previous.get('mlflow_run_id')}); resuming here would continue the original's run: pass "
                f"--overwrite to start afresh in {out}, or another --output"
            )
        runner = previous.get("runner") or _legacy_runner(previous, out)
        if _has_checkpoint(out, runner):
            _refuse_changes(out, previous, now, runner, _runner(job, out, "", ray), job)
            resuming = True
            now |= {"folder_id": previous.get("folder_id") or uuid.uuid4().hex, "runner": runner}
            if previous.get("tracking_uri") == tracking_uri:
                resume_id = previous.get("mlflow_run_id")
    if not resuming:
        folder_id = uuid.uuid4().hex
        now |= {"folder_id": folder_id, "runner": _runner(job, out, folder_id, ray)}
        if "://" not in now["runner"]["checkpoints"] and _has_checkpoint(out, now["runner"]):
            raise ConfigError(
                f"{out}: {_where(out, now['runner'])} holds a checkpoint that no {RUN_RECORD} describes; pass "
                "--overwrite to start afresh, or another --output"
            )
    now["tracking_uri"] = tracking_uri
    return Plan(now, resume_id, resuming, out, None if resuming else replaced)


def _with_defaults(job: dict[str, Any]) -> dict[str, Any]:
    """A recorded job with the fields added since it was recorded (e.g. model.name) at their defaults."""
    try:
        return TrainJobConfig.model_validate(job).model_dump(mode="json")
    except ValueError:
        return job


def _refuse_changes(
    out: Path,
    previous: dict[str, Any],
    now: dict[str, Any],
    runner: dict[str, Any],
    wanted: dict[str, Any],
    job: TrainJobConfig,
) -> None:
    """Refuse resuming `runner`'s checkpoint with anything that changes what the run computes."""
    free = FREE_FIELDS | {f"train.{k}" for k in FREE_TRAIN_FIELDS}
    changed = _differences(_with_defaults(previous.get("job", {})), now["job"], free)
    for key in ("store", "device") if not (runner["ray"] or wanted["ray"]) else ("store",):  # Ray: the runner's GPUs
        if previous.get(key, now[key]) != now[key]:
            changed.append(f"{key} {previous[key]} -> {now[key]}")
    how = {False: "this process", True: "Ray Train workers"}
    if (runner["ray"], runner["workers"], runner.get("use_gpu")) != (
        wanted["ray"],
        wanted["workers"],
        wanted.get("use_gpu"),
    ):
        changed.append(
            f"runner {runner['workers']} worker(s) in {how[runner['ray']]}"
            f"{' on GPUs' if runner.get('use_gpu') else ''} -> {wanted['workers']} in {how[wanted['ray']]}"
            f"{' on GPUs' if wanted.get('use_gpu') else ''} (its checkpoint cannot continue there)"
        )
    elif (
        runner["ray"] and job.storage_path and not runner["checkpoints"].startswith(job.storage_path.rstrip("/") + "/")
    ):
        changed.append(f"storage_path: its checkpoints are in {runner['checkpoints']}")
    if changed:
        sections = sorted({c.split(" ")[0].split(".")[0] for c in changed})
        raise ConfigError(
            f"{out}: its checkpoint ({_where(out, runner)}) was trained with another {' / '.join(sections)} config "
            f"({'; '.join(changed)}); re-run with the same settings to resume it, or pass --overwrite (or "
            "another --output) to start afresh"
        )


def writer_attrs(out: Path) -> dict[str, Any]:
    """The attrs that mark a latent as written by OUTPUT's run (from its run.json)."""
    record = read_record(out)
    return {WRITER_ATTR: {k: record.get(k) for k in ("output", "folder_id", "mlflow_run_id")}}


def check_latent_key(store: AtlasStore, key: str | None, folder_id: str, overwrite: bool) -> None:
    """Refuse to replace obsm[key] written by another run (or by an unrecorded writer) unless --overwrite."""
    if key is not None and (not key or "/" in key or key.startswith(".")):
        raise ConfigError(f"latent_key {key!r} is not a usable obsm key (no '/', not starting with '.')")
    if not key or is_url(store.path) or overwrite:
        return
    attrs = array_attrs(store.path, "obsm", key)
    if attrs is None:
        return
    writer = attrs.get(WRITER_ATTR) or {}
    if writer.get("folder_id") == folder_id:
        return
    who = (
        f"the run of output folder {writer.get('output')} (MLflow run {writer.get('mlflow_run_id')})"
        if writer
        else "another command"
    )
    raise ConfigError(
        f"{store.path}: obsm['{key}'] was written by {who}; pass another --latent-key, or --overwrite to replace it"
    )


def refuse_a_run_latent(store: str, key: str) -> None:
    """Refuse, before training, to replace obsm[key] that an `atlasvi train` run recorded as its own (commands
    without a run folder, e.g. `atlasvi scanvi`, would silently replace it and break that run's resume)."""
    attrs = None if is_url(store) else array_attrs(store, "obsm", key)
    writer = (attrs or {}).get(WRITER_ATTR)
    if writer:
        raise ConfigError(
            f"{store}: obsm['{key}'] was written by the run of output folder {writer.get('output')} "
            f"(MLflow run {writer.get('mlflow_run_id')}); pass another --latent-key"
        )
