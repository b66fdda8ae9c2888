"""A training job's configuration and the pieces every runner shares (plain process, Ray worker, API).

`TrainJobConfig` is what `atlasvi train` reads from YAML: the store, the model, the optimisation, the
loader and where outputs go; every field has a default that serves (the embedded dataset, scVI with
scvi-tools' defaults).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from atlasvi.data import LoaderConfig, StreamingLoader, split_rows
from atlasvi.data.resident import ResidentLoader, ResidentRows, choose_resident
from atlasvi.data.store import AtlasStore, StoreSchema
from atlasvi.errors import ConfigError
from atlasvi.models.registry import DEFAULT_MODEL, REGISTRY, ModelConfig, default_model_config, entry_of, get_entry
from atlasvi.models.saving import check_init_state, load_init_state, load_weights, read_meta, saved_schema
from atlasvi.train.loop import TrainConfig, pretrained_max_epochs


class TrainJobConfig(BaseModel):
    """`atlasvi train`. store None: the embedded CellBench store (built on first use).

    output: folder of the saved model and checkpoints; latent_key: obsm key the latent is written back
    to (None: not written); both default to the model's (outputs/NAME, its registry latent key);
    init_from: a saved model folder whose weights the model starts from (its method must be in the model's
    `init_from`; the registry is then the saved model's); umap_cells: cells in the UMAP figure (the store's
    first rows, a random sample);
    torch_threads: CPU intra-op threads (None: see `cpu_threads`). num_workers > 1 trains in Ray Train
    workers (use_gpu: one GPU each) that split the global batch `loader.batch_size` (see `rank_batch_size`),
    restarting the group up to max_failures times; storage_path: where
    Ray persists checkpoints, absolute or a URI (None: OUTPUT/ray_results).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: str | None = None
    model: ModelConfig = Field(default_factory=default_model_config)
    train: TrainConfig = TrainConfig()
    loader: LoaderConfig = LoaderConfig()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output: str = f"outputs/{DEFAULT_MODEL}"
    latent_key: str | None = REGISTRY[DEFAULT_MODEL].latent_key
    experiment: str = "atlasvi"
    run_name: str | None = None
    umap_cells: int = Field(default=20000, ge=0)
    torch_threads: int | None = Field(default=None, gt=0)
    num_workers: int = Field(default=1, gt=0)
    use_gpu: bool = False
    max_failures: int = Field(default=3, ge=0)
    storage_path: str | None = None
    init_from: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _model_defaults(cls, data: Any) -> Any:
        """output and latent_key default to the model's: outputs/NAME and its registry latent key; the train and
        loader fields the job does not set default to the model's (`ModelEntry.train_defaults`, `loader_defaults`)."""
        if not isinstance(data, dict) or data.get("model") is None:
            return data
        model = data["model"]
        name = model.get("name", DEFAULT_MODEL) if isinstance(model, dict) else getattr(model, "name", DEFAULT_MODEL)
        if name not in REGISTRY:
            return data  # the union names the unknown model
        entry = REGISTRY[name]
        data = {"output": f"outputs/{name}", "latent_key": entry.latent_key} | data
        if entry.train_defaults:
            data["train"] = section_fields(entry.train_defaults, data.get("train"))
        if entry.loader_defaults:
            data["loader"] = section_fields(entry.loader_defaults, data.get("loader"))
        return data

    @model_validator(mode="after")
    def _global_batch(self) -> "TrainJobConfig":
        """loader.batch_size is the global batch, split over the workers: at least one cell each."""
        rank_batch_size(self.loader.batch_size, self.num_workers)
        return self

    def cpu_threads(self, n_cores: int) -> int:
        """torch intra-op threads on CPU: torch_threads, else the cores the loader's read threads leave (>= 1).

        OpenMP threads spin-wait: on 2 busy cores, 2 torch threads next to the read threads ran a step ~40x
        slower than 1.
        """
        return self.torch_threads or max(1, n_cores - self.loader.num_threads)


def section_fields(defaults: dict[str, Any], section: BaseModel | dict[str, Any] | None) -> dict[str, Any]:
    """The fields of `section` (a TrainConfig or LoaderConfig, a mapping of its fields, or None) with those it does
    not set taken from `defaults` (a model's `ModelEntry.train_defaults` or `loader_defaults`); a config sets its
    `model_fields_set`."""
    given = section.model_dump(exclude_unset=True) if isinstance(section, BaseModel) else dict(section or {})
    return defaults | given


def train_config_for(model: BaseModel, train: TrainConfig | None) -> TrainConfig:
    """The TrainConfig a `model` (a registry entry's config) trains with: `train` over its entry's train defaults."""
    return TrainConfig.model_validate(section_fields(entry_of(model).train_defaults, train))


def loader_config_for(model: BaseModel, loader: LoaderConfig | None, seed: int) -> LoaderConfig:
    """The LoaderConfig a `model` (a registry entry's config) trains with: `loader` over its entry's loader
    defaults (TOTALVI: batch 256, as TOTALVI.train); no loader: those defaults, shuffled with `seed`."""
    given = loader if loader is not None else {"seed": seed}
    return LoaderConfig.model_validate(section_fields(entry_of(model).loader_defaults, given))


def resolve_device(name: str) -> torch.device:
    """ "auto": CUDA where available, else CPU; "cuda" without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_loaders(
    store: AtlasStore,
    loader: LoaderConfig,
    validation_fraction: float,
    rank: int = 0,
    world_size: int = 1,
    code_maps: dict[str, np.ndarray] | None = None,
    modalities: tuple[str, ...] = (),
    device: torch.device | str = "cpu",
) -> tuple[StreamingLoader, StreamingLoader]:
    """(train, validation) loaders of one rank on the seeded split of the store's rows (see `split_rows`).

    `loader.batch_size` is the global batch: each of the world_size ranks reads `rank_batch_size` cells a step, so
    N workers take one worker's optimiser steps per epoch on (about) one worker's batch.

    The validation loader reads its rows in order (no shuffling), with the training batch size.
    code_maps: store code -> model code per categorical key; modalities: those the minibatches carry beside the
    RNA counts (the module's `used_modalities`; see `StreamingLoader`). With `loader.resident` (see
    `choose_resident`: "auto" when the rows fit the budget on `device`) both are `ResidentLoader`s sharing the
    store's rows held on `device`: the same minibatches, cut there.
    """
    train_rows, validation_rows = split_rows(store.n_cells, validation_fraction)
    if validation_rows[0] == validation_rows[1]:
        raise ValueError("validation_fraction leaves no held-out cell; the loop evaluates on held-out cells")
    loader = loader.model_copy(update={"batch_size": rank_batch_size(loader.batch_size, world_size)})
    held_out = loader.model_copy(update={"shuffle": False})
    if choose_resident(store, loader, device, modalities, world_size).resident:
        rows = ResidentRows(store, 0, store.n_cells, modalities, device)
        return (
            ResidentLoader(store, rows, loader, rank, world_size, train_rows, code_maps),
            ResidentLoader(store, rows, held_out, rank, world_size, validation_rows, code_maps),
        )
    train = StreamingLoader(store, loader, rank, world_size, train_rows, code_maps, modalities)
    return train, StreamingLoader(store, held_out, rank, world_size, validation_rows, code_maps, modalities)


def rank_batch_size(batch_size: int, world_size: int) -> int:
    """Cells per rank per step when `batch_size` is the global batch: ceil(batch_size / world_size).

    DDP averages the ranks' gradients, so a step of world_size ranks is one step on their cells together; the global
    batch is rank_batch_size x world_size (batch_size itself when world_size divides it).
    """
    if batch_size < world_size:
        raise ConfigError(f"loader.batch_size {batch_size} is the global batch: it must be >= num_workers {world_size}")
    return -(-batch_size // world_size)


@dataclass(frozen=True)
class ModuleSpec:
    """What every runner (plain process, Ray worker, sweep trial) needs to build the job's module; picklable.

    schema: the model's registry; code_maps: store code -> model code per categorical key, and modalities: the
    store modalities the module reads (both for `make_loaders`); init_state: the weights it starts from
    (`init_from`), else None.
    """

    schema: StoreSchema
    code_maps: dict[str, np.ndarray]
    init_state: dict[str, torch.Tensor] | None = None
    modalities: tuple[str, ...] = ()


def module_spec(job: TrainJobConfig, store: AtlasStore) -> ModuleSpec:
    """The job's ModuleSpec on `store`: the registry from the store (or from the `init_from` model, whose
    method must be one the job's model can start from: ConfigError naming both), the code maps, the weights.

    The checks (the model on this registry, the init weights' names and shapes, the store's codes) run on a
    shape-only module on torch's meta device: no weight is allocated, initialised or loaded here, so the runner's
    `build_module` (or user class) builds the one module with weights."""
    entry = entry_of(job.model)
    base, init_state = store.schema, None
    if job.init_from is None and entry.needs_init_from:
        raise ConfigError(
            f"{entry.name} starts from a saved {' or '.join(entry.init_from)} model: pass its folder as init_from "
            "(--init-from)"
        )
    if job.init_from is not None:
        meta = read_meta(Path(job.init_from))
        source = get_entry(meta["method"])
        if source.name not in entry.init_from:
            raise ConfigError(
                f"init_from {job.init_from}: a saved {source.name} model; {entry.name} starts only from "
                f"{', '.join(entry.init_from) or 'no saved model'}"
            )
        base, init_state = saved_schema(meta, store.n_cells), load_weights(Path(job.init_from))
        init_registry = getattr(entry.module_class, "init_registry", None)
        if init_registry is not None:  # a module on the saved model's registry and the store's own parts (DestVI)
            base = init_registry(base, store.schema)
    try:
        schema = entry.module_class.registry(base, job.model)  # type: ignore[attr-defined]
        with torch.device("meta"):
            module = entry.module_class(schema, job.model)  # type: ignore[attr-defined]
    except ValueError as err:
        raise ConfigError(f"{store.path}: {err}") from None
    if init_state is not None:
        check_init_state(module, init_state, f"init_from {job.init_from}")
    rna = store.schema.modalities.get("rna")
    if rna is not None and rna.n_measured is not None and rna.n_measured < store.n_cells:
        if "rna" not in module.used_modalities:  # its RNA would be read as zero counts
            raise ConfigError(
                f"{store.path}: {store.n_cells - rna.n_measured} of its {store.n_cells} cells have no RNA (ATAC "
                f"only); {entry.name} reads every cell's RNA: train a model that reads the RNA mask (multivi), or "
                "build the store without those cells"
            )
    maps = module.code_maps(store.schema, str(store.path))  # type: ignore[operator]
    return ModuleSpec(schema, {k: v.numpy() for k, v in maps.items()}, init_state, module.used_modalities)


def build_module(
    model: BaseModel, schema: StoreSchema, seed: int, init_state: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """The module of `model`'s registry entry on registry `schema` (the entry's `registry` hook already applied),
    its initial weights drawn from `seed` (the global RNG is left as it was); init_state: trained weights it starts
    from (those under its `init_prefixes` must be there; the rest stays fresh), as scvi-tools' from_scvi_model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = entry_of(model).module_class(schema, model)
    if init_state is not None:
        load_init_state(module, init_state, "init_from")
    return module


def pretrained_train(job: TrainJobConfig, store: AtlasStore) -> TrainConfig:
    """The job's TrainConfig; a model started from trained weights with no max_epochs gets scvi-tools'
    pretrained rule over every cell of the store (as `atlasvi scanvi`)."""
    if job.init_from is None or job.train.max_epochs is not None:
        return job.train
    return job.train.model_copy(update={"max_epochs": pretrained_max_epochs(store.n_cells)})
