"""`atlasvi build` on the Ray cluster the training uses: `RayBuildExecutor` runs each pass's tasks in Ray actors
(one CPU each, spread over the nodes) where `BuildExecutor` runs them on dask workers.

This is not dask on Ray (`ray.util.dask` runs dask graphs; a build pass is a list of independent tasks whose
results are folded as they complete): the same tasks, submitted to Ray. Each actor keeps the inputs it opened
until the build ends, as a dask worker does; each runs one task at a time, so a failed or interrupted pass waits
for at most one task per actor. The actors must see the inputs and the output folder at the same paths.
"""

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray

from atlasvi.data.executor import BuildExecutor, PassProgress


class _BuildActor:
    """Runs fn(*args) for the build, one call at a time."""

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


class RayBuildExecutor(BuildExecutor):
    """A build's tasks on Ray: `workers` actors (None: one per CPU of the cluster) on the cluster at `address`
    ("auto": the one this node belongs to; None: the one this process is connected to, else a new local one).
    on_start(dashboard link) is called once the actors are placed."""

    def __init__(
        self, workers: int | None = None, address: str | None = None, on_start: Callable[[str], None] | None = None
    ):
        super().__init__(workers=workers or 1, on_start=on_start)
        self.ray_address, self._asked = address, workers
        self._actors: list = []
        self._link = ""

    @property
    def distributed(self) -> bool:
        return True

    @property
    def dashboard_link(self) -> str | None:
        return self._link or None

    def _start(self) -> None:
        if self._actors:
            return
        if not ray.is_initialized():
            context = ray.init(address=self.ray_address, logging_level="WARNING", log_to_driver=False)
            url = context.dashboard_url or ""
            self._link = url if not url or "://" in url else f"http://{url}"
        self.workers = self._asked or max(1, int(ray.cluster_resources().get("CPU", 1)))
        actor = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_BuildActor)
        self._actors = [actor.remote() for _ in range(self.workers)]
        if self.on_start is not None:
            self.on_start(self._link or "(no Ray dashboard)")

    def share(self, value: Any) -> Any:
        """`value` put in Ray's object store once (each actor reads it from there)."""
        return ray.put(value)

    def _run(
        self, fn: Callable[..., Any], tasks: Sequence[tuple], advance: PassProgress, shared: tuple
    ) -> Iterator[tuple[int, Any]]:
        """As `BuildExecutor.map`: (task index, result) as each task completes; a task's error is raised here as
        the task raised it (one line: an AtlasInputError names file, cell and gene), after the tasks still running
        have ended."""
        self._start()
        shared = tuple(self.share(value) for value in shared)
        waiting = list(reversed(range(len(tasks))))
        idle = list(self._actors)
        running: dict = {}  # ObjectRef -> (task index, actor)
        try:
            while waiting or running:
                while waiting and idle:
                    i, actor = waiting.pop(), idle.pop()
                    running[actor.call.remote(fn, *shared, *tasks[i])] = (i, actor)
                (ref,), _ = ray.wait(list(running), num_returns=1)
                i, actor = running.pop(ref)
                idle.append(actor)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    cause = err.cause if isinstance(err.cause, BaseException) else err
                    raise cause from err
                advance.completed(i)
                yield i, result
        except BaseException:
            if running:  # nothing of this pass writes after this
                ray.wait(list(running), num_returns=len(running), timeout=60)
            raise

    def run_on_workers(self, fn: Callable[[], Any]) -> dict[str, Any]:
        """fn() on every actor (or here, before any started): {actor number (or "local"): result}."""
        if not self._actors:
            return {"local": fn()}
        return {str(i): value for i, value in enumerate(ray.get([a.call.remote(fn) for a in self._actors]))}

    def close(self) -> None:
        """End the actors (Ray itself keeps running: the training may use it next)."""
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
