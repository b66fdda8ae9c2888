"""`atlasvi train` and its output folder: one writer at a time, a run that belongs to its folder, a resume
that truly continues (or is refused), no run left RUNNING, no latent replaced behind another run's back."""

import json
import shutil
import signal
import subprocess
import sys
import time

import anndata as ad
import numpy as np
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from atlasvi.api import SCVI
from atlasvi.cli.main import app
from atlasvi.train.lock import LOCK_NAME

runner = CliRunner()


def _train(*flags: str, output: str = "out"):
    args = ["train", "--store", "store.zarr", "--output", output, "--n-epochs-kl-warmup", "2"]
    return runner.invoke(app, [*args, *flags])


def _runs(workdir) -> dict[str, tuple[str, list[int], str | None]]:
    """run name -> (status, epochs logged, error tag) of every run in the local MLflow store."""
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    found = {}
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        epochs = [m.step for m in client.get_metric_history(run.info.run_id, "validation_elbo")]
        found[run.info.run_name] = (run.info.status, epochs, run.data.tags.get("error"))
    return found


def test_a_second_command_on_a_held_output_folder_is_refused_naming_the_holder(workdir):
    ready = workdir / "ready"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from atlasvi.train.lock import OutputLock; "
         "lock = OutputLock('out', command='atlasvi train (the other one)').acquire(); "
         "open(sys.argv[1], 'w').close(); time.sleep(600)", str(ready)],
    )  # fmt: skip
    try:
        for _ in range(300):
            if ready.exists():
                break
            time.sleep(0.1)
        result = _train("--max-epochs", "1")
        assert result.exit_code == 1, result.output
        assert "another command is writing into this output folder" in result.output
        assert f"pid {holder.pid}" in result.output and "atlasvi train (the other one)" in result.output
        assert not (workdir / "mlruns").exists() or _runs(workdir) == {}  # no run was opened
        assert sorted(p.name for p in (workdir / "out").iterdir()) == [LOCK_NAME]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without releasing: its lock is stale and taken over, with a note
    assert json.loads((workdir / "out" / LOCK_NAME).read_text())["pid"] == holder.pid
    result = _train("--max-epochs", "1")
    assert result.exit_code == 0, result.output
    assert f"took over the lock its holder left when it ended (pid {holder.pid}" in result.output
    assert not (workdir / "out" / LOCK_NAME).exists()
    assert _runs(workdir) == {"out": ("FINISHED", [0], None)}


def test_a_copied_output_folder_does_not_resume_or_touch_the_original_run(workdir):
    assert _train("--max-epochs", "1").exit_code == 0
    shutil.copytree(workdir / "out", workdir / "copy")
    result = _train("--max-epochs", "2", output="copy")
    assert result.exit_code == 2, result.output
    assert "a copy of the output folder" in result.output and "--overwrite" in result.output
    assert _runs(workdir) == {"out": ("FINISHED", [0], None)}
    result = _train("--max-epochs", "2", "--overwrite", "--latent-key", "X_copy", output="copy")
    assert result.exit_code == 0, result.output
    assert _runs(workdir) == {"out": ("FINISHED", [0], None), "copy": ("FINISHED", [0, 1], None)}
    record = json.loads((workdir / "copy" / "run.json").read_text())
    assert record["output"] == str((workdir / "copy").resolve())
    # a moved folder (its original is gone) is still its run's folder and resumes it
    shutil.rmtree(workdir / "out")
    shutil.move(workdir / "copy", workdir / "moved")
    result = _train("--max-epochs", "3", "--latent-key", "X_copy", output="moved")
    assert result.exit_code == 0, result.output
    assert _runs(workdir) == {"out": ("FINISHED", [0], None), "moved": ("FINISHED", [0, 1, 2], None)}  # renamed


def test_resuming_with_settings_that_change_the_result_is_refused_with_the_flag(workdir):
    assert _train("--max-epochs", "2").exit_code == 0
    # the README's Ray command after the demo: Ray workers cannot continue this process's checkpoint
    result = _train("--max-epochs", "2", "--num-workers", "2")
    assert result.exit_code == 2, result.output
    assert "another runner config (runner 1 worker(s) in this process -> 2 in Ray Train workers" in result.output
    assert "--overwrite" in result.output
    result = _train("--max-epochs", "2", "--lr", "0.01")
    assert result.exit_code == 2 and "train.lr 0.001 -> 0.01" in result.output
    result = _train("--max-epochs", "2", "--model", "scanvi", "--output", "out")
    assert result.exit_code == 2 and "model.name scvi -> scanvi" in result.output.replace("\n", "")
    # settings that change nothing computed: a longer run continues the same MLflow run
    result = _train("--max-epochs", "3", "--run-name", "renamed")
    assert result.exit_code == 0, result.output
    assert _runs(workdir) == {"renamed": ("FINISHED", [0, 1, 2], None)}


def test_a_checkpoint_without_a_run_record_is_not_resumed_silently(workdir):
    assert _train("--max-epochs", "1").exit_code == 0
    (workdir / "out" / "run.json").unlink()
    result = _train("--max-epochs", "2")
    assert result.exit_code == 2 and "holds a checkpoint that no run.json describes" in result.output


def test_a_failing_train_ends_its_run_failed_and_an_interrupted_one_killed(workdir, monkeypatch):
    def no_space(self, directory):
        raise OSError(28, "No space left on device")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(SCVI, "save", no_space)
        assert _train("--max-epochs", "1").exit_code != 0
    assert _runs(workdir) == {"out": ("FAILED", [0], "OSError: [Errno 28] No space left on device")}
    with monkeypatch.context() as patch:
        patch.setattr(SCVI, "fit", interrupted)
        assert _train("--max-epochs", "1", output="other").exit_code != 0
    assert _runs(workdir)["other"] == ("KILLED", [], "interrupted (KeyboardInterrupt: Ctrl-C)")


def test_another_output_folders_run_does_not_replace_the_latent(workdir):
    assert _train("--max-epochs", "1").exit_code == 0
    demo = ad.read_zarr(workdir / "store.zarr").obsm["X_scvi"]
    result = _train("--max-epochs", "1", "--n-latent", "5", output="other")
    assert result.exit_code == 2, result.output
    assert "obsm['X_scvi'] was written by the run of output folder" in result.output
    assert str((workdir / "out").resolve()) in result.output and "--latent-key" in result.output
    assert not (workdir / "other").exists()  # refused before anything was written
    result = _train("--max-epochs", "1", "--latent-key", "a/b", output="other")
    assert result.exit_code == 2 and "latent_key 'a/b' is not a usable obsm key" in result.output
    np.testing.assert_array_equal(ad.read_zarr(workdir / "store.zarr").obsm["X_scvi"], demo)
    assert _train("--max-epochs", "1", "--n-latent", "5", "--latent-key", "X_other", output="other").exit_code == 0
    adata = ad.read_zarr(workdir / "store.zarr")
    assert adata.obsm["X_other"].shape == (1408, 5)
    np.testing.assert_array_equal(adata.obsm["X_scvi"], demo)
    result = _train("--max-epochs", "2")  # the same folder's run re-writes its own key
    assert result.exit_code == 0, result.output
    assert _train("--max-epochs", "1", "--n-latent", "5", "--overwrite", output="other").exit_code == 0
    assert ad.read_zarr(workdir / "store.zarr").obsm["X_scvi"].shape == (1408, 5)


def test_a_run_left_running_by_a_killed_command_is_ended_when_its_folder_starts_afresh(workdir):
    assert _train("--max-epochs", "1").exit_code == 0
    record = json.loads((workdir / "out" / "run.json").read_text())
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    client.update_run(record["mlflow_run_id"], status="RUNNING")  # as a SIGKILLed command leaves it
    shutil.copytree(workdir / "out", workdir / "copy")
    assert _train("--max-epochs", "1", "--overwrite", "--latent-key", "X_copy", output="copy").exit_code == 0
    assert client.get_run(record["mlflow_run_id"]).info.status == "RUNNING"  # a copy never touches the original's
    result = _train("--max-epochs", "1", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "is now KILLED" in result.output
    ended = client.get_run(record["mlflow_run_id"])
    assert ended.info.status == "KILLED" and "ended without closing the run" in ended.data.tags["error"]
