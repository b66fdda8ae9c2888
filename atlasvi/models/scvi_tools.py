"""scvi-tools 1.4.2's save format, both ways, for the methods with a scvi-tools counterpart: SCVI, SCANVI,
LinearSCVI (atlasvi's ldvae), TOTALVI, PEAKVI, CondSCVI, SysVI (scvi.external.SysVI) and DestVI (`COUNTERPARTS`, the
one table of their names and arguments), and MULTIVI (set up on a MuData: modalities "rna" and "atac").

A scvi-tools model folder holds `model.pt`: {"model_state_dict": weights in scvi-tools' parameter names,
"var_names": (n_genes,) gene names, "attr_dict": {"registry_": the AnnData setup registry, "init_params_": the
class's init arguments, ...}} (scvi-tools' `BaseModelClass.save`). Reading one runs no code from the file:
`torch.load(weights_only=True)` with numpy arrays and dicts allowed and pandas objects (the training history,
which is not needed) read as inert placeholders; a file that needs any other global is refused, naming it.
Writing one gives what `<Class>.load(dir, adata)` reads: the weights renamed, the registry its `setup_anndata`
writes for the store's keys, and scvi-tools' parameters that atlasvi does not build (the library encoder with the
observed library, the zero-inflation head of an NB model, the per-cell dispersion head) as zeros, since
scvi-tools does not use them in those configurations.
"""

import os
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atlasvi.data import StoreSchema
from atlasvi.models.registry import get_entry
from atlasvi.models.saving import ModelFileError

SCVI_TOOLS_VERSION = "1.4.2"
MODEL_FILE = "model.pt"
NO_BATCH_KEY, NO_LABELS_KEY = "_scvi_batch", "_scvi_labels"  # scvi-tools' columns when no key was given
# scvi-tools' arguments that atlasvi takes with these values only (other values have no atlasvi counterpart)
FIXED_ARGS = {
    "latent_distribution": "normal",
    "batch_representation": "one-hot",
    "use_size_factor_key": False,
    "var_activation": None,
    "datamodule": None,
}
# scvi-tools' registry fields in the order each setup_anndata writes them
SCVI_FIELDS = ("X", "batch", "labels", "size_factor", "extra_categorical_covs", "extra_continuous_covs")
SCVI_SETUP = ("batch_key", "labels_key", "layer", "size_factor_key", "categorical_covariate_keys",
              "continuous_covariate_keys")  # fmt: skip


@dataclass(frozen=True)
class Counterpart:
    """How an atlasvi method maps onto its scvi-tools 1.4.2 class (registry `saved_name` = scvi-tools' class name).

    renames: (scvi-tools prefix, atlasvi prefix) of parameter names, the first match applied after scvi-tools'
    "fc_layers.Layer i." -> atlasvi's "layers.i."; class_args: config fields that are the class's own init
    arguments (same names); module_args: config fields passed to the module through the class's **kwargs
    (`kwargs_key` in init_params_); atlasvi_only: config fields with no scvi-tools argument (training-only: left
    at atlasvi's default on import); fields, setup_args: the setup registry's fields and setup_anndata's
    arguments, in scvi-tools' order; fixed_class, fixed_module: the values atlasvi's model has of scvi-tools'
    arguments it does not vary (written to init_params_; others are refused on import); labels: whether
    setup_anndata takes a labels_key; covariates: whether it takes extra categorical / continuous covariates (and
    atlasvi exports them); atlasvi_buffers: atlasvi weights with no scvi-tools counterpart (left out on export,
    built afresh on import). Every config field but `name` is in class_args, module_args or atlasvi_only
    (tests/api/test_interop.py).
    """

    renames: tuple[tuple[str, str], ...]
    class_args: tuple[str, ...]
    module_args: tuple[str, ...]
    kwargs_key: str = "model_kwargs"
    atlasvi_only: tuple[str, ...] = ()
    fields: tuple[str, ...] = SCVI_FIELDS
    setup_args: tuple[str, ...] = SCVI_SETUP
    fixed_class: dict[str, Any] = field(default_factory=lambda: {"latent_distribution": "normal"})
    fixed_module: dict[str, Any] = field(default_factory=dict)
    labels: bool = True
    covariates: bool = True
    atlasvi_buffers: tuple[str, ...] = ()


_SCVI_MODULE = ("log_variational", "encode_covariates", "deeply_inject_covariates", "use_batch_norm", "use_layer_norm")
_SCVI_CLASS = ("n_hidden", "n_latent", "n_layers", "dropout_rate", "dispersion", "gene_likelihood",
               "use_observed_lib_size")  # fmt: skip
COUNTERPARTS: dict[str, Counterpart] = {
    "SCVI": Counterpart(
        (("decoder.px_scale_decoder.0.", "decoder.px_scale_decoder."),), _SCVI_CLASS, _SCVI_MODULE, "kwargs"
    ),
    "SCANVI": Counterpart(
        (
            ("decoder.px_scale_decoder.0.", "decoder.px_scale_decoder."),
            ("decoder_z1_z2.decoder.", "decoder_z1_z2.encoder."),
            ("decoder_z1_z2.mean_decoder.", "decoder_z1_z2.mean_encoder."),
            ("decoder_z1_z2.var_decoder.", "decoder_z1_z2.var_encoder."),
            ("classifier.classifier.", "classifier."),
        ),
        (*_SCVI_CLASS, "linear_classifier"),
        _SCVI_MODULE,
        fixed_class={"datamodule": None},
        fixed_module={"latent_distribution": "normal"},
        atlasvi_only=("unlabeled_category", "classification_ratio"),  # setup_anndata's; train's
    ),
    "LinearSCVI": Counterpart(  # LDVAE: encoders always with batch norm; use_batch_norm is the decoder's (a bool)
        (),
        _SCVI_CLASS,
        ("log_variational", "use_batch_norm", "bias"),
        atlasvi_only=("encode_covariates", "deeply_inject_covariates", "use_layer_norm"),
        fields=("X", "batch", "labels"),
        setup_args=("batch_key", "labels_key", "layer"),
        covariates=False,
    ),
    "TOTALVI": Counterpart(
        (
            ("encoder.encoder.", "z_encoder.encoder."),
            ("encoder.z_mean_encoder.", "z_encoder.mean_encoder."),
            ("encoder.z_var_encoder.", "z_encoder.var_encoder."),
            ("encoder.l_gene_encoder.", "l_encoder.encoder."),
            ("encoder.l_gene_mean_encoder.", "l_encoder.mean_encoder."),
            ("encoder.l_gene_var_encoder.", "l_encoder.var_encoder."),
        ),
        ("n_latent", "gene_dispersion", "protein_dispersion", "gene_likelihood", "empirical_protein_background_prior"),
        (
            "n_hidden",
            "n_layers_encoder",
            "n_layers_decoder",
            "dropout_rate_encoder",
            "dropout_rate_decoder",
            "log_variational",
            "encode_covariates",
            "use_batch_norm",
            "use_layer_norm",
            "use_observed_lib_size",
        ),
        atlasvi_only=("adversarial_classifier",),  # scvi-tools: TOTALVI.train's argument
        fixed_class={"latent_distribution": "normal", "override_missing_proteins": False},
        fields=("X", "labels", "batch", "size_factor", "extra_categorical_covs", "extra_continuous_covs", "proteins"),
        setup_args=(
            "protein_expression_obsm_key",
            "protein_names_uns_key",
            "batch_key",
            "panel_key",
            "layer",
            "size_factor_key",
            "categorical_covariate_keys",
            "continuous_covariate_keys",
        ),
        labels=False,
    ),  # fmt: skip
    "PEAKVI": Counterpart(
        (("z_decoder.output.0.", "z_decoder.output."), ("d_encoder.output.0.", "d_encoder.output.")),
        (
            "n_hidden",
            "n_latent",
            "n_layers_encoder",
            "n_layers_decoder",
            "dropout_rate",
            "model_depth",
            "region_factors",
            "use_batch_norm",
            "use_layer_norm",
            "deeply_inject_covariates",
            "encode_covariates",
        ),
        (),
        atlasvi_only=("kl_weighting",),  # the loss's KL weighting: training only
        fields=("X", "batch", "labels", "extra_categorical_covs", "extra_continuous_covs"),
        setup_args=("batch_key", "labels_key", "categorical_covariate_keys", "continuous_covariate_keys", "layer"),
    ),  # fmt: skip
    "CondSCVI": Counterpart(  # scvi-tools' weight_obs is atlasvi's ct_weight (None or the inverse label frequency)
        (("_embeddings_dict.batch.", "batch_embedding."),),
        ("n_hidden", "n_latent", "n_layers", "dropout_rate"),
        ("log_variational", "encode_covariates"),
        "module_kwargs",
        atlasvi_only=("ct_weight", "vamp_prior_p"),  # weight_obs (the buffer ct_weight); DestVI's prototypes
        fields=("X", "labels", "batch", "size_factor"),
        setup_args=("batch_key", "labels_key", "fine_labels_key", "layer", "unlabeled_category", "size_factor_key"),
        fixed_class={},
        fixed_module={"prior": "normal"},
        covariates=False,
        atlasvi_buffers=("mean_vprior", "var_vprior", "mp_vprior"),  # CondSCVI.get_vamp_prior, kept by atlasvi
    ),
    "SysVI": Counterpart(  # scvi.external.SysVI: the system is its batch_key
        (
            ("encoder.decoder_y.", "encoder.fc."),
            ("encoder.mean_encoder.", "encoder.mean."),
            ("encoder.var_encoder.encoder.", "encoder.var."),
            ("encoder.var_encoder.var_param", "encoder.var_param"),
            ("decoder.decoder_y.", "decoder.fc."),
            ("decoder.mean_encoder.", "decoder.mean."),
            ("decoder.var_encoder.encoder.", "decoder.var."),
            ("decoder.var_encoder.var_param", "decoder.var_param"),
        ),
        ("prior", "n_prior_components"),
        ("n_latent", "n_hidden", "n_layers", "dropout_rate", "out_var_mode"),
        atlasvi_only=(  # SysVI.train's loss weights; the cycle's input; the log-normalisation of the counts
            "reconstruction_weight",
            "z_distance_cycle_weight",
            "cycle_input",
            "target_sum",
            "system_key",
        ),
        fixed_class={},
        fixed_module={"embed_categorical_covariates": False, "trainable_priors": True},
        fields=("X", "batch", "extra_categorical_covs", "extra_continuous_covs"),
        setup_args=("batch_key", "layer", "categorical_covariate_keys", "continuous_covariate_keys", "weight_batches"),
        labels=False,
        covariates=False,
        atlasvi_buffers=("pseudo_initialised",),
    ),  # fmt: skip
    "MULTIVI": Counterpart(  # set up with setup_mudata: RNA in modality "rna", peaks in "atac"; no protein
        (
            ("z_decoder_expression.px_scale_decoder.0.", "z_decoder_expression.px_scale_decoder."),
            ("z_decoder_accessibility.output.0.", "z_decoder_accessibility.output."),
            ("l_encoder_accessibility.output.0.", "l_encoder_accessibility.output."),
        ),
        (
            "modality_weights",
            "modality_penalty",
            "n_hidden",
            "n_latent",
            "n_layers_encoder",
            "n_layers_decoder",
            "dropout_rate",
            "region_factors",
            "gene_likelihood",
            "dispersion",
            "use_batch_norm",
            "use_layer_norm",
            "deeply_inject_covariates",
            "encode_covariates",
        ),
        (),
        atlasvi_only=("adversarial_classifier",),  # scvi-tools: MULTIVI.train's adversarial_mixing
        fixed_class={"latent_distribution": "normal", "fully_paired": False, "protein_dispersion": "protein"},
        fields=(
            "batch",
            "labels",
            "size_factor",
            "extra_categorical_covs",
            "extra_continuous_covs",
            "ind_x",
            "X",
            "atac",
        ),
        setup_args=(
            "rna_layer",
            "atac_layer",
            "protein_layer",
            "batch_key",
            "size_factor_key",
            "categorical_covariate_keys",
            "continuous_covariate_keys",
            "idx_layer",
            "modalities",
        ),
        labels=False,
        covariates=False,
    ),  # fmt: skip
    "DestVI": Counterpart(  # scvi-tools' dropout_decoder is atlasvi's dropout_rate (the CondSCVI's)
        (("_embeddings_dict.batch.", "batch_embedding."),),
        ("n_hidden", "n_latent", "n_layers"),
        (
            "amortization",
            "prior_mode",
            "augmentation",
            "n_samples_augmentation",
            "n_states_per_label",
            "eps_v",
            "add_celltypes",
            "n_latent_amortization",
            "dropout_amortization",
        ),
        "module_kwargs",
        atlasvi_only=(  # dropout_decoder; the prototypes' count (mean_vprior's shape); DestVI.train's loss weights
            "dropout_rate",
            "vamp_prior_p",
            "ct_sparsity_weight",
            "weighting_augmentation",
            "eta_reg",
            "beta_reg",
            "weighting_kl_latent",
            "reconst_weight",
        ),
        fields=("X", "ind_x", "batch"),
        setup_args=("batch_key", "layer", "smoothed_layer"),
        fixed_class={},
        labels=False,
        covariates=False,
    ),
}
NO_COUNTERPART: dict[str, str] = {}  # atlasvi methods with a scvi-tools class that export / import does not cover: why
# DestVI's init arguments that the weights hold (its CondSCVI's decoder, dispersion, bias and prototypes)
_DESTVI_FROM_WEIGHTS = ("cell_type_mapping", "decoder_state_dict", "px_decoder_state_dict", "px_r", "per_ct_bias",
                        "mean_vprior", "var_vprior", "mp_vprior")  # fmt: skip
DESTVI_LABELS = NO_LABELS_KEY  # an imported DestVI's labels key (its registry has none; the types are its own)
PROTEIN = "protein"  # atlasvi's modality name of totalVI's proteins


class ScviToolsFileError(ModelFileError):
    """A scvi-tools model file that atlasvi cannot read or does not support."""


@dataclass(frozen=True)
class ScviToolsModel:
    """A scvi-tools model in atlasvi's terms. method: scvi-tools' class name (model.json's method, a key of
    COUNTERPARTS); config: the atlasvi model config's fields; registry: the StoreSchema fields but n_cells,
    count_dtype, modalities and the library prior where scvi-tools has none (observed library), and for TOTALVI
    "protein_names" (its proteins, in order); state: weights in atlasvi's names; n_cells: cells it was set up on."""

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
        (multiarray.scalar, "numpy.core.multiarray.scalar"),  # a numpy scalar from its dtype and bytes (MULTIVI's)
        (multiarray.scalar, "numpy._core.multiarray.scalar"),
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


def counterpart(method: str, where: str = "") -> Counterpart:
    """The scvi-tools counterpart of `method` (model.json's method, scvi-tools' class name); ScviToolsFileError
    naming the methods that have one."""
    if method not in COUNTERPARTS:
        why = f": {NO_COUNTERPART[method]}" if method in NO_COUNTERPART else ""
        raise ScviToolsFileError(
            f"{where + ': ' if where else ''}a {method} model has no scvi-tools counterpart in atlasvi "
            f"({', '.join(COUNTERPARTS)} have){why}"
        )
    return COUNTERPARTS[method]


def to_atlasvi_name(method: str, key: str) -> str:
    """atlasvi's name of the scvi-tools parameter `key` of a `method` module (`Counterpart.renames`)."""
    key = re.sub(r"fc_layers\.Layer (\d+)\.", r"layers.\1.", key)
    for theirs, ours in COUNTERPARTS[method].renames:
        if key.startswith(theirs):
            return ours + key.removeprefix(theirs)
    return key


def to_scvi_tools_name(method: str, key: str) -> str:
    """scvi-tools' name of the atlasvi parameter `key` of a `method` module (the inverse of `to_atlasvi_name`)."""
    key = re.sub(r"(^|\.)layers\.(\d+)\.", r"\1fc_layers.Layer \2.", key)
    for theirs, ours in COUNTERPARTS[method].renames:
        if key.startswith(ours):
            return theirs + key.removeprefix(ours)
    return key


def _mapping(field: dict, where: str, name: str) -> tuple[str, ...]:
    mapping = field.get("state_registry", {}).get("categorical_mapping")
    if mapping is None:
        raise ScviToolsFileError(f"{where}: registry field {name!r} has no categorical_mapping")
    return tuple(str(c) for c in mapping)


def _config(method: str, args: dict[str, Any], where: str) -> dict[str, Any]:
    """atlasvi config fields of scvi-tools init arguments (`args`: non_kwargs and kwargs merged); an argument
    with no atlasvi counterpart is named."""
    spec = COUNTERPARTS[method]
    config: dict[str, Any] = {"name": get_entry(method).name}
    fixed = FIXED_ARGS | spec.fixed_class | spec.fixed_module
    for key, value in args.items():
        if key in spec.class_args or key in spec.module_args:
            config[key] = value
        elif key == "override_missing_proteins" and method == "TOTALVI":
            continue  # which all-zero proteins count as unmeasured when training; atlasvi's store mask says
        elif method == "DestVI" and key in _DESTVI_FROM_WEIGHTS:
            continue  # read from the weights
        elif method == "DestVI" and key == "dropout_decoder":
            config["dropout_rate"] = value
        elif (method, key) in (
            ("CondSCVI", "weight_obs"),
            ("CondSCVI", "ct_weight"),
            ("SysVI", "pseudoinputs_data_indices"),
            ("MULTIVI", "n_genes"),
            ("MULTIVI", "n_regions"),
        ):
            continue  # CondSCVI: its ct_weight buffer is read; SysVI: which cells started the pseudo-inputs
        elif key in fixed and value in (fixed[key], None):
            continue
        else:
            raise ScviToolsFileError(f"{where}: scvi-tools option {key}={value!r} has no atlasvi counterpart")
    if method == "LinearSCVI" and "use_batch_norm" in config:  # LDVAE's decoder batch norm (encoders: always)
        config["use_batch_norm"] = "both" if config["use_batch_norm"] else "encoder"
    return config


def from_scvi_tools(saved: dict[str, Any], where: str) -> ScviToolsModel:
    """A read scvi-tools model (`read_scvi_tools`) in atlasvi's terms; an option atlasvi lacks is named."""
    attrs = saved["attr_dict"]
    registry, init = attrs.get("registry_", {}), attrs.get("init_params_", {})
    method = str(registry.get("model_name"))
    if method not in COUNTERPARTS:
        raise ScviToolsFileError(f"{where}: a scvi-tools {method} model; atlasvi imports {', '.join(COUNTERPARTS)}")
    setup_method = "setup_mudata" if method == "MULTIVI" else "setup_anndata"
    if registry.get("setup_method_name", "setup_anndata") != setup_method:
        raise ScviToolsFileError(f"{where}: set up with {registry['setup_method_name']}; atlasvi reads {setup_method}")
    args = dict(init.get("non_kwargs", {}))
    for group in init.get("kwargs", {}).values():
        args.update(group)
    config = _config(method, args, where)
    fields = registry.get("field_registries", {})
    setup = registry.get("setup_args", {})
    for key in ("size_factor_key", "panel_key", "fine_labels_key", "weight_batches", "smoothed_layer"):
        if setup.get(key) not in (None, False):
            raise ScviToolsFileError(f"{where}: scvi-tools {key}={setup[key]!r} has no atlasvi counterpart")
    if not COUNTERPARTS[method].covariates and (
        setup.get("categorical_covariate_keys") or setup.get("continuous_covariate_keys")
    ):
        raise ScviToolsFileError(
            f"{where}: a scvi-tools {method} set up with covariates; atlasvi imports a {method} without covariates only"
        )
    batch_key = fields["batch"]["state_registry"]["original_key"]
    categorical = {batch_key: _mapping(fields["batch"], where, "batch")}
    labels_key = fields["labels"]["state_registry"].get("original_key") if "labels" in fields else NO_LABELS_KEY
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
    names = saved["var_names"]
    genes = tuple(str(g) for g in (names["rna"] if isinstance(names, dict) else names))
    state = {to_atlasvi_name(method, k): v for k, v in saved["model_state_dict"].items() if isinstance(v, torch.Tensor)}
    state = {k: v for k, v in state.items() if not k.startswith(tuple(p for p, _ in _unused_parts(method, config)))}
    if method == "CondSCVI" and args.get("weight_obs"):
        config["ct_weight"] = tuple(float(w) for w in state["ct_weight"])
    if method == "SysVI":
        state = _sysvi_in(state)
    if method == "DestVI":
        state = _destvi_in(state, config, where)
        labels_key = DESTVI_LABELS
        categorical[labels_key] = tuple(str(c) for c in args["cell_type_mapping"])
    if method == "MULTIVI":
        if config["modality_weights"] == "cell":
            raise ScviToolsFileError(f"{where}: {_CELL_WEIGHTS}")
        state = {k: v for k, v in state.items() if not k.startswith(_MULTIVI_PROTEIN)}
        state["mod_weights"] = state["mod_weights"][..., :2]  # RNA, ATAC (scvi-tools' third: protein)
    if config.get("linear_classifier"):  # scvi-tools' linear classifier is a Sequential of one Linear
        state = {
            k.replace("classifier.0.", "classifier.", 1) if k.startswith("classifier.0.") else k: v
            for k, v in state.items()
        }
    reg: dict[str, Any] = {
        "n_genes": len(genes), "gene_ids": genes, "gene_names": genes, "batch_key": batch_key,
        "labels_key": labels_key, "categorical": categorical, "continuous": tuple(str(c) for c in continuous),
    }  # fmt: skip
    if "library_log_means" in state:  # a latent library: scvi-tools' prior, a buffer of the module
        reg["library_log_means"] = tuple(float(v) for v in state["library_log_means"].view(-1))
        reg["library_log_vars"] = tuple(float(v) for v in state["library_log_vars"].view(-1))
    if "proteins" in fields:
        reg["protein_names"] = tuple(str(p) for p in fields["proteins"]["state_registry"]["column_names"])
    if method == "MULTIVI":
        reg["region_names"] = tuple(str(r) for r in names["atac"])
    n_cells = int(fields.get("X", {}).get("summary_stats", {}).get("n_cells", 0))
    return ScviToolsModel(method, config, reg, state, n_cells)


_MULTIVI_PROTEIN = ("z_encoder_protein.", "z_decoder_pro.", "py_r", "background_pro_")  # scvi-tools' protein parts
_CELL_WEIGHTS = (
    "a MULTIVI with per-cell modality weights has no counterpart in the other tool (its weights follow the rows "
    "of the data it was trained on, and atlasvi's store rows are permuted)"
)


def _multivi_out(state: dict[str, torch.Tensor], n_batch: int, n_genes: int) -> dict[str, torch.Tensor]:
    """scvi-tools' protein parts of a MULTIVAE without proteins (it builds and never uses them), as zeros in atlasvi's
    names: the protein encoder shaped as the RNA encoder with one input in place of the genes, the protein
    decoder's hidden layers as the RNA decoder's, its output layers with no outputs; the third modality weight 1."""
    out: dict[str, torch.Tensor] = {}
    n_hidden, n_in = state["z_decoder_expression.px_decoder.layers.0.0.weight"].shape
    n_latent = state["z_encoder_expression.mean_encoder.weight"].shape[0]
    encoder_in = state["z_encoder_expression.encoder.layers.0.0.weight"].shape[1]
    # its hidden layers always take the covariates (FCLayers' default), the RNA ones only when deeply injected
    deep = {"z_encoder_expression.": encoder_in - n_genes, "z_decoder_expression.px_decoder.": n_in - n_latent}
    for key, value in state.items():
        later = re.search(r"\.layers\.[1-9]\d*\.0\.weight$", key) is not None
        if key.startswith("z_encoder_expression."):
            value = value[:, n_genes - 1 :] if key == "z_encoder_expression.encoder.layers.0.0.weight" else value
            value = torch.zeros(n_hidden, n_hidden + deep["z_encoder_expression."]) if later else value
            out["z_encoder_protein." + key.removeprefix("z_encoder_expression.")] = torch.zeros_like(value)
        if key.startswith("z_decoder_expression.px_decoder."):
            rest = key.removeprefix("z_decoder_expression.px_decoder.")
            value = torch.zeros(n_hidden, n_hidden + deep["z_decoder_expression.px_decoder."]) if later else value
            for part in ("py_fore_decoder", "sigmoid_decoder", "py_back_decoder"):
                out[f"z_decoder_pro.{part}.{rest}"] = torch.zeros_like(value)
    for part in ("py_fore_scale_decoder", "py_background_decoder", "py_back_mean_log_alpha", "py_back_mean_log_beta"):
        out[f"z_decoder_pro.{part}.layers.0.0.weight"] = torch.zeros(0, n_hidden + n_in)
        out[f"z_decoder_pro.{part}.layers.0.0.bias"] = torch.zeros(0)
    out["background_pro_alpha"] = torch.zeros(0, n_batch)
    out["background_pro_log_beta"] = torch.zeros(0, n_batch)
    out["py_r"] = torch.zeros(0)
    weights = state["mod_weights"]
    out["mod_weights"] = torch.cat([weights, torch.ones_like(weights[..., :1])], dim=-1)
    return out


def _destvi_in(state: dict[str, torch.Tensor], config: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """scvi-tools' MRDeconv weights (renamed) as atlasvi's DestVI's (in place for `config`: vamp_prior_p, the
    prototypes per type): the free per-spot V and gamma dropped (atlasvi builds them only where used: amortization
    other than "both", which is refused); ScviToolsFileError without the CondSCVI's prototypes."""
    amortization = config.get("amortization", "both")
    if amortization != "both":
        raise ScviToolsFileError(f"{where}: {_DESTVI_AMORTIZATION.format(amortization)}")
    if "mean_vprior" not in state:
        raise ScviToolsFileError(
            f"{where}: a DestVI without its CondSCVI's prototypes (from_rna_model with vamp_prior_p None) has no "
            "atlasvi counterpart"
        )
    config["vamp_prior_p"] = int(state["mean_vprior"].shape[1])
    return {k: v for k, v in state.items() if k not in ("V", "gamma")}


_DESTVI_AMORTIZATION = (
    "a DestVI with amortization {!r} has no counterpart in the other tool yet (atlasvi exports and imports "
    "amortization 'both', scvi-tools' default)"
)


def _destvi_out(
    state: dict[str, torch.Tensor], config: dict[str, Any], schema: StoreSchema, n_spots: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """atlasvi's DestVI weights in scvi-tools' names with the free per-spot V (n_labels + add_celltypes, n_spots)
    and gamma (n_latent, n_labels, n_spots), unused with amortization "both", as zeros; and DestVI's init arguments
    (non_kwargs; the module's kwargs): the cell types, the CondSCVI's decoder, px_decoder, px_r, per_ct_bias and
    prototypes, taken from the weights (DestVI.load builds the module from them, then loads the weights)."""
    if config["amortization"] != "both":
        raise ScviToolsFileError(_DESTVI_AMORTIZATION.format(config["amortization"]))
    types = schema.categorical[schema.labels_key]
    state = dict(state)
    state["V"] = torch.zeros(len(types) + config["add_celltypes"], n_spots)
    state["gamma"] = torch.zeros(config["n_latent"], len(types), n_spots)

    def part(prefix: str) -> OrderedDict:
        return OrderedDict((k.removeprefix(prefix), v.clone()) for k, v in state.items() if k.startswith(prefix))

    non_kwargs = {
        "cell_type_mapping": np.array(types, dtype=object),
        "decoder_state_dict": part("decoder."),
        "px_decoder_state_dict": part("px_decoder."),
        "px_r": state["px_r"].clone(),
        "per_ct_bias": state["per_ct_bias"].clone(),
    } | {k: config[k] for k in ("n_hidden", "n_latent", "n_layers")}
    non_kwargs["dropout_decoder"] = config["dropout_rate"]
    prototypes = {k: state[k].clone() for k in ("mean_vprior", "var_vprior", "mp_vprior")}
    return state, non_kwargs, prototypes


def _sysvi_in(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """scvi-tools' SysVAE weights (renamed) as atlasvi's: its VampPrior's copy of the encoder dropped, the
    pseudo-inputs prior.u (k, n_genes), the mixture logits (k, 1, 1) -> (k,), the pseudo-inputs' one-hot system
    (k, n_system) -> codes (1, k), and the flag that they are initialised."""
    state = {k: v for k, v in state.items() if not k.startswith("prior.encoder.")}
    if "prior.w" in state:
        state["pseudo_x"] = state.pop("prior.u")
        state["prior_logits"] = state.pop("prior.w").reshape(-1)
        state["pseudo_codes"] = state.pop("prior.u_cat.0").argmax(-1).view(1, -1)
        state["pseudo_initialised"] = torch.tensor(True)
    return state


def _sysvi_out(state: dict[str, torch.Tensor], n_system: int) -> dict[str, torch.Tensor]:
    """atlasvi's SysVI weights in scvi-tools' names and shapes (the inverse of `_sysvi_in`; the VampPrior holds
    the encoder, so its weights are written under prior.encoder too)."""
    state = dict(state)
    if "prior_logits" in state:
        state["prior.u"] = state.pop("pseudo_x")
        state["prior.w"] = state.pop("prior_logits").reshape(-1, 1, 1)
        codes = state.pop("pseudo_codes")[0]
        state["prior.u_cat.0"] = torch.nn.functional.one_hot(codes, n_system).float()
        state |= {"prior." + k: v for k, v in state.items() if k.startswith("encoder.")}
    return state


def _unused_parts(method: str, config: dict[str, Any]) -> list[tuple[str, str]]:
    """(prefix, template prefix) in atlasvi's names of each part scvi-tools builds and atlasvi does not in this
    configuration: the library encoder with the observed library, the zero-inflation head without ZINB, the
    per-cell dispersion head without gene-cell dispersion; each shaped as its template (a library encoder as the
    z encoder's first layer with one output)."""
    if method in ("PEAKVI", "CondSCVI", "SysVI", "DestVI"):
        return []
    if method == "MULTIVI":
        zinb = config.get("gene_likelihood", "zinb") == "zinb"
        template = "z_decoder_expression.px_scale_decoder."
        unused = [("z_decoder_expression.px_r_decoder.", template)]
        return unused + ([] if zinb else [("z_decoder_expression.px_dropout_decoder.", template)])
    parts = [("l_encoder.", "z_encoder.")] if config.get("use_observed_lib_size", True) else []
    if method == "TOTALVI":
        zinb = config.get("gene_likelihood", "nb") == "zinb"
        return parts + ([] if zinb else [("decoder.px_dropout_decoder_gene.", "decoder.px_scale_decoder.")])
    if method == "LinearSCVI":
        zinb = config.get("gene_likelihood", "nb") == "zinb"
        return parts + ([] if zinb else [("decoder.px_dropout_decoder.", "decoder.factor_regressor.")])
    if config.get("dispersion", "gene") != "gene-cell":
        parts.append(("decoder.px_r_decoder.", "decoder.px_scale_decoder."))
    if config.get("gene_likelihood", "zinb") != "zinb":
        parts.append(("decoder.px_dropout_decoder.", "decoder.px_scale_decoder."))
    return parts


def _unused(state: dict[str, torch.Tensor], prefix: str, template: str) -> dict[str, torch.Tensor]:
    """Zeros under `prefix` shaped as the weights under `template` (batch norms as freshly built: weight and
    running variance 1); a library encoder ("l_encoder.") takes the z encoder's first layer and one output."""
    out: dict[str, torch.Tensor] = {}
    first = template + "encoder.layers.0." if prefix == "l_encoder." else template
    for key, value in state.items():
        if key.startswith(first):
            batch_norm = key.endswith("running_var") or (
                key.endswith(".weight") and key.removesuffix("weight") + "running_var" in state
            )
            out[prefix + key.removeprefix(template)] = torch.ones_like(value) if batch_norm else torch.zeros_like(value)
    if prefix == "l_encoder.":
        n_hidden = state[template + "mean_encoder.weight"].shape[1]
        for head in ("mean_encoder", "var_encoder"):
            out[f"l_encoder.{head}.weight"] = torch.zeros(1, n_hidden)
            out[f"l_encoder.{head}.bias"] = torch.zeros(1)
    return out


def _refuse_options(method: str, config: dict[str, Any], schema: StoreSchema) -> None:
    """ScviToolsFileError for a model whose configuration or store keys scvi-tools' class cannot express."""
    spec = COUNTERPARTS[method]
    extra = [k for k in schema.categorical if k not in (schema.batch_key, schema.labels_key)]
    if not spec.covariates and (extra or schema.continuous):
        raise ScviToolsFileError(
            f"a {method} model with covariates {[*extra, *schema.continuous]} has no scvi-tools form "
            f"(scvi-tools' {method}.setup_anndata takes batch_key and labels_key only)"
        )
    own = {"TOTALVI": {PROTEIN}, "MULTIVI": {"atac", "rna"}}.get(method, set())
    modalities = sorted(set(schema.modalities) - own)
    if modalities:
        raise ScviToolsFileError(f"a {method} model with modalities {modalities} has no scvi-tools form")
    if method == "LinearSCVI":
        if config["dispersion"] == "gene-label":
            raise ScviToolsFileError(
                "a LinearSCVI with gene-label dispersion has no scvi-tools form (LinearSCVI gives its module no labels)"
            )
        if config["encode_covariates"]:
            raise ScviToolsFileError(
                "a LinearSCVI with encode_covariates has no scvi-tools form (its encoders see x only)"
            )
        if config["use_batch_norm"] not in ("both", "encoder"):
            raise ScviToolsFileError(
                f"a LinearSCVI with use_batch_norm={config['use_batch_norm']!r} has no scvi-tools form "
                "(scvi-tools' LDVAE encoders always use batch norm)"
            )
    if method == "SysVI" and config["system_key"] not in (None, schema.batch_key):
        raise ScviToolsFileError(
            f"a SysVI with system_key {config['system_key']!r} other than the batch key has no scvi-tools form "
            "(scvi-tools' SysVI takes the system as batch_key and the batch as a covariate, which atlasvi does not "
            "export)"
        )
    if method == "MULTIVI" and config["modality_weights"] == "cell":
        raise ScviToolsFileError(_CELL_WEIGHTS)
    if method == "MULTIVI" and config["dispersion"] == "gene-label":
        raise ScviToolsFileError(
            "a MULTIVI with gene-label dispersion has no scvi-tools form (setup_mudata takes no labels)"
        )
    if method == "TOTALVI" and "label" in config["gene_dispersion"] + config["protein_dispersion"]:
        raise ScviToolsFileError(
            "a TOTALVI with per-label dispersion has no scvi-tools form (its setup takes no labels)"
        )


def to_scvi_tools(
    method: str, config: dict[str, Any], schema: StoreSchema, state: dict[str, torch.Tensor], n_cells: int
) -> dict[str, Any]:
    """The contents of a scvi-tools 1.4.2 model.pt for an atlasvi model of `method` (config: its model config's
    fields; schema: its registry; state: its weights). ScviToolsFileError for a method or option without a
    scvi-tools counterpart."""
    spec = counterpart(method)
    _refuse_options(method, config, schema)
    state = {k: v.detach().cpu() for k, v in state.items() if not k.startswith("adversary.")}  # scvi-tools: trainer's
    state = {k: v for k, v in state.items() if k not in spec.atlasvi_buffers}
    for prefix, template in _unused_parts(method, config):
        state |= _unused(state, prefix, template)
    if method == "MULTIVI":
        state |= _multivi_out(state, len(schema.batch_categories), schema.n_genes)
    linear = bool(config.get("linear_classifier", False))
    weights: dict[str, Any] = {}
    for key, value in state.items():
        if linear and key.startswith("classifier."):
            key = "classifier.0." + key.removeprefix("classifier.")
        weights[to_scvi_tools_name(method, key)] = value
    if method == "SysVI":
        weights = _sysvi_out(weights, len(schema.categorical[schema.batch_key]))
    destvi_args: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
    if method == "DestVI":
        weights, *destvi_args = _destvi_out(weights, config, schema, n_cells)  # type: ignore[assignment]
    weights["pyro_param_store"] = {"params": {}, "constraints": {}}
    non_kwargs = {k: config[k] for k in spec.class_args} | spec.fixed_class
    if method == "DestVI":
        non_kwargs = destvi_args[0]
    if method == "CondSCVI":
        non_kwargs["weight_obs"] = config["ct_weight"] is not None
    if method == "MULTIVI":
        non_kwargs = {"n_genes": schema.n_genes, "n_regions": len(schema.modalities["atac"].features)} | non_kwargs
    if method == "SysVI":  # the cells its pseudo-inputs started from: the first ones (the weights replace them)
        k = config["n_prior_components"]
        non_kwargs["pseudoinputs_data_indices"] = np.arange(k) if config["prior"] == "vamp" and k <= n_cells else None
    module_kwargs = destvi_args[1] | {k: config[k] for k in spec.module_args} | spec.fixed_module
    if method == "LinearSCVI":
        module_kwargs["use_batch_norm"] = config["use_batch_norm"] == "both"
    attrs = {
        "registry_": _registry(method, config, schema, n_cells),
        "init_params_": {"kwargs": {spec.kwargs_key: module_kwargs}, "non_kwargs": non_kwargs},
        "is_trained_": True,
        "get_normalized_function_name_": (
            "get_normalized_accessibility" if method == "PEAKVI" else "get_normalized_expression"
        ),
        "test_indices_": np.array([], dtype=np.int64),
    }
    if method == "SCANVI":
        attrs["unlabeled_category_"] = config["unlabeled_category"]
    var_names: Any = np.array(schema.gene_ids, dtype=object)
    if method == "MULTIVI":
        var_names = {"rna": var_names, "atac": np.array(schema.modalities["atac"].features, dtype=object)}
    return {"model_state_dict": weights, "var_names": var_names, "attr_dict": attrs}


def _field(attr_key: str | None, attr_name: str, state: dict, stats: dict) -> dict:
    data = {"attr_key": attr_key, "attr_name": attr_name} if attr_name else {}
    return {"data_registry": data, "state_registry": state, "summary_stats": stats}


def _registry(method: str, config: dict[str, Any], schema: StoreSchema, n_cells: int) -> dict[str, Any]:
    """scvi-tools' setup registry (`AnnDataManager.registry`) of `<method>.setup_anndata` with the store's keys."""
    spec = COUNTERPARTS[method]
    categories = schema.categorical
    extra = [k for k in categories if k not in (schema.batch_key, schema.labels_key)]
    labels_key = schema.labels_key if spec.labels else None
    if method == "CondSCVI" and labels_key is None:
        raise ScviToolsFileError("a CondSCVI without a labels key has no scvi-tools form")
    fields: dict[str, dict] = {}
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
    fields["ind_x"] = _field("_indices", "obs", {}, {})  # DestVI's spot indices
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
    setup: dict[str, Any] = {
        "batch_key": schema.batch_key, "labels_key": labels_key, "layer": None, "size_factor_key": None,
        "categorical_covariate_keys": extra or None, "continuous_covariate_keys": list(schema.continuous) or None,
        "panel_key": None, "protein_names_uns_key": None, "fine_labels_key": None,
        "unlabeled_category": "unlabeled", "weight_batches": False, "smoothed_layer": None,
    }  # fmt: skip
    if method == "TOTALVI":
        proteins = schema.modalities[PROTEIN]
        protein_state: dict[str, Any] = {"column_names": np.array(proteins.features, dtype=object)}
        if not all(all(panel) for panel in proteins.batch_mask):  # scvi-tools: keyed by batch code, as str
            protein_state["protein_batch_mask"] = {
                str(i): np.array(panel, dtype=bool) for i, panel in enumerate(proteins.batch_mask)
            }
        fields["proteins"] = _field(proteins.obsm_key, "obsm", protein_state, {"n_proteins": len(proteins.features)})
        setup["protein_expression_obsm_key"] = proteins.obsm_key
    scanvi = {"unlabeled_category": config["unlabeled_category"], "use_minified": False} if method == "SCANVI" else {}
    if method == "MULTIVI":
        _mudata_fields(fields, setup, schema, n_cells)
    return {
        "_scvi_uuid": str(uuid.uuid4()),
        "field_registries": {name: fields[name] for name in spec.fields},
        "model_name": method,
        "scvi_version": SCVI_TOOLS_VERSION,
        "setup_args": {k: setup[k] for k in spec.setup_args if k in setup} | scanvi,
        "setup_method_name": "setup_mudata" if method == "MULTIVI" else "setup_anndata",
    }


def _mudata_fields(fields: dict[str, dict], setup: dict[str, Any], schema: StoreSchema, n_cells: int) -> None:
    """MULTIVI.setup_mudata's fields and arguments (in place): X and batch in modality "rna", the peaks in "atac",
    the cell indices, no size factor; modalities {"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"}."""
    fields["X"]["data_registry"]["mod_key"] = "rna"
    fields["batch"]["data_registry"]["mod_key"] = "rna"
    fields["size_factor"]["summary_stats"] = {"n_size_factor": 0}
    fields["ind_x"] = _field("_indices", "obs", {}, {})
    peaks = np.array(schema.modalities["atac"].features, dtype=object)
    fields["atac"] = _field(None, "X", {"n_obs": n_cells, "n_vars": len(peaks), "column_names": peaks},
                            {"n_atac": len(peaks)})  # fmt: skip
    fields["atac"]["data_registry"]["mod_key"] = "atac"
    modalities = {"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"}
    setup |= {"rna_layer": None, "atac_layer": None, "protein_layer": None, "idx_layer": None, "modalities": modalities}


def write_scvi_tools(directory: Path, contents: dict[str, Any]) -> Path:
    """Write `contents` as `directory`/model.pt (written to a sibling, then renamed); returns the file."""
    directory.mkdir(parents=True, exist_ok=True)
    path, partial = directory / MODEL_FILE, directory / (MODEL_FILE + ".partial")
    torch.save(contents, partial)
    os.replace(partial, path)
    return path
