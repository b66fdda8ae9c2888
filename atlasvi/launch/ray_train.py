"""Ray Train (V2 API): `TorchTrainer` runs `atlasvi.train.fit` in N DDP workers, on one node or many.

Each worker opens the store itself and streams its own shard (the loader's rank / world size): no cell
passes through the driver and Ray Data makes no copy. Rank 0 alone writes the checkpoint (the loop's
`last.pt`, and where asked the model as `atlasvi train` saves it, `MODEL_DIR`) and hands it to `ray.train.report`,
which persists it under `storage_path/name`; every rank
reports each epoch (Ray's barrier). When a worker dies, Ray restarts the group (`max_failures` times)
and every worker resumes from the last reported checkpoint: model, optimizer, loader position, each
rank's RNG. Running the same `name` and `storage_path` again after the driver died resumes as well.

`loader.batch_size` is the global batch, split over the workers (`rank_batch_size`: ceil(batch / workers) cells
each): N workers take one worker's optimiser steps per epoch on one worker's batch, with the same learning rate,
so they reach the one-worker model in the same epochs.
"""

import contextlib
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from atlasvi.data import open_store
from atlasvi.models.registry import get_entry
from atlasvi.models.saving import save_model
from atlasvi.train import EpochRecord, fit
from atlasvi.train.job import ModuleSpec, TrainJobConfig, build_module, make_loaders, module_spec, pretrained_train
from atlasvi.train.loop import CHECKPOINT_NAME

MODEL_DIR = "model"  # the saved model (model.json, model.pt) in a checkpoint, where the run asks for it


@dataclass(frozen=True)
class DistributedConfig:
    """How to run: workers, GPUs, the Ray cluster, where checkpoints persist (an absolute path or URI).

    resources_per_worker: extra Ray resources each worker needs (e.g. a custom per-node resource that
    places one worker per node); cpu_threads: torch intra-op threads per CPU worker.
    """

    num_workers: int
    storage_path: str
    name: str
    use_gpu: bool = False
    max_failures: int = 0
    resources_per_worker: dict[str, float] | None = None
    cpu_threads: int = 1


class _Hooks:
    """What the driver asks of rank 0: log each epoch, note a restart (both picklable callables)."""

    def __init__(self, on_epoch_end: Callable[[EpochRecord], None] | None, on_restart: Callable[[int], None] | None):
        self.on_epoch_end, self.on_restart = on_epoch_end, on_restart


def _shard_audit(rows_read: np.ndarray) -> dict:
    """Gathered on every rank: which node each rank ran on, rows it read, rows read by more than one rank."""
    mine = {"node": ray.get_runtime_context().get_node_id(), "rows": np.packbits(rows_read)}
    ranks = [mine]
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    bitmaps = np.stack([np.unpackbits(r["rows"])[: len(rows_read)].astype(bool) for r in ranks])
    return {
        "rank_nodes": [r["node"] for r in ranks],
        "rank_rows_read": bitmaps.sum(axis=1).tolist(),
        "rows_read_by_several_ranks": int((bitmaps.sum(axis=0) > 1).sum()),
        "rows_read": int(bitmaps.any(axis=0).sum()),
    }


def _worker(config: dict) -> None:
    """One Ray Train worker: its shard of the store, the one training loop, reports per epoch."""
    job = TrainJobConfig.model_validate(config["job"])
    hooks: _Hooks = config["hooks"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(config["cpu_threads"])
    spec: ModuleSpec = config["module"]
    store = open_store(config["store"], backend=job.loader.backend)
    # the same initial weights everywhere (DDP broadcasts rank 0's anyway)
    module = build_module(job.model, spec.schema, job.train.seed, spec.init_state).to(device)
    train, validation = make_loaders(
        store, job.loader, job.train.validation_fraction, rank, world_size, spec.code_maps, spec.modalities, device
    )
    local = Path(tempfile.mkdtemp(prefix=f"atlasvi-rank{rank}-"))
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            shutil.copy(Path(directory) / CHECKPOINT_NAME, local / CHECKPOINT_NAME)
    started = {"restart_noted": restored is None}

    def on_epoch_end(record: EpochRecord) -> None:
        if rank == 0 and not started["restart_noted"] and hooks.on_restart is not None:
            hooks.on_restart(record.epoch)
            started["restart_noted"] = True
        if rank == 0 and hooks.on_epoch_end is not None:
            hooks.on_epoch_end(record)
        if rank == 0 and config.get("saved") is not None:  # the model as `atlasvi train` saves it, rank 0 writes
            state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
            save_model(local / MODEL_DIR, get_entry(job.model.name).saved_name, config["saved"], spec.schema, state)
        metrics = {k: v for k, v in asdict(record).items() if k != "step_losses"} | _shard_audit(store.rows_read)
        metrics["epochs_done"] = record.epoch + 1
        checkpoint = ray.train.Checkpoint.from_directory(str(local)) if rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{record.epoch:05d}")

    with train, validation:
        fit(module, train, validation, pretrained_train(job, store), checkpoint_dir=local, on_epoch_end=on_epoch_end)
    shutil.rmtree(local, ignore_errors=True)


@contextlib.contextmanager
def _sigint_kept() -> Iterator[None]:
    """This process's SIGINT handler is put back after the block. TorchTrainer.fit (Ray Train V2) installs one
    that aborts the run and does not raise KeyboardInterrupt, and leaves it installed: after it, Ctrl-C would no
    longer interrupt this process (a notebook, a later build). Only the main thread can set handlers (Ray skips
    its handler elsewhere, e.g. in a Tune trial), and a handler not set from Python (None) cannot be put back."""
    handler = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` ("auto": the one this node belongs to), or start a local one."""
    if not ray.is_initialized():
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)


def train_distributed(
    job: TrainJobConfig,
    store: str,
    run: DistributedConfig,
    on_epoch_end: Callable[[EpochRecord], None] | None = None,
    on_restart: Callable[[int], None] | None = None,
    callbacks: list | None = None,
    spec: ModuleSpec | None = None,
    saved: dict | None = None,
) -> tuple[Path, dict]:
    """Train in `run.num_workers` Ray Train workers; returns (the final checkpoint file, rank 0's last metrics).

    Ray must be initialised (ray.init) by the caller. on_epoch_end / on_restart run on rank 0 (they are
    pickled into the worker). `store` must be readable from every node (shared filesystem or URL).
    callbacks: Ray Train callbacks (a sweep passes Tune's TuneReportCallback). spec: the module's registry,
    code maps and start weights, shipped to the workers (None: `module_spec` of the job on `store`, read here).
    Ctrl-C during the run aborts it (Ray's handler); this process's own SIGINT handler is back afterwards.
    saved: model.json's config (`saved_config`): rank 0 then also writes the model as `atlasvi train` saves it
    into each epoch's checkpoint (`MODEL_DIR`; a sweep logs a trial's last one as its MLflow Model).
    """
    if not Path(run.storage_path).is_absolute() and "://" not in run.storage_path:
        raise ValueError(f"storage_path {run.storage_path!r} must be absolute (or a URI): every node writes there")
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "job": job.model_dump(mode="json"),
            "store": store,
            "hooks": _Hooks(on_epoch_end, on_restart),
            "module": spec or module_spec(job, open_store(store, backend=job.loader.backend)),
            "cpu_threads": run.cpu_threads,
            "saved": saved,
        },
        scaling_config=ScalingConfig(
            num_workers=run.num_workers,
            use_gpu=run.use_gpu,
            resources_per_worker=run.resources_per_worker or ({"CPU": 1} if not run.use_gpu else None),
        ),
        run_config=RunConfig(
            name=run.name,
            storage_path=run.storage_path,
            failure_config=FailureConfig(max_failures=run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    with _sigint_kept():
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {run.name} ended without a checkpoint: {result.error}")
    final = Path(tempfile.mkdtemp(prefix="atlasvi-final-"))
    with result.checkpoint.as_directory() as directory:
        shutil.copy(Path(directory) / CHECKPOINT_NAME, final / CHECKPOINT_NAME)
    return final / CHECKPOINT_NAME, dict(result.metrics or {})
