"""CondSCVI and DestVI: scvi-tools' formulas (label weights, vamp prior), DestVI's start from a CondSCVI (frozen
decoder, taken weights, its registry on the spots store) and a small simulation with known proportions."""

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import spearmanr

from atlasvi.api.condscvi import CondSCVI
from atlasvi.api.destvi import DestVI
from atlasvi.data import BuildConfig, LoaderConfig, build_store
from atlasvi.models.condscvi import CondSCVIConfig, vamp_prior
from atlasvi.models.condscvi.module import ct_weight_of
from atlasvi.models.destvi import DestVIConfig
from atlasvi.models.saving import ModelFileError
from atlasvi.train import TrainConfig
from tests.conftest import KANG

SMALL = {"n_hidden": 32}


def test_ct_weight_is_scvi_tools_weight_obs():
    counts = np.array([90.0, 8.0, 2.0])  # proportions 0.9, 0.08, 0.02 -> clipped 0.9, 0.08, 0.05 / 1.03
    expected = 1.03 / np.array([0.9, 0.08, 0.05])
    np.testing.assert_allclose(ct_weight_of(counts), expected, rtol=1e-12)


def test_vamp_prior_clusters_each_label():
    rng = np.random.default_rng(0)
    # label 0: two tight groups of 20 cells (p = 2 finds them); label 1: 3 cells, each its own prototype (p >= 3)
    means = np.concatenate([rng.normal(-5, 0.01, (20, 2)), rng.normal(5, 0.01, (20, 2)), rng.normal(0, 1, (3, 2))])
    variances = np.full_like(means, 0.5)
    labels = np.array([0] * 40 + [1] * 3)
    mean_v, var_v, mp_v = vamp_prior(means, variances, labels, n_labels=2, p=2, seed=0)
    assert mean_v.shape == (2, 2, 2) and mp_v.shape == (2, 2)
    np.testing.assert_allclose(sorted(mean_v[0, :, 0]), [-5, 5], atol=0.01)
    np.testing.assert_allclose(mp_v[0], [0.5, 0.5])
    np.testing.assert_allclose(var_v[0], 0.5 + means[:20].var(axis=0).mean(), atol=1e-3)  # mean var + var of means
    mean_v, var_v, mp_v = vamp_prior(means, variances, labels, n_labels=2, p=4, seed=0)
    np.testing.assert_allclose(mean_v[1, :3], means[40:])  # p >= cells: every cell its own prototype
    np.testing.assert_allclose(var_v[1, :3], 0.5)
    np.testing.assert_allclose(mp_v[1], [1 / 3, 1 / 3, 1 / 3, 0])
    np.testing.assert_allclose(var_v[1, 3], 1.0)  # unused slot: scvi-tools' (0 mean, 1 var, 0 weight)


def _kang_pair(folder: Path, n_genes: int = 150, n_spots: int = 100, cells_per_spot: int = 8, seed: int = 0):
    """(reference store, spots store, true proportions (spots x types)): Kang's cells split in halves per type, the
    spots sums of `cells_per_spot` cells of the other half in Dirichlet(0.5) proportions; the most dispersed genes."""
    kang = ad.read_h5ad(KANG)
    x = kang.X.tocsr().astype(np.float64)
    mean = np.asarray(x.mean(0)).ravel()
    variance = np.asarray(x.power(2).mean(0)).ravel() - mean**2
    kang = kang[:, np.sort(np.argsort(-variance / np.maximum(mean, 1e-3))[:n_genes])].copy()
    rng = np.random.default_rng(seed)
    labels = kang.obs["cell_type"].astype(str).to_numpy()
    types = sorted(set(labels))
    reference, held_out = [], {}
    for t in types:
        members = rng.permutation(np.flatnonzero(labels == t))
        reference.append(members[: len(members) // 2])
        held_out[t] = members[len(members) // 2 :]
    reference = np.sort(np.concatenate(reference))
    ref = ad.AnnData(
        kang.X[reference], obs=pd.DataFrame({"cell_type": labels[reference]}, index=kang.obs_names[reference])
    )
    ref.var_names = kang.var_names
    counts = np.stack([rng.multinomial(cells_per_spot, p) for p in rng.dirichlet(np.full(len(types), 0.5), n_spots)])
    x = kang.X.tocsr()
    rows = [
        sp.csr_matrix(x[np.concatenate([rng.choice(held_out[t], counts[s, i]) for i, t in enumerate(types)])].sum(0))
        for s in range(n_spots)
    ]
    spots = ad.AnnData(
        sp.vstack(rows).tocsr().astype(np.int32), obs=pd.DataFrame(index=[f"s{i}" for i in range(n_spots)])
    )
    spots.var_names = kang.var_names
    spots.obsm["spatial"] = rng.uniform(0, 10, size=(n_spots, 2))
    ref.write_h5ad(folder / "reference.h5ad")
    spots.write_h5ad(folder / "spots.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_store = build_store(
            BuildConfig(
                inputs=[str(folder / "reference.h5ad")], output=str(folder / "ref.zarr"), labels_key="cell_type"
            )
        )
        spot_store = build_store(BuildConfig(inputs=[str(folder / "spots.h5ad")], output=str(folder / "spots.zarr")))
    truth = pd.DataFrame(counts / cells_per_spot, index=spots.obs_names, columns=types)
    return ref_store, spot_store, truth


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return _kang_pair(tmp_path_factory.mktemp("destvi"))


@pytest.fixture(scope="module")
def reference(pair) -> CondSCVI:
    model = CondSCVI(pair[0], CondSCVIConfig(**SMALL), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(TrainConfig(max_epochs=15, n_epochs_kl_warmup=20), LoaderConfig(seed=0))
    return model


def test_destvi_starts_from_the_condscvi_with_its_decoder_frozen(pair, reference):
    model = DestVI.from_rna_model(pair[1], reference, device="cpu")
    module, source = model.module, reference.module.state_dict()
    for name, value in module.state_dict().items():
        if name.startswith(
            ("decoder.", "px_decoder.", "per_ct_bias", "px_r", "mean_vprior", "var_vprior", "mp_vprior")
        ):
            assert torch.equal(value, source[name]), name
    trainable = {name for name, _ in module.named_parameters()}
    assert not any(n.startswith(("decoder.", "px_decoder.", "per_ct_bias")) for n in trainable)
    assert {"px_r", "eta", "beta", "batch_embedding.weight"} <= trainable  # px_r trains from the CondSCVI's
    assert not torch.equal(module.batch_embedding.weight, reference.module.batch_embedding.weight)  # a fresh one
    assert model.cell_types == reference.schema.categorical["cell_type"]
    assert model.schema.batch_categories == ("spots.h5ad",) and model.schema.n_cells == 100
    with pytest.raises(ModelFileError, match="no prototypes"):  # a CondSCVI without its vamp prior
        state = dict(source) | {"mp_vprior": torch.zeros_like(source["mp_vprior"])}
        module.take_init_state(state)


def test_the_proportions_match_the_truth_of_a_small_simulation(pair, reference, tmp_path):
    """Kang cells summed into 100 spots of 8 cells: DestVI (40 epochs of minibatches of 16) recovers the proportions
    (Spearman over every entry above 0.25 (0.39 here; random proportions give ~0), RMSE below the uniform guess'),
    writes them back with the type names, and draws them. The benchmark (benchmarks/destvi_fidelity.py) trains
    longer, side by side with scvi-tools."""
    model = DestVI.from_rna_model(pair[1], reference, device="cpu", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(TrainConfig(max_epochs=40, n_epochs_kl_warmup=4), LoaderConfig(batch_size=16, seed=0))
    truth = pair[2]
    estimate = model.get_proportions().loc[truth.index, list(truth.columns)]
    np.testing.assert_allclose(estimate.sum(axis=1), 1.0, rtol=1e-5)
    rho = spearmanr(estimate.to_numpy().ravel(), truth.to_numpy().ravel()).statistic
    rmse = np.sqrt(((estimate.to_numpy() - truth.to_numpy()) ** 2).mean())
    uniform = np.sqrt(((1 / truth.shape[1] - truth.to_numpy()) ** 2).mean())
    assert rho > 0.25 and rmse < uniform, (rho, rmse, uniform)
    extended = model.get_proportions(keep_additional=True, normalize=False)
    assert list(extended.columns) == [*truth.columns, "additional_0"]
    gamma = model.get_gamma(return_numpy=True)
    assert gamma.shape == (100, model.config.n_latent, truth.shape[1]) and np.isfinite(gamma).all()
    scale = model.get_scale_for_ct(truth.columns[0])
    np.testing.assert_allclose(scale.sum(axis=1), 1.0, rtol=1e-4)
    (path,) = model.write_results()
    stored = ad.read_zarr(pair[1])
    assert dict(ad.read_zarr(pair[1]).obsm)["proportions"].shape == (100, truth.shape[1])
    order = model.get_proportions().loc[stored.obs_names]
    np.testing.assert_allclose(stored.obsm["proportions"], order.to_numpy(), rtol=1e-6)
    import zarr

    assert list(zarr.open_array(str(path), mode="r").attrs["columns"]) == list(truth.columns)
    ((name, draw),) = model.figures(tmp_path)
    assert name == "proportions_spatial" and draw().stat().st_size > 10_000


def test_destvi_options_build_and_give_finite_losses(pair, reference):
    """The amortization / prior options of scvi-tools' MRDeconv: per-spot parameters where not amortized."""
    for options in (
        {"amortization": "none", "prior_mode": "normal"},
        {"amortization": "proportion", "prior_mode": "normal"},
        {"amortization": "latent"},
        {"n_latent_amortization": 4},
        {"augmentation": False},
    ):
        model = DestVI.from_rna_model(pair[1], reference, device="cpu", **options)
        batch = next(iter(model._batches(None, None, 32)))
        model.module.train()
        output = model.module.loss(model.module.unpack(batch), kl_weight=0.5)
        assert torch.isfinite(output.loss) and output.reconstruction_loss.shape == (32,), options
        assert (model.module.V is None) == (options.get("amortization", "both") in ("both", "proportion"))
        assert model.get_proportions().shape == (100, 5)
    with pytest.raises(ValueError, match="needs amortization"):
        DestVIConfig(amortization="none")
