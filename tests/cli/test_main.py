"""`atlasvi build` / `atlasvi info` as a user runs them; the shipped configs validate."""

import json
from pathlib import Path

import anndata as ad
import yaml
from typer.testing import CliRunner

from atlasvi.cli.main import app
from atlasvi.data import BuildConfig, LoaderConfig
from tests.conftest import KANG

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_build_with_flags_then_info(tmp_path):
    store = tmp_path / "kang.zarr"
    args = ["build", str(KANG), "-o", str(store), "--batch-key", "sample", "--labels-key", "cell_type"]
    unlabeled = ["--unlabeled-batch", "stim101", "--unlabeled-batch", "stim107"]
    result = runner.invoke(app, [*args, "--n-top-genes", "300", *unlabeled])
    assert result.exit_code == 0, result.output
    built = ad.read_zarr(store)
    assert built.shape == (1556, 300)
    is_stim = built.obs["sample"].astype(str).str.startswith("stim").to_numpy()
    assert set(built.obs["cell_type"].astype(str)[is_stim]) == {"Unknown"}
    assert "Unknown" not in set(built.obs["cell_type"].astype(str)[~is_stim]) and is_stim.sum() == 806
    info = runner.invoke(app, ["info", str(store), "--json"])
    assert json.loads(info.stdout)["categorical"]["sample"] == ["ctrl101", "ctrl107", "stim101", "stim107"]


def test_flags_override_the_yaml_config(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    store = tmp_path / "cellbench.zarr"
    result = runner.invoke(app, ["build", "--config", "configs/build.yaml", "-o", str(store), "--n-top-genes", "250"])
    assert result.exit_code == 0, result.output
    built = ad.read_zarr(store)
    assert built.n_vars == 250 and set(built.obs.columns) == {"batch", "cell_line", "technology"}


def test_a_config_typo_is_an_error_naming_the_field(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump({"inputs": [str(KANG)], "output": str(tmp_path / "x.zarr"), "batch_kye": "s"}))
    result = runner.invoke(app, ["build", "--config", str(config)])
    assert result.exit_code == 2
    assert "unknown field 'batch_kye'" in result.output
    assert not (tmp_path / "x.zarr").exists()


def test_a_failed_build_says_so_and_writes_nothing(tmp_path):
    store = tmp_path / "out.zarr"
    result = runner.invoke(app, ["build", str(KANG), "-o", str(store), "--batch-key", "donor"])
    assert result.exit_code == 1
    assert "nothing written" in result.output and "'donor'" in result.output and KANG.name in result.output
    assert list(tmp_path.iterdir()) == []


def test_shipped_configs_are_valid():
    BuildConfig(**yaml.safe_load((REPO / "configs" / "build.yaml").read_text()))
    LoaderConfig(**yaml.safe_load((REPO / "configs" / "loader.yaml").read_text()))
