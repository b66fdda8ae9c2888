"""SCANVI on real data: label transfer ctrl -> stim on Kang, predictions written back, save / load."""

import warnings
from dataclasses import replace

import anndata as ad
import numpy as np
import pytest
import torch

from atlasvi.analysis.protocols import HasClassifier, HasExpression
from atlasvi.api import METHODS, SCANVI, SCVI, AtlasModel, saved_model_class, user_class
from atlasvi.data import BuildConfig, build_store, open_store
from atlasvi.models.registry import ENTRIES
from atlasvi.train import TrainConfig
from tests.conftest import KANG

QUERY = ["stim101", "stim107"]


@pytest.fixture(scope="module")
def transfer(tmp_path_factory, kang):
    """scVI (25 epochs) then scANVI (8 epochs) on Kang, 400 HVGs, the stim samples' labels masked."""
    store = tmp_path_factory.mktemp("scanvi_api") / "kang.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_store(
            BuildConfig(
                inputs=[str(KANG)], output=str(store), batch_key="sample", labels_key="cell_type", n_top_genes=400,
                unlabeled_batches=QUERY,
            )
        )  # fmt: skip
    torch.manual_seed(0)
    scvi = SCVI(store, device="cpu")
    scvi.fit(TrainConfig(max_epochs=25, n_epochs_kl_warmup=10))
    scanvi = SCANVI.from_scvi_model(scvi)
    scanvi.fit(TrainConfig(max_epochs=8))
    obs = kang.obs.loc[ad.read_zarr(store).obs_names]
    return scvi, scanvi, store, obs


def test_from_scvi_model_starts_from_the_trained_scvi(transfer):
    scvi, _, store, _ = transfer
    fresh = SCANVI.from_scvi_model(scvi, classification_ratio=10.0)
    assert fresh.was_pretrained and fresh.config.classification_ratio == 10.0
    own = {"name", "unlabeled_category", "classification_ratio", "linear_classifier"}
    assert fresh.config.model_dump(exclude=own) == scvi.config.model_dump(exclude={"name"})
    for name, value in scvi.module.state_dict().items():
        assert torch.equal(fresh.module.state_dict()[name], value), name
    np.testing.assert_array_equal(fresh.get_latent_representation(), scvi.get_latent_representation())


def test_method_classes_compose_the_base_and_resolve_through_the_registry(transfer, tmp_path):
    scvi, scanvi, _, _ = transfer
    assert not issubclass(SCANVI, SCVI) and issubclass(SCANVI, AtlasModel) and issubclass(SCVI, AtlasModel)
    assert METHODS == {entry.saved_name: user_class(entry) for entry in ENTRIES}
    assert METHODS["SCVI"] is SCVI and METHODS["SCANVI"] is SCANVI
    assert (scvi.entry.latent_key, scanvi.entry.latent_key) == ("X_scvi", "X_scanvi")
    assert isinstance(scanvi.module, HasClassifier) and isinstance(scanvi.module, HasExpression)
    assert not isinstance(scvi.module, HasClassifier)
    assert saved_model_class(scanvi.save(tmp_path / "scanvi")) is SCANVI
    with pytest.raises(ValueError, match=r"a SCVI model starts from \[\], not a SCANVI"):
        SCVI(scvi.store, device="cpu").init_from(scanvi)
    assert scanvi.differential_expression("cell_type", "B cells", n_samples_overall=50, all_stats=False).shape[0] == 400


def test_labels_transfer_to_the_unlabeled_query(transfer):
    _, scanvi, _, obs = transfer
    predicted = scanvi.predict()
    query = obs["sample"].isin(QUERY).to_numpy()
    truth = obs["cell_type"].to_numpy()
    accuracy = np.mean(predicted[query] == truth[query])
    assert accuracy > 0.8  # chance (largest class) is 0.26; seeds 0-3 gave 0.85-0.90
    assert np.mean(predicted[~query] == truth[~query]) > 0.93  # seeds 0-3: 0.965-0.983 on the labelled cells
    assert (
        scanvi.history[-1].extra_metrics["classification_loss"] < scanvi.history[0].extra_metrics["classification_loss"]
    )


def test_predictions_are_written_back_and_match(transfer):
    _, scanvi, store, _ = transfer
    probabilities = scanvi.predict(soft=True)
    assert list(probabilities.columns) == list(scanvi.labels) and probabilities.shape == (1556, 5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(scanvi.predict(rows=(10, 60)), scanvi.predict()[10:60])
    scanvi.write_predictions(batch_size=300)
    scanvi.write_latent_representation()
    written = ad.read_zarr(store)
    np.testing.assert_array_equal(written.obs["scanvi_prediction"].astype(str), scanvi.predict())
    np.testing.assert_allclose(written.obsm["scanvi_probabilities"], probabilities.to_numpy(), rtol=1e-5, atol=1e-6)
    assert written.obsm["X_scanvi"].shape == (1556, 10)
    assert written.obs["cell_type"].astype(str).isin(["Unknown", *scanvi.labels]).all()  # the store's own column
    with pytest.raises(ValueError, match="usable obs key"):
        scanvi.write_predictions(key="cell_type")


def test_save_load_round_trip(transfer, tmp_path):
    _, scanvi, store, _ = transfer
    scanvi.save(tmp_path / "model")
    loaded = SCANVI.load(tmp_path / "model", store, device="cpu")
    assert loaded.config == scanvi.config and loaded.labels == scanvi.labels
    np.testing.assert_array_equal(loaded.predict(soft=True).to_numpy(), scanvi.predict(soft=True).to_numpy())
    with pytest.raises(ValueError, match="a saved SCANVI model, not SCVI"):
        SCVI.load(tmp_path / "model", store)


def test_a_registry_without_labels_is_refused(kang_store):
    schema = open_store(kang_store).schema
    with pytest.raises(ValueError, match="labels key"):
        SCANVI(kang_store, device="cpu", registry=replace(schema, labels_key=None))
