"""The user-facing SCVI class on a real store: fit, posterior quantities, write-back, save / load."""

import shutil
import warnings

import anndata as ad
import numpy as np
import pytest
import torch

from atlasvi.api import SCVI
from atlasvi.data import BuildConfig, build_store
from atlasvi.models.saving import IncompatibleStoreError
from atlasvi.train import TrainConfig


@pytest.fixture(scope="module")
def trained(embedded_store, tmp_path_factory):
    """scVI after 15 epochs on a copy of the embedded store (300 genes), and its untrained twin's -ELBO."""
    store = tmp_path_factory.mktemp("api") / "embedded.zarr"
    shutil.copytree(embedded_store, store)
    torch.manual_seed(0)
    model = SCVI(store, device="cpu")
    untrained = model.get_elbo()
    model.fit(TrainConfig(max_epochs=15, n_epochs_kl_warmup=5))
    return model, untrained


def test_fit_lowers_the_held_out_elbo(trained):
    model, untrained = trained
    held_out = model.get_elbo()
    assert held_out < 0.8 * untrained
    assert model.get_reconstruction_error() < held_out  # -ELBO = reconstruction + KL, KL > 0
    assert held_out == pytest.approx(model.history[-1].validation_elbo, rel=0.01)  # one MC draw apart


def test_latent_is_written_back_chunk_by_chunk_and_matches(trained):
    model, _ = trained
    latent = model.get_latent_representation()
    assert latent.shape == (1408, 10) and np.isfinite(latent).all()
    np.testing.assert_array_equal(model.get_latent_representation(rows=(100, 300)), latent[100:300])
    path = model.write_latent_representation(batch_size=300)
    np.testing.assert_allclose(ad.read_zarr(path.parents[1]).obsm["X_scvi"], latent, rtol=1e-5, atol=1e-6)
    draws = [model.get_latent_representation(rows=(0, 50), give_mean=False, seed=s) for s in (1, 1, 2)]
    assert np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[0], draws[2])


def test_normalized_expression_is_library_size_normalized(trained):
    model, _ = trained
    expression = model.get_normalized_expression(rows=(0, 64), library_size=1e4)
    assert expression.shape == (64, 300)
    np.testing.assert_allclose(expression.sum(axis=1), 1e4, rtol=1e-4)
    genes = list(model.schema.gene_names[:4])
    subset = model.get_normalized_expression(rows=(0, 64), gene_list=genes, library_size=1e4)
    np.testing.assert_allclose(subset, expression[:, :4], rtol=1e-5)
    batches = model.schema.batch_categories
    as_first = model.get_normalized_expression(rows=(0, 64), transform_batch=batches[0])
    as_last = model.get_normalized_expression(rows=(0, 64), transform_batch=batches[-1])
    assert np.abs(as_first - as_last).max() > 1e-4  # the decoder sees the batch
    with pytest.raises(KeyError, match="not a batch"):
        model.get_normalized_expression(transform_batch="no-such-batch")
    with pytest.raises(KeyError, match="genes not in the model"):
        model.get_normalized_expression(gene_list=["NOT_A_GENE"])


def test_save_load_round_trip_and_incompatible_stores(trained, tmp_path, kang_store):
    model, _ = trained
    model.save(tmp_path / "model")
    assert (tmp_path / "model" / "model.pt").exists() and (tmp_path / "model" / "model.json").exists()
    loaded = SCVI.load(tmp_path / "model", model.store)
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())
    assert loaded.train_config == model.train_config
    with pytest.raises(IncompatibleStoreError, match="trained on 300 genes, the store has 1267"):
        SCVI.load(tmp_path / "model", kang_store)
    with pytest.raises(FileNotFoundError, match="no saved model here"):
        SCVI.load(tmp_path / "nothing", model.store)
    meta = tmp_path / "model" / "model.json"
    meta.write_text(meta.read_text().replace('"method": "SCVI"', '"method": "SCANVI"'))
    with pytest.raises(ValueError, match="a saved SCANVI model, not SCVI"):
        SCVI.load(tmp_path / "model", model.store)


def test_another_store_with_the_same_genes_is_recoded(trained, tmp_path, cellbench):
    """A store of one batch only (its own category codes) gets the cells' latent of the training store."""
    model, _ = trained
    genes = list(model.schema.gene_ids)
    one_batch = cellbench[cellbench.obs["batch"] == model.schema.batch_categories[-1], genes].copy()
    one_batch.write_h5ad(tmp_path / "one.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = BuildConfig(
            inputs=[str(tmp_path / "one.h5ad")], output=str(tmp_path / "one.zarr"), batch_key="batch",
            labels_key="cell_line", categorical_covariate_keys=[], n_top_genes=None, seed=0,
        )  # fmt: skip
        build_store(config)
    stored = ad.read_zarr(tmp_path / "one.zarr")
    own = ad.read_zarr(model.store.path)
    latent = model.get_latent_representation(store=tmp_path / "one.zarr")
    index = own.obs_names.get_indexer(stored.obs_names)
    np.testing.assert_allclose(latent, model.get_latent_representation()[index], rtol=1e-4, atol=1e-5)
    other = one_batch.copy()
    other.obs["batch"] = "a-new-batch"
    other.write_h5ad(tmp_path / "new.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_store(
            config.model_copy(update={"inputs": [str(tmp_path / "new.h5ad")], "output": str(tmp_path / "n.zarr")})
        )
    with pytest.raises(IncompatibleStoreError, match="categories the model has not seen: \\['a-new-batch'\\]"):
        model.get_latent_representation(store=tmp_path / "n.zarr")
