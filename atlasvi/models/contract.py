"""The module contract: what every registered model's module provides to the pipeline above it.

The loop (`atlasvi.train`) calls `unpack` and `loss`; the runners build the module from the `registry` hook and
read the store through `code_maps`; `--init-from` loads the weights under `init_prefixes`; scArches surgery
grows and freezes what `surgery_spec` names; the analysis reads `inference` / `generative` through its own
protocols (`atlasvi.analysis.protocols`). The conformance suite (tests/conformance) checks every entry.
"""

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel

from atlasvi.data import Minibatch, StoreSchema
from atlasvi.models.loss import LossOutput


@dataclass(frozen=True)
class SurgerySpec:
    """What scArches surgery does to a module (see `atlasvi.models.surgery`).

    covariate_layers: names of the FCLayers whose input carries the batch one-hot (their injected Linear
    layers grow by the query's new batches); batch_tensors: parameters whose last axis is the batch (e.g.
    gene-batch dispersion, (n_genes, n_batch)); decoders: top-level modules whose batch norms adapt to the
    query as scvi-tools' decoders do (the batch norms of every other module stay frozen in eval mode);
    fresh: top-level modules a query starts afresh and trains whole (an adversarial batch classifier, which
    scvi-tools builds anew for every training on the query's batches).
    """

    covariate_layers: tuple[str, ...]
    batch_tensors: tuple[str, ...]
    decoders: tuple[str, ...]
    fresh: tuple[str, ...] = ()


@runtime_checkable
class ModuleContract(Protocol):
    """A registered model's module (an nn.Module built as `module_class(schema, config)`).

    config: its config (the registry entry's config class); schema: the registry it was built on;
    used_keys: the categorical obs keys whose codes it reads; used_modalities: the store modalities its
    minibatches must carry beside the RNA counts (e.g. "protein"; see `StoreSchema.modalities`); init_prefixes:
    the weights a module started from a saved model (`--init-from`) must take from it (the rest start fresh).

    Optional hooks of a module started from another method's saved model (DestVI of a CondSCVI):
    `init_registry(saved, store) -> StoreSchema` (classmethod), its registry from the saved model's and the store's
    (default: the saved model's); `take_init_state(state) -> state`, the saved weights it takes (default: all).
    `surgery_spec` may return None: the method has no scArches query mapping.
    """

    config: BaseModel
    schema: StoreSchema
    used_keys: tuple[str, ...]
    used_modalities: tuple[str, ...]
    init_prefixes: ClassVar[tuple[str, ...]]

    @classmethod
    def registry(cls, schema: StoreSchema, config: Any) -> StoreSchema:
        """The registry the module is built on, from a store's or a saved model's (e.g. with an added category)."""
        ...

    def code_maps(self, store: StoreSchema, where: str) -> dict[str, torch.Tensor]:
        """Store code -> model code per used key, (n_store_categories,) int64; raises on a store it cannot read."""
        ...

    def surgery_spec(self) -> SurgerySpec | None:
        """What scArches surgery grows and freezes in this module (None: no query mapping)."""
        ...

    def unpack(self, batch: Minibatch) -> Any:
        """The module's inputs from a loader minibatch."""
        ...

    def inference(self, inputs: Any) -> dict[str, Any]:
        """The approximate posterior: at least qz (a Normal over the latent) and z (n, n_latent)."""
        ...

    def loss(self, inputs: Any, kl_weight: float = 1.0) -> LossOutput:
        """The minibatch loss with per-cell reconstruction and KL terms (nats)."""
        ...
