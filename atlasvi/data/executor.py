"""Where a build's tasks run: in this process, on a local dask cluster (every core), or on a dask.distributed
cluster given by its scheduler address.

A build is a few passes, each a list of independent tasks (a chunk of an input's cells, a shuffle bucket, a
shard of the store). `BuildExecutor.map` runs one pass and yields each task's result as it completes; the build
folds the results (in any order: what it folds is exact, see `atlasvi.data.exact`). One worker runs the tasks
here, one after the other, with no scheduler. Several workers are a `distributed.LocalCluster` of worker
processes (or threads), started on the first pass that has more than one task; `connect` uses a running cluster
(`dask scheduler` / `dask worker`, or dask-jobqueue / dask-kubernetes), whose workers must see the inputs and the
output folder at the same paths. Tasks are module-level functions of `atlasvi.data.build`, so workers need
atlasvi installed.
"""

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from atlasvi.data.errors import AtlasInputError

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): called as work advances (the CLI draws rich bars from it)."""


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_cluster_config() -> dict[str, Any]:
    """The dask settings of the local cluster a build starts (`BuildExecutor.local`); a cluster given by its
    scheduler address keeps its own.

    - Worker processes are spawned (dask's default): each starts an interpreter and imports distributed and
      atlasvi's readers anew, ~3.7 CPU s a worker on the 2-core VM. Forking them from this process saved that,
      but a forked worker was once seen to hang on a lock the driver's threads held at the fork (in the tests).
    - Fewer wake-ups of dask's bookkeeping, which costs CPU for every second the build runs, not for its work:
      the tick monitor (20 ms -> 1 s: it only warns about a blocked event loop), the statistical profiler of
      each worker (every 10 ms: the dashboard's profile page stays empty), the system monitor (0.5 -> 2 s) and the
      memory monitors of each worker and nanny (0.1 -> 1 s). Idle, the driver and 2 workers took 0.12 CPU s per
      second with dask's defaults, 0.02 so (over a 30-minute build of 10M cells under load: ~200 CPU s).
    - dask gives worker processes MALLOC_TRIM_THRESHOLD_, which turns off glibc's dynamic mmap threshold: every
      large temporary array of a task is then mapped and faulted in anew (passes 2-3x slower here); not given.
    """
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return {
        "distributed.nanny.pre-spawn-environ": environ,
        "distributed.admin.tick.interval": "1s",
        "distributed.worker.profile.enabled": False,
        "distributed.admin.system-monitor.interval": "2s",
        "distributed.worker.memory.monitor-interval": "1s",
    }


class PassProgress:
    """The progress of one pass of tasks: progress(stage, 0, total) at the start, then advanced by each task's
    weight (e.g. its cells; 1 each without weights) as it completes. What every executor's `map` reports."""

    def __init__(self, stage: str, progress: Progress, n_tasks: int, weights: Sequence[int] | None = None):
        self.stage, self.progress = stage, progress
        self.weights = list(weights) if weights is not None else [1] * n_tasks
        self.total, self.done = sum(self.weights), 0
        progress(stage, 0, self.total)

    def completed(self, i: int) -> None:
        """Task i has completed."""
        self.done += self.weights[i]
        self.progress(self.stage, self.done, self.total)


class BuildExecutor:
    """Runs a build's tasks. `BuildExecutor()` (one worker, this process), `BuildExecutor.local(n)` (a local
    dask cluster of n worker processes, or threads with processes=False) or `BuildExecutor.connect(address)`
    (a running dask.distributed scheduler). Use it as a context manager, or call `close`."""

    def __init__(
        self,
        workers: int = 1,
        processes: bool = True,
        address: str | None = None,
        on_start: Callable[[str | None], None] | None = None,
        dashboard: bool = True,
    ):
        """on_start(dashboard link, None without one): called when the cluster is started or connected to.
        dashboard: whether a local cluster serves dask's dashboard (a cluster given by its address has its own)."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers, self.processes, self.address, self.on_start = workers, processes, address, on_start
        self.dashboard = dashboard
        self._cluster = None
        self._client = None
        self._prefix = f"atlasvi-build-{uuid.uuid4().hex[:8]}"

    @classmethod
    def local(
        cls,
        workers: int | None = None,
        processes: bool = True,
        on_start: Callable[[str | None], None] | None = None,
        dashboard: bool = False,
    ) -> "BuildExecutor":
        """A local dask cluster of `workers` (default: every core) single-threaded workers; with `dashboard`, it
        serves dask's dashboard (its start costs ~1.1 CPU s here, bokeh's, a 1M-cell build's ~2%)."""
        return cls(workers or default_workers(), processes=processes, on_start=on_start, dashboard=dashboard)

    @classmethod
    def connect(cls, address: str, on_start: Callable[[str | None], None] | None = None) -> "BuildExecutor":
        """The dask.distributed cluster whose scheduler listens at `address` (e.g. tcp://10.0.0.1:8786)."""
        executor = cls(address=address, on_start=on_start)
        executor._start()
        return executor

    @property
    def distributed(self) -> bool:
        return self.address is not None or self.workers > 1

    @property
    def client(self):
        """The dask.distributed Client (None while no cluster runs: one worker, or before the first pass)."""
        return self._client

    @property
    def dashboard_link(self) -> str | None:
        if self._client is None or (self._cluster is not None and not self.dashboard):
            return None
        return self._client.dashboard_link

    def _start(self) -> None:
        if self._client is not None:
            return
        from distributed import Client, LocalCluster

        if self.address is not None:
            try:
                self._client = Client(self.address, set_as_default=False, timeout=30)
            except OSError as err:
                raise AtlasInputError(f"{self.address}: no dask scheduler answers there ({err})") from err
        else:
            import dask

            with dask.config.set(local_cluster_config()):
                self._cluster = LocalCluster(
                    n_workers=self.workers,
                    threads_per_worker=1,
                    processes=self.processes,
                    dashboard_address=":0" if self.dashboard else None,
                    silence_logs=logging.ERROR,
                )
            self._client = Client(self._cluster, set_as_default=False)
        if self.on_start is not None:
            self.on_start(self.dashboard_link)

    def share(self, value: Any) -> Any:
        """`value` as a task argument sent to each worker once (a scattered future), or itself in this process."""
        if self._client is None:
            return value
        return self._client.scatter(value, broadcast=True, hash=False)

    def map(
        self,
        fn: Callable[..., Any],
        tasks: Sequence[tuple],
        stage: str,
        progress: Progress,
        weights: Sequence[int] | None = None,
        shared: tuple = (),
    ) -> Iterator[tuple[int, Any]]:
        """Run fn(*shared, *task) for every task; yield (task index, result) as each completes. progress(stage,
        done, total) advances by each task's weight (e.g. its cells). A task's error is raised here, the other
        tasks cancelled and waited for (none writes after this returns)."""
        if tasks:
            yield from self._run(fn, tasks, PassProgress(stage, progress, len(tasks), weights), shared)

    def _run(
        self, fn: Callable[..., Any], tasks: Sequence[tuple], advance: PassProgress, shared: tuple
    ) -> Iterator[tuple[int, Any]]:
        """`map` of a pass of one or more tasks, its progress started."""
        if self.distributed and len(tasks) > 1:
            self._start()
        if self._client is None:
            for i, task in enumerate(tasks):
                result = fn(*shared, *task)
                advance.completed(i)
                yield i, result
            return
        from distributed import as_completed

        shared = tuple(self.share(value) for value in shared)
        keys = [f"{self._prefix}-{advance.stage}-{i}" for i in range(len(tasks))]
        futures = [
            self._client.submit(fn, *shared, *task, key=key, pure=False) for key, task in zip(keys, tasks, strict=True)
        ]
        index = {future.key: i for i, future in enumerate(futures)}
        try:
            for future, result in as_completed(futures, loop=self._client.loop, with_results=True):
                i = index[future.key]
                futures[i] = None  # release the result on the worker
                advance.completed(i)
                yield i, result
        except BaseException:
            self._stop([f for f in futures if f is not None])
            raise

    def _stop(self, futures: list) -> None:
        """Cancel `futures` and wait (up to a minute) until no task of this build runs on any worker."""
        with contextlib.suppress(Exception):
            self._client.cancel(futures)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                running = self._client.processing()
            except (OSError, RuntimeError, TimeoutError):  # the cluster is gone: nothing runs
                return
            if not any(str(key).startswith(self._prefix) for keys in running.values() for key in keys):
                return
            time.sleep(0.1)

    def run_on_workers(self, fn: Callable[[], Any]) -> dict[str, Any]:
        """fn() on every worker (or here): {worker address (or "local"): result}."""
        if self._client is None:
            return {"local": fn()}
        return self._client.run(fn)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def __enter__(self) -> "BuildExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
