"""What the analysis functions need of a trained module, as Protocols (no model class is named here).

`HasLatent`: inputs from a minibatch and q(z | x). `HasExpression`: also the decoder and the sizes DE reads.
`HasClassifier`: also q(y | z) and the class names. `expression_scale` is the one adapter: px_scale decoded
at z, optionally as if every cell came from one batch.
"""

from collections.abc import Iterator
from dataclasses import is_dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch

from atlasvi.data import Minibatch


@runtime_checkable
class HasLatent(Protocol):
    """A module with an encoder: `inference(unpack(batch))["qz"]` is q(z | x) (a Normal); its minibatches carry
    the store modalities in `used_modalities` (e.g. "protein")."""

    used_modalities: tuple[str, ...]

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def eval(self) -> Any: ...

    def unpack(self, batch: Minibatch) -> Any: ...

    def inference(self, inputs: Any) -> dict[str, Any]: ...


@runtime_checkable
class HasExpression(HasLatent, Protocol):
    """A module with a decoder: `generative(z, library, inputs)["px_scale"]` (n, n_genes), batches 0..n_batch-1.

    One that decodes the features of a store modality rather than X's genes (MultiVI's accessibility) also names
    them: `feature_ids` (n_genes,) and `features_modality` (the modality whose counts DE's statistics read)."""

    n_genes: int
    n_batch: int

    def generative(self, z: torch.Tensor, library: torch.Tensor, inputs: Any) -> dict[str, Any]: ...


@runtime_checkable
class HasClassifier(HasLatent, Protocol):
    """A module with a classifier: `classify(inputs)` gives logits (n, len(label_names))."""

    label_names: tuple[str, ...]

    def classify(self, inputs: Any) -> torch.Tensor: ...


def expression_scale(
    module: HasExpression, inputs: Any, z: torch.Tensor, library: torch.Tensor, transform_batch: int | None
) -> torch.Tensor:
    """px_scale (n, n_genes) at z; transform_batch: decode every cell as if from that batch code.

    A module may define `expression_scale(inputs, z, library, transform_batch)` itself; otherwise its
    inputs are a dataclass with a `batch_index` field (the scVI family's)."""
    own = getattr(module, "expression_scale", None)
    if own is not None:
        return own(inputs, z, library, transform_batch)
    if transform_batch is not None:
        if not (is_dataclass(inputs) and hasattr(inputs, "batch_index")):
            raise TypeError(f"{type(module).__name__}: no expression_scale and no batch_index in its inputs")
        inputs = replace(inputs, batch_index=torch.full_like(inputs.batch_index, transform_batch))
    return module.generative(z, library, inputs)["px_scale"]
