"""sysVI: the module's parts, and a small run on Baron human + mouse pancreas with species as the system."""

import warnings

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import torch
from torch.distributions import Normal

from atlasvi.api import SysVI
from atlasvi.data import LoaderConfig, open_store
from atlasvi.models.sysvi import SysVIConfig, SysVIModule
from atlasvi.models.sysvi.module import SysVIInputs, log_normalise
from atlasvi.train import TrainConfig

LOADER = LoaderConfig(batch_size=128, seed=0)
EPOCHS = 120


def test_log_normalise_is_scanpys_normalize_total_then_log1p(baron_store):
    adata = ad.read_zarr(baron_store)
    counts = np.asarray(adata.X.toarray(), dtype=np.float32)
    expected = ad.AnnData(counts.copy())
    sc.pp.normalize_total(expected, target_sum=1e4)
    sc.pp.log1p(expected)
    got = log_normalise(torch.from_numpy(counts), 1e4).numpy()
    np.testing.assert_allclose(got, expected.X, rtol=1e-5, atol=1e-5)
    assert log_normalise(torch.zeros(1, 3), 1e4).tolist() == [[0.0, 0.0, 0.0]]  # an empty cell stays 0


def test_other_system_is_never_the_cells_own_and_reaches_every_other():
    module = SysVIModule(_schema_with_systems(3), SysVIConfig(n_latent=2, n_hidden=8))
    system = torch.tensor([0, 1, 2] * 300)
    torch.manual_seed(0)
    other = module.other_system(system)
    assert (other != system).all() and 0 <= int(other.min()) and int(other.max()) < 3
    for s in range(3):
        assert set(other[system == s].tolist()) == set(range(3)) - {s}


def test_cycle_distance_is_zero_for_equal_means_and_standardised():
    loc = torch.randn(50, 4)
    same = SysVIModule.cycle_distance(Normal(loc, 1.0), Normal(loc.clone(), 2.0))
    assert same.shape == (50,) and torch.allclose(same, torch.zeros(50))
    # scaling both latents by 10 leaves the standardised distance as it was (no shrinking the latent to cheat)
    other = loc + 0.3 * torch.randn(50, 4)
    small = SysVIModule.cycle_distance(Normal(loc, 1.0), Normal(other, 1.0))
    large = SysVIModule.cycle_distance(Normal(10 * loc, 1.0), Normal(10 * other, 1.0))
    assert torch.allclose(small, large, rtol=1e-4) and small.mean() > 0


@pytest.mark.parametrize("cycle_input", ["cross_system", "own_system"])
def test_the_cycle_reencodes_the_decoding_its_config_names(cycle_input):
    """cross_system (the paper): z decoded as the other system; own_system (scvi-tools 1.4.2): the cell's own
    decoding; either is re-encoded with the other system's label."""
    schema = _schema_with_systems(2)
    config = SysVIConfig(n_latent=2, n_hidden=8, dropout_rate=0, prior="standard_normal", cycle_input=cycle_input)
    torch.manual_seed(0)
    module = SysVIModule(schema, config).eval()
    x, system = torch.rand(40, 6), torch.tensor([0, 1] * 20)
    inputs = SysVIInputs(x=x, system=system, categorical=(), continuous=None)
    torch.manual_seed(1)
    got = module.loss(inputs).extra_metrics["cycle_loss"]
    torch.manual_seed(1)
    inference = module.inference(inputs)
    own = module.generative(inference["z"], inputs)["px"]
    other = module.other_system(system)
    cross = module.generative(inference["z"], inputs, other)["px"]
    expected = {
        name: SysVIModule.cycle_distance(inference["qz"], module._encode(px.loc, other, inputs)).mean()
        for name, px in (("own_system", own), ("cross_system", cross))
    }
    assert torch.allclose(got, expected[cycle_input])
    assert not torch.allclose(expected["own_system"], expected["cross_system"])


def test_the_vamp_prior_reads_running_statistics_the_cycle_pass_has_updated():
    """As scvi-tools' SysVAE: the cycle's encoding (training mode) updates the encoder's batch-norm running
    statistics before the VampPrior encodes its pseudo-inputs (eval mode, with those running statistics)."""
    torch.manual_seed(0)
    module = SysVIModule(_schema_with_systems(2), SysVIConfig(n_latent=2, n_hidden=8, dropout_rate=0)).train()
    inputs = SysVIInputs(x=torch.rand(40, 6), system=torch.tensor([0, 1] * 20), categorical=(), continuous=None)
    norm = module.encoder.fc.layers[0][1]
    seen, prior_log_prob = [], module.prior_log_prob

    def recording(z: torch.Tensor) -> torch.Tensor:
        seen.append((int(norm.num_batches_tracked), norm.running_mean.clone()))
        return prior_log_prob(z)

    module.prior_log_prob = recording
    module.loss(inputs)
    assert len(seen) == 1 and seen[0][0] == 2  # the cells' encoding and the cycle's, then the prior
    assert torch.equal(seen[0][1], norm.running_mean)


def _schema_with_systems(n: int):
    from atlasvi.data import StoreSchema

    return StoreSchema(
        n_cells=10, n_genes=6, gene_ids=tuple(f"g{i}" for i in range(6)), gene_names=tuple(f"g{i}" for i in range(6)),
        batch_key="system", labels_key=None, categorical={"system": tuple(f"s{i}" for i in range(n))},
        continuous=(), library_log_means=(0.0,) * n, library_log_vars=(1.0,) * n, count_dtype="float32",
    )  # fmt: skip


def test_a_single_system_is_refused():
    with pytest.raises(ValueError, match="sysVI needs >= 2 systems"):
        SysVIModule(_schema_with_systems(1))


@pytest.fixture(scope="module")
def baron_model(baron_store) -> SysVI:
    """sysVI with scvi-tools' defaults but n_hidden 128, EPOCHS epochs on Baron (species = system)."""
    model = SysVI(baron_store, SysVIConfig(n_hidden=128), device="cpu")
    model.fit(TrainConfig(max_epochs=EPOCHS, seed=0), LOADER)
    return model


def test_baron_loss_falls_and_the_cycle_term_is_logged(baron_model):
    history = baron_model.history
    assert [r.kl_weight for r in history] == [1.0] * EPOCHS  # no KL warm-up, as scvi-tools' SysVI
    first, last = history[0], history[-1]
    assert last.train_loss < first.train_loss - 0.1 * abs(first.train_loss)
    assert last.validation_elbo < first.validation_elbo - 0.05 * abs(first.validation_elbo)
    cycle = [r.extra_metrics["cycle_loss"] for r in history]
    assert all(np.isfinite(cycle)) and min(cycle) > 0
    latent = baron_model.get_latent_representation()
    assert latent.shape == (328, 15) and np.isfinite(latent).all()


def test_baron_latent_mixes_the_species_and_keeps_the_cell_types(baron_model, baron_store):
    """A small version of the benchmark's check: the species mix more in sysVI's latent than in the
    log-normalised expression's first 15 principal components, and the cell types stay apart (after 40 epochs
    the species entropy is still 0.32, below the PCA's: this fails on a model that does not integrate)."""
    from sklearn.decomposition import PCA
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

    store = ad.read_zarr(baron_store)
    species, labels = store.obs["species"].to_numpy(), store.obs["cell_type"].to_numpy()
    expression = log_normalise(torch.from_numpy(np.asarray(store.X.toarray(), dtype=np.float32)), 1e4).numpy()

    def entropy(latent: np.ndarray) -> float:  # species entropy among 50 nearest other cells, / log 2
        neighbours = NearestNeighbors(n_neighbors=51).fit(latent).kneighbors(latent)[1][:, 1:]
        share = (species[neighbours] == species[0]).mean(axis=1).clip(1e-12, 1 - 1e-12)
        return float(np.mean(-(share * np.log2(share) + (1 - share) * np.log2(1 - share))))

    latent = baron_model.get_latent_representation()
    uncorrected = PCA(15, random_state=0).fit_transform(expression)
    assert entropy(latent) > 0.55 and entropy(uncorrected) < 0.5  # measured: 0.66 and 0.44
    assert cross_val_score(KNeighborsClassifier(15), latent, labels, cv=5).mean() > 0.95  # measured: 0.997


def test_pseudo_inputs_are_log_normalised_training_cells_of_both_systems(baron_model, baron_store):
    """Initialised at the first step from the first minibatch's cells (then trained, so: nearest cells)."""
    module = baron_model.module
    assert bool(module.pseudo_initialised) and module.pseudo_x.shape == (5, 1000)
    store = ad.read_zarr(baron_store)
    cells = log_normalise(torch.from_numpy(np.asarray(store.X.toarray(), dtype=np.float32)), 1e4)
    train_rows = baron_model.validation_rows[0]
    distances = torch.cdist(module.pseudo_x.detach(), cells)
    nearest = distances.argmin(dim=1)
    assert (nearest < train_rows).all()  # training rows only
    codes = store.obs["species"].cat.codes.to_numpy()
    assert module.pseudo_codes[0].tolist() == codes[nearest.numpy()].tolist()


def test_the_job_trains_without_kl_warmup_unless_asked(baron_store):
    from atlasvi.train.job import TrainJobConfig

    job = TrainJobConfig.model_validate({"store": str(baron_store), "model": {"name": "sysvi"}})
    assert job.train.n_epochs_kl_warmup == 0 and job.latent_key == "X_sysvi"
    asked = TrainJobConfig.model_validate({"model": {"name": "sysvi"}, "train": {"n_epochs_kl_warmup": 5}})
    assert asked.train.n_epochs_kl_warmup == 5


def test_system_key_can_be_a_categorical_covariate(baron_store, tmp_path):
    """With system_key naming another covariate, the batch key is an ordinary (injected, not cycled) one."""
    from atlasvi.data import BuildConfig, build_store
    from tests.conftest import BARON

    path = tmp_path / "baron_donor.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = BuildConfig(
            inputs=[str(BARON)], output=str(path), batch_key="donor", labels_key="cell_type",
            categorical_covariate_keys=["species"],
        )  # fmt: skip
        build_store(config)
    schema = open_store(path).schema
    module = SysVIModule(schema, SysVIConfig(n_latent=4, n_hidden=16, system_key="species"))
    assert module.used_keys == ("species", "donor") and module.n_system == 2
    assert module.encoder.fc.n_categories == [2, 6]
