"""scArches surgery on Kang: ctrl samples are the reference, stim samples a query study with new batches."""

import warnings

import anndata as ad
import numpy as np
import pytest
import torch

from atlasvi.api import SCANVI, SCVI
from atlasvi.data import BuildConfig, build_store, open_store
from atlasvi.models.scvi import SCVIConfig
from atlasvi.models.surgery import SurgeryConfig, extend_registry
from atlasvi.train import TrainConfig
from tests.data.helpers import build_ctrl_stim_stores

ARCHES = {"encode_covariates": True, "n_layers": 2, "use_layer_norm": "both", "use_batch_norm": "encoder"}


def _top_genes(kang: ad.AnnData) -> list[str]:
    return list(kang.var_names[np.argsort(-np.asarray(kang.X.sum(axis=0)).ravel())[:300]])


@pytest.fixture(scope="module")
def stores(tmp_path_factory, kang):
    """(reference store: ctrl101, ctrl107 with labels; query store: stim101, stim107, no labels key), 300 genes."""
    return list(build_ctrl_stim_stores(kang, 300, tmp_path_factory.mktemp("surgery")))


@pytest.fixture(scope="module")
def references(stores):
    """scVI (8 epochs, covariates encoded, encoder batch norm) and scANVI from it (3 epochs) on the reference."""
    torch.manual_seed(0)
    scvi = SCVI(stores[0], SCVIConfig(**ARCHES), device="cpu")
    scvi.fit(TrainConfig(max_epochs=8, n_epochs_kl_warmup=4))
    scanvi = SCANVI.from_scvi_model(scvi)
    scanvi.fit(TrainConfig(max_epochs=3))
    return scvi, scanvi


@pytest.mark.parametrize("method", ["SCVI", "SCANVI"])
def test_query_training_leaves_the_reference_exactly_as_it_was(stores, references, method):
    reference_store, query_store = stores
    reference = references[method == "SCANVI"]
    reference_latent = reference.get_latent_representation()
    query = type(reference).load_query_data(query_store, reference, device="cpu")
    assert query.schema.batch_categories == ("ctrl101", "ctrl107", "stim101", "stim107")
    before = {k: v.clone() for k, v in query.module.state_dict().items()}
    np.testing.assert_array_equal(query.get_latent_representation(reference_store), reference_latent)
    query.fit(TrainConfig(max_epochs=3))  # weight decay 1e-6 asked for: a query model trains with 0
    assert query.train_config.weight_decay == 0.0
    after = query.module.state_dict()
    # the reference cells' latent, exactly (the reference's BN statistics are frozen, new columns unused)
    assert np.array_equal(query.get_latent_representation(reference_store), reference_latent)
    trainable = {n for n, p in query.module.named_parameters() if p.requires_grad}
    decoder_norms = {
        n for n in trainable if n.startswith(("decoder.", "decoder_z1_z2.")) and n not in query.query_masks
    }
    assert trainable == set(query.query_masks) | decoder_norms  # the decoders' batch norms train, as scvi-tools'
    assert decoder_norms == set()  # (this architecture has no decoder batch norm)
    for name, value in before.items():
        if name in query.query_masks:
            mask = query.query_masks[name]
            assert torch.equal(after[name][~mask], value[~mask]), name  # the reference columns
            assert not torch.equal(after[name][mask], value[mask]), name  # the new batch columns trained
            assert mask.sum() == 2 * mask.shape[0]  # two new batches, one column each
        else:  # every other weight, and the encoders' batch-norm statistics
            assert torch.equal(after[name], value), name
    assert set(query.query_masks) == {
        "z_encoder.encoder.layers.0.0.weight", "z_encoder.encoder.layers.1.0.weight",
        "decoder.px_decoder.layers.0.0.weight", "decoder.px_decoder.layers.1.0.weight",
    }  # fmt: skip


def test_scanvi_query_is_labelled_and_the_model_round_trips(stores, references, tmp_path, kang):
    reference_store, query_store = stores
    reference_dir = references[1].save(tmp_path / "reference")
    query = SCANVI.load_query_data(query_store, reference_dir, device="cpu")
    query.fit(TrainConfig(max_epochs=2))
    predicted = query.predict()
    truth = kang.obs.loc[ad.read_zarr(query_store).obs_names, "cell_type"].to_numpy()
    assert np.mean(predicted == truth) > 0.5  # chance (largest class) 0.26; 8 + 3 + 2 epochs only
    query.save(tmp_path / "query")
    loaded = SCANVI.load(tmp_path / "query", query_store, device="cpu")
    np.testing.assert_array_equal(loaded.predict(), predicted)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(reference_store), references[1].get_latent_representation()
    )


def test_decoder_batch_norm_follows_scvi_tools_unless_frozen(stores):
    """Default architecture (batch norm in encoder and decoder, covariates not encoded): the encoder is frozen
    whole, the decoder's batch norms train unless freeze_batchnorm_decoder."""
    torch.manual_seed(0)
    reference = SCVI(stores[0], device="cpu")
    for config, trains in ((SurgeryConfig(), True), (SurgeryConfig(freeze_batchnorm_decoder=True), False)):
        query = SCVI.load_query_data(stores[1], reference, device="cpu", surgery=config)
        trainable = {n for n, p in query.module.named_parameters() if p.requires_grad}
        norms = {"decoder.px_decoder.layers.0.1.weight", "decoder.px_decoder.layers.0.1.bias"}
        assert trainable == {"decoder.px_decoder.layers.0.0.weight"} | (norms if trains else set())
        query.module.train()
        assert not query.module.z_encoder.encoder.layers[0][1].training
        assert query.module.decoder.px_decoder.layers[0][1].training == trains


def test_a_single_batch_reference_gains_a_zero_column(stores, tmp_path, kang):
    """A one-category batch has no one-hot column in the reference: its column is 0 and stays frozen."""
    reference_cells = kang[kang.obs["sample"] == "ctrl101", _top_genes(kang)].copy()
    reference_cells.write_h5ad(tmp_path / "one.h5ad")
    query_cells = kang[kang.obs["sample"] == "stim101", _top_genes(kang)].copy()
    query_cells.write_h5ad(tmp_path / "q.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = build_store(BuildConfig(inputs=[str(tmp_path / "one.h5ad")], output=str(tmp_path / "one.zarr"),
                                      batch_key="sample"))  # fmt: skip
        q = build_store(BuildConfig(inputs=[str(tmp_path / "q.h5ad")], output=str(tmp_path / "q.zarr"),
                                    batch_key="sample"))  # fmt: skip
    torch.manual_seed(0)
    reference = SCVI(one, SCVIConfig(encode_covariates=True), device="cpu")
    latent = reference.get_latent_representation()
    query = SCVI.load_query_data(q, reference, device="cpu")
    weight = query.module.z_encoder.encoder.layers[0][0].weight
    n_genes = 300
    assert weight.shape[1] == n_genes + 2 and torch.equal(weight[:, n_genes], torch.zeros(weight.shape[0]))
    assert query.query_masks["z_encoder.encoder.layers.0.0.weight"][:, n_genes + 1].all()
    np.testing.assert_array_equal(query.get_latent_representation(one), latent)


def test_gene_batch_dispersion_grows_by_the_new_batches(stores):
    """The module's surgery_spec names px_r as a batch tensor: the query's batches get trainable columns."""
    reference = SCVI(stores[0], SCVIConfig(dispersion="gene-batch"), device="cpu")
    assert reference.module.surgery_spec().batch_tensors == ("px_r",)
    query = SCVI.load_query_data(stores[1], reference, device="cpu")
    px_r, mask = query.module.px_r.detach(), query.query_masks["px_r"]
    assert px_r.shape == (300, 4) and torch.equal(px_r[:, :2], reference.module.px_r.detach())
    assert mask[:, 2:].all() and not mask[:, :2].any()


def test_nothing_new_to_map_is_an_error(stores):
    schema = open_store(stores[0]).schema
    with pytest.raises(ValueError, match="every sample of the query is in the reference"):
        extend_registry(schema, schema, "reference.zarr")
