"""scVI module on real stores: every parameter used, training beats a per-gene NB baseline, and the sparse fast path
gives the dense path's steps."""

import copy
import dataclasses
import warnings

import numpy as np
import pytest
import torch

from atlasvi.data import BuildConfig, LoaderConfig, SparseCounts, StreamingLoader, build_store, open_store
from atlasvi.datasets import CELLBENCH
from atlasvi.distributions import NegativeBinomial
from atlasvi.models.scvi import SCVIConfig, SCVIModule
from atlasvi.models.vae import kl_standard_normal


@pytest.fixture(scope="module")
def cellbench_store(tmp_path_factory):
    """The embedded CellBench file: 5 batches, labels, a categorical and a continuous covariate."""
    path = tmp_path_factory.mktemp("scvi") / "cellbench.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_store(
            BuildConfig(
                inputs=[str(CELLBENCH)], output=str(path), batch_key="batch", labels_key="cell_line",
                categorical_covariate_keys=["technology"], continuous_covariate_keys=["total_count_per_cell"],
                n_top_genes=300,
            )
        )  # fmt: skip
    return path


CONFIGS = [
    {},
    {"gene_likelihood": "nb", "dispersion": "gene-batch"},
    {"gene_likelihood": "poisson", "use_observed_lib_size": False},
    {"dispersion": "gene-label", "encode_covariates": True, "n_layers": 2},
    {"dispersion": "gene-cell", "deeply_inject_covariates": False, "use_batch_norm": "none", "use_layer_norm": "both"},
]


@pytest.mark.parametrize("options", CONFIGS)
def test_every_parameter_gets_a_gradient(cellbench_store, options):
    """No parameter a configuration does not use: DDP needs no find_unused_parameters."""
    torch.manual_seed(0)
    module = SCVIModule(open_store(cellbench_store).schema, SCVIConfig(**options))
    batch = next(iter(StreamingLoader(cellbench_store, LoaderConfig(batch_size=64))))
    output = module.loss(module.unpack(batch))
    output.loss.backward()
    unused = [name for name, p in module.named_parameters() if p.grad is None]
    assert unused == []
    assert torch.isfinite(output.loss) and output.reconstruction_loss.shape == (64,)
    if options.get("use_observed_lib_size") is False:
        assert set(output.kl_local) == {"kl_z", "kl_library"}


def _negative_elbo(module: SCVIModule, loader: StreamingLoader) -> float:
    module.eval()
    with torch.no_grad():
        values = [module.loss(module.unpack(b)).negative_elbo for b in loader]
    module.train()
    return float(torch.cat(values).mean())


def _per_gene_nb_baseline(loader: StreamingLoader) -> float:
    """-log p(x) per cell under x_g ~ NB(library * p_g, theta_g), moments fitted on the same cells."""
    counts = torch.cat([b.counts() for b in loader]).double()
    library = counts.sum(1, keepdim=True)
    fractions = counts.sum(0) / counts.sum()
    mean = library * fractions
    excess = ((counts - mean) ** 2 - mean).mean(0)
    theta = (mean.mean(0) ** 2 / excess.clamp_min(1e-6)).clamp(1e-3, 1e4)
    return float(-NegativeBinomial(mean, theta).log_prob(counts).sum(1).mean())


def test_training_beats_a_per_gene_negative_binomial(embedded_store):
    """Fails when the model is wrong (a KL sign, a missing library term): scVI must explain more."""
    torch.manual_seed(0)
    loader = StreamingLoader(embedded_store, LoaderConfig(batch_size=128, seed=0))
    module = SCVIModule(open_store(embedded_store).schema)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3, eps=0.01)
    before = _negative_elbo(module, loader)
    for _ in range(30):
        for batch in loader:
            optimizer.zero_grad()
            module.loss(module.unpack(batch)).loss.backward()
            optimizer.step()
    after = _negative_elbo(module, loader)
    baseline = _per_gene_nb_baseline(loader)
    assert after < 0.7 * before
    assert after < baseline - 20, (after, baseline)  # 402 vs 455 nats per cell when written
    assert np.isfinite(after)
    # the KL the loss reports is the analytic KL(N(mu, sigma^2) || N(0, I)), computed here independently
    module.eval()
    with torch.no_grad():
        inputs = module.unpack(next(iter(loader)))
        reported = module.loss(inputs).kl_local["kl_z"]
        qz = module.inference(inputs)["qz"]
    analytic = 0.5 * (qz.loc**2 + qz.scale**2 - 1 - 2 * torch.log(qz.scale)).sum(-1)
    assert (reported >= 0).all()
    torch.testing.assert_close(reported, analytic, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", CONFIGS)
def test_the_sparse_fast_path_gives_the_dense_paths_steps(cellbench_store, options):
    """Sparse input to the first layer and the fused NB / ZINB likelihood vs the same module on densified counts:
    the same per-step losses over 6 Adam steps (same draws; 1e-5 relative) and per-cell reconstruction terms."""
    torch.manual_seed(0)
    sparse = SCVIModule(open_store(cellbench_store).schema, SCVIConfig(**options))
    dense = copy.deepcopy(sparse)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2, eps=0.01, fused=True) for m in (sparse, dense)]
    batches = list(StreamingLoader(cellbench_store, LoaderConfig(batch_size=64, seed=0)))[:6]
    for step, batch in enumerate(batches):
        outputs = []
        for module, optimizer in zip((sparse, dense), optimizers, strict=True):
            inputs = module.unpack(batch)
            assert isinstance(inputs.x, SparseCounts)
            if module is dense:
                inputs = dataclasses.replace(inputs, x=batch.counts())
            torch.manual_seed(step)
            output = module.loss(inputs, kl_weight=0.5)
            optimizer.zero_grad()
            output.loss.backward()
            optimizer.step()
            outputs.append(output)
        torch.testing.assert_close(outputs[0].loss, outputs[1].loss, rtol=1e-5, atol=0)
        if step == 0:  # the same weights: the same per-cell terms (later steps' weights differ by float rounding)
            torch.testing.assert_close(
                outputs[0].reconstruction_loss, outputs[1].reconstruction_loss, rtol=1e-5, atol=0
            )


def test_the_kl_to_the_standard_normal_is_torchs_bit_for_bit():
    """`kl_standard_normal(q)` is kl_divergence(q, Normal(0, 1)) without the prior's tensors: the same values and
    gradients, bit for bit, from ordinary to extreme scales."""
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(256, 10, generator=generator) * 3
    variance = torch.exp(torch.randn(256, 10, generator=generator) * 4) + 1e-4
    results = []
    for direct in (True, False):
        loc, var = mean.clone().requires_grad_(), variance.clone().requires_grad_()
        q = torch.distributions.Normal(loc, var.sqrt(), validate_args=False)
        prior = torch.distributions.Normal(torch.zeros_like(loc), torch.ones_like(loc))
        kl = kl_standard_normal(q) if direct else torch.distributions.kl_divergence(q, prior)
        (kl * torch.linspace(0.5, 2.0, 10)).sum().backward()
        results.append((kl.detach(), loc.grad, var.grad))
    for got, expected in zip(*results, strict=True):
        assert torch.equal(got, expected)
