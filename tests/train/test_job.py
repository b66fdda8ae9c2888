from dataclasses import replace

import pytest
import torch

from atlasvi.data import open_store
from atlasvi.errors import ConfigError
from atlasvi.models.saving import ModelFileError, save_model
from atlasvi.models.scanvi import SCANVIModule
from atlasvi.train.job import TrainJobConfig, build_module, module_spec, pretrained_train


def _job(**fields) -> TrainJobConfig:
    return TrainJobConfig.model_validate(fields)


def test_scanvi_module_from_the_registry_with_unlabeled_and_code_maps(embedded_store):
    store = open_store(embedded_store)
    job = _job(model={"name": "scanvi"})
    spec = module_spec(job, store)
    labels = store.schema.categorical["cell_line"]
    assert spec.schema.categorical["cell_line"] == (*labels, "Unknown")
    assert set(spec.code_maps) == {"batch", "cell_line"}  # every store code maps to itself
    assert spec.code_maps["cell_line"].tolist() == list(range(len(labels)))
    module = build_module(job.model, spec.schema, seed=3)
    again = build_module(job.model, spec.schema, seed=3)
    assert isinstance(module, SCANVIModule) and module.n_labels == len(labels)
    assert all(
        torch.equal(a, b) for a, b in zip(module.state_dict().values(), again.state_dict().values(), strict=True)
    )


def test_init_from_a_saved_scvi_starts_from_its_weights(embedded_store, tmp_path):
    store = open_store(embedded_store)
    scvi_job = _job()
    scvi = build_module(scvi_job.model, store.schema, seed=1)
    save_model(tmp_path / "scvi", "SCVI", {"model": scvi_job.model.model_dump()}, store.schema, scvi.state_dict())
    job = _job(model={"name": "scanvi"}, init_from=str(tmp_path / "scvi"))
    spec = module_spec(job, store)
    module = build_module(job.model, spec.schema, job.train.seed, spec.init_state)
    assert torch.equal(
        module.state_dict()["decoder.px_decoder.layers.0.0.weight"],
        scvi.state_dict()["decoder.px_decoder.layers.0.0.weight"],
    )
    assert torch.equal(module.px_r, scvi.px_r)
    assert pretrained_train(job, store).max_epochs == 10  # min(10, max(2, round(400 / 3))) on ~1k cells
    assert pretrained_train(_job(model={"name": "scanvi"}), store).max_epochs is None
    save_model(tmp_path / "scanvi", "SCANVI", {"model": job.model.model_dump()}, spec.schema, module.state_dict())
    with pytest.raises(ConfigError, match="a saved scanvi model; scanvi starts only from scvi"):
        module_spec(_job(model={"name": "scanvi"}, init_from=str(tmp_path / "scanvi")), store)
    with pytest.raises(ConfigError, match="a saved scvi model; scvi starts only from no saved model"):
        module_spec(_job(init_from=str(tmp_path / "scvi")), store)


def test_init_from_weights_that_do_not_fit_and_a_store_without_labels_are_one_error(embedded_store, tmp_path):
    store = open_store(embedded_store)
    small = _job(model={"n_latent": 5})
    scvi = build_module(small.model, store.schema, seed=1)
    save_model(tmp_path / "scvi", "SCVI", {"model": small.model.model_dump()}, store.schema, scvi.state_dict())
    job = _job(model={"name": "scanvi"}, init_from=str(tmp_path / "scvi"))  # n_latent 10: other shapes
    with pytest.raises(ModelFileError, match=r"init_from .*scvi: the weights do not fit this model: '.*' is \("):
        module_spec(job, store)
    store.schema = replace(store.schema, labels_key=None)  # a store built without labels
    with pytest.raises(ConfigError, match=r"embedded.*: scANVI needs a store built with a labels key"):
        module_spec(_job(model={"name": "scanvi"}), store)


def test_the_batch_size_is_global_and_split_over_the_workers(embedded_store):
    """2 workers read 64 cells each a step at the default 128, and as many steps an epoch as one process; 3 workers
    of a batch of 128 read 43 each (global 129); fewer cells than workers is refused."""
    from atlasvi.data import LoaderConfig
    from atlasvi.train.job import make_loaders, rank_batch_size

    assert [rank_batch_size(128, n) for n in (1, 2, 3, 128)] == [128, 64, 43, 1]
    store, loader = open_store(embedded_store), LoaderConfig(batch_size=128)
    one, _ = make_loaders(store, loader, 0.1)
    ranks = [make_loaders(store, loader, 0.1, rank, 2)[0] for rank in (0, 1)]
    assert [r.config.batch_size for r in ranks] == [64, 64]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 10  # 1267 training cells: ceil(1267 / 128) steps
    with pytest.raises(ValueError, match="global batch: it must be >= num_workers"):
        _job(num_workers=4, loader={"batch_size": 2})


def test_resident_loaders_train_exactly_as_streaming_and_resume_its_checkpoints(embedded_store, tmp_path):
    """make_loaders with the rows held in memory: per-step losses and held-out -ELBOs identical (not close) to
    streaming over 2 epochs, and a streaming run's checkpoint resumes on resident loaders as if uninterrupted."""
    from atlasvi.data import LoaderConfig
    from atlasvi.data.resident import ResidentLoader
    from atlasvi.train import TrainConfig, fit
    from atlasvi.train.job import make_loaders

    store = open_store(embedded_store)
    spec = module_spec(_job(), store)

    def run(resident: bool, epochs: int, checkpoint_dir=None):
        loader = LoaderConfig(batch_size=128, block_size=256, resident=resident)
        train, validation = make_loaders(store, loader, 0.1, code_maps=spec.code_maps)
        assert isinstance(train, ResidentLoader) == isinstance(validation, ResidentLoader) == resident
        module = build_module(_job().model, spec.schema, seed=0)
        config = TrainConfig(max_epochs=epochs, n_epochs_kl_warmup=2)
        return fit(module, train, validation, config, checkpoint_dir=checkpoint_dir)

    streaming, resident = run(False, 2), run(True, 2)
    for a, b in zip(streaming, resident, strict=True):
        assert a.step_losses == b.step_losses and len(a.step_losses) == 10
        assert a.validation_elbo == b.validation_elbo
    run(False, 1, tmp_path)  # stopped after one epoch
    resumed = run(True, 2, tmp_path)
    assert [r.step_losses for r in resumed] == [r.step_losses for r in streaming]
