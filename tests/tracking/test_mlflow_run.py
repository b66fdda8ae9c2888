"""`MlflowRun` as a context manager: every way out of the block ends the run, none leaves it RUNNING."""

import pytest
import typer
from mlflow.tracking import MlflowClient

from atlasvi.errors import AtlasviError
from atlasvi.tracking import MlflowRun


@pytest.fixture
def uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _ended(uri: str, run_id: str) -> tuple[str, str | None]:
    run = MlflowClient(uri).get_run(run_id)
    return run.info.status, run.data.tags.get("error")


def test_a_block_that_ends_normally_finishes_the_run(uri):
    with MlflowRun(uri, "atlasvi", run_name="ok") as run:
        assert _ended(uri, run.run_id) == ("RUNNING", None)
    assert _ended(uri, run.run_id) == ("FINISHED", None)


@pytest.mark.parametrize(
    ("error", "status", "tag"),
    [
        (AtlasviError("store.zarr: no atlas store here"), "FAILED", "AtlasviError: store.zarr: no atlas store here"),
        (ValueError("bad"), "FAILED", "ValueError: bad"),
        (typer.Exit(2), "FAILED", "Exit (exit code 2)"),
        (SystemExit(3), "FAILED", "SystemExit (exit code 3)"),
        (KeyboardInterrupt(), "KILLED", "interrupted (KeyboardInterrupt: Ctrl-C)"),
    ],
)
def test_every_error_ends_the_run_failed_or_killed_with_the_error(uri, error, status, tag):
    with pytest.raises(type(error)), MlflowRun(uri, "atlasvi") as run:
        raise error
    assert _ended(uri, run.run_id) == (status, tag)


def test_an_exit_with_code_0_finishes_and_an_explicit_finish_is_kept(uri):
    with pytest.raises(typer.Exit), MlflowRun(uri, "atlasvi") as run:
        raise typer.Exit(0)
    assert _ended(uri, run.run_id) == ("FINISHED", None)
    with pytest.raises(RuntimeError), MlflowRun(uri, "atlasvi") as run:
        run.finish()
        raise RuntimeError("after the end: e.g. printing the summary")
    assert _ended(uri, run.run_id) == ("FINISHED", None)


def test_a_resumed_run_is_running_again_renamed_and_tagged(uri):
    with MlflowRun(uri, "atlasvi", run_name="first") as first:
        pass
    with MlflowRun(uri, "other", run_name="second", run_id=first.run_id, tags={"k": "v"}) as again:
        run = MlflowClient(uri).get_run(first.run_id)
        assert (run.info.status, run.info.run_name, run.data.tags["k"]) == ("RUNNING", "second", "v")
        assert again.experiment_id == run.info.experiment_id  # the run's own experiment, not "other"
    assert _ended(uri, first.run_id) == ("FINISHED", None)
