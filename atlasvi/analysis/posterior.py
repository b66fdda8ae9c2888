"""Streaming posterior quantities of a trained module (typed on `atlasvi.analysis.protocols`) over an atlas store.

Every function reads the store's rows in order through the loader (shuffle off, read-ahead on), holds
one minibatch at a time, and yields (store rows, values) so a caller can collect the values or write
them back into the store chunk by chunk (`atlasvi.data.writeback`). A store other than the training
store is used through `code_maps` (store category code -> model code, from `check_compatible`).
"""

from collections.abc import Iterator

import numpy as np
import torch

from atlasvi.analysis.protocols import HasExpression, HasLatent, expression_scale
from atlasvi.data import LoaderConfig, Minibatch, StreamingLoader
from atlasvi.data.store import AtlasStore
from atlasvi.train import evaluate
from atlasvi.train.loop import Trainable


def minibatches(
    store: AtlasStore,
    rows: tuple[int, int] | None = None,
    batch_size: int = 1024,
    code_maps: dict[str, torch.Tensor] | None = None,
    modalities: tuple[str, ...] = (),
) -> Iterator[Minibatch]:
    """The store's rows [start, stop) in order, in minibatches, with categorical codes in the model's coding and
    the named modalities beside the RNA counts."""
    config = LoaderConfig(batch_size=batch_size, shuffle=False, block_size=max(16384, batch_size))
    with StreamingLoader(store, config, rows=rows, modalities=modalities) as loader:
        for batch in loader:
            for key, code_map in (code_maps or {}).items():
                batch.categorical[key] = code_map[batch.categorical[key]]
            yield batch


def _device(module: HasLatent) -> torch.device:
    return next(module.parameters()).device


def latent_representation(
    module: HasLatent,
    batches: Iterator[Minibatch],
    give_mean: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(store rows (n,), latent (n, n_latent)) per minibatch: the posterior mean of q(z | x), or one draw."""
    device = _device(module)
    module.eval()
    with torch.no_grad():
        for batch in batches:
            qz = module.inference(module.unpack(batch.to(device)))["qz"]
            if give_mean:
                z = qz.loc
            else:
                noise = torch.randn(qz.loc.shape, generator=generator, device="cpu").to(device)
                z = qz.loc + qz.scale * noise
            yield batch.rows.numpy(), z.float().cpu().numpy()


def normalized_expression(
    module: HasExpression,
    batches: Iterator[Minibatch],
    transform_batch: int | None = None,
    library_size: float = 1.0,
    n_samples: int = 1,
    gene_indices: np.ndarray | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(store rows (n,), expression (n, n_genes_kept)) per minibatch, as scvi-tools' get_normalized_expression.

    px_scale of the decoder at z drawn from q(z | x) (n_samples draws, averaged), times library_size
    (1: proportions; 1e4: counts per 10K). transform_batch: decode every cell as if from that batch code.
    """
    device = _device(module)
    module.eval()
    with torch.no_grad():
        for batch in batches:
            inputs = module.unpack(batch.to(device))
            inference = module.inference(inputs)
            qz = inference["qz"]
            total = torch.zeros(len(batch), module.n_genes, device=device)
            for _ in range(n_samples):
                noise = torch.randn(qz.loc.shape, generator=generator, device="cpu").to(device)
                z = qz.loc + qz.scale * noise
                total += expression_scale(module, inputs, z, inference["library"], transform_batch)
            expression = total * (library_size / n_samples)
            if gene_indices is not None:
                expression = expression[:, torch.as_tensor(gene_indices, device=device)]
            yield batch.rows.numpy(), expression.float().cpu().numpy()


def elbo(module: Trainable, batches: Iterator[Minibatch]) -> tuple[float, float, float]:
    """(-ELBO, reconstruction, KL) per cell in nats at KL weight 1, each cell counted once."""
    return evaluate(module, batches, _device(module))
