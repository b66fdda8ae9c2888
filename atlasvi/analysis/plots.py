"""Figures people would rather look at than numbers: loss curves, a latent UMAP and cell-type proportions on
spot coordinates, as PNG files."""

import textwrap
import warnings
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
from scipy.sparse import SparseEfficiencyWarning

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


def _pca_2d(latent: np.ndarray) -> np.ndarray:
    """The latent's first two principal components: UMAP's starting layout. scanpy's default (spectral) took
    25 of 84 s on a 20,000-cell latent of several disconnected groups; PCA takes milliseconds."""
    centred = latent - latent.mean(axis=0)
    if len(centred) < 2:
        return np.zeros((len(centred), 2), dtype=np.float32)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    components = np.zeros((latent.shape[1], 2))
    components[:, : min(2, vt.shape[0])] = vt[:2].T
    return (centred @ components).astype(np.float32)


def umap_png(latent: np.ndarray, colour_by: dict[str, Sequence[str]], path: Path, seed: int = 0) -> Path:
    """UMAP (scanpy: exact 15-neighbour graph on the latent, PCA start) of (n_cells, n_latent), one panel per
    obs key.

    The neighbours are exact (scikit-learn): at 20,000 cells that took 9 s here against 41 s for scanpy's
    default approximate search (pynndescent, whose numba compilation dominates at this size).
    """
    adata = ad.AnnData(
        X=np.zeros((len(latent), 0), dtype=np.float32),
        obs=pd.DataFrame(
            {k: pd.Categorical(v) for k, v in colour_by.items()}, index=[str(i) for i in range(len(latent))]
        ),
        obsm={"X_latent": latent, "X_pca_init": _pca_2d(latent)},
    )
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparseEfficiencyWarning)  # scanpy setting the kNN matrix's diagonal
        sc.pp.neighbors(adata, use_rep="X_latent", random_state=seed, transformer="sklearn")
    sc.tl.umap(adata, init_pos="X_pca_init", random_state=seed)
    torch.set_num_threads(threads)  # the neighbour search resets OpenMP's thread count, torch's with it
    fig, axes = plt.subplots(1, len(colour_by), figsize=(6.2 * len(colour_by), 5), squeeze=False)
    for ax, key in zip(axes[0], colour_by, strict=True):
        sc.pl.umap(adata, color=key, ax=ax, show=False, frameon=False, title=f"latent UMAP by {key}", size=12)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def sweep_heatmap_png(trials: Sequence[dict], row_key: str, column_key: str, metric: str, path: Path) -> Path:
    """The objective of finished trials over two swept fields at the epoch every one of them reached
    (`at_common`, `common_epochs` of `rank_trials`), so ASHA's early stops do not bias it; each cell also
    shows how far its trial trained (the minimum where a cell has several trials)."""
    finished = [t for t in trials if t["status"] == "FINISHED" and np.isfinite(t["at_common"])]
    rows = sorted({t["overrides"][row_key] for t in finished})
    columns = sorted({t["overrides"][column_key] for t in finished})
    grid = np.full((len(rows), len(columns)), np.nan)
    trained = np.zeros((len(rows), len(columns)), dtype=int)
    for t in finished:
        i, j = rows.index(t["overrides"][row_key]), columns.index(t["overrides"][column_key])
        grid[i, j] = np.fmin(grid[i, j], t["at_common"])
        trained[i, j] = max(trained[i, j], t["epochs"])
    width = max(4.8, 1.6 + 1.6 * len(columns))
    fig, ax = plt.subplots(figsize=(width, 1.6 + 0.9 * len(rows)), constrained_layout=True)
    image = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    for i in range(len(rows)):
        for j in range(len(columns)):
            if np.isfinite(grid[i, j]):
                label = f"{grid[i, j]:.1f}\n({trained[i, j]} ep)"
                light = image.norm(grid[i, j]) < 0.5  # viridis_r is light at the low (good) end
                ax.text(j, i, label, ha="center", va="center", color="black" if light else "white", fontsize=9)
    ax.set_xticks(range(len(columns)), [str(c) for c in columns])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel(column_key)
    ax.set_ylabel(row_key)
    common = finished[0]["common_epochs"] if finished else 0
    title = textwrap.wrap(f"{metric} at epoch {common}, reached by every trial (lower is better)", round(width * 8))
    ax.set_title("\n".join([*title, "(in brackets: epochs trained)"]), fontsize=10)  # ~8 characters an inch
    fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def scanvi_loss_figure(history: Sequence[EpochRecord], classification_ratio: float) -> plt.Figure:
    """scANVI's terms apart: the -ELBO (train, at the warm-up KL weight, and held-out), the labelled cells'
    cross-entropy, which the training loss adds `classification_ratio` times, reconstruction and KL per cell."""
    epochs = [r.epoch for r in history]
    cross_entropy = [r.extra_metrics.get("classification_loss", np.nan) for r in history]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6), constrained_layout=True)
    train_elbo = [r.train_loss - classification_ratio * ce for r, ce in zip(history, cross_entropy, strict=True)]
    axes[0].plot(epochs, train_elbo, label="train (warm-up KL weight)")
    axes[0].plot(epochs, [r.validation_elbo for r in history], label="held-out")
    axes[0].set_title("-ELBO per cell (nats), without the classification term", fontsize=10)
    axes[1].plot(epochs, cross_entropy, label="train, labelled cells")
    axes[1].set_title(
        f"cross-entropy of labelled cells\n(training loss adds {classification_ratio:g} x this)", fontsize=10
    )
    axes[2].plot(epochs, [r.train_reconstruction for r in history], label="train")
    axes[2].plot(epochs, [r.validation_reconstruction for r in history], label="held-out")
    axes[2].set_title("reconstruction per cell", fontsize=10)
    axes[3].plot(epochs, [r.train_kl for r in history], label="train")
    axes[3].plot(epochs, [r.validation_kl for r in history], label="held-out")
    axes[3].set_title("KL per cell", fontsize=10)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    return fig


def scanvi_loss_curves_png(history: Sequence[EpochRecord], classification_ratio: float, path: Path) -> Path:
    """`scanvi_loss_figure` as a PNG."""
    fig = scanvi_loss_figure(history, classification_ratio)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def proportions_png(
    coordinates: np.ndarray, proportions: np.ndarray, names: Sequence[str], path: Path, title: str = ""
) -> Path:
    """One panel per cell type: the spots at their coordinates (n, 2; image convention, y down) coloured by the
    type's proportion (n, n_types), on one 0..1 scale per panel's maximum."""
    n_types = proportions.shape[1]
    columns = min(4, n_types)
    rows = -(-n_types // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.0 * rows), squeeze=False, constrained_layout=True)
    size = max(1.0, min(30.0, 20000.0 / max(len(coordinates), 1)))
    for i, ax in enumerate(axes.ravel()):
        if i >= n_types:
            ax.axis("off")
            continue
        points = ax.scatter(
            coordinates[:, 0], coordinates[:, 1], c=proportions[:, i], s=size, cmap="viridis", vmin=0,
            vmax=max(float(proportions[:, i].max()), 1e-6), linewidths=0,
        )  # fmt: skip
        ax.set_title(textwrap.shorten(str(names[i]), 32), fontsize=9)
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(points, ax=ax, shrink=0.7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
