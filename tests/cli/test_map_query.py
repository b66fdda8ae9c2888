"""`atlasvi map-query` as a user runs it: a saved scANVI reference, a query store with new batches."""

import anndata as ad
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from atlasvi.api import SCANVI, SCVI
from atlasvi.cli.main import app
from atlasvi.train import TrainConfig
from tests.data.helpers import build_ctrl_stim_stores

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def reference_and_query(tmp_path_factory, kang):
    """A saved scANVI (2 + 2 epochs) on Kang's ctrl samples, and a store of its stim samples (no labels)."""
    folder = tmp_path_factory.mktemp("map_query")
    stores = build_ctrl_stim_stores(kang, 200, folder)
    torch.manual_seed(0)
    scvi = SCVI(stores[0], device="cpu")
    scvi.fit(TrainConfig(max_epochs=2))
    scanvi = SCANVI.from_scvi_model(scvi)
    scanvi.fit(TrainConfig(max_epochs=2))
    return scanvi.save(folder / "reference_model"), stores[0], stores[1]


def test_map_query_writes_latent_predictions_and_the_query_model(reference_and_query, tmp_path):
    reference, reference_store, query = reference_and_query
    args = ["map-query", "--reference", str(reference), "--query", str(query), "--max-epochs", "2"]
    result = runner.invoke(app, [*args, "--output", str(tmp_path / "query_model")])
    assert result.exit_code == 0, result.output
    written = ad.read_zarr(query)
    assert written.obsm["X_scanvi"].shape == (806, 10) and np.isfinite(written.obsm["X_scanvi"]).all()
    assert set(written.obs["scanvi_prediction"].astype(str)) <= set(
        ad.read_zarr(reference_store).obs["cell_type"].astype(str)
    )
    np.testing.assert_allclose(written.obsm["scanvi_probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    model = SCANVI.load(tmp_path / "query_model", query, device="cpu")
    assert model.schema.batch_categories == ("ctrl101", "ctrl107", "stim101", "stim107")
    np.testing.assert_allclose(model.get_latent_representation(), written.obsm["X_scanvi"], rtol=1e-5, atol=1e-6)


def test_map_query_errors_name_the_problem(reference_and_query, tmp_path):
    reference, reference_store, _ = reference_and_query
    missing = runner.invoke(app, ["map-query", "--reference", str(tmp_path), "--query", str(reference_store)])
    assert missing.exit_code == 1 and "no saved model here" in missing.output
    nothing_new = runner.invoke(app, ["map-query", "--reference", str(reference), "--query", str(reference_store)])
    assert nothing_new.exit_code == 1 and "every sample of the query is in the reference" in nothing_new.output


def test_de_and_latent_load_a_saved_scanvi(reference_and_query):
    reference, reference_store, _ = reference_and_query
    args = ["de", "--model", str(reference), "--groupby", "cell_type", "--group1", "B cells"]
    de = runner.invoke(app, [*args, "--n-samples-overall", "100"])
    assert de.exit_code == 0, de.output
    assert "B cells vs Rest: top 10" in de.output
    latent = runner.invoke(app, ["latent", "--model", str(reference), "--key", "X_scanvi"])
    assert latent.exit_code == 0, latent.output
    expected = SCANVI.load(reference, reference_store, device="cpu").get_latent_representation()
    np.testing.assert_allclose(ad.read_zarr(reference_store).obsm["X_scanvi"], expected, rtol=1e-5, atol=1e-6)
