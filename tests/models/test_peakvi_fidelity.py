"""PeakVI fidelity, small: atlasvi's held-out reconstruction and latent kNN accuracy next to scvi-tools' PEAKVI.

scvi-tools 1.4.2's figures (3 seeds; the same 540 training and 60 held-out Granja cells, per seed the 54 validation
cells of atlasvi's store built with that seed, PEAKVI defaults but 60 epochs, KL warm-up 10, no early stopping) are
in peakvi_scvi_tools_reference.json with the command that regenerates them (benchmarks/peakvi_fidelity.py, whose
full run is benchmarks/results/peakvi_fidelity.md).
"""

import json
import sys
from pathlib import Path

import anndata as ad

from atlasvi.api import PEAKVI
from atlasvi.data import BuildConfig, LoaderConfig, build_store
from atlasvi.train import TrainConfig
from tests.conftest import GRANJA

REFERENCE = json.loads(Path(__file__).with_name("peakvi_scvi_tools_reference.json").read_text())
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from peakvi_fidelity import atlasvi_knn_accuracy, held_out_mask, heldout_bce  # noqa: E402


def _stores(tmp_path: Path) -> tuple[Path, Path]:
    """(train, held-out) stores of the reference's cells: its held-out 10% of the file (h5ad order)."""
    adata = ad.read_h5ad(GRANJA)
    adata.obs = adata.obs[["Group", "BioClassification"]].copy()
    held = held_out_mask(adata.n_obs)
    stores = []
    for name, cells in (("train", ~held), ("heldout", held)):
        adata[cells].copy().write_h5ad(tmp_path / f"{name}.h5ad")
        config = BuildConfig(
            inputs=[str(tmp_path / f"{name}.h5ad")], output=str(tmp_path / f"{name}.zarr"), batch_key="Group",
            labels_key="BioClassification",
        )  # fmt: skip
        stores.append(build_store(config))
    return stores[0], stores[1]


def test_held_out_reconstruction_and_knn_accuracy_are_scvi_tools(tmp_path):
    train, heldout = _stores(tmp_path)
    model = PEAKVI(train, device="cpu", seed=0)
    model.fit(TrainConfig(seed=0, **REFERENCE["train"]), LoaderConfig(batch_size=128, seed=0))
    bce = heldout_bce(model, heldout)
    knn = atlasvi_knn_accuracy(model, [train, heldout], [tmp_path / "train.h5ad", tmp_path / "heldout.h5ad"])
    scvi_bce = [r["heldout_bce_mean_z"] for r in REFERENCE["rows"]]
    scvi_knn = [r["knn_accuracy"] for r in REFERENCE["rows"]]
    # 60 epochs, 3 scvi-tools seeds: BCE 382.0-386.3 (atlasvi seeds 0-2: 380.6-386.5, seed 0 385.5); kNN 0.22-0.27
    # (atlasvi 0.23-0.26): little above chance (1/6) this early, so the kNN bound is loose; the full run is the
    # benchmark's
    assert bce <= max(scvi_bce) + REFERENCE["bce_tolerance"], (bce, scvi_bce)
    assert knn >= min(scvi_knn) - REFERENCE["knn_tolerance"], (knn, scvi_knn)
