"""scANVI module on a real store: labels, gradients, the marginalised ELBO against a brute-force sum, training."""

import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, Normal, kl_divergence

from atlasvi.data import BuildConfig, LoaderConfig, StreamingLoader, build_store, open_store
from atlasvi.models.scanvi import SCANVIConfig, SCANVIModule
from atlasvi.train import TrainConfig, fit
from tests.conftest import KANG

QUERY = ["stim101", "stim107"]


@pytest.fixture(scope="module")
def kang_masked(tmp_path_factory):
    """Kang, 200 HVGs, labels of the stim samples stored as "Unknown" (the query of a label transfer)."""
    path = tmp_path_factory.mktemp("scanvi") / "kang.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_store(
            BuildConfig(
                inputs=[str(KANG)], output=str(path), batch_key="sample", labels_key="cell_type", n_top_genes=200,
                unlabeled_batches=QUERY,
            )
        )  # fmt: skip
    return path


def _batch(store, size=64):
    return next(iter(StreamingLoader(store, LoaderConfig(batch_size=size))))


def test_query_batches_are_unlabeled_and_labels_become_classes(kang_masked):
    schema = open_store(kang_masked).schema
    assert schema.categorical["cell_type"][-1] == "Unknown"
    module = SCANVIModule(schema)
    assert module.n_labels == 5 and "Unknown" not in module.label_names
    batch = _batch(kang_masked, 256)
    labels = module.unpack(batch).labels
    query = torch.isin(batch.categorical["sample"], torch.tensor([schema.batch_categories.index(b) for b in QUERY]))
    assert (labels[query] == -1).all() and (labels[~query] >= 0).all() and query.any() and (~query).any()
    names = [schema.categorical["cell_type"][c] for c in batch.categorical["cell_type"][~query]]
    assert [module.label_names[c] for c in labels[~query]] == names
    del batch.categorical["cell_type"]  # a store without labels: every cell unlabeled
    assert (module.unpack(batch).labels == -1).all()


@pytest.mark.parametrize(
    "options",
    [{}, {"linear_classifier": True, "use_observed_lib_size": False, "n_layers": 2, "encode_covariates": True}],
)
def test_every_parameter_gets_a_gradient(kang_masked, options):
    torch.manual_seed(0)
    module = SCANVIModule(open_store(kang_masked).schema, SCANVIConfig(**options))
    output = module.loss(module.unpack(_batch(kang_masked)))
    output.loss.backward()
    assert [name for name, p in module.named_parameters() if p.grad is None] == []
    assert output.reconstruction_loss.shape == (64,) and torch.isfinite(output.loss)
    expected = {"kl_z2", "kl_y"} | ({"kl_library"} if "use_observed_lib_size" in options else set())
    assert set(output.kl_local) == expected and all(v.shape == (64,) for v in output.kl_local.values())
    assert 0 < output.extra_metrics["n_labelled"] < 64 and output.extra_metrics["classification_loss"] > 0


def test_bad_configurations_are_refused(kang_store):
    with pytest.raises(ValueError, match="gene-label"):
        SCANVIConfig(dispersion="gene-label")
    schema = open_store(kang_store).schema
    with pytest.raises(ValueError, match="labels key"):
        SCANVIModule(replace(schema, labels_key=None))


def test_the_elbo_marginalises_y_as_a_brute_force_sum_over_labels(kang_masked):
    """Per cell: sum_y q(y|z1) [log p(x|z1) + log p(z1|z2_y,y) - log q(z1|x) - KL(q(z2|z1,y) || p(z2))]
    - KL(q(y|z1) || uniform), computed label by label, with the same draws of z1 and z2."""
    torch.manual_seed(0)
    module = SCANVIModule(open_store(kang_masked).schema).eval()  # no dropout: the two passes see the same network
    inputs = module.unpack(_batch(kang_masked, 16))
    torch.manual_seed(1)
    output = module.loss(inputs, kl_weight=1.0)
    torch.manual_seed(1)
    with torch.no_grad():
        inference = module.inference(inputs)
        qz1, z1 = inference["qz"], inference["z"]
        log_px = module.generative(z1, inference["library"], inputs)["px"].log_prob(inputs.dense_x).sum(-1)
        n, k = len(z1), module.n_labels
        ys = torch.arange(k).repeat_interleave(n)
        qz2_all, z2_all = module.encoder_z2_z1(z1.repeat(k, 1), ys)  # the draws the loss made, in its order
        q_y = torch.softmax(module.classifier(z1), -1)
        elbo = torch.zeros(n)
        for y in range(k):
            rows = slice(y * n, (y + 1) * n)
            qz2 = Normal(qz2_all.loc[rows], qz2_all.scale[rows])
            pz1, _ = module.decoder_z1_z2(z2_all[rows], torch.full((n,), y))
            term = log_px + pz1.log_prob(z1).sum(-1) - qz1.log_prob(z1).sum(-1)
            term = term - kl_divergence(qz2, Normal(0.0, 1.0)).sum(-1)
            elbo += q_y[:, y] * term
        elbo -= kl_divergence(Categorical(probs=q_y), Categorical(probs=torch.full((k,), 1 / k)))
    torch.testing.assert_close(output.negative_elbo.detach(), -elbo, rtol=1e-5, atol=1e-3)
    labelled = inputs.labels >= 0
    ce = F.cross_entropy(module.classifier(qz1.loc[labelled]), inputs.labels[labelled])
    expected_loss = (-elbo).mean() + 50.0 * ce
    torch.testing.assert_close(output.loss.detach(), expected_loss.detach(), rtol=1e-5, atol=1e-3)


def test_classifier_probabilities_sum_to_one(kang_masked):
    torch.manual_seed(0)
    module = SCANVIModule(open_store(kang_masked).schema).eval()
    probabilities = torch.softmax(module.classify(module.unpack(_batch(kang_masked))), -1)
    assert probabilities.shape == (64, 5)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(64))


def test_training_lowers_the_loss_and_logs_the_classification_loss(kang_masked):
    torch.manual_seed(0)
    store = open_store(kang_masked)
    module = SCANVIModule(store.schema)
    train = StreamingLoader(store, LoaderConfig(batch_size=128), rows=(0, 1400))
    validation = StreamingLoader(store, LoaderConfig(batch_size=128, shuffle=False), rows=(1400, store.n_cells))
    history = fit(module, train, validation, TrainConfig(max_epochs=6, n_epochs_kl_warmup=None))
    assert history[-1].train_loss < 0.8 * history[0].train_loss
    first, last = (h.extra_metrics["classification_loss"] for h in (history[0], history[-1]))
    assert last < 0.5 * first
