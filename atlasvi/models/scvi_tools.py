"""scvi-tools 1.4.2's save format, both ways, for the methods with a scvi-tools counterpart (SCVI, SCANVI).

A scvi-tools model folder holds `model.pt`: {"model_state_dict": weights in scvi-tools' parameter names,
"var_names": (n_genes,) gene names, "attr_dict": {"registry_": the AnnData setup registry, "init_params_": the
class's init arguments, ...}} (scvi-tools' `BaseModelClass.save`). Reading one runs no code from the file:
`torch.load(weights_only=True)` with numpy arrays and dicts allowed and pandas objects (the training history,
which is not needed) read as inert placeholders; a file that needs any other global is refused, naming it.
Writing one gives what `SCVI.load(dir, adata)` / `SCANVI.load` read: the weights renamed, scvi-tools' parameters
that atlasvi does not build (the library encoder with the observed library, the zero-inflation head of an NB
model, the per-cell dispersion head) as zeros, since scvi-tools does not use them in those configurations.
"""

import os
import re
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atlasvi.data import StoreSchema
from atlasvi.models.saving import ModelFileError

SCVI_TOOLS_VERSION = "1.4.2"
MODEL_FILE = "model.pt"
NO_BATCH_KEY, NO_LABELS_KEY = "_scvi_batch", "_scvi_labels"  # scvi-tools' columns when no key was given
# atlasvi config field -> scvi-tools init argument (the class's own arguments; the others go to the module)
CLASS_ARGS = ("n_hidden", "n_latent", "n_layers", "dropout_rate", "dispersion", "gene_likelihood")
MODULE_ARGS = ("log_variational", "encode_covariates", "deeply_inject_covariates", "use_batch_norm", "use_layer_norm")
SCANVI_ARGS = ("linear_classifier",)
# scvi-tools' arguments that atlasvi takes with these values only (other values have no atlasvi counterpart)
FIXED_ARGS = {
    "latent_distribution": "normal",
    "batch_representation": "one-hot",
    "use_size_factor_key": False,
    "var_activation": None,
    "datamodule": None,
}
RENAMES = (  # scvi-tools -> atlasvi, applied in order after "fc_layers.Layer i." -> "layers.i."
    ("decoder.px_scale_decoder.0.", "decoder.px_scale_decoder."),
    ("decoder_z1_z2.decoder.", "decoder_z1_z2.encoder."),
    ("decoder_z1_z2.mean_decoder.", "decoder_z1_z2.mean_encoder."),
    ("decoder_z1_z2.var_decoder.", "decoder_z1_z2.var_encoder."),
    ("classifier.classifier.", "classifier."),
)


class ScviToolsFileError(ModelFileError):
    """A scvi-tools model file that atlasvi cannot read or does not support."""


@dataclass(frozen=True)
class ScviToolsModel:
    """A scvi-tools model in atlasvi's terms. method: "SCVI" or "SCANVI" (model.json's method); config: the
    atlasvi model config's fields; registry: the StoreSchema fields but n_cells, count_dtype and the library
    prior where scvi-tools has none (observed library); state: weights in atlasvi's names; n_cells: cells it
    was set up on."""

    method: str
    config: dict[str, Any]
    registry: dict[str, Any]
    state: dict[str, torch.Tensor]
    n_cells: int


class _Unread:
    """Stands in for a pickled pandas object (scvi-tools' training history): built from the file's arguments
    without running any of pandas' code, and never read."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Unread":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _plain_dict(*args: Any) -> dict:
    """An empty dict in place of a pickled `defaultdict(factory)` (its items are filled in next)."""
    return {}


def _data_globals() -> list[tuple[Any, str]]:
    """The globals a scvi-tools model.pt needs that only build data: numpy arrays and dtypes, dicts."""
    from numpy.core import multiarray  # numpy 1 and 2 (numpy._core) name the same function

    allowed: list[tuple[Any, str]] = [
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
        (np.ndarray, "numpy.ndarray"),
        (np.dtype, "numpy.dtype"),
        (_plain_dict, "collections.defaultdict"),  # torch's reader fills dicts only: a defaultdict is read as one
        (dict, "builtins.dict"),
        (bytes, "builtins.bytes"),
        (slice, "builtins.slice"),
    ]
    allowed += [(t, f"numpy.dtypes.{t.__name__}") for t in vars(np.dtypes).values() if isinstance(t, type)]
    return allowed


def read_scvi_tools(path: Path) -> dict[str, Any]:
    """A scvi-tools model.pt (or the folder holding it) as a dict, read weights-only: numpy arrays and dicts are
    read, pandas objects become inert placeholders, and a file that needs any other global is refused."""
    path = path / MODEL_FILE if path.is_dir() else path
    if not path.exists():
        raise ScviToolsFileError(f"{path}: missing (a scvi-tools model folder holds {MODEL_FILE})")
    allowed = _data_globals()
    names = {name for _, name in allowed}
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - its scanner knows fewer opcodes than the loader, which names what it refuses
        needed = []
    refused = [g for g in needed if g not in names and not g.startswith("pandas.")]
    if refused:
        raise ScviToolsFileError(_refusal(path, refused))
    allowed += [(_Unread, g) for g in needed if g.startswith("pandas.")]
    try:
        with torch.serialization.safe_globals(allowed):
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - the weights-only unpickler raises many types; all mean "refused"
        unsupported = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(err))
        if unsupported:
            raise ScviToolsFileError(_refusal(path, [unsupported.group(1)])) from None
        text = str(err).split("WeightsUnpickler error:")[-1].split("trusted source.")[-1].strip() or repr(err)
        raise ScviToolsFileError(f"{path}: not readable weights-only ({text.splitlines()[0]})") from None
    if not isinstance(saved, dict) or not {"model_state_dict", "var_names", "attr_dict"} <= set(saved):
        raise ScviToolsFileError(f"{path}: not a scvi-tools model (no model_state_dict, var_names and attr_dict)")
    return saved


def _refusal(path: Path, refused: list[str]) -> str:
    """One line naming the globals (sorted, at most 3) the file would unpickle."""
    names = sorted(set(refused))
    return (
        f"{path}: reading it would run code from the file ({', '.join(names[:3])} must be unpickled"
        + (f", and {len(names) - 3} more" if len(names) > 3 else "")
        + "); refused (atlasvi reads tensors, numpy arrays and dicts only)"
    )


def _to_atlasvi_name(key: str) -> str:
    key = re.sub(r"fc_layers\.Layer (\d+)\.", r"layers.\1.", key)
    for theirs, ours in RENAMES:
        key = key.replace(theirs, ours)
    return key


def _to_scvi_name(key: str, linear_classifier: bool) -> str:
    key = re.sub(r"(^|\.)layers\.(\d+)\.", r"\1fc_layers.Layer \2.", key)
    if key.startswith("classifier.") and linear_classifier:
        return "classifier.classifier.0." + key.removeprefix("classifier.")
    for theirs, ours in reversed(RENAMES):
        if key.startswith(ours):
            return theirs + key.removeprefix(ours)
    return key


def _mapping(field: dict, where: str, name: str) -> tuple[str, ...]:
    mapping = field.get("state_registry", {}).get("categorical_mapping")
    if mapping is None:
        raise ScviToolsFileError(f"{where}: registry field {name!r} has no categorical_mapping")
    return tuple(str(c) for c in mapping)


def from_scvi_tools(saved: dict[str, Any], where: str) -> ScviToolsModel:
    """A read scvi-tools model (`read_scvi_tools`) in atlasvi's terms; an option atlasvi lacks is named."""
    attrs = saved["attr_dict"]
    registry, init = attrs.get("registry_", {}), attrs.get("init_params_", {})
    method = registry.get("model_name")
    if method not in ("SCVI", "SCANVI"):
        raise ScviToolsFileError(f"{where}: a scvi-tools {method} model; atlasvi imports SCVI and SCANVI")
    if registry.get("setup_method_name", "setup_anndata") != "setup_anndata":
        raise ScviToolsFileError(f"{where}: set up with {registry['setup_method_name']}; atlasvi reads setup_anndata")
    args = dict(init.get("non_kwargs", {}))
    for group in init.get("kwargs", {}).values():
        args.update(group)
    config: dict[str, Any] = {"name": method.lower()}
    known = CLASS_ARGS + MODULE_ARGS + ("use_observed_lib_size",) + (SCANVI_ARGS if method == "SCANVI" else ())
    for key, value in args.items():
        if key in known:
            config[key] = value
        elif key in FIXED_ARGS and value in (FIXED_ARGS[key], None):
            continue
        else:
            raise ScviToolsFileError(f"{where}: scvi-tools option {key}={value!r} has no atlasvi counterpart")
    fields = registry.get("field_registries", {})
    setup = registry.get("setup_args", {})
    if setup.get("size_factor_key") is not None:
        raise ScviToolsFileError(f"{where}: scvi-tools size_factor_key has no atlasvi counterpart")
    batch_key = fields["batch"]["state_registry"]["original_key"]
    categorical = {batch_key: _mapping(fields["batch"], where, "batch")}
    labels_key = fields["labels"]["state_registry"].get("original_key")
    if labels_key == NO_LABELS_KEY:
        labels_key = None
    else:
        labels = list(_mapping(fields["labels"], where, "labels"))
        if method == "SCANVI":
            unlabeled = fields["labels"]["state_registry"].get("unlabeled_category", setup.get("unlabeled_category"))
            config["unlabeled_category"] = str(unlabeled)
        categorical[labels_key] = tuple(labels)
    for key, mapping in fields.get("extra_categorical_covs", {}).get("state_registry", {}).get("mappings", {}).items():
        categorical[key] = tuple(str(c) for c in mapping)
    continuous = fields.get("extra_continuous_covs", {}).get("state_registry", {}).get("columns", [])
    genes = tuple(str(g) for g in saved["var_names"])
    state = {_to_atlasvi_name(k): v for k, v in saved["model_state_dict"].items() if isinstance(v, torch.Tensor)}
    observed = config.get("use_observed_lib_size", True)
    drop = ["l_encoder."] if observed else []
    if config.get("dispersion", "gene") != "gene-cell":
        drop.append("decoder.px_r_decoder.")
    if config.get("gene_likelihood", "zinb") != "zinb":
        drop.append("decoder.px_dropout_decoder.")
    state = {k: v for k, v in state.items() if not k.startswith(tuple(drop))}
    if config.get("linear_classifier"):  # scvi-tools' linear classifier is a Sequential of one Linear
        state = {
            k.replace("classifier.0.", "classifier.", 1) if k.startswith("classifier.0.") else k: v
            for k, v in state.items()
        }
    reg: dict[str, Any] = {
        "n_genes": len(genes), "gene_ids": genes, "gene_names": genes, "batch_key": batch_key,
        "labels_key": labels_key, "categorical": categorical, "continuous": tuple(str(c) for c in continuous),
    }  # fmt: skip
    if not observed:
        reg["library_log_means"] = tuple(float(v) for v in state["library_log_means"].view(-1))
        reg["library_log_vars"] = tuple(float(v) for v in state["library_log_vars"].view(-1))
    n_cells = int(fields.get("X", {}).get("summary_stats", {}).get("n_cells", 0))
    return ScviToolsModel(method, config, reg, state, n_cells)


def _unused(state: dict[str, torch.Tensor], prefix: str, n_out: int | None = None) -> dict[str, torch.Tensor]:
    """scvi-tools' parameters that atlasvi does not build, as zeros (batch norms as freshly built: weight and running
    variance 1): the library encoder (shaped as z_encoder's first layer, one output) or a decoder head."""
    out: dict[str, torch.Tensor] = {}
    if prefix == "l_encoder.":
        for key, value in state.items():  # Linear, then BatchNorm1d if any (LayerNorm has no parameters)
            if key.startswith("z_encoder.encoder.layers.0."):
                ones = key.endswith(("layers.0.1.weight", "running_var"))
                out["l_encoder." + key.removeprefix("z_encoder.")] = torch.ones_like(value) if ones else value * 0
        n_hidden = state["z_encoder.mean_encoder.weight"].shape[1]
        for head in ("mean_encoder", "var_encoder"):
            out[f"l_encoder.{head}.weight"] = torch.zeros(1, n_hidden)
            out[f"l_encoder.{head}.bias"] = torch.zeros(1)
    else:
        n_hidden = state["decoder.px_scale_decoder.weight"].shape[1]
        out[f"{prefix}weight"] = torch.zeros(n_out or 0, n_hidden)
        out[f"{prefix}bias"] = torch.zeros(n_out or 0)
    return out


def to_scvi_tools(
    method: str, config: dict[str, Any], schema: StoreSchema, state: dict[str, torch.Tensor], n_cells: int
) -> dict[str, Any]:
    """The contents of a scvi-tools 1.4.2 model.pt for an atlasvi SCVI / SCANVI (config: its model config's
    fields; schema: its registry; state: its weights). ScviToolsFileError for a method or option without a
    scvi-tools counterpart."""
    if method not in ("SCVI", "SCANVI"):
        raise ScviToolsFileError(f"a {method} model has no scvi-tools export in atlasvi (SCVI and SCANVI have)")
    if schema.modalities:
        raise ScviToolsFileError(f"a {method} model with modalities {sorted(schema.modalities)} has no scvi-tools form")
    state = {k: v.detach().cpu() for k, v in state.items()}
    n_genes = schema.n_genes
    if config["use_observed_lib_size"]:
        state |= _unused(state, "l_encoder.")
    if config["dispersion"] != "gene-cell":
        state |= _unused(state, "decoder.px_r_decoder.", n_genes)
    if config["gene_likelihood"] != "zinb":
        state |= _unused(state, "decoder.px_dropout_decoder.", n_genes)
    linear = bool(config.get("linear_classifier", False))
    weights: dict[str, Any] = {_to_scvi_name(k, linear): v for k, v in state.items()}
    weights["pyro_param_store"] = {"params": {}, "constraints": {}}
    non_kwargs = {k: config[k] for k in CLASS_ARGS} | {"use_observed_lib_size": config["use_observed_lib_size"]}
    module_kwargs = {k: config[k] for k in MODULE_ARGS}
    if method == "SCVI":
        non_kwargs["latent_distribution"] = "normal"
        init = {"kwargs": {"kwargs": module_kwargs}, "non_kwargs": non_kwargs}
    else:
        non_kwargs |= {"linear_classifier": linear, "datamodule": None}
        init = {"kwargs": {"model_kwargs": module_kwargs | {"latent_distribution": "normal"}}, "non_kwargs": non_kwargs}
    attrs = {
        "registry_": _registry(method, config, schema, n_cells),
        "init_params_": init,
        "is_trained_": True,
        "get_normalized_function_name_": "get_normalized_expression",
        "test_indices_": np.array([], dtype=np.int64),
    }
    if method == "SCANVI":
        attrs["unlabeled_category_"] = config["unlabeled_category"]
    return {"model_state_dict": weights, "var_names": np.array(schema.gene_ids, dtype=object), "attr_dict": attrs}


def _field(attr_key: str | None, attr_name: str, state: dict, stats: dict) -> dict:
    data = {"attr_key": attr_key, "attr_name": attr_name} if attr_name else {}
    return {"data_registry": data, "state_registry": state, "summary_stats": stats}


def _registry(method: str, config: dict[str, Any], schema: StoreSchema, n_cells: int) -> dict[str, Any]:
    """scvi-tools' setup registry (`AnnDataManager.registry`) of `setup_anndata` with the store's keys."""
    categories = schema.categorical
    extra = [k for k in categories if k not in (schema.batch_key, schema.labels_key)]
    labels_key = schema.labels_key
    fields: dict[str, dict] = defaultdict(dict)
    genes = np.array(schema.gene_ids, dtype=object)
    x_state = {"n_obs": n_cells, "n_vars": schema.n_genes, "column_names": genes}
    fields["X"] = _field(None, "X", x_state, {"n_vars": schema.n_genes, "n_cells": n_cells})
    batch = categories[schema.batch_key]
    fields["batch"] = _field(
        "_scvi_batch", "obs", {"categorical_mapping": np.array(batch, dtype=object), "original_key": schema.batch_key},
        {"n_batch": len(batch)},
    )  # fmt: skip
    if labels_key is None:  # scvi-tools' default labels: one category, the integer 0
        labels: tuple = (0,)
        label_state: dict[str, Any] = {"original_key": NO_LABELS_KEY}
    elif method == "SCANVI":
        unlabeled = config["unlabeled_category"]
        labels = (*[c for c in categories[labels_key] if c != unlabeled], unlabeled)  # scvi-tools: unlabeled last
        label_state = {"original_key": labels_key, "unlabeled_category": unlabeled}
    else:
        labels, label_state = categories[labels_key], {"original_key": labels_key}
    label_state = {"categorical_mapping": np.array(labels, dtype=object)} | label_state
    fields["labels"] = _field("_scvi_labels", "obs", label_state, {"n_labels": len(labels)})
    fields["size_factor"] = _field(None, "", {}, {})
    if extra:
        mappings = {k: np.array(categories[k], dtype=object) for k in extra}
        state = {"mappings": mappings, "field_keys": extra, "n_cats_per_key": [len(categories[k]) for k in extra]}
        fields["extra_categorical_covs"] = _field(
            "_scvi_extra_categorical_covs", "obsm", state, {"n_extra_categorical_covs": len(extra)}
        )
    else:
        fields["extra_categorical_covs"] = _field(None, "", {}, {"n_extra_categorical_covs": 0})
    if schema.continuous:
        fields["extra_continuous_covs"] = _field(
            "_scvi_extra_continuous_covs", "obsm", {"columns": np.array(schema.continuous, dtype=object)},
            {"n_extra_continuous_covs": len(schema.continuous)},
        )  # fmt: skip
    else:
        fields["extra_continuous_covs"] = _field(None, "", {}, {"n_extra_continuous_covs": 0})
    setup = {
        "batch_key": schema.batch_key, "labels_key": labels_key, "layer": None, "size_factor_key": None,
        "categorical_covariate_keys": extra or None, "continuous_covariate_keys": list(schema.continuous) or None,
    }  # fmt: skip
    if method == "SCANVI":
        setup |= {"unlabeled_category": config["unlabeled_category"], "use_minified": False}
    return {
        "_scvi_uuid": str(uuid.uuid4()),
        "field_registries": fields,
        "model_name": method,
        "scvi_version": SCVI_TOOLS_VERSION,
        "setup_args": setup,
        "setup_method_name": "setup_anndata",
    }


def write_scvi_tools(directory: Path, contents: dict[str, Any]) -> Path:
    """Write `contents` as `directory`/model.pt (written to a sibling, then renamed); returns the file."""
    directory.mkdir(parents=True, exist_ok=True)
    path, partial = directory / MODEL_FILE, directory / (MODEL_FILE + ".partial")
    torch.save(contents, partial)
    os.replace(partial, path)
    return path
