"""The adversarial batch classifier (scvi-tools' AdversarialTrainingPlan): its two losses against the formula, where
their gradients go, its own optimizer in the loop (and in checkpoints), totalVI's rule for it, query mapping."""

import numpy as np
import pytest
import torch

from atlasvi.api import TOTALVI
from atlasvi.data import LoaderConfig
from atlasvi.models.adversary import BatchAdversary
from atlasvi.models.totalvi import TOTALVIConfig
from atlasvi.train import TrainConfig, fit
from atlasvi.train.job import make_loaders

LOADER = LoaderConfig(batch_size=64, seed=0)
SMALL = TOTALVIConfig(n_latent=6, n_hidden=32)


def test_losses_are_scvi_tools_formula_and_reach_their_own_parameters():
    torch.manual_seed(0)
    adversary = BatchAdversary(n_latent=4, n_batch=3)
    adversary.eval()  # no dropout: the two passes see the same logits
    z = torch.randn(10, 4, requires_grad=True)
    batch = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    fooling, own = adversary.losses(z, batch, kappa=0.7)
    log_p = torch.log_softmax(adversary(z), dim=-1).detach().numpy()
    one_hot = np.eye(3)[batch.numpy()]
    # scvi-tools' loss_adversarial_classifier: -mean(sum(log_p * target)), target = the other batches / (n - 1)
    expected_fooling = -np.mean(np.sum(log_p * (1 - one_hot) / 2, axis=1)) * 0.7
    expected_own = -np.mean(np.sum(log_p * one_hot, axis=1)) * 0.7
    assert fooling.item() == pytest.approx(expected_fooling, rel=1e-5)
    assert own.item() == pytest.approx(expected_own, rel=1e-5)
    fooling.backward(retain_graph=True)
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in adversary.parameters())  # the model's term never trains the classifier
    z.grad = None
    own.backward()
    assert z.grad is None and all(p.grad is not None for p in adversary.parameters())  # nor the reverse


def test_totalvi_builds_it_when_a_panel_misses_proteins(two_panel_store, cbmc_store):
    assert TOTALVI(two_panel_store, config=SMALL, device="cpu").module.adversary is not None  # 14 vs 29 antibodies
    assert TOTALVI(cbmc_store, config=SMALL, device="cpu").module.adversary is None  # one batch, every protein
    off = SMALL.model_copy(update={"adversarial_classifier": False})
    assert TOTALVI(two_panel_store, config=off, device="cpu").module.adversary is None


def _fit(store, epochs: int, checkpoint_dir=None):
    model = TOTALVI(store, config=SMALL, device="cpu")
    train, validation = make_loaders(model.store, LOADER, 0.1, modalities=("protein",))
    config = TrainConfig(max_epochs=epochs, n_epochs_kl_warmup=4, seed=0)
    with train, validation:
        history = fit(model.module, train, validation, config, checkpoint_dir)
    return model.module, history


def test_the_loop_trains_the_adversary_with_its_own_optimizer_and_resumes_it_exactly(two_panel_store, tmp_path):
    model = TOTALVI(two_panel_store, config=SMALL, device="cpu")
    before = {k: v.clone() for k, v in model.module.adversary.state_dict().items()}
    module, history = _fit(two_panel_store, 3)
    after = module.adversary.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    losses = [r.extra_metrics["adversary_loss"] for r in history]
    assert losses[0] > 0 and np.isfinite(losses).all()
    # kappa = 1 - kl_weight: 1, 0.75, 0.5 over the warm-up's first epochs, so the logged loss shrinks with it
    assert [r.kl_weight for r in history] == [0.0, 0.25, 0.5]
    # 2 epochs, then a resumed third: the same weights, the adversary's (and its optimizer's moments) included
    _fit(two_panel_store, 2, tmp_path)
    resumed, _ = _fit(two_panel_store, 3, tmp_path)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)


def test_a_step_warmup_counts_both_optimizers_steps_as_scvi_tools_global_step(two_panel_store):
    """scvi-tools' AdversarialTrainingPlan steps two optimizers per minibatch and its step-based KL warm-up reads
    Lightning's global_step (optimizer steps): with the adversary the warm-up runs at twice the minibatch pace."""
    weights = {}
    for adversary in (True, False):
        config = SMALL.model_copy(update={"adversarial_classifier": adversary})
        model = TOTALVI(two_panel_store, config=config, device="cpu")
        train, validation = make_loaders(model.store, LOADER, 0.1, modalities=("protein",))
        with train, validation:
            steps = len(train)
            history = fit(
                model.module,
                train,
                validation,
                TrainConfig(max_epochs=2, n_epochs_kl_warmup=None, n_steps_kl_warmup=100, seed=0),
            )
        weights[adversary] = [r.kl_weight for r in history]  # the KL weight of each epoch's last minibatch
    assert steps == 6  # 360 training cells, batches of 64: the last minibatches are steps 5 and 11
    assert weights[False] == pytest.approx([0.05, 0.11]) and weights[True] == pytest.approx([0.10, 0.22])


def test_a_query_starts_the_adversary_afresh_and_trains_it(two_panel_store, tmp_path):
    import anndata as ad

    from atlasvi.data import BuildConfig, build_store
    from tests.conftest import PBMC5K_PROTEIN

    reference = TOTALVI(two_panel_store, config=SMALL, device="cpu")
    reference.fit(TrainConfig(max_epochs=2, n_epochs_kl_warmup=4), LOADER)
    query_h5ad = tmp_path / "pbmc5k_again.h5ad"  # pbmc5k's cells once more, as a new study on the reference's features
    schema = reference.module.schema
    adata = ad.read_h5ad(PBMC5K_PROTEIN)[:, list(schema.gene_ids)].copy()
    adata.obsm["protein_expression"] = adata.obsm["protein_expression"][list(reference.module.protein_names)]
    adata.obs_names = [f"q{i}" for i in range(adata.n_obs)]
    adata.write_h5ad(query_h5ad)
    query_store = tmp_path / "query.zarr"
    build_store(BuildConfig(inputs=[str(query_h5ad)], output=str(query_store), protein_key="protein_expression"))
    query = TOTALVI.load_query_data(query_store, reference, device="cpu")
    adversary = query.module.adversary
    assert adversary.n_batch == 3 and all(p.requires_grad for p in adversary.parameters())
    assert all(query.query_masks[f"adversary.{k}"].all() for k, _ in adversary.named_parameters())
    start = {k: v.clone() for k, v in adversary.state_dict().items()}
    frozen = query.module.z_encoder.encoder.layers[0][0].weight.detach().clone()
    query.fit(TrainConfig(max_epochs=2, n_epochs_kl_warmup=4), LOADER)
    assert any(not torch.equal(start[k], v) for k, v in adversary.state_dict().items())
    n_reference = reference.module.z_encoder.encoder.layers[0][0].weight.shape[1]
    torch.testing.assert_close(  # the reference's columns did not move
        query.module.z_encoder.encoder.layers[0][0].weight.detach()[:, : n_reference - 2], frozen[:, : n_reference - 2]
    )
