"""Model files: weights (`model.pt`, read with `torch.load(weights_only=True)`) and `model.json`.

model.json holds what is needed to rebuild and to check a store before use: the method, its config,
and the registry (gene ids and names, batch / labels / covariate keys with their categories, the
library prior). Loading executes no code from the files.
"""

import json
import os
import pickle
from dataclasses import asdict, fields
from pathlib import Path

import torch

from atlasvi.data import StoreSchema
from atlasvi.data.loader import feature_map_key
from atlasvi.data.store import ModalitySchema
from atlasvi.errors import AtlasviError

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.pt"
META_NAME = "model.json"


class IncompatibleStoreError(AtlasviError, ValueError):
    """A store does not match a saved model (genes, keys or categories)."""


class ModelFileError(AtlasviError, ValueError):
    """A saved model's files are malformed, disagree with each other, or would run code when loaded."""


class NoSavedModelError(AtlasviError, FileNotFoundError):
    """A folder holds no saved model."""


REGISTRY_FIELDS = tuple(f.name for f in fields(StoreSchema) if f.name != "n_cells")


def save_model(directory: Path, method: str, config: dict, schema: StoreSchema, state: dict[str, torch.Tensor]) -> Path:
    """Write weights and model.json into `directory` (each written to a sibling, then renamed)."""
    directory.mkdir(parents=True, exist_ok=True)
    registry = asdict(schema)
    registry.pop("n_cells")
    meta = {"format_version": FORMAT_VERSION, "method": method, "config": config, "registry": registry}
    weights, partial = directory / WEIGHTS_NAME, directory / (WEIGHTS_NAME + ".partial")
    torch.save(state, partial)
    os.replace(partial, weights)
    partial = directory / (META_NAME + ".partial")
    partial.write_text(json.dumps(meta, indent=1))
    os.replace(partial, directory / META_NAME)
    return directory


def saved_config(model: dict, store: str, n_cells: int, nnz: int, train: dict | None) -> dict:
    """model.json's `config`: the model config's fields, the training store (its absolute path or URL) with its cells
    and non-zeros (so that it is found, and recognised, from any working folder), the training config if any."""
    config = {"model": model, "store": store, "store_identity": {"n_cells": n_cells, "nnz": nnz}}
    return config | ({"train": train} if train is not None else {})


def read_meta(directory: Path) -> dict:
    """model.json of a saved model, checked for the fields loading needs (each missing one is named)."""
    path = directory / META_NAME
    if not path.exists():
        raise NoSavedModelError(f"{directory}: no saved model here (no {META_NAME})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelFileError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: not a JSON object of model fields")
    for field in ("format_version", "method", "config", "registry"):
        if field not in meta:
            raise ModelFileError(f"{path}: missing field {field!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ModelFileError(f"{path}: model format {meta['format_version']}, this atlasvi reads {FORMAT_VERSION}")
    for section, required in (("config", ("model",)), ("registry", REGISTRY_FIELDS)):
        if not isinstance(meta[section], dict):
            raise ModelFileError(f"{path}: field {section!r} is not a JSON object")
        missing = [f"{section}.{k}" for k in required if k not in meta[section]]
        if missing:
            raise ModelFileError(f"{path}: missing field {missing[0]!r}")
    return meta


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    """model.pt as tensors only: a file holding pickled code (or anything but weights) is refused, never run."""
    path = directory / WEIGHTS_NAME
    if not path.exists():
        raise ModelFileError(f"{path}: missing (a saved model is {META_NAME} and {WEIGHTS_NAME})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelFileError(
            f"{path}: not a weights-only model file; loading it would run code from the file, refused"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ModelFileError(f"{path}: not a readable model file ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{path}: not a model's weights (a name -> tensor mapping)")
    return state


def load_model(directory: Path, method: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model.json contents, weights) of a saved model of `method`; no code from the files runs."""
    meta = read_meta(directory)
    if meta["method"] != method:
        raise ModelFileError(f"{directory / META_NAME}: a saved {meta['method']} model, not {method}")
    return meta, load_weights(directory)


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str, described: str) -> None:
    """Load `state` into `module`, built from model.json's config (`described`, e.g. "n_latent=10, ..."); a
    weight missing, unexpected or of another shape is named with the config it contradicts."""
    expected = module.state_dict()
    problems = [f"{k!r} is in {WEIGHTS_NAME} only" for k in state if k not in expected]
    problems += [f"{k!r} is missing from {WEIGHTS_NAME}" for k in expected if k not in state]
    problems += [
        f"{k!r} is {tuple(state[k].shape)} in {WEIGHTS_NAME}, {tuple(v.shape)} by {META_NAME}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        raise ModelFileError(
            f"{where}: {META_NAME} ({described}) does not describe the weights in {WEIGHTS_NAME}: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        )
    module.load_state_dict(state)


def load_init_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Start `module` from another model's trained weights (`--init-from`): every weight of `state` is loaded, and
    each weight under the module's `init_prefixes` must come from it; the others keep their initial values.
    A state that does not fit raises ModelFileError naming the first weight at fault (`check_init_state`)."""
    state = taken_init_state(module, state)
    check_init_state(module, state, where)
    module.load_state_dict(state, strict=False)


def check_init_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """ModelFileError naming the first weight at fault where `load_init_state` could not start `module` from `state`
    (a weight the module lacks, one under its `init_prefixes` missing, another shape); reads only names and shapes,
    so `module` may be shape-only (built on torch's meta device)."""
    state = taken_init_state(module, state)
    prefixes: tuple[str, ...] = getattr(module, "init_prefixes", ())
    expected = module.state_dict()
    problems = [f"{k!r} is not a weight of this model" for k in state if k not in expected]
    problems += [f"{k!r} is missing" for k in expected if k.startswith(prefixes) and k not in state]
    problems += [
        f"{k!r} is {tuple(v.shape)}, this model's is {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        raise ModelFileError(
            f"{where}: the weights do not fit this model: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        )


def taken_init_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of another model's `state` that `module` starts from: those its `take_init_state(state)` picks
    (a module reusing part of another method's model, e.g. DestVI of a CondSCVI), else all of them."""
    take = getattr(module, "take_init_state", None)
    return take(state) if take is not None else state


def saved_schema(meta: dict, n_cells: int = 0) -> StoreSchema:
    """The registry of a saved model as a StoreSchema (n_cells is not part of it)."""
    registry = dict(meta["registry"])
    registry["categorical"] = {k: tuple(v) for k, v in registry["categorical"].items()}
    for key in ("gene_ids", "gene_names", "continuous", "library_log_means", "library_log_vars"):
        registry[key] = tuple(registry[key])
    registry["modalities"] = {k: ModalitySchema.from_dict(v) for k, v in registry.get("modalities", {}).items()}
    return StoreSchema(n_cells=n_cells, **registry)


def feature_map(model: tuple[str, ...], store: tuple[str, ...], what: str, where: str) -> dict[str, torch.Tensor]:
    """A dense modality's features matched by name: {feature_map_key(what): (n_model,) the store column of each
    of the model's features, -1 where the store lacks it (read as not measured)}; {} when the store has them in
    the model's order. Raises IncompatibleStoreError when the store has none of them."""
    if store == model:
        return {}
    column = {name: i for i, name in enumerate(store)}
    if not any(name in column for name in model):
        raise IncompatibleStoreError(
            f"{where}: the store has none of the model's {len(model)} {what} features {list(model[:3])}... "
            f"(it has {len(store)}: {list(store[:3])}...)"
        )
    return {feature_map_key(what): torch.tensor([column.get(name, -1) for name in model], dtype=torch.int64)}


def check_compatible(
    model: StoreSchema, store: StoreSchema, used_keys: tuple[str, ...], where: str
) -> dict[str, torch.Tensor]:
    """Store code -> model code for each categorical key in `used_keys`, (n_store_categories,) int64.

    Raises IncompatibleStoreError naming the first difference: genes (ids, order), a missing key, a
    category the model has not seen, continuous covariates.
    """
    if store.gene_ids != model.gene_ids:
        missing = [g for g in model.gene_ids if g not in set(store.gene_ids)]
        detail = f"{len(missing)} of the model's genes are missing, first {missing[:3]}" if missing else "other order"
        raise IncompatibleStoreError(
            f"{where}: the model was trained on {model.n_genes} genes, the store has {store.n_genes} ({detail}); "
            "build the store with the model's gene list"
        )
    code_maps = {}
    for key in used_keys:
        if key not in store.categorical:
            raise IncompatibleStoreError(f"{where}: obs key {key!r}, which the model uses, is not in the store")
        known = {c: i for i, c in enumerate(model.categorical[key])}
        unknown = [c for c in store.categorical[key] if c not in known]
        if unknown:
            raise IncompatibleStoreError(
                f"{where}: obs[{key!r}] has categories the model has not seen: {unknown[:5]}"
                " (map a new study onto the model with query mapping instead)"
            )
        code_maps[key] = torch.tensor([known[c] for c in store.categorical[key]], dtype=torch.int64)
    if tuple(store.continuous) != tuple(model.continuous):
        raise IncompatibleStoreError(f"{where}: continuous covariates {store.continuous}, model {model.continuous}")
    return code_maps
