"""Streaming label transfer of a trained module with a classifier (scANVI): q(y | z1) per minibatch."""

from collections.abc import Iterator

import numpy as np
import torch

from atlasvi.analysis.protocols import HasClassifier
from atlasvi.data import Minibatch


def class_probabilities(module: HasClassifier, batches: Iterator[Minibatch]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(store rows (n,), probabilities (n, n_labels)) per minibatch: softmax of the classifier at the
    posterior mean of z1 (scvi-tools' predict with use_posterior_mean=True); rows sum to 1."""
    device = next(module.parameters()).device
    module.eval()
    with torch.no_grad():
        for batch in batches:
            logits = module.classify(module.unpack(batch.to(device)))
            yield batch.rows.numpy(), torch.softmax(logits.float(), dim=-1).cpu().numpy()
