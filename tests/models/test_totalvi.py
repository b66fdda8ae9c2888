"""totalVI: scvi-tools' defaults, the background prior from the store, the masked protein likelihood, and a small
run on the two-panel CITE-seq store (pbmc10k's 14 antibodies, pbmc5k's 29) that imputes the missing proteins."""

import numpy as np
import pytest
import torch

from atlasvi.api import TOTALVI
from atlasvi.data import LoaderConfig, open_store
from atlasvi.models.totalvi import TOTALVIConfig, TOTALVIModule
from atlasvi.train import TrainConfig
from atlasvi.train.job import make_loaders, train_config_for

LOADER = LoaderConfig(batch_size=128, seed=0)
SMALL = TOTALVIConfig(n_latent=6, n_hidden=32)


def test_the_defaults_are_scvi_tools():
    config = TOTALVIConfig()
    assert (config.n_latent, config.n_hidden, config.n_layers_encoder, config.n_layers_decoder) == (20, 256, 2, 1)
    assert (config.dropout_rate_encoder, config.dropout_rate_decoder) == (0.2, 0.2)
    assert (config.gene_likelihood, config.gene_dispersion, config.protein_dispersion) == ("nb", "gene", "protein")
    assert config.encode_covariates and config.use_batch_norm == "both" and config.use_observed_lib_size
    train = train_config_for(config, None)  # TOTALVI.train: lr 4e-3, warm-up 0.75 x cells steps, plateau, stop
    assert (train.lr, train.n_epochs_kl_warmup, train.kl_warmup_steps_per_cell) == (4e-3, None, 0.75)
    assert train.reduce_lr_on_plateau and (train.lr_factor, train.lr_patience, train.lr_threshold) == (0.6, 30, 0.0)
    assert train.early_stopping and train.early_stopping_patience == 45
    assert train_config_for(config, TrainConfig(lr=1e-3)).lr == 1e-3  # the caller's field wins


def test_fit_trains_on_totalvi_trains_batch_of_256_unless_the_caller_sets_one(two_panel_store):
    # scvi-tools' TOTALVI.train(batch_size=256) (its other models' train: 128, the loader's default): the two-panel
    # store's 360 training cells are 2 minibatches at 256, 3 at 128
    model = TOTALVI(two_panel_store, config=SMALL, device="cpu")
    model.fit(TrainConfig(max_epochs=1, n_epochs_kl_warmup=1, seed=4))
    assert model.loader_config == LoaderConfig(batch_size=256, seed=4) and len(model.history[0].step_losses) == 2
    model.fit(TrainConfig(max_epochs=1, n_epochs_kl_warmup=1), LoaderConfig(seed=1))  # no batch size: the model's
    assert model.loader_config == LoaderConfig(batch_size=256, seed=1) and len(model.history[0].step_losses) == 2
    model.fit(TrainConfig(max_epochs=1, n_epochs_kl_warmup=1), LoaderConfig(batch_size=128))  # the caller's wins
    assert model.loader_config.batch_size == 128 and len(model.history[0].step_losses) == 3


def test_the_background_prior_starts_at_the_stores_per_batch_values(two_panel_store, cbmc_store):
    schema = open_store(two_panel_store).schema
    proteins = schema.modalities["protein"]
    assert len(proteins.features) == 29 and [sum(m) for m in proteins.batch_mask] == [14, 29]
    module = TOTALVIModule(schema, SMALL)  # 29 proteins > 10: the empirical prior, per batch, for every protein
    assert module.background_pro_alpha.shape == (29, 2)
    for b in range(2):
        np.testing.assert_allclose(module.background_pro_alpha[:, b].detach(), proteins.background_log_means[b])
        np.testing.assert_allclose(
            module.background_pro_log_beta[:, b].exp().detach(), proteins.background_log_scales[b], rtol=1e-6
        )
    assert proteins.background_log_means[0] == pytest.approx(3.0877, abs=1e-3)  # a GMM fit at build: stable figure
    flat = TOTALVIModule(schema, SMALL.model_copy(update={"empirical_protein_background_prior": False}))
    assert (flat.background_pro_alpha == 3.0).all() and (flat.background_pro_log_beta == 0.0).all()
    cbmc = TOTALVIModule(open_store(cbmc_store).schema, SMALL)  # 13 proteins, one batch
    assert cbmc.background_pro_alpha.shape == (13, 1)


def _batch(store):
    schema = open_store(store).schema
    module = TOTALVIModule(schema, SMALL)
    train, validation = make_loaders(open_store(store), LOADER, 0.1, modalities=module.used_modalities)
    with train, validation:
        batch = next(iter(train))
    return module, batch


def _loss(module, batch, seed: int = 0):
    module.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return module.loss(module.unpack(batch))


def test_unmeasured_proteins_change_nothing_and_measured_ones_do(two_panel_store):
    module, batch = _batch(two_panel_store)
    mask = batch.masks["protein"]
    assert (~mask).any() and mask.any()  # pbmc10k's cells lack 15 proteins
    before = _loss(module, batch)
    counts = batch.obsm["protein"].clone()
    batch.obsm["protein"] = torch.where(mask, counts, torch.full_like(counts, 5000.0))
    after = _loss(module, batch)
    assert torch.equal(before.loss, after.loss) and torch.equal(before.reconstruction_loss, after.reconstruction_loss)
    batch.obsm["protein"] = torch.where(mask, counts + 50.0, counts)
    changed = _loss(module, batch)
    assert (changed.reconstruction_loss - before.reconstruction_loss).abs().min() > 1.0


def test_the_masked_likelihood_sums_the_measured_proteins_only(two_panel_store):
    module, batch = _batch(two_panel_store)
    inputs = module.unpack(batch)
    module.eval()
    torch.manual_seed(0)
    inference = module.inference(inputs)
    generative = module.generative(inference["qz"].loc, inference["library"], inputs)
    per_protein = -generative["py"].log_prob(inputs.y)
    expected = (per_protein * inputs.y_mask).sum(-1)
    assert (per_protein[~inputs.y_mask] > 0).all()  # the unmasked terms would have added to the loss
    rna = -generative["px"].log_prob(inputs.x).sum(-1)
    torch.manual_seed(0)
    got = module.loss(inputs)
    assert torch.allclose(got.extra_metrics["reconstruction_protein"], expected.mean(), rtol=0.05)
    assert torch.allclose(got.extra_metrics["reconstruction_rna"], rna.mean(), rtol=0.05)


@pytest.fixture(scope="module")
def trained(two_panel_store) -> TOTALVI:
    model = TOTALVI(two_panel_store, config=SMALL, device="cpu")
    model.fit(TrainConfig(max_epochs=60, n_epochs_kl_warmup=20), LOADER)
    return model


def test_a_two_panel_store_trains_and_imputes_the_missing_proteins(trained, two_panel_store):
    history = trained.history
    assert history[-1].validation_elbo < 0.8 * history[0].validation_elbo
    schema = open_store(two_panel_store).schema
    proteins = schema.modalities["protein"]
    missing = ~np.array(proteins.batch_mask[0])  # not in pbmc10k's panel
    codes = open_store(two_panel_store).read_obs_categorical(schema.batch_key)[0]
    in_10k = codes == 0
    as_5k = {"transform_batch": schema.batch_categories[1], "include_protein_background": True}
    imputed = trained.get_protein_expression(**as_5k)
    assert imputed.shape == (400, 29) and np.isfinite(imputed).all()
    values = imputed[in_10k][:, missing]
    assert (values > 0.1).all()  # imputed, not zeros
    assert (values.std(axis=0) > 0).all()  # per cell, not one constant
    # the pbmc10k cells' imputed levels of the 15 proteins rank as pbmc5k's measured levels do
    block = open_store(two_panel_store).read_rows(0, 400, ("protein",))
    measured = block.obsm["protein"][~in_10k][:, missing]
    rho = np.corrcoef(np.log1p(values.mean(0)), np.log1p(measured.mean(0)))[0, 1]
    assert rho > 0.75, rho  # 0.86 at seed 0
    foreground = trained.get_protein_foreground_probability()
    assert foreground.shape == (400, 29) and (foreground >= 0).all() and (foreground <= 1).all()
    rna = trained.get_normalized_expression(rows=(0, 50))
    np.testing.assert_allclose(rna.sum(1), 1.0, rtol=1e-4)


def test_de_over_genes_and_proteins_finds_cd19_up_in_b_cells(trained, two_panel_store):
    """One table as scvi-tools' TOTALVI.differential_expression: the genes and "<protein>_protein" rows, these
    raw columns count only the cells that measured the protein. B cells (MS4A1 or CD79A RNA): CD19 protein up."""
    store = open_store(two_panel_store)
    schema, block = store.schema, store.read_rows(0, store.n_cells, ("protein",))
    counts = np.zeros((store.n_cells, schema.n_genes))
    for row in range(store.n_cells):
        span = slice(block.indptr[row], block.indptr[row + 1])
        counts[row, block.indices[span]] = block.data[span]
    genes = list(schema.gene_names)
    b_cells = (counts[:, genes.index("MS4A1")] > 0) | (counts[:, genes.index("CD79A")] > 0)
    assert 30 <= b_cells.sum() <= 60
    result = trained.differential_expression(idx1=b_cells, idx2=~b_cells, n_samples_overall=400, seed=0)
    assert len(result) == schema.n_genes + 29 and result.index.str.endswith("_protein").sum() == 29
    proteins = result.loc[[f"{p}_protein" for p in trained.protein_names]]
    assert proteins["raw_normalized_mean1"].isna().all() and (proteins["scale1"] > 0.1).all()  # + prior count
    # the B-cell proteins CD19 (both panels) and CD20 (pbmc5k's) the most up in B cells, CD4 down
    lfc = proteins["lfc_mean"].sort_values(ascending=False)
    assert lfc["CD19_TotalSeqB_protein"] > 2.0, lfc.head()
    assert set(lfc.index[:2]) == {"CD19_TotalSeqB_protein", "CD20_TotalSeqB_protein"}  # 3.25 and 2.40 at seed 0
    assert proteins.loc["CD19_TotalSeqB_protein", "proba_de"] > 0.7 and lfc["CD4_TotalSeqB_protein"] < -0.3
    # raw columns over the measuring cells only: CD20 is in pbmc5k's panel alone
    column = list(trained.protein_names).index("CD20_TotalSeqB")
    measured = block.masks["protein"][:, column]
    expected = block.obsm["protein"][b_cells & measured, column].mean()
    assert proteins.loc["CD20_TotalSeqB_protein", "raw_mean1"] == pytest.approx(expected)
    assert proteins.loc["CD20_TotalSeqB_protein", "raw_mean1"] > 5 * proteins.loc["CD20_TotalSeqB_protein", "raw_mean2"]
    # use_field: the proteins alone, from the same draws
    only_proteins = trained.differential_expression(
        idx1=b_cells, idx2=~b_cells, n_samples_overall=400, seed=0, use_field=["protein"]
    )
    assert sorted(only_proteins.index) == sorted(proteins.index)
    np.testing.assert_allclose(only_proteins.loc[proteins.index, "lfc_mean"], proteins["lfc_mean"], rtol=1e-5)
    with pytest.raises(ValueError, match="use_field"):
        trained.differential_expression(idx1=b_cells, use_field=["atac"])


def test_save_load_gives_the_same_protein_expression(trained, two_panel_store, tmp_path):
    loaded = TOTALVI.load(trained.save(tmp_path / "totalvi"), two_panel_store, device="cpu")
    np.testing.assert_array_equal(
        loaded.get_protein_expression(rows=(0, 64)), trained.get_protein_expression(rows=(0, 64))
    )
    assert loaded.protein_names == trained.protein_names


def test_a_study_that_measured_no_antibody_is_masked_whole_and_imputed(cbmc_store, tmp_path):
    import anndata as ad
    import pandas as pd

    from atlasvi.data import BuildConfig, build_store

    cite = ad.read_zarr(cbmc_store)[:300].copy()
    rna = ad.read_zarr(cbmc_store)[300:].copy()
    cite.obsm["protein_expression"] = pd.DataFrame(
        cite.obsm["protein_expression"], index=cite.obs_names, columns=list(cite.uns["protein_expression_names"])
    )
    rna.obsm["protein_expression"] = pd.DataFrame(index=rna.obs_names)  # an obsm DataFrame of no antibodies
    for part, name in ((cite, "cite"), (rna, "rna")):
        part.obs["study"] = name
        part.uns = {}
        part.write_h5ad(tmp_path / f"{name}.h5ad")
    store = tmp_path / "mixed.zarr"
    inputs = [str(tmp_path / "cite.h5ad"), str(tmp_path / "rna.h5ad")]
    build_store(BuildConfig(inputs=inputs, output=str(store), protein_key="protein_expression", batch_key="study"))
    proteins = open_store(store).schema.modalities["protein"]
    assert [sum(m) for m in proteins.batch_mask] == [13, 0]
    assert (proteins.background_log_means[1], proteins.background_log_scales[1]) == (0.0, 0.05)  # scvi-tools' rule
    model = TOTALVI(store, config=SMALL, device="cpu")
    model.fit(TrainConfig(max_epochs=2, n_epochs_kl_warmup=1), LOADER)
    imputed = model.get_protein_expression(transform_batch="cite", include_protein_background=True)
    assert np.isfinite(imputed).all() and (imputed > 0).all()


def test_query_mapping_adds_the_new_batch_with_its_own_prior(cbmc_store, tmp_path):
    import anndata as ad

    from atlasvi.data import BuildConfig, build_store
    from tests.conftest import CBMC

    reference = TOTALVI(cbmc_store, config=SMALL, device="cpu")
    reference.fit(TrainConfig(max_epochs=2, n_epochs_kl_warmup=1), LOADER)
    query_h5ad = tmp_path / "query_cbmc.h5ad"
    ad.read_h5ad(CBMC)[600:900].copy().write_h5ad(query_h5ad)
    query_store = tmp_path / "query.zarr"
    build_store(BuildConfig(inputs=[str(query_h5ad)], output=str(query_store), protein_key="protein_expression"))
    query = TOTALVI.load_query_data(query_store, reference, device="cpu")
    prior = open_store(query_store).schema.modalities["protein"]
    alpha = query.module.background_pro_alpha.detach()
    assert alpha.shape == (13, 2)
    torch.testing.assert_close(alpha[:, 0], reference.module.background_pro_alpha.detach()[:, 0])
    np.testing.assert_allclose(alpha[:, 1], prior.background_log_means[0], rtol=1e-6)  # the query's own prior
    assert (
        query.query_masks["background_pro_alpha"][:, 1].all()
        and not query.query_masks["background_pro_alpha"][:, 0].any()
    )
    query.fit(TrainConfig(max_epochs=2, n_epochs_kl_warmup=1), LOADER)
    latent = query.get_latent_representation()
    assert latent.shape == (300, 6) and np.isfinite(latent).all()
    torch.testing.assert_close(
        query.module.background_pro_alpha.detach()[:, 0], reference.module.background_pro_alpha.detach()[:, 0]
    )  # the reference's batch did not move


def test_query_proteins_are_matched_by_name_and_the_missing_ones_masked(cbmc_store, tmp_path):
    """A query whose panel has the reference's proteins in another order, lacks two (CD19, CD8) and has one more:
    its columns are read in the reference's order by name; the two it lacks are not measured (mask False, 0 in,
    imputed out, no raw DE mean), the extra one is not read; a query with none of them is refused in one line."""
    import anndata as ad
    import pandas as pd

    from atlasvi.data import BuildConfig, build_store
    from atlasvi.models.saving import IncompatibleStoreError
    from tests.conftest import CBMC

    reference = TOTALVI(cbmc_store, config=SMALL, device="cpu")
    reference.fit(TrainConfig(max_epochs=2, n_epochs_kl_warmup=1), LOADER)
    names = list(reference.protein_names)
    cells = ad.read_h5ad(CBMC)[600:900].copy()
    counts = pd.DataFrame(cells.obsm["protein_expression"], index=cells.obs_names, columns=names)
    panel = counts[[p for p in reversed(names) if p not in ("CD19", "CD8")]].assign(CD999=7)
    cells.obsm["protein_expression"] = panel
    cells.write_h5ad(tmp_path / "query.h5ad")
    store = tmp_path / "query.zarr"
    build_store(BuildConfig(inputs=[str(tmp_path / "query.h5ad")], output=str(store), protein_key="protein_expression"))
    query = TOTALVI.load_query_data(store, reference, device="cpu")
    assert query.protein_names == reference.protein_names
    lacking = [names.index("CD19"), names.index("CD8")]
    new_panel = np.array(query.schema.modalities["protein"].batch_mask[1])
    assert not new_panel[lacking].any() and new_panel.sum() == 11
    batch = next(iter(query._batches(None, (0, 64), 64)))
    stored = ad.read_zarr(store)
    order = cells.obs_names.get_indexer(stored.obs_names[batch.rows.numpy()])
    expected = counts.to_numpy()[order]
    mask = batch.masks["protein"].numpy()
    assert not mask[:, lacking].any() and mask.sum() == 64 * 11
    np.testing.assert_array_equal(batch.obsm["protein"].numpy()[mask], expected[mask])
    assert (batch.obsm["protein"].numpy()[:, lacking] == 0).all()
    query.fit(TrainConfig(max_epochs=2, n_epochs_kl_warmup=1), LOADER)
    imputed = query.get_protein_expression(protein_list=["CD19", "CD8"])
    assert np.isfinite(imputed).all() and (imputed > 0).all()
    table = query.differential_expression(idx1=np.arange(150), idx2=np.arange(150, 300), n_samples_overall=50)
    assert table.loc[["CD19_protein", "CD8_protein"], "raw_mean1"].isna().all()
    first = cells.obs_names.get_indexer(stored.obs_names[:150])  # idx1: the store's first 150 rows
    assert table.loc["CD3_protein", "raw_mean1"] == pytest.approx(counts["CD3"].to_numpy()[first].mean())
    none = cells.copy()
    none.obsm["protein_expression"] = panel.rename(columns=lambda p: f"{p}_other")
    none.write_h5ad(tmp_path / "none.h5ad")
    build_store(
        BuildConfig(
            inputs=[str(tmp_path / "none.h5ad")], output=str(tmp_path / "none.zarr"), protein_key="protein_expression"
        )
    )
    with pytest.raises(IncompatibleStoreError, match="none of the model's 13 protein features") as refused:
        TOTALVI.load_query_data(tmp_path / "none.zarr", reference, device="cpu")
    assert "\n" not in str(refused.value)
