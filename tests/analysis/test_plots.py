"""The figures' text stays inside the image: nothing drawn touches a PNG's border (a clipped title does)."""

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from atlasvi.analysis.plots import sweep_heatmap_png
from atlasvi.launch.sweep import rank_trials


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
