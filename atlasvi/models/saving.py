"""Model files: weights (`model.pt`, read with `torch.load(weights_only=True)`) and `model.json`.

model.json holds what is needed to rebuild and to check a store before use: the method, its config,
and the registry (gene ids and names, batch / labels / covariate keys with their categories, the
library prior). Loading executes no code from the files.
"""

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from atlasvi.data import StoreSchema
from atlasvi.errors import AtlasviError

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.pt"
META_NAME = "model.json"


class IncompatibleStoreError(AtlasviError, ValueError):
    """A store does not match a saved model (genes, keys or categories)."""


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


def load_model(directory: Path, method: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model.json contents, weights) of a saved model of `method`; no code from the files runs."""
    meta_path = directory / META_NAME
    if not meta_path.exists():
        raise FileNotFoundError(f"{directory}: no saved model here (no {META_NAME})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: model format {meta.get('format_version')}, this atlasvi reads {FORMAT_VERSION}")
    if meta.get("method") != method:
        raise ValueError(f"{meta_path}: a saved {meta.get('method')} model, not {method}")
    state = torch.load(directory / WEIGHTS_NAME, map_location="cpu", weights_only=True)
    return meta, state


def saved_schema(meta: dict, n_cells: int = 0) -> StoreSchema:
    """The registry of a saved model as a StoreSchema (n_cells is not part of it)."""
    registry = dict(meta["registry"])
    registry["categorical"] = {k: tuple(v) for k, v in registry["categorical"].items()}
    for key in ("gene_ids", "gene_names", "continuous", "library_log_means", "library_log_vars"):
        registry[key] = tuple(registry[key])
    return StoreSchema(n_cells=n_cells, **registry)


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
