"""The model registry: one entry per method, the only place the layers above learn which models exist.

Adding a model is its own folder under `atlasvi/models/` plus one `ModelEntry` line in `ENTRIES`. The job's
`model` section is `ModelConfig`, a union of the entries' configs keyed on their `name` field
(`model: {name: scanvi, n_latent: 20}` in YAML; no name means scvi, so older configs and run records still read).
"""

from dataclasses import dataclass, field
from typing import Annotated, Any, Union

from pydantic import BaseModel, Discriminator, Tag
from torch import nn

from atlasvi.errors import ConfigError
from atlasvi.models.condscvi import CondSCVIConfig, CondSCVIModule
from atlasvi.models.destvi import DestVIConfig, DestVIModule
from atlasvi.models.ldvae import LDVAEConfig, LDVAEModule
from atlasvi.models.multivi import MULTIVIConfig, MULTIVIModule
from atlasvi.models.peakvi import PEAKVIConfig, PEAKVIModule
from atlasvi.models.scanvi import SCANVIConfig, SCANVIModule
from atlasvi.models.scvi import SCVIConfig, SCVIModule
from atlasvi.models.sysvi import SysVIConfig, SysVIModule
from atlasvi.models.totalvi import TOTALVIConfig, TOTALVIModule

DEFAULT_MODEL = "scvi"

PEAKVI_TRAIN = {  # scvi-tools' PEAKVI.train: AdamW, early stopping on the held-out reconstruction, 50-epoch warm-up
    "max_epochs": 500,
    "optimizer": "AdamW",
    "lr": 1e-4,
    "weight_decay": 1e-3,
    "eps": 1e-8,
    "n_epochs_kl_warmup": 50,
    "early_stopping": True,
    "early_stopping_monitor": "reconstruction",
    "early_stopping_patience": 50,
}
MULTIVI_TRAIN = PEAKVI_TRAIN  # scvi-tools' MULTIVI.train: the same optimizer, warm-up and early stopping as PEAKVI's
SYSVI_TRAIN = {"n_epochs_kl_warmup": 0}  # scvi-tools' SysVI.train: no KL warm-up (poor integration with one)
TOTALVI_TRAIN = {  # scvi-tools' TOTALVI.train: lr 4e-3, KL warm-up over 0.75 x cells steps, lr on plateau, early stop
    "lr": 4e-3,
    "n_epochs_kl_warmup": None,
    "kl_warmup_steps_per_cell": 0.75,
    "reduce_lr_on_plateau": True,
    "early_stopping": True,
}

CONDSCVI_TRAIN = {
    "max_epochs": 300
}  # scvi-tools' CondSCVI.train: 300 epochs, lr 1e-3, TrainingPlan's 400-epoch warm-up
DESTVI_TRAIN = {"max_epochs": 2000, "lr": 3e-3, "n_epochs_kl_warmup": 200}  # scvi-tools' DestVI.train
# scvi-tools 1.4.2's train(batch_size=...) is 128 (LoaderConfig's default) for SCVI, SCANVI, LinearSCVI, PEAKVI,
# MULTIVI, SysVI, CondSCVI and DestVI; TOTALVI.train's is 256
TOTALVI_LOADER = {"batch_size": 256}


@dataclass(frozen=True)
class ModelEntry:
    """A registered method.

    name: the config's `name` and `atlasvi train --model NAME`; saved_name: `method` in model.json (scvi-tools'
    class name); user_class: "module:Class" of the user-facing class (the api layer imports it); latent_key:
    the obsm key its latent is written to by default; init_from: names of the entries whose saved weights it
    can start from (`--init-from`); train_defaults: TrainConfig fields whose defaults differ for this method (as
    scvi-tools' `train` of the method sets them), under whatever the job or the caller sets; loader_defaults: the
    same for LoaderConfig fields (TOTALVI.train's batch size 256); needs_init_from: it cannot train without one of
    those saved models (DestVI reuses a CondSCVI's decoder).
    """

    name: str
    saved_name: str
    config_class: type[BaseModel]
    module_class: type[nn.Module]
    user_class: str
    latent_key: str
    init_from: tuple[str, ...] = ()
    train_defaults: dict[str, Any] = field(default_factory=dict)
    loader_defaults: dict[str, Any] = field(default_factory=dict)
    needs_init_from: bool = False


ENTRIES: tuple[ModelEntry, ...] = (
    ModelEntry("scvi", "SCVI", SCVIConfig, SCVIModule, "atlasvi.api.scvi:SCVI", "X_scvi"),
    ModelEntry("scanvi", "SCANVI", SCANVIConfig, SCANVIModule, "atlasvi.api.scanvi:SCANVI", "X_scanvi", ("scvi",)),
    ModelEntry("ldvae", "LinearSCVI", LDVAEConfig, LDVAEModule, "atlasvi.api.ldvae:LinearSCVI", "X_ldvae"),
    ModelEntry(
        "peakvi", "PEAKVI", PEAKVIConfig, PEAKVIModule, "atlasvi.api.peakvi:PEAKVI", "X_peakvi", (), PEAKVI_TRAIN
    ),
    ModelEntry("sysvi", "SysVI", SysVIConfig, SysVIModule, "atlasvi.api.sysvi:SysVI", "X_sysvi", (), SYSVI_TRAIN),
    ModelEntry(
        "totalvi",
        "TOTALVI",
        TOTALVIConfig,
        TOTALVIModule,
        "atlasvi.api.totalvi:TOTALVI",
        "X_totalvi",
        (),
        TOTALVI_TRAIN,
        TOTALVI_LOADER,
    ),
    ModelEntry(
        "multivi",
        "MULTIVI",
        MULTIVIConfig,
        MULTIVIModule,
        "atlasvi.api.multivi:MULTIVI",
        "X_multivi",
        (),
        MULTIVI_TRAIN,
    ),
    ModelEntry(
        "condscvi",
        "CondSCVI",
        CondSCVIConfig,
        CondSCVIModule,
        "atlasvi.api.condscvi:CondSCVI",
        "X_condscvi",
        (),
        CONDSCVI_TRAIN,
    ),  # fmt: skip
    ModelEntry(
        "destvi",
        "DestVI",
        DestVIConfig,
        DestVIModule,
        "atlasvi.api.destvi:DestVI",
        "proportions",
        ("condscvi",),
        DESTVI_TRAIN,
        needs_init_from=True,
    ),  # fmt: skip
)
REGISTRY: dict[str, ModelEntry] = {entry.name: entry for entry in ENTRIES}


def get_entry(name: str) -> ModelEntry:
    """The entry registered as `name` (a config `name` or a model.json `method`); ConfigError naming the known ones."""
    for entry in ENTRIES:
        if name in (entry.name, entry.saved_name):
            return entry
    raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(REGISTRY)}")


def entry_of(config: BaseModel) -> ModelEntry:
    """The entry of a model config (by its `name`)."""
    return get_entry(config.name)  # type: ignore[attr-defined]


def default_model_config() -> BaseModel:
    """The config of the default model (scVI with scvi-tools' defaults)."""
    return REGISTRY[DEFAULT_MODEL].config_class()


def _model_name(value: Any) -> str:
    """The union's tag: `name` of a mapping or a config, scvi when absent."""
    if isinstance(value, dict):
        return value.get("name", DEFAULT_MODEL)
    return getattr(value, "name", DEFAULT_MODEL)


ModelConfig = Annotated[
    Union[tuple(Annotated[entry.config_class, Tag(entry.name)] for entry in ENTRIES)],  # noqa: UP007
    Discriminator(
        _model_name,
        custom_error_type="unknown_model",
        custom_error_message=f"unknown model name; registered models: {', '.join(REGISTRY)}",
    ),
]
