"""Check 1 of the fidelity comparison, small: atlasvi's held-out ELBO next to scvi-tools' on the same cells.

scvi-tools 1.4.2's figures (3 seeds, same cells, genes, held-out cells, architecture, epochs, KL schedule
and batch size) are in scvi_tools_reference.json with the command that regenerates them. A wrong model
(a KL sign, a missing library term, a missing KL) moves the held-out -ELBO by tens to thousands of nats;
seed-to-seed noise at 50 epochs is ~7.
"""

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import torch

from atlasvi.data import BuildConfig, LoaderConfig, StreamingLoader, build_store
from atlasvi.models.scvi import SCVIModule
from atlasvi.train import TrainConfig, fit
from tests.conftest import CELLBENCH

REFERENCE = json.loads((Path(__file__).with_name("scvi_tools_reference.json")).read_text())


def _stores(tmp_path: Path) -> tuple[Path, Path]:
    """(train, held-out) stores of the reference's cells: SNG cells, 2000 HVGs, its held-out 10%."""
    adata = ad.read_h5ad(CELLBENCH)
    adata = adata[adata.obs["demuxlet_cls"].astype(str) == "SNG"].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=2000, batch_key="batch", subset=True)
    picked = np.random.default_rng(0).choice(adata.n_obs, size=round(0.1 * adata.n_obs), replace=False)
    held = np.zeros(adata.n_obs, dtype=bool)
    held[picked] = True
    adata.obs = adata.obs[["batch", "cell_line"]]
    stores = []
    for name, cells in (("train", ~held), ("heldout", held)):
        adata[cells].copy().write_h5ad(tmp_path / f"{name}.h5ad")
        config = BuildConfig(
            inputs=[str(tmp_path / f"{name}.h5ad")], output=str(tmp_path / f"{name}.zarr"), batch_key="batch",
            labels_key="cell_line", n_top_genes=None,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stores.append(build_store(config))
    return stores[0], stores[1]


def test_held_out_elbo_matches_scvi_tools(tmp_path):
    train_store, heldout_store = _stores(tmp_path)
    train = StreamingLoader(train_store, LoaderConfig(batch_size=128, seed=0))
    heldout = StreamingLoader(heldout_store, LoaderConfig(batch_size=128, shuffle=False))
    assert (train.sampler.n_cells, heldout.sampler.n_cells) == (919, 102)
    torch.manual_seed(0)
    module = SCVIModule(train.store.schema)
    history = fit(module, train, heldout, TrainConfig(max_epochs=50, n_epochs_kl_warmup=10, seed=0))
    atlasvi = history[-1].validation_elbo
    mean, sd = REFERENCE["mean"], REFERENCE["sd"]
    assert atlasvi == pytest.approx(mean, abs=3 * sd), f"atlasvi {atlasvi:.1f}, scvi-tools {mean:.1f} +- {sd:.1f}"
