"""`AtlasModel`: what every user-facing model class shares (fit, latent, ELBO, save / load, scArches).

A method class (`SCVI`, `SCANVI`) is this plus small extras (`atlasvi.api.extras`), never another method
class. Its registry entry (`atlasvi.models.registry`) gives the model.json method and the latent key.
Posterior quantities stream over the store (one minibatch in memory); the `write_*` methods put them back
into the store chunk by chunk, atomically.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from typing import Any, Self, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from atlasvi.analysis import elbo, latent_representation, minibatches
from atlasvi.data import LoaderConfig, Minibatch, open_store, split_rows
from atlasvi.data.store import AtlasStore, StoreSchema, is_url
from atlasvi.data.writeback import ObsArrayWriter
from atlasvi.models.registry import ModelEntry, get_entry
from atlasvi.models.saving import (
    META_NAME,
    IncompatibleStoreError,
    ModelFileError,
    load_init_state,
    load_model,
    load_state,
    read_meta,
    save_model,
    saved_config,
    saved_schema,
)
from atlasvi.models.surgery import SurgeryConfig, extend_registry, freeze_for_query, transplant
from atlasvi.train import EpochRecord, TrainConfig, fit
from atlasvi.train.job import loader_config_for, make_loaders, resolve_device, train_config_for


class AtlasModel:
    """A model trained on `store` (a path, URL or open AtlasStore). device: "auto", "cpu" or "cuda".

    seed: the initial weights are drawn from it alone (in a scope of their own; the global RNG is untouched).
    registry: the model's genes and categories when they are not the store's own (set by `load`).
    query_masks: after `load_query_data`, the entries of each parameter that train (the new batch columns).
    """

    method: str  # model.json's method, the registry entry's saved_name: the entry gives the config and module classes

    def __init__(
        self,
        store: AtlasStore | str | Path,
        config: BaseModel | None = None,
        device: str = "auto",
        registry: StoreSchema | None = None,
        seed: int = 0,
    ):
        entry = self.entry
        self.store = store if isinstance(store, AtlasStore) else open_store(store)
        self.config = config or entry.config_class()
        self.schema = entry.module_class.registry(registry or self.store.schema, self.config)  # type: ignore[attr-defined]
        self.device = resolve_device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = entry.module_class(self.schema, self.config).to(self.device)
        self.code_maps = self._code_maps(self.store)
        self.query_masks: dict[str, torch.Tensor] | None = None
        self.train_config: TrainConfig | None = None
        self.loader_config: LoaderConfig | None = None
        self.history: list[EpochRecord] = []

    def fit(
        self,
        train: TrainConfig | None = None,
        loader: LoaderConfig | None = None,
        checkpoint_dir: Path | None = None,
        on_epoch_end: Callable[[EpochRecord], None] | None = None,
    ) -> list[EpochRecord]:
        """Train on the store's training rows, evaluating on its held-out rows; returns the epoch records.

        With checkpoint_dir, a run that stopped resumes where it was (see `atlasvi.train.fit`). The fields `train`
        does not set are the method's defaults (its registry entry's `train_defaults`, else TrainConfig's), and so
        are those `loader` does not set (`loader_defaults`: TOTALVI's batch 256; no loader: shuffled with train's
        seed); `train_config` and `loader_config` are what it used. A query model (`load_query_data`) trains with
        weight decay 0, whatever `train` says: decay would move frozen weights.
        """
        self.train_config = train_config_for(self.config, train)
        if self.query_masks is not None:
            self.train_config = self.train_config.model_copy(update={"weight_decay": 0.0})
        self.loader_config = loader_config_for(self.config, loader, self.train_config.seed)
        train_loader, validation_loader = make_loaders(
            self.store, self.loader_config, self.train_config.validation_fraction,
            code_maps={k: v.numpy() for k, v in self.code_maps.items()}, modalities=self.module.used_modalities,
            device=self.device,
        )  # fmt: skip
        with train_loader, validation_loader:
            self.history = fit(
                self.module, train_loader, validation_loader, self.train_config, checkpoint_dir, on_epoch_end
            )
        return self.history

    @classmethod
    def _entry(cls) -> ModelEntry:
        return get_entry(cls.method)

    @property
    def entry(self) -> ModelEntry:
        """The model registry's entry of this method (config and module classes, saved name, latent key, ...)."""
        return self._entry()

    def init_from(self, other: "AtlasModel") -> None:
        """Start from `other`'s trained weights (`other`'s entry must be in this entry's init_from): the weights
        under this module's `init_prefixes` must come from `other`; the others keep their initial values."""
        if other.entry.name not in self.entry.init_from:
            raise ValueError(f"a {self.method} model starts from {list(self.entry.init_from)}, not a {other.method}")
        load_init_state(self.module, other.module.state_dict(), f"a {other.method} model")

    @property
    def n_latent(self) -> int:
        """The latent's width: the module's where it resolves it from the data (PeakVI's default), else the config's."""
        return int(getattr(self.module, "n_latent", None) or self.config.n_latent)

    @property
    def has_latent(self) -> bool:
        """Whether the model gives each cell a latent (`get_latent_representation`); DestVI's may not."""
        return True

    @property
    def latent_key(self) -> str:
        """The obsm key its latent is written to by default: the registry entry's (X_scvi, X_scanvi, ...)."""
        return self.entry.latent_key

    @property
    def validation_rows(self) -> tuple[int, int]:
        """The held-out rows [start, stop) of the training store (the default of get_elbo)."""
        return split_rows(self.store.n_cells, (self.train_config or TrainConfig()).validation_fraction)[1]

    def _batches(
        self, store: AtlasStore | str | Path | None, rows: tuple[int, int] | None, batch_size: int
    ) -> Iterator[Minibatch]:
        modalities = self.module.used_modalities
        if store is None:
            return minibatches(self.store, rows, batch_size, self.code_maps, modalities)
        opened = store if isinstance(store, AtlasStore) else open_store(store)
        return minibatches(opened, rows, batch_size, self._code_maps(opened), modalities)

    def _code_maps(self, opened: AtlasStore) -> dict[str, torch.Tensor]:
        return self.module.code_maps(opened.schema, str(opened.path))  # type: ignore[operator]

    @contextmanager
    def _own_rng(self, seed: int = 0) -> Iterator[None]:
        """A scope whose random draws come from `seed` alone and leave the global RNG states as they were
        (the encoder draws a latent sample even where only its mean is used)."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield

    def _store_path(self, store: AtlasStore | str | Path | None) -> Path:
        opened = self.store if store is None else store
        return Path(opened.path) if isinstance(opened, AtlasStore) else Path(opened)

    def get_latent_representation(
        self,
        store: AtlasStore | str | Path | None = None,
        rows: tuple[int, int] | None = None,
        give_mean: bool = True,
        batch_size: int = 1024,
        seed: int = 0,
    ) -> np.ndarray:
        """(n_rows, n_latent) posterior means of z (or one draw) for the store's rows in order."""
        generator = torch.Generator().manual_seed(seed)
        parts = latent_representation(self.module, self._batches(store, rows, batch_size), give_mean, generator)
        with self._own_rng(seed):
            return _stack(parts, self.n_latent)

    def write_latent_representation(
        self,
        store: AtlasStore | str | Path | None = None,
        key: str | None = None,
        batch_size: int = 1024,
        attrs: dict[str, Any] | None = None,
    ) -> Path:
        """Write the posterior means into obsm[key] of a local store, chunk by chunk; returns the array's path.
        key: default the registry entry's latent key (X_scvi, X_scanvi). attrs: extra attributes of the
        written array (e.g. the run that wrote it)."""
        if not self.has_latent:
            raise ValueError(f"this {self.entry.saved_name} has no latent; write_results writes what it gives")
        key = key or self.latent_key
        parts = latent_representation(self.module, self._batches(store, None, batch_size))
        with self._own_rng():
            return _write(parts, self._store_path(store), "obsm", key, self.n_latent, attrs)

    def write_results(self, key: str | None = None, attrs: dict[str, Any] | None = None) -> list[Path]:
        """What `atlasvi train` writes back into the training store: the latent in obsm[key] (default the entry's
        latent key); a method's extras add their own (e.g. predictions). Returns the written arrays' paths."""
        return [self.write_latent_representation(key=key, attrs=attrs)]

    def figures(self, folder: Path) -> list[tuple[str, Callable[[], Path | None]]]:
        """The method's own figures `atlasvi train` draws and logs beside the loss curves and the latent UMAP:
        (name, draw) pairs, draw() writing a PNG under `folder` (none here; DestVI draws its proportions)."""
        return []

    def _elbo_terms(
        self, store: AtlasStore | str | Path | None, rows: tuple[int, int] | None, batch_size: int
    ) -> tuple[float, float, float]:
        if store is None and rows is None:
            rows = self.validation_rows
        with self._own_rng():  # the ELBO's latent draws: the same value at every call
            return elbo(self.module, self._batches(store, rows, batch_size))

    def get_elbo(
        self, store: AtlasStore | str | Path | None = None, rows: tuple[int, int] | None = None, batch_size: int = 1024
    ) -> float:
        """-ELBO per cell (nats, KL weight 1) on the held-out rows of the training store, or on `rows` / `store`."""
        return self._elbo_terms(store, rows, batch_size)[0]

    def get_reconstruction_error(
        self, store: AtlasStore | str | Path | None = None, rows: tuple[int, int] | None = None, batch_size: int = 1024
    ) -> float:
        """-log p(x | z, library) per cell (nats) on the held-out rows, or on `rows` / `store`."""
        return self._elbo_terms(store, rows, batch_size)[1]

    def save(self, directory: str | Path) -> Path:
        """Weights (model.pt) and model.json (config, registry of genes and categories, training config).

        The training store is recorded by absolute path (a URL as it is), with its cells and non-zeros,
        so that it is found, and recognised, from any working folder.
        """
        path = self.store.path if is_url(self.store.path) else str(Path(self.store.path).resolve())
        train = self.train_config.model_dump() if self.train_config is not None else None
        config = saved_config(self.config.model_dump(), path, self.store.n_cells, self.store.nnz, train)
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        return save_model(Path(directory), self.method, config, self.schema, state)

    @classmethod
    def saved_store(cls, directory: str | Path) -> str:
        """The store a saved model was trained on: its absolute path or URL, as recorded at training."""
        meta = read_meta(Path(directory))
        where, store = Path(directory) / META_NAME, meta["config"].get("store")
        if not isinstance(store, str):
            raise ModelFileError(f"{where}: missing field 'config.store' (the training store); name a store to use")
        if not is_url(store) and not Path(store).is_absolute():
            raise ModelFileError(
                f"{where}: the training store is recorded as {store!r}, relative to the folder training ran in "
                "(a model saved by an older atlasvi); name the store to use"
            )
        return store

    @classmethod
    def load(cls, directory: str | Path, store: AtlasStore | str | Path, device: str = "auto") -> "Self":
        """A saved model on `store`; a store with other genes, a missing key or unseen categories is refused,
        and so is another store than the one trained on where that one was (same path, other cells)."""
        directory = Path(directory)
        meta, state = load_model(directory, cls.method)
        opened = store if isinstance(store, AtlasStore) else open_store(store)
        _check_training_store(directory, meta["config"], opened)
        schema = saved_schema(meta, opened.n_cells)
        config = _section(directory, cls._entry().config_class, meta["config"], "model")
        model = cls(opened, config, device, registry=schema)
        load_state(model.module, state, str(directory), _described(config))
        if "train" in meta["config"]:
            model.train_config = _section(directory, TrainConfig, meta["config"], "train")
        return model

    @classmethod
    def load_query_data(
        cls,
        query: AtlasStore | str | Path,
        reference: "AtlasModel | str | Path",
        device: str = "auto",
        surgery: SurgeryConfig | None = None,
        seed: int = 0,
    ) -> "Self":
        """scArches: the reference model (an instance or a saved folder) extended to the query store's new
        batches, ready for `fit` on the query; only the new batch columns train (see `atlasvi.models.surgery`).

        The new columns are initialised as a fresh module of `seed` would be. The reference's genes must be the
        query's, in order; its other covariates may not have categories the reference has not seen.
        """
        opened = query if isinstance(query, AtlasStore) else open_store(query)
        if isinstance(reference, AtlasModel):
            schema, config, state = reference.schema, reference.config, reference.module.state_dict()
        else:
            meta, state = load_model(Path(reference), cls.method)
            schema, config = (
                saved_schema(meta),
                _section(Path(reference), cls._entry().config_class, meta["config"], "model"),
            )
        with torch.random.fork_rng(devices=[]):  # its initial weights are replaced by the reference's
            reference_module = cls._entry().module_class(schema, config)
        load_state(reference_module, state, str(reference), _described(config))
        registry = extend_registry(schema, opened.schema, str(opened.path))
        model = cls(opened, config, device, registry=registry, seed=seed)
        model.query_masks = transplant(reference_module, model.module)
        freeze_for_query(model.module, model.query_masks, surgery)
        return model


def user_class(entry: ModelEntry) -> type[AtlasModel]:
    """The user-facing class of a registry entry ("module:Class" in `entry.user_class`)."""
    module, name = entry.user_class.split(":")
    return getattr(import_module(module), name)


_Config = TypeVar("_Config", bound=BaseModel)
_DESCRIBED = ("n_latent", "n_hidden", "n_layers", "gene_likelihood", "dispersion", "use_observed_lib_size")


def _described(config: BaseModel) -> str:
    """The architecture fields of a model config, as model.json gives them (for a mismatch with the weights)."""
    return ", ".join(f"{k}={v!r}" for k, v in config.model_dump().items() if k in _DESCRIBED)


def _section(directory: Path, config_cls: type[_Config], config: dict, section: str) -> _Config:
    """config[section] of model.json as `config_cls`; an invalid value is named by its field."""
    try:
        return config_cls(**config[section])
    except (TypeError, ValidationError) as err:
        if isinstance(err, ValidationError):
            first = err.errors()[0]
            detail = f"field 'config.{section}.{'.'.join(str(p) for p in first['loc'])}': {first['msg']}"
        else:
            detail = f"field 'config.{section}' is not a mapping of fields"
        raise ModelFileError(f"{directory / META_NAME}: {detail}") from None


def _check_training_store(directory: Path, config: dict, opened: AtlasStore) -> None:
    """Where `opened` is at the path the model recorded as its training store, it must be that store."""
    recorded, identity = config.get("store"), config.get("store_identity")
    if not isinstance(recorded, str) or not isinstance(identity, dict):
        return
    here = opened.path if is_url(opened.path) else str(Path(opened.path).resolve())
    found = {"n_cells": opened.n_cells, "nnz": opened.nnz}
    if here == recorded and found != identity:
        raise IncompatibleStoreError(
            f"{opened.path}: not the store {directory} was trained on: {directory / META_NAME} records "
            f"{identity.get('n_cells')} cells and {identity.get('nnz')} non-zeros at {recorded}, this store has "
            f"{found['n_cells']} cells and {found['nnz']} non-zeros; rebuild it as it was, or name another store"
        )


def _stack(parts: Iterator[tuple[np.ndarray, np.ndarray]], width: int) -> np.ndarray:
    chunks = [values for _, values in parts]
    return np.concatenate(chunks) if chunks else np.zeros((0, width), dtype=np.float32)


def _write(
    parts: Iterator[tuple[np.ndarray, np.ndarray]],
    path: Path,
    group: str,
    key: str,
    width: int,
    attrs: dict[str, Any] | None = None,
) -> Path:
    with ObsArrayWriter(path, group, key, width, attrs=attrs) as writer:
        for _, values in parts:
            writer.write(values)
        return writer.commit()
