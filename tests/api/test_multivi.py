"""MULTIVI: a short run on the sci-CAR multiome store imputes the hidden modality of unpaired cells (accessibility of
RNA-only cells, expression of ATAC-only cells) above chance, per-modality latents, library and region factors, DE over
genes, save / load, and query mapping onto a new batch."""

import warnings

import anndata as ad
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from atlasvi.api import MULTIVI
from atlasvi.data import BuildConfig, LoaderConfig, build_store
from atlasvi.train import TrainConfig


@pytest.fixture(scope="module")
def trained(multiome_store):
    model = MULTIVI(multiome_store, device="cpu", seed=0)
    model.fit(TrainConfig(max_epochs=40, lr=3e-3, n_epochs_kl_warmup=10, early_stopping=False, seed=0),
              LoaderConfig(batch_size=64, seed=0))  # fmt: skip
    return model


def _hidden(store):
    hidden = np.load(store.parent / "hidden.npz", allow_pickle=True)
    names = ad.read_zarr(store).obs_names
    where = {str(n): i for i, n in enumerate(names)}
    cells = [str(c) for c in hidden["cells"]]
    return hidden, np.array([where[c] for c in cells[:150]]), np.array([where[c] for c in cells[150:300]])


def test_the_hidden_modality_is_imputed(trained, multiome_store):
    hidden, rna_only, atac_only = _hidden(multiome_store)
    accessibility = trained.get_accessibility_estimates()
    assert accessibility.shape == (450, 2000) and 0 < accessibility.min() and accessibility.max() < 1
    auroc = roc_auc_score((hidden["atac"] > 0).ravel(), accessibility[rna_only].ravel())
    assert auroc > 0.55  # from RNA alone, above chance (0.58 after 40 epochs on these 2000 sparse peaks)
    expression = trained.get_normalized_expression()
    np.testing.assert_allclose(expression.sum(1), 1.0, rtol=1e-5)
    counts = hidden["rna"]
    truth = np.log1p(1e4 * counts / counts.sum(1, keepdims=True))
    imputed = np.log1p(1e4 * expression[atac_only])
    r = [np.corrcoef(a, b)[0, 1] for a, b in zip(imputed, truth, strict=True)]
    assert np.mean(r) > 0.35  # from ATAC alone (0.41 after 40 epochs)
    sparse = trained.get_accessibility_estimates(threshold=0.5, region_list=list(trained.region_names[:10]))
    assert sparse.shape == (450, 10) and (sparse.data >= 0.5).all()


def test_latents_factors_and_de(trained):
    joint = trained.get_latent_representation()
    rna = trained.get_latent_representation(modality="expression")
    atac = trained.get_latent_representation(modality="accessibility")
    assert joint.shape == rna.shape == atac.shape == (450, trained.n_latent)
    masks = trained.store.read_rows(0, 450, ("atac", "rna")).masks
    only_rna = ~masks["atac"][:, 0]
    np.testing.assert_allclose(joint[only_rna], rna[only_rna], rtol=1e-5, atol=1e-6)
    factors = trained.get_library_size_factors()
    assert (
        factors["accessibility"].shape == (450,)
        and ((0 < factors["accessibility"]) & (factors["accessibility"] < 1)).all()
    )
    assert trained.get_region_factors().shape == (2000,)
    table = trained.differential_expression(
        groupby="treatment_time_h", group1="dex_0h", group2="dex_3h", all_stats=False
    )
    assert len(table) == 1185 and {"proba_de", "lfc_mean", "bayes_factor"} <= set(table.columns)


def test_save_load_and_query_mapping(trained, multiome_store, tmp_path):
    trained.save(tmp_path / "model")
    loaded = MULTIVI.load(tmp_path / "model", multiome_store)
    np.testing.assert_allclose(loaded.get_latent_representation(), trained.get_latent_representation(), atol=1e-6)
    source = ad.read_h5ad(multiome_store.parent / "scicar450.h5ad")[300:].copy()  # paired cells as a new study
    source.obs["modality"] = "query_paired"
    source.obs_names = [f"q{i}" for i in range(source.n_obs)]
    source.write_h5ad(tmp_path / "query.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_store(BuildConfig(inputs=[str(tmp_path / "query.h5ad")], output=str(tmp_path / "query.zarr"),
                                atac_key="atac", batch_key="modality", labels_key="treatment_time_h"))  # fmt: skip
    query = MULTIVI.load_query_data(tmp_path / "query.zarr", trained, device="cpu")
    before = {k: v.clone() for k, v in query.module.state_dict().items()}
    query.fit(TrainConfig(max_epochs=2, seed=0), LoaderConfig(batch_size=64, seed=0))
    after = query.module.state_dict()
    assert torch.equal(
        before["z_encoder_accessibility.mean_encoder.weight"], after["z_encoder_accessibility.mean_encoder.weight"]
    )
    layer = "z_decoder_accessibility.px_decoder.layers.0.0.weight"
    n_latent = query.n_latent
    assert torch.equal(before[layer][:, : n_latent + 3], after[layer][:, : n_latent + 3])  # the reference's columns
    assert not torch.equal(before[layer][:, n_latent + 3 :], after[layer][:, n_latent + 3 :])  # the new batch's
    assert query.get_latent_representation().shape == (150, n_latent)


def test_differential_accessibility_over_the_peaks(trained, multiome_store):
    table = trained.differential_accessibility(groupby="treatment_time_h", group1="dex_0h", group2="dex_3h")
    assert len(table) == 2000 and set(table.index) == set(trained.region_names)
    assert list(table.columns[:4]) == ["prob_da", "is_da_fdr", "bayes_factor", "effect_size"]
    np.testing.assert_allclose(table["effect_size"], table["est_prob2"] - table["est_prob1"])
    # the empirical columns are the fractions of each group's cells with the peak open, from the store's peaks
    adata = ad.read_zarr(multiome_store)
    group = adata.obs["treatment_time_h"].astype(str).to_numpy()
    opened = (adata.obsm["atac"] > 0).toarray()
    names = list(adata.uns["atac_names"])
    first = table.index[0]
    assert table.loc[first, "emp_prob1"] == pytest.approx(opened[group == "dex_0h", names.index(first)].mean())
    assert table.loc[first, "emp_prob2"] == pytest.approx(opened[group == "dex_3h", names.index(first)].mean())
