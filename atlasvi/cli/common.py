"""Helpers every command shares: the console, YAML configs validated by pydantic, the embedded store."""

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from atlasvi.api import METHODS
from atlasvi.data.build import build_store
from atlasvi.data.config import BuildConfig
from atlasvi.data.executor import BuildExecutor, default_workers
from atlasvi.data.store import is_url
from atlasvi.datasets import CELLBENCH
from atlasvi.errors import AtlasviError, ConfigError
from atlasvi.tracking import local_tracking_uri

console = Console(stderr=True)

EMBEDDED_BUILD = {
    "inputs": [str(CELLBENCH)],
    "output": "outputs/cellbench.zarr",
    "batch_key": "batch",
    "labels_key": "cell_line",
    "annotation_keys": ["technology"],  # batch is nested in technology: a covariate of it would add nothing
    "n_top_genes": 2000,
    "overwrite": True,
}


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping; a clear error for a missing file or a non-mapping."""
    if not path.exists():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML ({problem})") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: a config is a YAML mapping of field: value, not {type(content).__name__}")
    return content


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested merge; None in `override` means "not given"."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict):
            nested = _merge(merged.get(key) if isinstance(merged.get(key), dict) else {}, value)
            if nested:
                merged[key] = nested
        elif value is not None:
            merged[key] = value
    return merged


def make_config(model: type, sources: list[tuple[str, dict[str, Any]]]):
    """Validate the merged sources (later ones override); an unknown field is an error naming it."""
    merged: dict[str, Any] = {}
    for _, values in sources:
        merged = _merge(merged, values)
    try:
        return model(**merged)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            owner, names = _owner(model, e["loc"][:-1])
            tag = e["loc"] and e["loc"][-1] in [
                getattr(m.model_fields.get("name"), "default", None) for m in _members(owner)
            ]
            field = ".".join([*names, str(e["loc"][-1])] if e["loc"] and not tag else names)
            if e["type"] == "extra_forbidden":
                allowed = ", ".join(owner.model_fields)
                problems.append(f"unknown field {field!r} (fields: {allowed})")
            elif e["type"] == "unknown_model" and isinstance(e["input"], dict):
                problems.append(f"{field}.name {e['input'].get('name')!r}: {e['msg']}")
            else:  # a validator's ValueError reads as its message; a whole-config one names no field
                message = e["msg"].removeprefix("Value error, ")
                problems.append(f"{field}: {message}" if field else message)
        where = " + ".join(name for name, _ in sources)
        raise ConfigError(f"invalid {model.__name__} ({where}): " + "; ".join(problems)) from None


def _owner(model: type, loc: tuple) -> tuple[type, list[str]]:
    """The config class that `loc` (a pydantic error location) ends in, and the field names along it without
    the tags of a union (`model.scanvi.x` is field `model.x` of the scanvi config)."""
    owner: Any = model
    names: list[str] = []
    for part in loc:
        fields = getattr(owner, "model_fields", None)
        if fields is not None and part in fields:
            names.append(str(part))
            owner = fields[part].annotation
            continue
        tagged = [m for m in _members(owner) if getattr(m.model_fields.get("name"), "default", None) == part]
        owner = tagged[0] if tagged else owner
    return owner, names


def _members(annotation: Any) -> list[type[BaseModel]]:
    """The config classes of a union of configs (through Annotated and its tags)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _members(arg)]


class _LogLines(Progress):
    """A Progress for a captured log (stderr not a terminal): no live bar, one plain line per update of a
    task, at most one every `every` seconds, and always its last one."""

    def __init__(self, every: float = 2.0):
        super().__init__(console=console, disable=True)
        self.every, self.printed = every, {}

    def update(self, task_id: TaskID, **fields: Any) -> None:
        super().update(task_id, **fields)
        self._print(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._print(task_id)

    def _print(self, task_id: TaskID) -> None:
        task, now = self._tasks[task_id], time.monotonic()
        unfinished = task.total is None or task.completed < task.total
        if unfinished and now - self.printed.get(task_id, -1e9) < self.every:
            return
        self.printed[task_id] = now
        total = f"/{task.total:.0f}" if task.total is not None else ""
        line = f"{task.description}  {task.completed:.0f}{total}  {task.elapsed or 0:.0f} s"
        console.print(line, markup=False, highlight=False, soft_wrap=True)


@contextmanager
def status(what: str) -> Iterator[None]:
    """A step without a count (writing the results, the UMAP, logging the model): a spinner on a terminal; in a
    captured log a plain line when it starts and one with its seconds when it ends, so a long step is not silent."""
    if console.is_terminal:
        with console.status(what):
            yield
        return
    console.print(f"{what} ...", markup=False, highlight=False, soft_wrap=True)
    start = time.monotonic()
    yield
    console.print(f"{what}: {time.monotonic() - start:.0f} s", markup=False, highlight=False, soft_wrap=True)


def progress_bars(*columns: ProgressColumn) -> Progress:
    """Rich bars (the given columns, then elapsed and remaining time) on a terminal; in a captured log, plain
    lines (see `_LogLines`), so that a log file reads as text rather than cut-off bars."""
    if console.is_terminal:
        return Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    return _LogLines()


class _RichProgress:
    """Draws one rich bar per build stage from the build's progress callback."""

    def __init__(self, progress: Progress):
        self.progress, self.tasks = progress, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done)


def build_with_progress(
    config: BuildConfig,
    workers: int | None = 1,
    scheduler: str | None = None,
    ray_address: str | None = None,
    dashboard: bool = False,
) -> Path:
    """build_store with rich bars per stage (a failed build raises AtlasInputError and writes nothing), on
    `workers` local worker processes (None: every core; 1: this process; with `dashboard` they serve dask's
    dashboard), on the dask cluster at `scheduler` or on the Ray cluster at `ray_address` ("local": a new one
    here; `workers` actors, None: one per CPU), whose dashboard link is printed."""

    def announce(link: str | None) -> None:
        if ray_address is not None:
            where = f"Ray cluster at {ray_address} ({executor.workers} actors)"
        else:
            where = f"dask cluster at {scheduler}" if scheduler else f"{workers} local dask workers"
        console.print(f"building on the {where}" + (f"; dashboard: {link}" if link else ""))

    if scheduler is not None and ray_address is not None:
        raise ConfigError("give --scheduler (a dask cluster) or --ray (a Ray cluster), not both")
    if ray_address is not None:
        from atlasvi.launch.ray_build import RayBuildExecutor  # Ray only when asked for

        address = None if ray_address == "local" else ray_address
        executor: BuildExecutor = RayBuildExecutor(workers, address, on_start=announce)
    elif scheduler is not None:
        executor = BuildExecutor.connect(scheduler, on_start=announce)
    else:
        workers = workers or default_workers()
        executor = BuildExecutor()
        if workers > 1:
            executor = BuildExecutor.local(workers, on_start=announce, dashboard=dashboard)
    with executor, progress_bars(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn()) as bars:
        return build_store(config, _RichProgress(bars), executor)


def write_atomic(path: Path, text: str) -> Path:
    """Write `text` beside `path`, then rename it into place (a reader never sees half a file)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)
    return path


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else the local SQLite store in the working folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri(Path.cwd())


def check_writable(folder: str | Path, what: str) -> None:
    """Refuse, before any work, a folder this command cannot write (read-only file system, no permission): a
    probe file is made and removed in it (or in its nearest existing parent, where the command would make it)."""
    folder = Path(folder)
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".atlasvi-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise AtlasviError(f"{folder}: cannot write {what} there ({err.strerror})") from None


def check_store_writable(store: str) -> None:
    """A local store the command writes results into: the store folder and the folder beside it (where the
    staged copy and the writer's lock go). A URL store is not checked (results go only into local stores)."""
    if is_url(store):
        return
    check_writable(Path(store), "results into the store")
    check_writable(Path(store).resolve().parent, f"results into the store {store}")


def refuse_without(model: Path, model_class: type, attribute: str, what: str, where: str) -> None:
    """One error line, before loading, where a saved model's class lacks `attribute` (a capability such as
    differential_expression): it names the model, `what` it lacks and, after `where`, the methods that have it."""
    if hasattr(model_class, attribute):
        return
    having = [name for name, cls in METHODS.items() if hasattr(cls, attribute)]
    raise AtlasviError(f"{model}: a {model_class.__name__} model has no {what}; {where} {', '.join(having)}")
