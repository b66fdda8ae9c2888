"""`atlasvi build` / `atlasvi info` as a user runs them; the shipped configs validate."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from typer.testing import CliRunner

from atlasvi.api import SCVI
from atlasvi.cli.common import EMBEDDED_BUILD
from atlasvi.cli.main import app
from atlasvi.data import BuildConfig, LoaderConfig, open_store
from atlasvi.models.scanvi import SCANVIConfig
from atlasvi.models.scvi import SCVIConfig
from atlasvi.train import TrainConfig
from atlasvi.train.job import TrainJobConfig
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
    # technology is kept as an annotation: batch is nested in it, the model conditions on batch only
    assert set(open_store(store).schema.categorical) == {"batch", "cell_line"}
    assert built.obs.groupby("batch", observed=True)["technology"].nunique().max() == 1


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
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "'donor'" in line and KANG.name in line and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_shipped_configs_are_valid():
    shipped = BuildConfig(**yaml.safe_load((REPO / "configs" / "build.yaml").read_text()))
    embedded = BuildConfig(**EMBEDDED_BUILD)
    for config in [shipped, embedded]:
        assert config.categorical_covariate_keys == [] and config.annotation_keys == ["technology"]
    LoaderConfig(**yaml.safe_load((REPO / "configs" / "loader.yaml").read_text()))


def test_shipped_train_configs_load_as_the_models_they_name():
    """configs/scvi.yaml is scVI; configs/scanvi.yaml is scANVI from the demo's saved scVI (model: {name: scanvi})."""
    scvi, scanvi = (
        TrainJobConfig(**yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())) for name in ("scvi", "scanvi")
    )
    assert type(scvi.model) is SCVIConfig and scvi.output == "outputs/scvi" and scvi.init_from is None
    assert type(scanvi.model) is SCANVIConfig and scanvi.model.classification_ratio == 50.0
    assert scanvi.model.unlabeled_category == "Unknown" and scanvi.model.n_latent == 10
    assert (scanvi.init_from, scanvi.output, scanvi.latent_key) == ("outputs/scvi/model", "outputs/scanvi", "X_scanvi")
    assert scanvi.train.max_epochs is None  # scvi-tools' pretrained rule


def test_an_annotation_column_is_kept_and_de_groups_by_it(tmp_path):
    """`--annotation-key condition` keeps a plain obs column the model does not condition on; `de` groups by it."""
    store = tmp_path / "kang.zarr"
    args = ["build", str(KANG), "-o", str(store), "--batch-key", "sample", "--annotation-key", "condition"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "obs['condition'] (annotation)" in result.output
    assert set(open_store(store).schema.categorical) == {"sample"}
    assert ad.read_zarr(store).obs["condition"].value_counts().to_dict() == {"stim": 806, "ctrl": 750}
    model = SCVI(store, device="cpu")
    model.fit(TrainConfig(max_epochs=1, seed=0))
    model.save(tmp_path / "model")
    args = ["de", "--model", str(tmp_path / "model"), "--groupby", "condition", "--group1", "stim"]
    result = runner.invoke(app, [*args, "--n-samples-overall", "100", "--output", str(tmp_path / "de.csv")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "de.csv", index_col="gene")
    assert len(table) == 1267 and set(table["comparison"]) == {"stim vs Rest"}
    source = ad.read_h5ad(KANG)
    stim = (source.obs["condition"] == "stim").to_numpy()
    isg15 = source[:, "ISG15"].X.toarray().ravel()  # the interferon response: stimulated cells' counts
    assert table.loc["ISG15", "raw_mean1"] == pytest.approx(isg15[stim].mean(), rel=1e-9)
    assert table.loc["ISG15", "raw_mean2"] == pytest.approx(isg15[~stim].mean(), rel=1e-9)
    assert isg15[stim].mean() > 10 * isg15[~stim].mean()


def _unprivileged(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`atlasvi ARGS` in a subprocess that cannot write where permissions forbid it (root: capabilities dropped)."""
    prefix = []
    if os.geteuid() == 0:  # root writes anywhere: drop its capabilities
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv")
        prefix = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    command = [*prefix, sys.executable, "-m", "atlasvi.cli.main", *args]
    env = os.environ | {"COLUMNS": "200", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)


def test_an_output_that_cannot_be_written_is_one_line_before_any_work(kang_store, tmp_path):
    """export / de / train / latent into a read-only folder or store: one error line naming it, exit 1, no
    traceback; train is refused before it trains (no model saved, no MLflow run), de before its draws."""
    model = SCVI(kang_store, SCVIConfig(n_latent=4, n_hidden=16), device="cpu")
    model.fit(TrainConfig(max_epochs=1))
    model.save(tmp_path / "model")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    ro_store = read_only / "store.zarr"
    shutil.copytree(kang_store, ro_store)
    for path in [ro_store, *ro_store.rglob("*"), read_only]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    cases = {
        ("export", "--model", str(tmp_path / "model"), str(read_only / "exported")): f"{read_only / 'exported'}: ",
        ("de", "--model", str(tmp_path / "model"), "--groupby", "cell_type", "--output", str(read_only / "de.csv")): (
            f"{read_only}: cannot write the CSV there (Permission denied)"
        ),
        ("latent", "--model", str(tmp_path / "model"), "--store", str(ro_store)): (
            f"{ro_store}: cannot write results into the store there (Permission denied)"
        ),
        ("train", "--store", str(ro_store), "--max-epochs", "1", "--output", str(tmp_path / "out")): (
            f"{ro_store}: cannot write results into the store there (Permission denied)"
        ),
    }
    for args, message in cases.items():
        result = _unprivileged(*args, cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert line.startswith(f"error: {message}"), line
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "mlruns").exists()
    assert sorted(p.name for p in read_only.iterdir()) == ["store.zarr"]


def test_a_warning_is_one_line_without_the_source_line(tmp_path):
    """Python's warning display (`/path/atlasvi/data/build.py:N: UserWarning: ...` and the source line under it)
    is `warning: MESSAGE`, as an error is `error: MESSAGE` (map-query and scanvi showed the KL warm-up that way)."""
    kang = ad.read_h5ad(KANG)[:120].copy()
    counts = kang.X.toarray()
    counts[7] = 0
    kang.X = sp.csr_matrix(counts)
    kang.write_h5ad(tmp_path / "one_empty.h5ad")
    args = ["build", str(tmp_path / "one_empty.h5ad"), "-o", str(tmp_path / "a.zarr"), "--drop-empty-cells"]
    result = runner.invoke(app, [*args, "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "warning: dropped 1 cells with zero counts" in result.output.splitlines()
    assert "UserWarning" not in result.output and "warnings.warn" not in result.output
