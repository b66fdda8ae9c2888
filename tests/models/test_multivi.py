"""MultiVI: scvi-tools' defaults, the masked mixture of the modality posteriors, the masked likelihood terms and the
Jeffreys penalty as scvi-tools 1.4.2 computes them, on the sci-CAR multiome store (paired, RNA-only, ATAC-only)."""

import math

import pytest
import torch

from atlasvi.data import LoaderConfig, open_store
from atlasvi.models.multivi import MULTIVIConfig, MULTIVIModule
from atlasvi.train.job import make_loaders, train_config_for

LOADER = LoaderConfig(batch_size=450, seed=0)


def test_the_defaults_are_scvi_tools(multiome_store):
    config = MULTIVIConfig()
    assert (config.modality_weights, config.modality_penalty, config.gene_likelihood) == ("equal", "Jeffreys", "zinb")
    assert (config.n_layers_encoder, config.n_layers_decoder, config.dropout_rate) == (2, 2, 0.1)
    assert (config.use_batch_norm, config.use_layer_norm, config.region_factors) == ("none", "both", True)
    assert config.adversarial_classifier
    train = train_config_for(config, None)  # MULTIVI.train
    assert (train.max_epochs, train.optimizer, train.lr, train.weight_decay, train.eps) == (
        500,
        "AdamW",
        1e-4,
        1e-3,
        1e-8,
    )
    assert (train.n_epochs_kl_warmup, train.early_stopping, train.early_stopping_monitor) == (
        50,
        True,
        "reconstruction",
    )
    assert train.early_stopping_patience == 50
    module = MULTIVIModule(open_store(multiome_store).schema)
    assert (module.n_regions, module.n_hidden, module.n_latent) == (2000, 44, 6)  # int(sqrt(2000)), int(sqrt(44))
    assert module.adversary is not None and module.adversary.n_batch == 3
    one = open_store(multiome_store).schema.__class__  # no peaks: refused with the build option to use
    with pytest.raises(ValueError, match="atac_key"):
        MULTIVIModule.registry(one(**{**open_store(multiome_store).schema.__dict__, "modalities": {}}), config)


def _batch(store, config: MULTIVIConfig):
    module = MULTIVIModule(open_store(store).schema, config)
    train, validation = make_loaders(open_store(store), LOADER, 0.1, modalities=module.used_modalities)
    with train, validation:
        batch = next(iter(train))
    module.eval()
    return module, module.unpack(batch)


@pytest.mark.parametrize("weights", ["equal", "universal"])
def test_the_joint_posterior_is_the_masked_weighted_mixture(multiome_store, weights):
    module, inputs = _batch(multiome_store, MULTIVIConfig(n_hidden=16, modality_weights=weights))
    if weights == "universal":
        with torch.no_grad():
            module.mod_weights.copy_(torch.tensor([0.3, -0.5]))
    with torch.no_grad():
        out = module.inference(inputs)
    rna, atac = inputs.rna_mask, inputs.atac_mask
    assert rna.any() and atac.any() and (~rna).any() and (~atac).any() and (rna & atac).any()
    qz, qe, qa = out["qz"], out["qz_expression"], out["qz_accessibility"]
    torch.testing.assert_close(qz.loc[~atac], qe.loc[~atac])  # RNA only: the RNA posterior
    torch.testing.assert_close(qz.scale[~atac], qe.scale[~atac])
    torch.testing.assert_close(qz.loc[~rna], qa.loc[~rna])  # ATAC only: the ATAC posterior
    both = rna & atac
    w = torch.softmax(module.mod_weights.detach(), 0)  # scvi-tools: mean sum w mu, variance sum sqrt(w) var
    torch.testing.assert_close(qz.loc[both], w[0] * qe.loc[both] + w[1] * qa.loc[both])
    variance = w[0].sqrt() * qe.scale[both] ** 2 + w[1].sqrt() * qa.scale[both] ** 2
    torch.testing.assert_close(qz.scale[both] ** 2, variance)


def test_cell_weights_are_per_store_row(multiome_store):
    module, inputs = _batch(multiome_store, MULTIVIConfig(n_hidden=16, modality_weights="cell"))
    assert module.mod_weights.shape == (450, 2)
    with torch.no_grad():
        module.mod_weights[inputs.rows[0]] = torch.tensor([2.0, -1.0])
        weights = module.modality_weights(inputs)
    first = weights[0]
    if bool(inputs.rna_mask[0] & inputs.atac_mask[0]):
        torch.testing.assert_close(first, torch.softmax(torch.tensor([2.0, -1.0]), 0))
    assert torch.allclose(weights.sum(1), torch.ones(len(weights)))


def _closed_form_kl(m1, s1, m2, s2):
    return torch.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


def test_the_loss_masks_missing_modalities_and_adds_scvi_tools_jeffreys_penalty(multiome_store):
    module, inputs = _batch(multiome_store, MULTIVIConfig(n_hidden=16))
    torch.manual_seed(3)
    out = module.loss(inputs, kl_weight=0.3)
    rna, atac = inputs.rna_mask, inputs.atac_mask
    torch.manual_seed(3)
    inference = module.inference(inputs)
    generative = module.generative(inference["z"], inference["library"], inputs)
    rl_rna = -generative["px"].log_prob(inputs.x).sum(-1)
    probs = generative["p"] * inference["depth"] * torch.sigmoid(module.region_factors)
    opened = (inputs.atac > 0).float()
    rl_atac = -(opened * torch.log(probs) + (1 - opened) * torch.log1p(-probs)).sum(-1)
    expected = torch.where(rna, rl_rna, 0.0) + torch.where(atac, rl_atac, 0.0)
    torch.testing.assert_close(out.reconstruction_loss, expected, rtol=1e-4, atol=1e-3)
    # scvi-tools' sym_kld(mu1, sqrt(var1), mu2, sqrt(var2)) takes the square root again: Normals of scale var^(1/4)
    qe, qa = inference["qz_expression"], inference["qz_accessibility"]
    s1, s2 = (qe.scale**2) ** 0.25, (qa.scale**2) ** 0.25
    jeffreys = (_closed_form_kl(qe.loc, s1, qa.loc, s2) + _closed_form_kl(qa.loc, s2, qe.loc, s1)).sum(-1)
    torch.testing.assert_close(out.kl_local["kl_paired"], torch.where(rna & atac, jeffreys, 0.0), rtol=1e-4, atol=1e-5)
    assert (out.kl_local["kl_paired"][~(rna & atac)] == 0).all() and (out.kl_local["kl_paired"][rna & atac] > 0).all()
    kl_z = (_closed_form_kl(inference["qz"].loc, inference["qz"].scale, 0.0, torch.ones(1))).sum(-1)
    torch.testing.assert_close(out.kl_local["kl_z"], kl_z, rtol=1e-4, atol=1e-4)
    fooling, _ = module.adversary.losses(inference["z"], inputs.batch_index, 1.0)  # kappa 1, not 1 - kl_weight
    total = (expected + 0.3 * kl_z + out.kl_local["kl_paired"]).mean() + fooling  # the penalty is not warmed up
    assert float(out.loss) == pytest.approx(float(total), rel=1e-4)
    assert math.isfinite(float(out.adversary_loss))


def test_poisson_and_nb_heads_and_no_adversary(multiome_store):
    inputs = None  # one minibatch for both heads (the inputs do not depend on the head)
    for likelihood in ("nb", "poisson"):
        config = MULTIVIConfig(n_hidden=16, gene_likelihood=likelihood, adversarial_classifier=False)
        if inputs is None:
            module, inputs = _batch(multiome_store, config)
        else:
            module = MULTIVIModule(open_store(multiome_store).schema, config).eval()
        assert module.adversary is None and (module.px_r is None) == (likelihood == "poisson")
        out = module.loss(inputs)
        assert out.adversary_loss is None and torch.isfinite(out.loss)


def test_the_rna_library_encoder_initialises_as_scvi_tools():
    """The initial RNA log-library (the output MultiVI's training starts from) is scvi-tools 1.4.2's: under the same
    torch seed atlasvi's LibrarySizeEncoder draws the same weights as scvi-tools' (figures recorded with
    scvi.module._multivae.LibrarySizeEncoder(50, n_layers=2, n_hidden=32, use_batch_norm=False,
    use_layer_norm=True) on this input), so its distribution over seeds is scvi-tools': mean output 0.1396 over
    50 seeds, positive in 56% of them (the LeakyReLU output is ~0 on its leaky side in the others)."""
    from atlasvi.models.multivi.module import LibrarySizeEncoder

    cells, genes = torch.arange(64)[:, None], torch.arange(50)[None]
    x = ((cells * 7 + genes * 13) % 11).float() * (1 + cells % 5)  # (64, 50) counts
    scvi_tools_first_cells = [
        [-0.006984, -0.00346, -0.004439, -0.003364],
        [-0.00378, 0.157723, 0.222157, -0.001645],
        [-0.002868, -0.005487, -0.006756, -0.006131],
    ]
    means = []
    for seed in range(50):
        torch.manual_seed(seed)
        encoder = LibrarySizeEncoder(50, [], 2, 32, use_batch_norm=False, use_layer_norm=True)
        with torch.no_grad():
            library = encoder(x)[:, 0]
        if seed < 3:
            assert library[:4].tolist() == pytest.approx(scvi_tools_first_cells[seed], abs=2e-6)
        means.append(float(library.mean()))
    assert sum(means) / len(means) == pytest.approx(0.13955, abs=1e-4)
    assert sum(m > 0 for m in means) / len(means) == pytest.approx(0.56)


def test_every_weight_has_scvi_tools_size_and_init_scheme(multiome_store):
    """The two tools draw their initial weights from one distribution (benchmarks/results/multivi_init_distribution.md,
    100 seeds each): every tensor has scvi-tools 1.4.2's size (entries per module recorded from
    scvi.module.MULTIVAE(n_input_regions=2000, n_input_genes=1185, n_batch=3) and the classifier its
    AdversarialTrainingPlan builds, floating tensors, names mapped, the protein modules left out) and torch's default
    init, as scvi-tools' (Linear: kaiming-uniform weights and uniform biases within 1 / sqrt(fan_in); layer norm
    without parameters; batch norm 1 / 0), px_r standard normal, region factors 0, modality weights 1."""
    scvi_tools = {
        "px_r": 1185, "region_factors": 2000, "z_encoder_expression": 54704, "l_encoder_expression": 54209,
        "z_decoder_expression": 109070, "z_encoder_accessibility": 90564, "z_decoder_accessibility": 92420,
        "l_encoder_accessibility": 90069, "adversary": 1635, "mod_weights": 2,
    }  # fmt: skip
    torch.manual_seed(0)
    module = MULTIVIModule(open_store(multiome_store).schema).requires_grad_(False)
    counts: dict[str, int] = {}
    for name, value in module.state_dict().items():
        if value.is_floating_point():
            counts[name.split(".")[0]] = counts.get(name.split(".")[0], 0) + value.numel()
    assert counts == scvi_tools
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 24
    for layer in linears:
        bound = 1 / math.sqrt(layer.in_features)
        assert float(layer.weight.abs().max()) <= bound and float(layer.bias.abs().max()) <= bound
        if layer.weight.numel() >= 2000:  # uniform on (-bound, bound): s.d. bound / sqrt(3)
            assert float(layer.weight.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert all(m.weight is None for m in module.modules() if isinstance(m, torch.nn.LayerNorm))
    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms) == 2 and all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in norms)
    assert float(module.px_r.std()) == pytest.approx(1.0, abs=0.06) and abs(float(module.px_r.mean())) < 0.1
    assert float(module.region_factors.abs().max()) == 0.0 and module.mod_weights.tolist() == [1.0, 1.0]
