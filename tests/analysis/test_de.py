"""Bayesian DE: the statistics against hand computations, streaming reads, stim vs ctrl on Kang, and
CellBench RNA mixtures whose LFC is known from the pure cell lines."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from atlasvi.analysis import de
from atlasvi.analysis.protocols import HasClassifier, HasExpression
from atlasvi.api import SCVI
from atlasvi.data import BuildConfig, build_store, open_store
from atlasvi.data.writeback import ObsCategoricalWriter
from atlasvi.train import TrainConfig
from tests.conftest import KANG, RNAMIX

ISGS = ["ISG15", "IFI6", "IFIT1", "IFIT3", "MX1"]


def test_vanilla_bayes_factor_is_the_log_odds_of_h1_above_h2():
    s1 = np.array([[1.0, 0.1], [2.0, 0.2], [3.0, 0.3], [0.5, 0.4]])
    s2 = np.array([[0.9, 0.5], [2.5, 0.5], [1.0, 0.5], [0.1, 0.5]])
    info = de.bayes_factors(s1, s2, "vanilla", delta=None)
    np.testing.assert_allclose(info["proba_m1"], [0.75, 0.0])
    np.testing.assert_allclose(
        info["bayes_factor"], [np.log(0.75 + 1e-8) - np.log(0.25 + 1e-8), np.log(1e-8 / (1 + 1e-8))]
    )


def test_change_mode_against_numpy_by_hand(monkeypatch):
    rng = np.random.default_rng(0)
    s1 = rng.gamma(2.0, 1e-3, size=(400, 7)).astype(np.float32)
    s2 = (s1[rng.permutation(400)] * np.array([1, 1, 2, 4, 0.5, 0.25, 1.1], dtype=np.float32)).astype(np.float32)
    monkeypatch.setattr(de, "GENE_CHUNK", 3)  # reductions in gene chunks give the whole-matrix values
    info = de.bayes_factors(s1, s2, "change", delta=0.25, pseudocounts=1e-4)
    change = np.log2(s1.astype(np.float64) + 1e-4) - np.log2(s2.astype(np.float64) + 1e-4)
    p_de = np.maximum((change >= 0.25).mean(0), (change < -0.25).mean(0))
    np.testing.assert_allclose(info["proba_de"], p_de)
    np.testing.assert_allclose(info["bayes_factor"], np.log(p_de + 1e-8) - np.log(1 - p_de + 1e-8))
    small = np.log2(s1.astype(np.float64) + 1e-7) - np.log2(s2.astype(np.float64) + 1e-7)  # 1e-3 x pseudocount
    np.testing.assert_allclose(info["lfc_mean"], small.mean(0))
    np.testing.assert_allclose(info["lfc_median"], np.median(small, 0))
    np.testing.assert_allclose(info["lfc_std"], small.std(0, ddof=0))
    np.testing.assert_allclose(info["lfc_min"], small.min(0))
    assert info["lfc_mean"][3] == pytest.approx(-2.0, abs=1e-3)  # permuted draws x 4
    two = de.bayes_factors(s1, s2, "change", delta=0.25, pseudocounts=1e-4, test_mode="two")
    np.testing.assert_allclose(two["proba_de"], (change >= 0.25).mean(0) + (change < -0.25).mean(0))


def test_pseudocount_is_the_quantile_of_non_expressed_maxima_over_n_genes():
    scales_a = np.array([[1e-3, 2e-5, 4e-5, 0.5], [2e-3, 1e-5, 8e-5, 0.5]])
    scales_b = np.array([[1e-3, 1e-6, 1e-6, 0.5], [1e-3, 3e-6, 1e-6, 0.5]])
    zero_a = np.array([False, True, True, False])
    zero_b = np.array([False, True, True, False])
    expected_a = np.quantile([2e-5, 8e-5], 0.9)  # max over draws of the non-expressed genes, 0.9 quantile
    value = de.estimate_pseudocounts_offset(scales_a, scales_b, zero_a, zero_b)
    assert value == pytest.approx(max(expected_a, np.quantile([3e-6, 1e-6], 0.9)) / 4)
    assert de.estimate_pseudocounts_offset(scales_a, scales_b, ~zero_a & False, ~zero_b & False) == 1e-10


def test_fdr_calls_the_largest_top_set_with_mean_error_below_target():
    probas = pd.Series([0.5, 0.99, 0.1, 0.98, 0.9, 0.97], index=list("abcdef"))
    # sorted 0.99, 0.98, 0.97, 0.9, 0.5: mean(1 - p) = 0.01, 0.015, 0.02, 0.04, 0.132 -> the top 4
    called = de.fdr_de_prediction(probas, fdr=0.05)
    assert called.index.tolist() == list("abcdef")
    assert called.tolist() == [False, True, False, True, True, True]
    assert de.fdr_de_prediction(probas, fdr=0.012).sum() == 1


def test_delta_estimate_from_a_three_mode_lfc_distribution():
    rng = np.random.default_rng(1)
    means = np.concatenate([rng.normal(-2, 0.1, 200), rng.normal(0, 0.1, 600), rng.normal(2, 0.1, 200)])
    assert de.estimate_delta(means, rng) == pytest.approx(1.2, abs=0.05)


def test_idx_codes_and_groups_follow_scvi_tools():
    codes = de.index_codes(6, np.array([True, True, True, False, False, False]), np.array([2, 3]))
    np.testing.assert_array_equal(codes, [0, 0, 1, 1, -1, -1])  # a cell in both goes to group two
    tests = de.comparisons(np.array([0, 1, 2, 0, -1]), ("a", "b", "c"), None, None)
    assert [(t.name1, t.name2) for t in tests] == [("a", "Rest"), ("b", "Rest"), ("c", "Rest")]
    np.testing.assert_array_equal(tests[0].rows2, [1, 2, 4])  # the rest includes cells of no group
    assert tests[0].stats2 == (1, 2, 3)
    with pytest.raises(KeyError, match="'d' is not a category"):
        de.comparisons(np.array([0, 1]), ("a", "b"), ["d"], None)
    with pytest.raises(ValueError, match="size zero"):
        de.index_codes(3, np.zeros(3, dtype=bool), None)


@pytest.fixture(scope="module")
def kang_model(tmp_path_factory):
    """scVI after 20 epochs on Kang, batch `sample`, labels `group` = cell type x condition."""
    folder = tmp_path_factory.mktemp("de")
    adata = ad.read_h5ad(KANG)
    adata.obs["group"] = adata.obs["cell_type"].astype(str) + "_" + adata.obs["condition"].astype(str)
    adata.write_h5ad(folder / "kang.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = BuildConfig(
            inputs=[str(folder / "kang.h5ad")], output=str(folder / "kang.zarr"), batch_key="sample",
            labels_key="group", categorical_covariate_keys=[],
        )  # fmt: skip
        build_store(config)
    torch.manual_seed(0)
    model = SCVI(folder / "kang.zarr", device="cpu")
    model.fit(TrainConfig(max_epochs=20, n_epochs_kl_warmup=10))
    return model, adata


def test_raw_count_columns_match_the_counts(kang_model):
    model, adata = kang_model
    store = open_store(model.store.path)
    codes, categories = store.read_obs_categorical("group")
    stats = de.count_statistics(store, codes, len(categories))
    names = ad.read_zarr(store.path).obs_names
    counts = adata[names].X.toarray().astype(np.float64)
    member = codes == categories.index("B cells_stim")
    expected = counts[member]
    means = stats.means((categories.index("B cells_stim"),))
    np.testing.assert_allclose(means["raw_mean"], expected.mean(0))
    np.testing.assert_allclose(means["non_zeros_proportion"], (expected > 0).mean(0))
    normalized = counts * (1e4 / counts.sum(1, keepdims=True))
    np.testing.assert_allclose(means["raw_normalized_mean"], normalized[member].mean(0))
    rest = stats.means(tuple(c for c in range(len(categories) + 1) if c != categories.index("B cells_stim")))
    np.testing.assert_allclose(rest["raw_mean"], counts[~member].mean(0))


def test_draws_read_only_the_picked_rows_and_average_to_the_posterior_mean(kang_model):
    model, _ = kang_model
    store = open_store(model.store.path)
    rows = np.arange(100, 1500, 7)
    scales, batch = de.sample_scales(
        model.module, store, rows, 60, [None], np.random.default_rng(0), torch.Generator().manual_seed(0)
    )
    assert scales.shape == (60, 1267) and (batch == -1).all()
    read = np.flatnonzero(store.rows_read)
    assert 0 < len(read) <= 60 and np.isin(read, rows).all()  # bounded by the draws, never the group
    np.testing.assert_allclose(scales.sum(1), 1.0, rtol=1e-4)
    one = np.array([500])
    draws, _ = de.sample_scales(
        model.module, store, one, 3000, [None], np.random.default_rng(1), torch.Generator().manual_seed(1)
    )
    posterior = model.get_normalized_expression(rows=(500, 501), n_samples=3000, seed=2)[0]
    top = np.argsort(posterior)[-50:]
    np.testing.assert_allclose(draws.mean(0)[top], posterior[top], rtol=0.05)
    per_batch, ids = de.sample_scales(
        model.module, store, rows, 40, [0, 3], np.random.default_rng(0), torch.Generator().manual_seed(0)
    )
    assert per_batch.shape == (40, 1267) and ids.tolist() == [0] * 20 + [3] * 20


def test_interferon_genes_top_stim_vs_ctrl_on_kang(kang_model):
    model, _ = kang_model
    model.store.rows_read[:] = False
    result = model.differential_expression(
        "group", group1="CD14+ Monocytes_stim", group2="CD14+ Monocytes_ctrl", seed=0
    )
    assert result.columns.tolist() == [
        "proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "pseudocounts", "delta", "lfc_mean",
        "lfc_median", "lfc_std", "lfc_min", "lfc_max", "raw_mean1", "raw_mean2", "non_zeros_proportion1",
        "non_zeros_proportion2", "raw_normalized_mean1", "raw_normalized_mean2", "is_de_fdr_0.05", "comparison",
        "group1", "group2",
    ]  # fmt: skip
    assert result["proba_de"].is_monotonic_decreasing and len(result) == 1267
    # all five interferon-stimulated genes among the 30 of 1267 most up; ranks over training seeds 0-4: ISG15 23-28,
    # the others 2-24
    up = result.sort_values("lfc_mean", ascending=False).index[:30].tolist()
    assert all(g in up for g in ISGS)
    assert result.loc[ISGS, "is_de_fdr_0.05"].all() and (result.loc[ISGS, "lfc_mean"] > 2).all()
    assert result["is_de_fdr_0.05"].mean() < 0.5  # not every gene
    assert (result["comparison"] == "CD14+ Monocytes_stim vs CD14+ Monocytes_ctrl").all()
    again = model.differential_expression("group", group1="CD14+ Monocytes_stim", group2="CD14+ Monocytes_ctrl", seed=0)
    pd.testing.assert_frame_equal(result, again)  # the seed fixes every draw
    vanilla = model.differential_expression(
        "group", group1=["B cells_stim", "B cells_ctrl"], mode="vanilla", all_stats=False, n_samples_overall=300
    )
    assert vanilla.columns.tolist() == [
        "proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2", "comparison", "group1", "group2",
    ]  # fmt: skip
    assert vanilla["comparison"].unique().tolist() == ["B cells_stim vs Rest", "B cells_ctrl vs Rest"]
    model.store.rows_read[:] = False  # no raw-count pass when neither the columns nor the pseudocount need it
    model.differential_expression(
        "group", group1="B cells_stim", n_samples_overall=100, all_stats=False, pseudocounts=1e-5
    )
    assert 0 < model.store.rows_read.sum() <= 200
    with pytest.raises(KeyError, match="no categorical column 'nope'"):
        model.differential_expression("nope")


def test_one_de_config_for_keywords_and_overrides(kang_model):
    model, _ = kang_model
    assert isinstance(model.module, HasExpression) and not isinstance(model.module, HasClassifier)
    args = ("group", "B cells_stim", "B cells_ctrl")
    by_keywords = model.differential_expression(*args, n_samples_overall=200, delta=0.5, seed=3)
    config = de.DEConfig(n_samples_overall=200, delta=0.5, seed=7)
    by_config = model.differential_expression(*args, config=config, seed=3)
    pd.testing.assert_frame_equal(by_keywords, by_config)  # a keyword overrides the config's option
    assert config.seed == 7 and de.DEConfig().n_samples_overall == 5000
    with pytest.raises(ValueError, match="n_sample_overall"):
        model.differential_expression(*args, n_sample_overall=10)


def test_groupby_an_obs_column_written_after_the_build(kang_model):
    model, adata = kang_model
    names = ad.read_zarr(model.store.path).obs_names
    condition = adata.obs["condition"].astype(str)[names].to_numpy()
    with ObsCategoricalWriter(model.store.path, "stimulated", ["ctrl", "stim"]) as writer:
        writer.write((condition == "stim").astype(np.int64))
        writer.commit()
    codes, categories = open_store(model.store.path).read_obs_categorical("stimulated")
    assert categories == ("ctrl", "stim") and (codes == (condition == "stim")).all()
    result = model.differential_expression("stimulated", group1="stim", group2="ctrl", n_samples_overall=1000)
    top = result.sort_values("lfc_mean", ascending=False).index[:10]
    assert sum(g in top for g in ISGS) >= 3 and result.loc["ISG15", "is_de_fdr_0.05"]
    assert result.loc["ISG15", "raw_mean1"] > 20 * result.loc["ISG15", "raw_mean2"]


def test_mixture_lfc_follows_the_known_proportions_and_spike_ins_are_null(tmp_path):
    """CellBench RNA mixtures (H2228_H1975_HCC827 proportions): a mixture's expected expression is the
    proportion-weighted mean of the pure lines' library-normalised profiles, so each gene's true LFC between
    two mixtures is known; the ERCC spike-ins are the same in every cell and must not be called DE."""
    import scanpy as sc
    from scipy.stats import pearsonr

    adata = ad.read_h5ad(RNAMIX)
    hvg = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=1000, batch_key="batch", inplace=False)
    adata = adata[:, hvg["highly_variable"].to_numpy() | adata.var["is_ercc"].to_numpy()].copy()
    adata.obs = adata.obs[["batch", "mix_label"]].astype(str)
    adata.write_h5ad(tmp_path / "rnamix.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = BuildConfig(
            inputs=[str(tmp_path / "rnamix.h5ad")], output=str(tmp_path / "rnamix.zarr"), batch_key="batch",
            labels_key="mix_label",
        )  # fmt: skip
        build_store(config)
    torch.manual_seed(0)
    model = SCVI(tmp_path / "rnamix.zarr", device="cpu")
    model.fit(TrainConfig(max_epochs=60, n_epochs_kl_warmup=30, seed=0))
    mixture1, mixture2 = "0.68_0.16_0.16", "0.16_0.68_0.16"
    result = model.differential_expression("mix_label", group1=mixture1, group2=mixture2, seed=0)

    counts = adata.X.toarray().astype(np.float64)
    normalized = counts / counts.sum(1, keepdims=True)
    labels = adata.obs["mix_label"].to_numpy()
    pure = [normalized[labels == p].mean(0) for p in ("1.0_0.0_0.0", "0.0_1.0_0.0", "0.0_0.0_1.0")]
    expected1, expected2 = (
        sum(float(p) * mu for p, mu in zip(m.split("_"), pure, strict=True)) for m in (mixture1, mixture2)
    )
    ercc = adata.var["is_ercc"].to_numpy()
    genes = ~ercc & (expected1 >= 1e-5) & (expected2 >= 1e-5)
    truth = np.log2(expected1[genes] / expected2[genes])
    lfc = result["lfc_mean"].reindex(adata.var_names[genes]).to_numpy()
    raw = result[["raw_normalized_mean1", "raw_normalized_mean2"]].reindex(adata.var_names[genes]).to_numpy()
    raw_lfc = np.log2((raw[:, 0] + 1e-3) / (raw[:, 1] + 1e-3))  # the mixtures' own cells, no model
    assert genes.sum() > 900 and ercc.sum() == 26
    assert pearsonr(lfc, truth)[0] > 0.75  # 0.79 / 0.80 / 0.82 on seeds 0 / 1 / 2
    assert pearsonr(lfc, truth)[0] > pearsonr(raw_lfc, truth)[0] + 0.1  # the raw LFC: 0.60
    assert result.loc[adata.var_names[ercc], "is_de_fdr_0.05"].mean() <= 0.05
    assert result.loc[adata.var_names[genes], "is_de_fdr_0.05"].sum() >= 20  # yet genes are called


def test_de_of_a_protein_model_reads_the_proteins_its_module_uses(two_panel_store):
    """totalVI's encoder reads the protein counts: DE's scattered reads carry them (no KeyError 'protein')."""
    from atlasvi.api.totalvi import TOTALVI
    from atlasvi.models.totalvi import TOTALVIConfig

    model = TOTALVI(two_panel_store, config=TOTALVIConfig(n_latent=4, n_hidden=16), device="cpu")
    result = model.differential_expression("batch", n_samples_overall=40, seed=0)
    n_genes = open_store(two_panel_store).schema.n_genes
    assert len(result) == 2 * (n_genes + 29) and np.isfinite(result["lfc_mean"]).all()  # genes and proteins
