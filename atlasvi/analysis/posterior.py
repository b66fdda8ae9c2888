"""Streaming posterior quantities of a trained module (typed on `atlasvi.analysis.protocols`) over an atlas store.

Every function reads the store's rows in order through the loader (shuffle off, read-ahead on), holds
one minibatch at a time, and yields (store rows, values) so a caller can collect the values or write
them back into the store chunk by chunk (`atlasvi.data.writeback`). A store other than the training
store is used through `code_maps` (store category code -> model code, from `check_compatible`).
"""

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from atlasvi.analysis.protocols import HasExpression, HasLatent, expression_scale
from atlasvi.data import LoaderConfig, Minibatch, StreamingLoader
from atlasvi.data.store import AtlasStore
from atlasvi.train import evaluate
from atlasvi.train.loop import Trainable

FeatureValues = Callable[[Any, torch.Tensor, torch.Tensor, int | None], torch.Tensor]
"""(inputs, z (n, n_latent), library (n, 1), transform_batch) -> (n, n_features): a module's values at one z draw."""


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
    maps = {k: np.asarray(v) for k, v in (code_maps or {}).items()}
    with StreamingLoader(store, config, rows=rows, code_maps=maps, modalities=modalities) as loader:
        yield from loader


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
    values: FeatureValues | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(store rows (n,), expression (n, n_genes_kept)) per minibatch, as scvi-tools' get_normalized_expression.

    px_scale of the decoder at z drawn from q(z | x) (n_samples draws, averaged), times library_size
    (1: proportions; 1e4: counts per 10K). transform_batch: decode every cell as if from that batch code.
    values: what a draw gives instead of px_scale x library_size, (inputs, z, library, transform_batch) ->
    (n, n_features) (e.g. totalVI's genes and proteins for DE); gene_indices then index its features.
    """
    device = _device(module)
    module.eval()
    with torch.no_grad():
        for batch in batches:
            inputs = module.unpack(batch.to(device))
            inference = module.inference(inputs)
            qz = inference["qz"]
            total = torch.zeros((), device=device)
            for _ in range(n_samples):
                noise = torch.randn(qz.loc.shape, generator=generator, device="cpu").to(device)
                z = qz.loc + qz.scale * noise
                if values is None:
                    total = total + expression_scale(module, inputs, z, inference["library"], transform_batch)
                else:
                    total = total + values(inputs, z, inference["library"], transform_batch)
            expression = total * ((library_size if values is None else 1.0) / n_samples)
            if gene_indices is not None:
                expression = expression[:, torch.as_tensor(gene_indices, device=device)]
            yield batch.rows.numpy(), expression.float().cpu().numpy()


def protein_expression(
    generative: dict[str, torch.Tensor],
    include_background: bool = False,
    scale_protein: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(n, n_proteins) denoised protein expression from a totalVI-style decoder's outputs (rate_fore, rate_back,
    mixing: the logit of P(background)), as scvi-tools' TOTALVI get_normalized_expression: rate_fore x
    (1 - P(background)) (+ rate_back x P(background) with include_background), in counts; scale_protein: each
    cell's values divided by their sum. generator: draw the background indicator from Bernoulli(P(background))
    instead of using the probability (scvi-tools' sample_protein_mixing)."""
    background = torch.sigmoid(generative["mixing"])
    if generator is not None:
        noise = torch.rand(background.shape, generator=generator, device="cpu").to(background.device)
        background = (noise < background).to(background.dtype)
    value = generative["rate_fore"] * (1 - background)
    if include_background:
        value = value + generative["rate_back"] * background
    return torch.nn.functional.normalize(value, p=1, dim=-1) if scale_protein else value


def elbo(module: Trainable, batches: Iterator[Minibatch]) -> tuple[float, float, float]:
    """(-ELBO, reconstruction, KL) per cell in nats at KL weight 1, each cell counted once."""
    return evaluate(module, batches, _device(module))
