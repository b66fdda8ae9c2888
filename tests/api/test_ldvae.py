"""LDVAE (`LinearSCVI`) on Kang: scvi-tools' defaults, the folded loadings, varm write-back, the ISG factor."""

import shutil
import warnings

import anndata as ad
import numpy as np
import pytest
import torch

from atlasvi.api import LinearSCVI
from atlasvi.data import BuildConfig, LoaderConfig, build_store
from atlasvi.models.ldvae import LDVAEConfig
from atlasvi.nn import LinearCountDecoder
from atlasvi.train import TrainConfig
from tests.conftest import KANG

EPOCHS = 30
ISGS = ["ISG15", "IFI6", "IFIT1", "IFIT3", "MX1"]


@pytest.fixture(scope="module")
def trained(kang_store, tmp_path_factory):
    """LDVAE with scvi-tools' defaults, 30 epochs (10 of KL warm-up), on a copy of the Kang store."""
    store = tmp_path_factory.mktemp("ldvae") / "kang.zarr"
    shutil.copytree(kang_store, store)
    torch.set_num_threads(1)
    model = LinearSCVI(store, device="cpu", seed=0)
    untrained = model.get_elbo()
    model.fit(TrainConfig(max_epochs=EPOCHS, n_epochs_kl_warmup=10), LoaderConfig(batch_size=128, seed=0))
    return model, untrained


def test_the_defaults_are_scvi_tools_linear_scvi():
    config = LDVAEConfig()
    assert (config.n_latent, config.n_hidden, config.n_layers, config.dropout_rate) == (10, 128, 1, 0.1)
    assert (config.gene_likelihood, config.dispersion, config.use_observed_lib_size, config.bias) == (
        "nb",
        "gene",
        False,
        False,
    )
    assert config.use_batch_norm == "both" and not config.encode_covariates


def test_the_decoder_is_one_linear_layer_without_bias_with_batch_norm(trained):
    model, untrained = trained
    module = model.module
    assert isinstance(module.decoder, LinearCountDecoder) and module.l_encoder is not None
    (block,) = module.decoder.factor_regressor.layers
    assert [type(layer).__name__ for layer in block] == ["Linear", "BatchNorm1d"]
    assert block[0].bias is None and block[0].weight.shape == (1267, 10 + 4)  # z and the 4 samples' one-hot
    assert module.decoder.px_dropout_decoder is None and module.px_r.shape == (1267,)
    assert model.get_elbo() < 0.8 * untrained  # the held-out -ELBO falls


def test_the_loadings_fold_the_batch_norm_and_give_the_decoder_output(trained):
    model, _ = trained
    module = model.module
    loadings = model.get_loadings()
    assert loadings.shape == (1267, 10) and list(loadings.columns) == [f"Z_{i}" for i in range(10)]
    assert list(loadings.index) == list(model.schema.gene_names)
    norm = module.decoder.factor_regressor.layers[0][1]
    assert not torch.allclose(norm.running_var, torch.ones_like(norm.running_var))  # a fold that changes W
    batch = next(model._batches(None, None, 2048))  # every cell, one minibatch
    module.eval()
    with torch.no_grad():
        inputs = module.unpack(batch)
        inference = module.inference(inputs)
        z = inference["qz"].loc
        assert len(inputs.batch_index.unique()) == 4
        scale = module.generative(z, inference["library"], inputs)["px_scale"]
        batch_terms = module.decoder.factor_regressor(torch.zeros_like(z), inputs.batch_index)
    folded = torch.as_tensor(loadings.to_numpy())
    torch.testing.assert_close(scale, torch.softmax(z @ folded.T + batch_terms, dim=-1), rtol=1e-4, atol=1e-7)


def test_write_loadings_puts_the_table_into_varm(trained):
    model, _ = trained
    paths = model.write_results()
    assert [p.parent.name + "/" + p.name for p in paths] == ["obsm/X_ldvae", "varm/ldvae_loadings"]
    path = model._store_path(None)
    adata = ad.read_zarr(path)
    np.testing.assert_array_equal(adata.varm["ldvae_loadings"], model.get_loadings().to_numpy().astype(np.float32))
    assert adata.obsm["X_ldvae"].shape == (1556, 10)
    assert not list(path.parent.glob(".*"))  # no staging or lock files left beside the store


def test_the_interferon_genes_load_together_on_a_factor_that_separates_stim(tmp_path):
    """Without a batch covariate (Kang's samples are each all ctrl or all stim, so per-sample decoder terms could
    carry the response instead of the latent), 30 epochs: ISG15, IFI6, IFIT1, IFIT3, MX1 share the sign of the
    factor they load most on, all within its top 150 of 1267 genes, and that factor separates stim from ctrl."""
    source = ad.read_h5ad(KANG)
    source.obs = source.obs[["cell_type"]].assign(all="kang")
    source.write_h5ad(tmp_path / "kang.h5ad")
    store = tmp_path / "kang.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_store(BuildConfig(inputs=[str(tmp_path / "kang.h5ad")], output=str(store), batch_key="all"))
    torch.set_num_threads(1)
    model = LinearSCVI(store, device="cpu", seed=0)
    model.fit(TrainConfig(max_epochs=EPOCHS, n_epochs_kl_warmup=10), LoaderConfig(batch_size=128, seed=0))
    loadings = model.get_loadings()
    isg = loadings.loc[ISGS].to_numpy()
    factor = int(np.argmax(np.abs(isg.mean(axis=0))))
    sign = np.sign(isg[:, factor].mean())
    assert np.all(np.sign(isg[:, factor]) == sign)
    ranks = (sign * loadings.iloc[:, factor]).rank(ascending=False).loc[ISGS]
    assert ranks.max() <= 150, ranks.to_dict()
    condition = ad.read_h5ad(KANG, backed="r").obs["condition"].astype(str)
    stim = condition.reindex(ad.read_zarr(store).obs_names).to_numpy() == "stim"  # the store's row order
    values = sign * model.get_latent_representation()[:, factor]
    auroc = (values[stim][:, None] > values[~stim][None, :]).mean()
    assert auroc > 0.75, auroc
