"""Figures people would rather look at than numbers: loss curves and a latent UMAP, as PNG files."""

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
import torch

from atlasvi.train import EpochRecord


def loss_curves_png(history: Sequence[EpochRecord], path: Path) -> Path:
    """Train loss and held-out -ELBO, reconstruction and KL per cell against the epoch."""
    epochs = [r.epoch for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    axes[0].plot(epochs, [r.train_loss for r in history], label="train loss (warm-up KL weight)")
    axes[0].plot(epochs, [r.validation_elbo for r in history], label="held-out -ELBO")
    axes[0].set_title("loss per cell (nats)")
    axes[1].plot(epochs, [r.train_reconstruction for r in history], label="train")
    axes[1].plot(epochs, [r.validation_reconstruction for r in history], label="held-out")
    axes[1].set_title("reconstruction -log p(x | z) per cell")
    axes[2].plot(epochs, [r.train_kl for r in history], label="train")
    axes[2].plot(epochs, [r.validation_kl for r in history], label="held-out")
    axes[2].set_title("KL per cell")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def umap_png(latent: np.ndarray, colour_by: dict[str, Sequence[str]], path: Path, seed: int = 0) -> Path:
    """UMAP (scanpy: 15-neighbour graph on the latent) of (n_cells, n_latent), one panel per obs key."""
    adata = ad.AnnData(
        X=np.zeros((len(latent), 0), dtype=np.float32),
        obs=pd.DataFrame(
            {k: pd.Categorical(v) for k, v in colour_by.items()}, index=[str(i) for i in range(len(latent))]
        ),
        obsm={"X_latent": latent},
    )
    threads = torch.get_num_threads()
    sc.pp.neighbors(adata, use_rep="X_latent", random_state=seed)
    sc.tl.umap(adata, random_state=seed)
    torch.set_num_threads(threads)  # the neighbour search resets OpenMP's thread count, torch's with it
    fig, axes = plt.subplots(1, len(colour_by), figsize=(6.2 * len(colour_by), 5), squeeze=False)
    for ax, key in zip(axes[0], colour_by, strict=True):
        sc.pl.umap(adata, color=key, ax=ax, show=False, frameon=False, title=f"latent UMAP by {key}", size=12)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
