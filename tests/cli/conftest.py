"""Fixtures of the CLI tests."""

import shutil

import pytest


@pytest.fixture
def workdir(tmp_path, embedded_store, monkeypatch):
    """A working folder with a copy of the embedded store; MLflow's default local store lands in it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copytree(embedded_store, tmp_path / "store.zarr")
    return tmp_path
