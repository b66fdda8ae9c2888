"""scArches architecture surgery (Lotfollahi et al. 2022), as scvi-tools' ArchesMixin.load_query_data.

A query study with new batches is mapped onto a trained reference model without retraining it:
1. `extend_registry`: the query's new batch categories are appended to the reference's (and their
   library-size prior to the reference's).
2. `transplant`: a module built on the extended registry takes every reference weight; tensors that
   grew with the batch one-hot (the first layer of every covariate-injected block, gene-batch
   dispersion) keep the reference slice, and the new columns keep their fresh initialisation.
   Modules the spec names `fresh` (an adversarial batch classifier) keep their fresh initialisation.
3. `freeze_for_query`: only the new batch columns (and the fresh modules) train. Gradient hooks zero the
   gradient of every other entry of those tensors, every other parameter has requires_grad False, and the
   encoders' batch-norm layers stay in eval mode (their running statistics are neither updated nor replaced by
   minibatch statistics). Query training must use weight decay 0, or frozen entries would still move.

Differences from scvi-tools 1.4.2 (each keeps the reference exactly as it was): scvi-tools lets the
gradient through to every categorical column of a hooked layer (the reference batch columns get none
from query cells, but extra categorical covariates' columns would train), trains the library encoder
fully, keeps gene-batch dispersion of new batches at its random initialisation, and runs the encoders'
batch norms in train mode with momentum 0 (minibatch statistics in the query forward pass). scvi-tools
appends the new slice at the end of a grown tensor; here the batch block is grown in place, so the
columns of extra categorical covariates after it keep their weights. A reference with a single batch
has no batch columns (a one-category covariate is ignored): its batch's new column is set to 0 and
frozen, so reference cells are computed as before.
"""

from dataclasses import replace

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from atlasvi.data import StoreSchema
from atlasvi.data.store import ModalitySchema
from atlasvi.models.contract import SurgerySpec
from atlasvi.nn import FCLayers


class SurgeryConfig(BaseModel):
    """Which parts of the reference stay frozen; the defaults are scvi-tools'.

    freeze_batchnorm_decoder: False (scvi-tools' default) lets the decoders' batch-norm layers adapt to
    the query (affine weights train, running statistics update); True freezes them too.
    freeze_dropout: dropout off during query training.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    freeze_batchnorm_decoder: bool = False
    freeze_dropout: bool = False


def extend_registry(reference: StoreSchema, query: StoreSchema, where: str) -> StoreSchema:
    """The reference registry with the query's new batch categories (and their library prior) appended; a modality
    of both gets the query's new batches' panels (in the reference's features, matched by name: one the query
    lacks is not in its panel) and priors appended (one of the reference alone is dropped).

    Raises ValueError when the query has no batch the reference has not seen (nothing to map).
    """
    known = set(reference.batch_categories)
    new = [i for i, c in enumerate(query.batch_categories) if c not in known]
    if not new:
        raise ValueError(
            f"{where}: every {reference.batch_key} of the query is in the reference "
            f"({list(query.batch_categories)}); use the reference model on it directly"
        )
    categorical = dict(reference.categorical)
    categorical[reference.batch_key] = reference.batch_categories + tuple(query.batch_categories[i] for i in new)

    def grown(values: tuple, name: str, field: str) -> tuple:
        """A per-batch tuple of the reference with the query's new batches' values (none for a modality without
        them: peaks and the RNA mask have no background prior)."""
        theirs = getattr(query.modalities[name], field)
        return values + tuple(theirs[i] for i in new) if values else values

    modalities = {
        name: replace(
            modality,
            batch_mask=modality.batch_mask + tuple(_panel(modality, query.modalities[name], i) for i in new),
            background_log_means=grown(modality.background_log_means, name, "background_log_means"),
            background_log_scales=grown(modality.background_log_scales, name, "background_log_scales"),
        )
        for name, modality in reference.modalities.items()
        if name in query.modalities
    }
    return replace(
        reference,
        n_cells=query.n_cells,
        categorical=categorical,
        library_log_means=reference.library_log_means + tuple(query.library_log_means[i] for i in new),
        library_log_vars=reference.library_log_vars + tuple(query.library_log_vars[i] for i in new),
        modalities=modalities,
    )


def _panel(reference: ModalitySchema, query: ModalitySchema, batch: int) -> tuple[bool, ...]:
    """The query batch's panel over the reference's features, matched by name (a CSR modality's: as it is)."""
    if query.kind != "dense" or query.features == reference.features:
        return query.batch_mask[batch]
    measured = dict(zip(query.features, query.batch_mask[batch], strict=True))
    return tuple(measured.get(name, False) for name in reference.features)


def _grow_columns(old: torch.Tensor, new: torch.Tensor, old_layers: FCLayers, layers: FCLayers):
    """(weight, train mask) of an injected Linear whose input is [features, one-hot blocks]: features and each
    covariate's reference columns from `old`; a covariate's added categories keep `new`'s fresh columns."""
    n_in = new.shape[1] - sum(layers.n_categories)
    weight, mask = new.clone(), torch.zeros_like(new, dtype=torch.bool)
    weight[:, :n_in] = old[:, :n_in]
    a_old = a_new = n_in
    for w_old, w_new in zip(old_layers.n_categories, layers.n_categories, strict=True):
        # a one-category covariate has no columns (ignored): its category becomes a column of 0
        n_reference = w_old if w_old > 0 else min(w_new, 1)
        weight[:, a_new : a_new + w_old] = old[:, a_old : a_old + w_old]
        weight[:, a_new + w_old : a_new + n_reference] = 0.0
        mask[:, a_new + n_reference : a_new + w_new] = True
        a_old, a_new = a_old + w_old, a_new + w_new
    return weight, mask


def transplant(reference: nn.Module, query: nn.Module) -> dict[str, torch.Tensor]:
    """Copy the reference's weights into `query` (built on the extended registry); returns the train masks.

    What grows is the query module's `surgery_spec()`: its covariate layers and batch tensors. The masks
    (parameter name -> bool tensor of its shape) mark the entries that train: the added categories' columns.
    Every other entry holds the reference's value.
    """
    spec: SurgerySpec | None = query.surgery_spec()  # type: ignore[operator]
    if spec is None:
        raise ValueError(f"{type(query).__name__}: this method has no scArches query mapping (nor has scvi-tools')")
    old_state, new_state = reference.state_dict(), query.state_dict()
    masks: dict[str, torch.Tensor] = {}
    old_modules, new_modules = dict(reference.named_modules()), dict(query.named_modules())
    for name in spec.covariate_layers:
        old_layers, layers = old_modules[name], new_modules[name]
        if list(old_layers.n_categories) == list(layers.n_categories):
            continue
        for i, inject in enumerate(layers.inject):
            if inject:
                key = f"{name}.layers.{i}.0.weight"
                new_state[key], masks[key] = _grow_columns(old_state[key], new_state[key], old_layers, layers)
    for key in spec.batch_tensors:  # (..., n_batch): the new batches' slices train
        old, new = old_state[key], new_state[key]
        new_state[key] = torch.cat([old, new[..., old.shape[-1] :]], dim=-1)
        masks[key] = torch.zeros_like(new, dtype=torch.bool)
        masks[key][..., old.shape[-1] :] = True
    fresh = {key for key in new_state if key.split(".")[0] in spec.fresh}
    for key, parameter in query.named_parameters():
        if key in fresh:
            masks[key] = torch.ones_like(parameter, dtype=torch.bool)
    for key, old in old_state.items():
        if key not in masks and key not in fresh and new_state[key].shape == old.shape:
            new_state[key] = old.clone()
        # else a buffer built from the extended registry (the library prior): its reference slice is the same
    query.load_state_dict(new_state)
    return masks


class _EvalBatchNorm1d(nn.BatchNorm1d):
    """A BatchNorm1d that stays in eval mode: running statistics neither updated nor bypassed."""

    def train(self, mode: bool = True) -> "_EvalBatchNorm1d":
        return super().train(False)


def freeze_for_query(module: nn.Module, masks: dict[str, torch.Tensor], config: SurgeryConfig | None = None) -> None:
    """Only the masked entries train: gradient hooks zero the rest, other parameters are frozen.

    Encoder batch norms (every BatchNorm1d outside the decoders of the module's `surgery_spec()`) stay in
    eval mode; decoder batch norms train as scvi-tools' unless config.freeze_batchnorm_decoder.
    """
    config = config or SurgeryConfig()
    spec: SurgerySpec = module.surgery_spec()  # type: ignore[operator]
    decoders = spec.decoders
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(name in masks)
        if name in masks:
            keep = masks[name].to(parameter.device, parameter.dtype)
            parameter.register_hook(lambda grad, keep=keep: grad * keep)
    for name, layer in module.named_modules():
        in_decoder = name.split(".")[0] in decoders
        if isinstance(layer, nn.BatchNorm1d) and name.split(".")[0] not in spec.fresh:
            if in_decoder and not config.freeze_batchnorm_decoder:
                for parameter in layer.parameters():
                    parameter.requires_grad_(True)
            else:
                layer.__class__ = _EvalBatchNorm1d
                layer.eval()
        if isinstance(layer, nn.Dropout) and config.freeze_dropout:
            layer.p = 0.0
