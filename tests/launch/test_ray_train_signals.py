"""train_distributed puts the caller's SIGINT handler back after TorchTrainer.fit, which (Ray Train V2) installs
a handler that does not raise KeyboardInterrupt and leaves it installed. Ray is not started: a stand-in trainer
installs a handler as Ray's fit does."""

import signal
import threading

import pytest

import atlasvi.launch.ray_train as ray_train
from atlasvi.launch import DistributedConfig, train_distributed
from atlasvi.train.job import TrainJobConfig


class _Result:
    checkpoint = None
    error = "stand-in"
    metrics: dict = {}


class _Trainer:
    """Records the SIGINT handler during fit after installing a non-raising one (main thread only, as Ray)."""

    handler_in_fit = None

    def __init__(self, *args, fail: bool = False, **kwargs):
        self.fail = fail

    def fit(self) -> _Result:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, lambda signum, frame: None)
        _Trainer.handler_in_fit = signal.getsignal(signal.SIGINT)
        if self.fail:
            raise RuntimeError("the run failed")
        return _Result()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@pytest.mark.parametrize("fail", [False, True])
def test_ctrl_c_raises_again_after_a_ray_run(monkeypatch, tmp_path, fail):
    monkeypatch.setattr(ray_train, "TorchTrainer", lambda *a, **k: _Trainer(*a, fail=fail, **k))
    run = DistributedConfig(num_workers=2, storage_path=str(tmp_path), name="run")
    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        with pytest.raises(RuntimeError, match="the run failed" if fail else "ended without a checkpoint"):
            train_distributed(TrainJobConfig(), "store", run, spec=object())
        assert _Trainer.handler_in_fit not in (_interrupt, None)  # the stand-in replaced it during fit
        assert signal.getsignal(signal.SIGINT) is _interrupt
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_run_outside_the_main_thread_leaves_handlers_alone(monkeypatch, tmp_path):
    """In a Tune trial (a thread) neither Ray nor train_distributed may set a handler (signal.signal raises)."""
    monkeypatch.setattr(ray_train, "TorchTrainer", _Trainer)
    run = DistributedConfig(num_workers=2, storage_path=str(tmp_path), name="run")
    before = signal.getsignal(signal.SIGINT)
    errors: list[BaseException] = []

    def trial() -> None:
        try:
            train_distributed(TrainJobConfig(), "store", run, spec=object())
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            errors.append(err)

    thread = threading.Thread(target=trial)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "ended without a checkpoint" in str(errors[0])
    assert signal.getsignal(signal.SIGINT) is before
