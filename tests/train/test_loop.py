"""The training loop on a real store: KL schedule, seeding, exact resume, NaN stop, early stopping; the fused step."""

import copy

import numpy as np
import pytest
import torch

from atlasvi.data import LoaderConfig, StreamingLoader, open_store, split_rows
from atlasvi.models.scvi import SCVIModule
from atlasvi.train import (
    TrainConfig,
    TrainingDiverged,
    default_max_epochs,
    fit,
    kl_weight,
    pretrained_max_epochs,
    training_seed,
)
from atlasvi.train.loop import KLWarmupWarning, _optimizer, _step, kl_warmup_shortfall


@pytest.fixture
def store(embedded_store):
    return embedded_store


def _setup(store, seed: int = 0):
    """A fresh module (seeded init) and train / validation loaders on a 10% held-out split."""
    torch.manual_seed(seed)
    opened = open_store(store)
    train_rows, validation_rows = split_rows(opened.n_cells, 0.1)
    train = StreamingLoader(opened, LoaderConfig(batch_size=128), rows=train_rows)
    validation = StreamingLoader(opened, LoaderConfig(batch_size=128, last_batch="pad"), rows=validation_rows)
    return SCVIModule(opened.schema), train, validation


def test_epoch_rules_are_scvi_tools_defaults():
    # min(round(20000 / n * 400), 400): 400 up to 20k cells, 80 at 100k; epochs_for keeps an explicit max_epochs
    assert [default_max_epochs(n) for n in (1, 20_000, 30_000, 100_000)] == [400, 400, 267, 80]
    assert TrainConfig().epochs_for(100_000) == 80 and TrainConfig(max_epochs=7).epochs_for(100_000) == 7
    # scANVI from trained weights: a third of the rule, between 2 and 10
    assert [pretrained_max_epochs(n) for n in (1_556, 500_000, 2_000_000)] == [10, 5, 2]


def test_kl_warmup_is_scvi_tools_schedule():
    by_epochs = TrainConfig(n_epochs_kl_warmup=400)
    assert [kl_weight(by_epochs, e, 0) for e in (0, 100, 200, 400, 900)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    by_steps = TrainConfig(n_epochs_kl_warmup=None, n_steps_kl_warmup=1000, min_kl_weight=0.1)
    assert kl_weight(by_steps, 50, 500) == pytest.approx(0.55) and kl_weight(by_steps, 0, 1000) == 1.0
    assert TrainConfig().epochs_for(1267) == 400 and TrainConfig().epochs_for(100_000) == 80


def test_kl_weights_out_of_order_are_refused_and_a_warmup_longer_than_the_run_is_named():
    with pytest.raises(ValueError, match=r"min_kl_weight \(0.5\) is above max_kl_weight \(0.2\)"):
        TrainConfig(min_kl_weight=0.5, max_kl_weight=0.2)
    said = kl_warmup_shortfall(TrainConfig(n_epochs_kl_warmup=400), 10, 50)
    assert said.startswith("the KL warm-up (400 epochs) outlasts the run (10 epochs): it ends at KL weight 0.0225,")
    assert kl_warmup_shortfall(TrainConfig(n_epochs_kl_warmup=400), 400, 50) is None
    by_steps = TrainConfig(n_epochs_kl_warmup=None, n_steps_kl_warmup=1000)
    assert "(1000 steps) outlasts the run (500 steps): it ends at KL weight 0.499" in kl_warmup_shortfall(
        by_steps, 10, 50
    )
    assert kl_warmup_shortfall(by_steps, 20, 50) is None


def test_validation_elbo_improves_and_every_held_out_cell_counts_once(store):
    module, train, validation = _setup(store)
    history = fit(module, train, validation, TrainConfig(max_epochs=12, n_epochs_kl_warmup=4))
    assert [r.epoch for r in history] == list(range(12))
    # eval-mode BatchNorm statistics (momentum 0.01) lag this early; the held-out -ELBO still falls clearly
    assert history[-1].validation_elbo < 0.9 * history[0].validation_elbo
    assert [r.kl_weight for r in history[:5]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(history[0].step_losses) == len(train) == 10  # 9 full batches and one of 115 cells


def test_resume_continues_exactly(store, tmp_path):
    config = TrainConfig(max_epochs=4, n_epochs_kl_warmup=3)
    module, train, validation = _setup(store)
    uninterrupted = fit(module, train, validation, config)

    module, train, validation = _setup(store)
    first = fit(module, train, validation, config.model_copy(update={"max_epochs": 2}), checkpoint_dir=tmp_path)
    assert len(first) == 2 and (tmp_path / "last.pt").exists()
    module, train, validation = _setup(store, seed=123)  # a different init: the checkpoint must restore it
    resumed = fit(module, train, validation, config, checkpoint_dir=tmp_path)
    assert [r.epoch for r in resumed] == [0, 1, 2, 3]
    for before, after in zip(uninterrupted, resumed, strict=True):
        assert before.step_losses == after.step_losses  # identical, not merely close
        assert before.validation_elbo == after.validation_elbo


def test_training_draws_do_not_repeat_the_initial_weights_and_a_seed_reproduces_the_run(store):
    """The initial weights come from torch seed `seed`; training's draws (dropout, latent samples) from
    training_seed(seed, rank), SeedSequence([seed, rank]): another sequence, one per rank (scvi-tools seeds once,
    so its training never replays its initial weights' draws)."""
    seeds = {training_seed(s, r) for s in range(4) for r in range(4)}
    assert len(seeds | set(range(4))) == 20  # no two (seed, rank) share a stream, none is an init seed
    assert training_seed(3, 1) == int(np.random.SeedSequence([3, 1]).generate_state(1, np.uint64)[0])

    def first_draws(train_seed: int) -> tuple[torch.Tensor, list[float]]:
        module, train, validation = _setup(store, seed=7)
        original, states = module.loss, []

        def recording(inputs, kl_weight=1.0):
            states.append(torch.get_rng_state())
            return original(inputs, kl_weight)

        module.loss = recording
        history = fit(module, train, validation, TrainConfig(max_epochs=1, seed=train_seed))
        return states[0], history[0].step_losses

    state, losses = first_draws(7)
    assert torch.equal(state, torch.Generator().manual_seed(training_seed(7, 0)).get_state())
    assert not torch.equal(state, torch.Generator().manual_seed(7).get_state())  # the init's sequence
    assert first_draws(7)[1] == losses  # on CPU a seed reproduces the run exactly
    assert first_draws(8)[1] != losses  # same initial weights and minibatches, other draws


def test_a_nan_loss_stops_naming_epoch_step_and_checkpoint(store, tmp_path):
    module, train, validation = _setup(store)
    fit(module, train, validation, TrainConfig(max_epochs=1), checkpoint_dir=tmp_path)
    original = module.loss
    calls = {"n": 0}

    def poisoned(inputs, kl_weight=1.0):
        calls["n"] += 1
        output = original(inputs, kl_weight)
        if calls["n"] == 4:
            output.loss = output.loss * float("nan")
        return output

    module.loss = poisoned
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 13; last good checkpoint: .*last.pt \(epoch 1\)"):
        fit(module, train, validation, TrainConfig(max_epochs=3), checkpoint_dir=tmp_path)


def test_early_stopping_on_validation_elbo(store):
    module, train, validation = _setup(store)
    config = TrainConfig(max_epochs=50, early_stopping=True, early_stopping_patience=2, early_stopping_min_delta=1e9)
    history = fit(module, train, validation, config)
    assert len(history) == 3  # the first epoch sets the best; two without a 1e9 improvement stop it


def _stopped_after(values: list[float], patience: int, min_delta: float) -> int:
    """The epochs early stopping runs on `values` (held-out figures per epoch): the loop's rule, replayed."""
    best, waited = float("inf"), 0
    for epoch, value in enumerate(values):
        best, waited = (value, 0) if value < best - min_delta else (best, waited + 1)
        if waited >= patience:
            return epoch + 1
    return len(values)


def test_early_stopping_may_watch_the_held_out_reconstruction(store):
    module, train, validation = _setup(store)
    config = TrainConfig(
        max_epochs=40, n_epochs_kl_warmup=5, early_stopping=True, early_stopping_monitor="reconstruction",
        early_stopping_patience=2, early_stopping_min_delta=2.0,
    )  # fmt: skip
    history = fit(module, train, validation, config)
    reconstruction = [r.validation_reconstruction for r in history]
    assert 3 <= len(history) < 40 and len(history) == _stopped_after(reconstruction, 2, 2.0)


def test_held_out_figures_count_each_cell_once_under_padding(store):
    """141 held-out cells in padded batches of 128 (115 repeats, some within one batch): the KL (exact
    in eval mode) must be the mean over the 141 distinct cells."""
    from atlasvi.train import evaluate

    module, train, validation = _setup(store)
    fit(module, train, validation, TrainConfig(max_epochs=2))
    _, _, kl = evaluate(module, validation, torch.device("cpu"))
    module.eval()
    with torch.no_grad():
        unpadded = StreamingLoader(validation.store, LoaderConfig(batch_size=141), rows=(1267, 1408))
        (batch,) = list(unpadded)
        expected = module.loss(module.unpack(batch)).kl_local["kl_z"].double().mean().item()
    assert kl == pytest.approx(expected, rel=1e-5)


def test_kl_warmup_steps_per_cell_resolve_against_the_cells():
    # scvi-tools' totalVI: floor(0.75 x cells) steps, unless a warm-up length is given
    config = TrainConfig(n_epochs_kl_warmup=None, kl_warmup_steps_per_cell=0.75)
    assert config.resolved(1001).n_steps_kl_warmup == 750
    assert TrainConfig(kl_warmup_steps_per_cell=0.75).resolved(1001).n_steps_kl_warmup is None  # 400 epochs given
    assert config.model_copy(update={"n_steps_kl_warmup": 9}).resolved(1001).n_steps_kl_warmup == 9


def test_fit_counts_the_held_out_cells_in_the_kl_warmup_as_scvi_tools(store):
    # scvi-tools' TOTALVI.train: int(0.75 x adata.n_obs), validation cells included: 1,408 cells -> 1,056 steps (the
    # 1,267 training cells alone would give 950); the epoch's last minibatch (step 9 of 10) has KL weight 9 / 1056
    module, train, validation = _setup(store)
    config = TrainConfig(max_epochs=1, n_epochs_kl_warmup=None, kl_warmup_steps_per_cell=0.75)
    with train, validation, pytest.warns(KLWarmupWarning, match="1056 steps"):
        (record,) = fit(module, train, validation, config)
    assert (train.sampler.n_cells, validation.sampler.n_cells, len(train)) == (1267, 141, 10)
    assert record.kl_weight == pytest.approx(9 / 1056)


def test_reduce_lr_on_plateau_multiplies_the_learning_rate_and_is_checkpointed(store, tmp_path):
    # threshold 1e9: no epoch after the first counts as an improvement; patience 1: the third epoch's step cuts it
    module, train, validation = _setup(store)
    config = TrainConfig(
        max_epochs=3, n_epochs_kl_warmup=1, lr=1e-3, reduce_lr_on_plateau=True, lr_patience=1, lr_threshold=1e9
    )
    with train, validation:
        fit(module, train, validation, config, tmp_path)
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    assert payload["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.6)
    assert payload["scheduler"]["num_bad_epochs"] == 0 and payload["scheduler"]["_last_lr"] == [pytest.approx(6e-4)]


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_the_lean_fused_step_is_torchs_step_bit_for_bit(name):
    """`_step` calls torch's fused kernel itself: weights and optimizer state equal optimizer.step()'s exactly over
    several steps; the first step (which makes the state) and a step with a parameter lacking a gradient go through
    optimizer.step(), the others do not."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))
    twin = copy.deepcopy(model)
    config = TrainConfig(optimizer=name, weight_decay=0.01, eps=1e-3)
    lean, plain = _optimizer(model, config), _optimizer(twin, config)
    through_torch = []
    torch_step = lean.step
    lean.step = lambda: through_torch.append(1) or torch_step()
    for step in range(6):
        x = torch.randn(8, 20)
        for net, optimizer in ((model, lean), (twin, plain)):
            optimizer.zero_grad(set_to_none=True)
            net[2].bias.requires_grad_(step != 4)  # step 4: a parameter without a gradient
            net(x).pow(2).mean().backward()
            _step(optimizer) if optimizer is lean else optimizer.step()
    assert len(through_torch) == 2  # the first step and the one without every gradient
    for mine, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(mine, theirs)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(lean.state[mine][key], plain.state[theirs][key])
    assert lean.state[model[0].weight]["step"] == 6 and lean.state[model[2].bias]["step"] == 5
