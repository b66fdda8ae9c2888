"""`atlasvi build --genes`, `atlasvi import`, `atlasvi export` and `atlasvi map-query` on an imported reference, as a
user runs them on the scvi-tools fixture (tests/fixtures/scvi_tools: a SCANVI saved by scvi-tools 1.4.2)."""

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from typer.testing import CliRunner

from atlasvi.api import SCANVI
from atlasvi.cli.main import app
from atlasvi.models.scvi_tools import read_scvi_tools
from tests.conftest import KANG

runner = CliRunner(env={"COLUMNS": "200"})
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "scvi_tools"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_import_a_scvi_tools_scanvi_map_a_query_onto_it_and_export_it(workdir):
    """build --genes SCVI_TOOLS_MODEL; import; map-query --reference IMPORTED (new samples streamed from a store);
    export; the imported reference's latent is scvi-tools' and the exported file is read back the same."""
    _invoke(
        "build", str(KANG), "-o", "kang.zarr", "--batch-key", "sample", "--labels-key", "cell_type",
        "--unlabeled-batch", "stim101", "--unlabeled-batch", "stim107", "--genes", str(FIXTURE / "scanvi"),
    )  # fmt: skip
    imported = _invoke("import", str(FIXTURE / "scanvi"), "--store", "kang.zarr", "--output", "imported")
    assert "imported a scvi-tools SCANVI (150 genes, 5 latent dimensions, 4 sample)" in imported
    expected = np.load(FIXTURE / "expected.npz")
    order = {n: i for i, n in enumerate(expected["obs_names"])}
    store = ad.read_zarr("kang.zarr")
    theirs = expected["scanvi_latent"][[order[n] for n in store.obs_names]]
    model = SCANVI.load("imported", "kang.zarr", device="cpu")
    assert np.abs(model.get_latent_representation() - theirs).max() <= 1e-5

    kang = ad.read_h5ad(KANG)
    query = kang[kang.obs["condition"] == "stim"].copy()
    query.obs = query.obs[["sample"]].assign(sample=lambda obs: "new_" + obs["sample"].astype(str))
    query.write_h5ad(workdir / "query.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _invoke("build", "query.h5ad", "-o", "query.zarr", "--batch-key", "sample", "--genes", "imported")
    args = ("map-query", "--reference", "imported", "--query", "query.zarr", "--max-epochs", "1", "--output", "q")
    assert "query sample: ['new_stim101', 'new_stim107']" in _invoke(*args)
    mapped = ad.read_zarr("query.zarr")
    assert mapped.obsm["X_scanvi"].shape == (806, 5) and np.isfinite(mapped.obsm["X_scanvi"]).all()
    assert set(mapped.obs["scanvi_prediction"].astype(str)) <= set(kang.obs["cell_type"].astype(str))
    reference_cells = SCANVI.load("q", "kang.zarr", device="cpu").get_latent_representation()
    np.testing.assert_array_equal(reference_cells, model.get_latent_representation())  # the reference is untouched

    assert "wrote exported/model.pt" in _invoke("export", "--model", "imported", "--to", "scvi-tools", "exported")
    exported, original = read_scvi_tools(workdir / "exported"), read_scvi_tools(FIXTURE / "scanvi")
    for key, value in original["model_state_dict"].items():
        if not key.startswith(("l_encoder.", "decoder.px_r_decoder.", "pyro")):
            np.testing.assert_array_equal(exported["model_state_dict"][key].numpy(), value.numpy())


def test_interop_errors_are_one_line(workdir, tmp_path):
    """A file that would run code, a store without the model's genes, an existing output, an unknown format:
    one line each, exit 1 (2 for a flag), no traceback."""
    _invoke("build", str(KANG), "-o", "kang.zarr", "--batch-key", "sample", "--n-top-genes", "100")
    (workdir / "evil").mkdir()
    (workdir / "evil" / "model.pt").write_bytes(
        b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
    )  # pickle of os.system("true")
    cases = {
        ("import", "evil", "--store", "kang.zarr", "--output", "m"): "evil/model.pt: reading it would run code",
        ("import", str(FIXTURE / "scvi"), "--store", "kang.zarr", "--output", "m"): "of the model's genes are not in",
        ("export", "--model", "nowhere", "--to", "scvi-tools", "x"): "nowhere: no saved model here",
    }
    for args, message in cases.items():
        result = runner.invoke(app, list(args))
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    unknown = runner.invoke(app, ["export", "--model", "m", "--to", "anndata", "x"])
    assert unknown.exit_code == 2 and "--to 'anndata': the formats are scvi-tools" in unknown.output
