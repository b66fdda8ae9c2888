"""The model registry and the job's model union keyed on `name`."""

import importlib

import pytest

from atlasvi.cli.common import make_config
from atlasvi.data import LoaderConfig
from atlasvi.errors import ConfigError
from atlasvi.launch.sweep import SweepConfig, with_overrides
from atlasvi.models.registry import ENTRIES, REGISTRY, get_entry
from atlasvi.models.scvi import SCVIConfig
from atlasvi.models.totalvi import TOTALVIConfig
from atlasvi.train.job import TrainJobConfig, loader_config_for


def test_every_entry_names_a_config_whose_name_is_its_own_and_a_user_class_that_imports():
    for entry in ENTRIES:
        assert entry.config_class().name == entry.name
        module, _, name = entry.user_class.partition(":")
        assert getattr(importlib.import_module(module), name).__name__ == entry.saved_name
        assert all(source in REGISTRY for source in entry.init_from)
    assert get_entry("SCANVI") is get_entry("scanvi") is REGISTRY["scanvi"]


def test_the_job_model_is_chosen_by_name_and_scvi_without_one():
    job = make_config(TrainJobConfig, [("train.yaml", {"model": {"name": "scanvi", "n_latent": 20}})])
    assert type(job.model).__name__ == "SCANVIConfig" and job.model.n_latent == 20
    assert job.model.classification_ratio == 50.0
    assert TrainJobConfig.model_validate({"model": {"n_latent": 5}}).model.name == "scvi"
    assert TrainJobConfig().model.name == "scvi"
    again = TrainJobConfig.model_validate(job.model_dump(mode="json"))  # a run.json / config.yaml round trip
    assert again == job


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"name": "scanvi", "colour": 1}, "unknown field 'model.colour' (fields: n_latent, n_hidden,"),
        ({"name": "nosuchmodel"}, "model.name 'nosuchmodel': unknown model name; registered models: scvi, scanvi"),
        ({"classification_ratio": 5.0}, "unknown field 'model.classification_ratio'"),  # a scANVI field on scVI
        ({"name": "scanvi", "n_latent": 0}, "model.n_latent: Input should be greater than 0"),
    ],
)
def test_a_bad_model_section_is_one_error_naming_the_field(model, expected):
    with pytest.raises(ConfigError) as raised:
        make_config(TrainJobConfig, [("train.yaml", {"model": model})])
    assert expected in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match="unknown model 'nosuchmodel'; registered models: scvi, scanvi"):
        get_entry("nosuchmodel")


def test_a_sweep_may_search_the_fields_of_the_job_model_only():
    job = {"model": {"name": "scanvi"}, "train": {"max_epochs": 10}}
    space = {"model.classification_ratio": {"grid": [1, 50]}}
    sweep = SweepConfig(name="s", grace_period=1, job=job, search_space=space)
    assert sweep.job.model.name == "scanvi"
    with pytest.raises(ValueError, match="'model.classification_ratio' is not a TrainJobConfig field"):
        SweepConfig(name="s", grace_period=1, job={"train": {"max_epochs": 10}},
                    search_space={"model.classification_ratio": {"grid": [1, 50]}})  # fmt: skip


def test_a_model_s_loader_defaults_apply_under_what_the_job_or_the_caller_sets():
    # scvi-tools 1.4.2's train(batch_size=...): 256 for TOTALVI; 128 (LoaderConfig's default) for SCVI, SCANVI,
    # LinearSCVI, PEAKVI, MULTIVI, SysVI, CondSCVI and DestVI
    assert {e.name: e.loader_defaults for e in ENTRIES if e.loader_defaults} == {"totalvi": {"batch_size": 256}}
    job = make_config(TrainJobConfig, [("flags", {"model": {"name": "totalvi"}, "loader": {"seed": 3}})])
    assert job.loader == LoaderConfig(batch_size=256, seed=3)
    assert TrainJobConfig.model_validate(job.model_dump(mode="json")) == job  # a run.json / config.yaml round trip
    given = [("train.yaml", {"model": {"name": "totalvi"}}), ("flags", {"loader": {"batch_size": 128}})]
    assert make_config(TrainJobConfig, given).loader.batch_size == 128  # `--batch-size 128` wins
    assert TrainJobConfig(model=TOTALVIConfig(), loader=LoaderConfig(shuffle=False)).loader.batch_size == 256
    assert TrainJobConfig(model=TOTALVIConfig(), loader=LoaderConfig(batch_size=64)).loader.batch_size == 64
    assert TrainJobConfig.model_validate({"model": {"name": "scvi"}}).loader.batch_size == 128
    assert with_overrides(job, {"loader.seed": 5}).loader == LoaderConfig(batch_size=256, seed=5)  # a sweep trial
    assert loader_config_for(TOTALVIConfig(), None, 7) == LoaderConfig(batch_size=256, seed=7)
    assert loader_config_for(TOTALVIConfig(), LoaderConfig(batch_size=32), 7) == LoaderConfig(batch_size=32)
    assert loader_config_for(SCVIConfig(), None, 7) == LoaderConfig(seed=7)
