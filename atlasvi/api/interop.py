"""scvi-tools interoperability: an atlasvi model exported in scvi-tools 1.4.2's save format, and a scvi-tools
saved model imported as an atlasvi model on a store with its genes (`atlasvi export`, `atlasvi import`), for SCVI,
SCANVI, LinearSCVI, TOTALVI, PEAKVI, CondSCVI, SysVI and MULTIVI (`atlasvi.models.scvi_tools.COUNTERPARTS`).

The format and the renaming live in `atlasvi.models.scvi_tools`; here the user-facing class comes from the model
registry and the store is checked against the imported model (genes, keys, categories), each problem named.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from atlasvi.api.base import AtlasModel, _described, user_class
from atlasvi.data import open_store
from atlasvi.data.store import AtlasStore, ModalitySchema, StoreSchema
from atlasvi.models.registry import get_entry
from atlasvi.models.saving import META_NAME, IncompatibleStoreError, load_state, load_weights, read_meta, saved_schema
from atlasvi.models.scvi_tools import (
    COUNTERPARTS,
    MODEL_FILE,
    NO_BATCH_KEY,
    PROTEIN,
    ScviToolsFileError,
    ScviToolsModel,
    from_scvi_tools,
    read_scvi_tools,
    to_scvi_tools,
    write_scvi_tools,
)


def export_scvi_tools(model: AtlasModel | str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Write a trained model (an instance, or a saved model's folder: no store needed) as a scvi-tools 1.4.2
    model folder `output` (`output`/model.pt), so that `scvi.model.<Class>.load(output, adata)` (SCVI, SCANVI,
    LinearSCVI, TOTALVI, PEAKVI, CondSCVI; `scvi.external.SysVI`, whose adata.X is then the log-normalised
    counts, log1p(counts / total * target_sum); MULTIVI, whose adata is a MuData of modalities "rna" and "atac";
    DestVI with amortization "both", on its spots) gives its latent (DestVI: its proportions and gamma) on the same
    cells; another method is refused in one line.
    An existing `output` is refused unless `overwrite` (then only its model.pt is replaced).
    Returns the written model.pt."""
    output = Path(output)
    if isinstance(model, AtlasModel):
        method, config, schema = model.method, model.config.model_dump(), model.schema
        state, n_cells = model.module.state_dict(), model.store.n_cells
    else:
        meta = read_meta(Path(model))
        method, config, schema = meta["method"], meta["config"]["model"], saved_schema(meta)
        state = load_weights(Path(model))
        n_cells = int((meta["config"].get("store_identity") or {}).get("n_cells", 0))
    contents = to_scvi_tools(method, config, schema, state, n_cells)
    if output.exists() and not overwrite:
        raise ScviToolsFileError(f"{output}: already exists; --overwrite (overwrite=True) replaces its {MODEL_FILE}")
    return write_scvi_tools(output, contents)


def import_scvi_tools(source: str | Path, store: AtlasStore | str | Path, device: str = "auto") -> AtlasModel:
    """A scvi-tools saved SCVI / SCANVI / LinearSCVI / TOTALVI / PEAKVI / CondSCVI / SysVI / MULTIVI / DestVI (its
    folder or model.pt, read without running code from the file) as the atlasvi model of the same method on `store`,
    which must hold the model's genes (peaks for PEAKVI; genes and peaks for MULTIVI) in its order, its batch (and
    for SCANVI, CondSCVI labels) key, no batch category it has not seen and for TOTALVI its proteins in its order;
    the first problem is named. A DestVI (amortization "both") goes on a store of spots with its genes; its cell
    types are its own (labels key "_scvi_labels"). A TOTALVI's or MULTIVI's adversarial batch classifier
    (scvi-tools keeps it in the trainer, not the file) starts afresh, as for a query; a CondSCVI's prototypes for
    DestVI are computed on the store when it is saved. A SysVI reads the store's counts log-normalised with
    target_sum 1e4 (scvi-tools' SysVI reads whatever layer it was given)."""
    path = Path(source)
    imported = from_scvi_tools(read_scvi_tools(path), str(path))
    opened = store if isinstance(store, AtlasStore) else open_store(store)
    schema = _registry(imported, opened.schema, str(path), str(opened.path))
    entry = get_entry(imported.method)
    cls = user_class(entry)
    try:
        config = entry.config_class(**imported.config)
    except ValidationError as err:
        first = err.errors()[0]
        raise ScviToolsFileError(
            f"{path}: scvi-tools option {'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        ) from None
    model = cls(opened, config, device, registry=schema)
    buffers = COUNTERPARTS[imported.method].atlasvi_buffers
    fresh = {
        k: v
        for k, v in model.module.state_dict().items()
        if k.startswith("adversary.") or (k in buffers and k not in imported.state)
    }
    load_state(model.module, imported.state | fresh, str(path), _described(config))
    return model


def model_genes(directory: str | Path) -> list[str]:
    """The gene ids of a saved model, in its order: an atlasvi model folder (model.json) or a scvi-tools one."""
    directory = Path(directory)
    if (directory / META_NAME).exists():
        return list(read_meta(directory)["registry"]["gene_ids"])
    return [str(g) for g in read_scvi_tools(directory)["var_names"]]


def _registry(imported: ScviToolsModel, store: StoreSchema, where: str, store_path: str) -> StoreSchema:
    """The atlasvi registry of an imported model on `store`: its genes, keys and categories (checked against the
    store's), the store's count dtype and, with the observed library (unused then), the store's library prior."""
    reg = dict(imported.registry)
    proteins = reg.pop("protein_names", None)
    regions = reg.pop("region_names", None)
    genes, stored = reg["gene_ids"], store.gene_ids
    if genes != stored:
        missing = [g for g in genes if g not in set(stored)]
        extra = [g for g in stored if g not in set(genes)]
        detail = (
            "; ".join(
                f"{len(found)} {what}, first {found[:5]}"
                for found, what in (
                    (missing, "of the model's genes are not in the store"),
                    (extra, "store genes are not the model's"),
                )
                if found
            )
            or "the same genes in another order"
        )
        raise IncompatibleStoreError(
            f"{store_path}: not the genes of {where} ({len(genes)} genes; the store has {len(stored)}): {detail}; "
            "build the store with the model's genes: atlasvi build ... --genes MODEL"
        )
    categorical = dict(reg["categorical"])
    if reg["batch_key"] == NO_BATCH_KEY:  # scvi-tools set up without a batch key: one batch, named as the store's
        if len(store.batch_categories) != 1:
            raise IncompatibleStoreError(
                f"{store_path}: {where} has one batch (no batch key), the store {len(store.batch_categories)}"
            )
        categorical.pop(NO_BATCH_KEY)
        categorical = {store.batch_key: store.batch_categories} | categorical
        reg["batch_key"] = store.batch_key
    elif reg["batch_key"] != store.batch_key:
        raise IncompatibleStoreError(
            f"{store_path}: {where} has batch key obs[{reg['batch_key']!r}], the store obs[{store.batch_key!r}]; "
            f"build the store with --batch-key {reg['batch_key']}"
        )
    labels_key = reg["labels_key"]
    if labels_key is not None and labels_key != store.labels_key and imported.method != "DestVI":
        if imported.method in ("SCANVI", "CondSCVI") or imported.config.get("dispersion") == "gene-label":
            raise IncompatibleStoreError(
                f"{store_path}: {where} has labels key obs[{labels_key!r}], the store {store.labels_key!r}; "
                f"build the store with --labels-key {labels_key}"
            )
        categorical.pop(labels_key)  # labels the model does not use
        reg["labels_key"] = None
    if "library_log_means" not in reg:
        pairs = zip(store.library_log_means, store.library_log_vars, strict=True)
        prior = dict(zip(store.batch_categories, pairs, strict=True))
        fill = (float(np.mean(store.library_log_means)), float(np.mean(store.library_log_vars)))
        values = [prior.get(c, fill) for c in categorical[reg["batch_key"]]]
        reg["library_log_means"] = tuple(v[0] for v in values)
        reg["library_log_vars"] = tuple(v[1] for v in values)
    reg["categorical"] = categorical
    if proteins is not None:
        reg["modalities"] = {PROTEIN: _proteins(proteins, store, categorical[reg["batch_key"]], where, store_path)}
    if regions is not None:
        reg["modalities"] = _regions(regions, store, categorical[reg["batch_key"]], where, store_path)
    return StoreSchema(n_cells=store.n_cells, count_dtype=store.count_dtype, **reg)


def _proteins(
    proteins: tuple[str, ...], store: StoreSchema, batches: tuple[str, ...], where: str, store_path: str
) -> ModalitySchema:
    """The protein modality of an imported totalVI: the store's, which must have the model's proteins in its order
    (a model whose proteins are named "0".."n-1", as scvi-tools names the columns of an obsm array, e.g. of
    `anndata.read_zarr(store)`, takes the store's n proteins in the store's order), its per-batch
    panels and background priors taken for the model's batches (a full panel and the mean prior for a batch the
    store lacks; the prior only starts a training, the imported weights replace it)."""
    stored = store.modalities.get(PROTEIN)
    if stored is not None and proteins == tuple(str(i) for i in range(len(stored.features))):
        proteins = stored.features  # scvi-tools' names of an obsm array's columns (read_zarr of a store): its order
    if stored is None or stored.features != proteins:
        has = f"{len(stored.features)}: {list(stored.features[:5])}" if stored is not None else "none"
        numbered = proteins == tuple(str(i) for i in range(len(proteins)))
        raise IncompatibleStoreError(
            f"{store_path}: {where} reads {len(proteins)} proteins {list(proteins[:5])}..., in that order; the store "
            f"has {has}; build it from cells with those proteins (--protein-key)"
            + (" (proteins named 0..n-1: scvi-tools was set up on an obsm array; a store with that many proteins in "
               "that order is taken)" if numbered else "")
        )  # fmt: skip
    return _for_batches(stored, store, batches)


def _regions(
    regions: tuple[str, ...], store: StoreSchema, batches: tuple[str, ...], where: str, store_path: str
) -> dict[str, ModalitySchema]:
    """The modalities of an imported MULTIVI: the store's peaks ("atac", which must be the model's in its order) and
    RNA mask ("rna"), their per-batch panels taken for the model's batches."""
    stored = store.modalities.get("atac")
    if stored is None or stored.features != regions or "rna" not in store.modalities:
        has = f"{len(stored.features)}: {list(stored.features[:3])}" if stored is not None else "none"
        raise IncompatibleStoreError(
            f"{store_path}: {where} reads {len(regions)} peaks {list(regions[:3])}..., in that order, and the RNA "
            f"of the same cells; the store has peaks {has}; build it with those peaks (--atac-key)"
        )
    return {name: _for_batches(store.modalities[name], store, batches) for name in ("atac", "rna")}


def _for_batches(stored: ModalitySchema, store: StoreSchema, batches: tuple[str, ...]) -> ModalitySchema:
    """A store modality's per-batch panels and priors for the model's batches (a full panel and the mean prior for
    a batch the store lacks)."""
    index = {b: i for i, b in enumerate(store.batch_categories)}
    means, scales = stored.background_log_means, stored.background_log_scales
    n_features = len(stored.batch_mask[0]) if stored.batch_mask else 0
    if len(means) != len(store.batch_categories):  # no per-batch prior (peaks, a mask)
        picked = [stored.batch_mask[index[b]] if b in index else (True,) * n_features for b in batches]
        return replace(stored, batch_mask=tuple(picked))
    fill = (float(np.mean(means)), float(np.mean(scales)))
    picked = [(stored.batch_mask[index[b]], means[index[b]], scales[index[b]]) if b in index else None for b in batches]
    return replace(
        stored,
        batch_mask=tuple(p[0] if p else (True,) * n_features for p in picked),
        background_log_means=tuple(p[1] if p else fill[0] for p in picked),
        background_log_scales=tuple(p[2] if p else fill[1] for p in picked),
    )
