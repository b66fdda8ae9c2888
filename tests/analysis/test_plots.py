"""Figures: their text stays inside the image (nothing drawn touches a PNG's border, as a clipped title does);
the scANVI figure shows the ELBO and the weighted classification term apart."""

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from atlasvi.analysis.plots import scanvi_loss_curves_png, scanvi_loss_figure, sweep_heatmap_png
from atlasvi.launch.sweep import rank_trials
from atlasvi.train import EpochRecord


def _ink_on_border(path: Path) -> int:
    """Pixels of the image's outermost rows and columns that are not white."""
    pixels = matplotlib.image.imread(path)[..., :3]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return int((border < 0.95).any(axis=-1).sum())


@pytest.mark.parametrize("n_latent, n_layers", [([10], [1]), ([5, 10], [1, 2]), ([10, 20, 30], [1, 2, 3])])
def test_the_sweep_heatmap_title_is_not_clipped(tmp_path, n_latent, n_layers):
    trials = [
        {
            "trial_id": f"{a}-{b}",
            "overrides": {"model.n_latent": a, "model.n_layers": b},
            "status": "FINISHED",
            "epochs": 30,
            "last": 900.0 + a - b,
            "history": [{"validation_reconstruction": 900.0 + a - b + 30 - k} for k in range(30)],
        }
        for a in n_latent
        for b in n_layers
    ]
    path = sweep_heatmap_png(
        rank_trials(trials, "validation_reconstruction"), "model.n_latent", "model.n_layers",
        "validation_reconstruction", tmp_path / "heatmap.png",
    )  # fmt: skip
    assert _ink_on_border(path) == 0


def test_the_scanvi_figure_plots_the_elbo_and_the_weighted_classification_term_apart(tmp_path):
    history = [
        EpochRecord(
            epoch,
            0.5,
            1000.0 - 10 * epoch + 50 * ce,
            900.0,
            40.0,
            980.0 - 9 * epoch,
            930.0,
            50.0,
            1e4,
            1.0,
            extra_metrics={"classification_loss": ce, "n_labelled": 64.0},
        )  # fmt: skip
        for epoch, ce in enumerate([1.5, 0.75, 0.25])
    ]
    figure = scanvi_loss_figure(history, classification_ratio=50.0)
    elbo, cross_entropy = figure.axes[0], figure.axes[1]
    np.testing.assert_allclose(elbo.lines[0].get_ydata(), [1000.0, 990.0, 980.0])  # train loss less 50 x CE
    np.testing.assert_allclose(elbo.lines[1].get_ydata(), [980.0, 971.0, 962.0])
    np.testing.assert_allclose(cross_entropy.lines[0].get_ydata(), [1.5, 0.75, 0.25])
    assert "without the classification term" in elbo.get_title()
    assert "training loss adds 50 x this" in cross_entropy.get_title()
    path = scanvi_loss_curves_png(history, 50.0, tmp_path / "scanvi.png")
    assert _ink_on_border(path) == 0
