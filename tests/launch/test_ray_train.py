"""The one loop under Ray Train on this machine: 2 CPU workers (gloo) on a real store.

Slow (Ray starts workers; ~1-3 min each on 2 cores): `make test-slow` runs them.
"""

import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from atlasvi.data import LoaderConfig
from atlasvi.launch import DistributedConfig, connect, train_distributed
from atlasvi.models.scvi import SCVIModule
from atlasvi.tracking import EpochLogger, MlflowRun
from atlasvi.train import EpochRecord, TrainConfig
from atlasvi.train.job import TrainJobConfig, make_loaders
from atlasvi.train.loop import fit, read_checkpoint

pytestmark = pytest.mark.slow

EPOCHS = 12


def _job(store: Path, batch_size: int) -> TrainJobConfig:
    return TrainJobConfig(
        store=str(store),
        train=TrainConfig(max_epochs=EPOCHS, n_epochs_kl_warmup=4, seed=0),
        loader=LoaderConfig(batch_size=batch_size, seed=0),
    )


@pytest.fixture(scope="module")
def ray_local():
    import ray

    connect(None)
    yield
    ray.shutdown()


class KillOnce:
    """Logs like EpochLogger; once, 0.3 s after logging `epoch` (in the next epoch's steps), SIGKILLs its worker."""

    def __init__(self, logger: EpochLogger, marker: Path, epoch: int):
        self.logger, self.marker, self.epoch = logger, marker, epoch

    def __call__(self, record: EpochRecord) -> None:
        self.logger(record)
        if record.epoch == self.epoch and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGKILL)).start()


def test_two_workers_match_one_and_read_disjoint_shards(embedded_store, tmp_path, ray_local):
    """The global batch 128, split into 2 workers x 64: the held-out ELBO of 1 plain process at 128, within 2%."""
    job = _job(embedded_store, 128)
    run = DistributedConfig(num_workers=2, storage_path=str(tmp_path / "ray"), name="two")
    checkpoint, metrics = train_distributed(job, str(embedded_store), run)
    _, two = read_checkpoint(checkpoint)

    from atlasvi.data import open_store

    store = open_store(embedded_store)
    torch.manual_seed(0)
    module = SCVIModule(store.schema)
    train, validation = make_loaders(store, job.loader, 0.1)
    one = fit(module, train, validation, job.train)
    assert len(two) == len(one) == EPOCHS
    assert two[-1].validation_elbo == pytest.approx(one[-1].validation_elbo, rel=0.02)
    assert two[-1].validation_elbo < 0.9 * two[0].validation_elbo
    # every rank read only its shard: 1267 training + 141 held-out rows, split in 2 (n mod 2 left out)
    assert metrics["rows_read_by_several_ranks"] == 0
    assert metrics["rank_rows_read"] == [633 + 70, 633 + 70]


def test_a_killed_worker_is_restarted_and_the_run_resumes(embedded_store, tmp_path, ray_local):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowRun(uri, "atlasvi", run_name="killed")
    logger = EpochLogger(uri, "atlasvi", tracker.run_id)
    job = _job(embedded_store, 128)
    run = DistributedConfig(num_workers=2, storage_path=str(tmp_path / "ray"), name="killed", max_failures=1)
    hook = KillOnce(logger, tmp_path / "killed.pid", epoch=3)  # dies in epoch 4
    checkpoint, _ = train_distributed(job, str(embedded_store), run, on_epoch_end=hook, on_restart=logger.restarted)
    assert (tmp_path / "killed.pid").exists()  # a worker did die
    _, history = read_checkpoint(checkpoint)
    assert [r.epoch for r in history] == list(range(EPOCHS))
    steps = [m.step for m in tracker.client.get_metric_history(tracker.run_id, "validation_elbo")]
    assert steps == list(range(EPOCHS))  # every epoch once, though the group recomputed some
    (restart,) = tracker.client.get_metric_history(tracker.run_id, "resumed_at_epoch")
    # the group resumed from the last checkpoint Ray had registered (epoch 3's, or an earlier one if the
    # controller had not yet taken in epoch 3's report when the worker died)
    assert 1 <= restart.value <= 4

    reference = train_distributed(
        job, str(embedded_store), DistributedConfig(num_workers=2, storage_path=str(tmp_path / "ray"), name="whole")
    )[0]
    assert history[-1].validation_elbo == pytest.approx(read_checkpoint(reference)[1][-1].validation_elbo, rel=0.01)


def test_the_same_run_started_again_resumes_from_its_checkpoint(embedded_store, tmp_path, ray_local):
    """A driver that died: starting the same run name and storage path again resumes, it does not restart."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowRun(uri, "atlasvi", run_name="again")
    logger = EpochLogger(uri, "atlasvi", tracker.run_id)
    run = DistributedConfig(num_workers=2, storage_path=str(tmp_path / "ray"), name="again")
    short = _job(embedded_store, 128).model_copy(update={"train": TrainConfig(max_epochs=2, n_epochs_kl_warmup=4)})
    train_distributed(short, str(embedded_store), run, on_epoch_end=logger, on_restart=logger.restarted)
    checkpoint, _ = train_distributed(
        _job(embedded_store, 128), str(embedded_store), run, on_epoch_end=logger, on_restart=logger.restarted
    )
    assert [r.epoch for r in read_checkpoint(checkpoint)[1]] == list(range(EPOCHS))
    (restart,) = tracker.client.get_metric_history(tracker.run_id, "resumed_at_epoch")
    assert restart.value == 2
    assert [m.step for m in tracker.client.get_metric_history(tracker.run_id, "validation_elbo")] == list(range(EPOCHS))
