"""MultiVI fidelity: atlasvi's MULTIVI next to scvi-tools 1.4.2's on sci-CAR A549 (2,641 paired cells, 1,185 genes +
52,761 peaks, three dexamethasone treatment times), the MultiVI paper's unpaired protocol.

    .venv/bin/python benchmarks/multivi_fidelity.py --seeds 0 1 2 --max-epochs 100

Both tools get the same cells (numpy default_rng(0).permutation of the file's cells): the first 10% are held out
(paired, never trained on); of the others, a third keep RNA only (their ATAC hidden: batch "expression"), a third
ATAC only (their RNA hidden: "accessibility") and a third both ("paired"), scvi-tools' organize_multiome_anndatas
names, used as the batch key as in scvi-tools' MultiVI tutorial. atlasvi reads them from one .h5ad in scvi-tools'
concatenated layout (peaks in obsm["atac"], zero rows where a modality is hidden: `atlasvi build --atac-key` stores
those as not measured); scvi-tools from a MuData (rna, atac) of the same zero-filled rows (its MULTIVAE reads a
modality summing to 0 as missing). Each tool trains with its MULTIVI defaults (n_hidden 128, n_latent 11, ZINB,
Jeffreys penalty, equal weights, AdamW lr 1e-4, weight decay 1e-3, batch 128, KL warm-up 50 epochs, early stopping on
the held-out reconstruction, the adversarial batch classifier); `--max-epochs` shortens BOTH tools' runs alike
(their default 500 epochs do not fit the shared 2-core machine). Per seed and tool:

- held-out reconstruction per modality: nats per held-out cell, -log p(RNA) and the ATAC BCE (each tool's own scorer,
  one z draw; with --same-start one scorer for both, see below);
- accessibility imputed for the RNA-only cells (decoded from their RNA, each tool's get_accessibility_estimates /
  get_normalized_accessibility, z the posterior mean) vs their hidden peaks (open = count > 0): AUROC over every
  (cell, peak), and the mean of the per-cell AUROCs;
- expression imputed for the ATAC-only cells (each tool's get_normalized_expression, z the posterior mean) vs their
  hidden RNA: Pearson r of log1p(1e4 x imputed) vs log1p(1e4 x counts / library) per gene (genes detected in them),
  averaged, and per cell, averaged;
- mixing of the three groups: 15-NN treatment-time accuracy of the latent of every cell (stratified 5-fold CV, both
  tools' latents sorted by cell name: the same folds).

The scvi-tools half is this file run with `--side scvi` in the scvi-tools venv (benchmarks/.cache/scvi-venv) as a
subprocess after atlasvi's runs, one torch thread. Output: results/multivi_fidelity.json and .md (`--out NAME`).

`--library-start-at-mean` (an experiment; results/multivi_fidelity_library_init*.md): atlasvi's RNA library encoder
starts its output bias at the store's mean log library (~6.3 nats here) instead of both tools' draw (~0.1): the
short-run held-out RNA figure stops depending on the draw (benchmarks/results/multivi_swap.json), at some cost to the
per-cell expression r and the kNN accuracy (benchmarks/README.md).

`--same-start` (paired design; results/multivi_fidelity_paired.md): per seed, scvi-tools trains from atlasvi's
initial weights of that seed (its MULTIVAE's weights and its adversarial batch classifier's, names mapped as
benchmarks/multivi_weights_check.py; its protein modules, unused by these cells, keep their draw), so the two runs of a
seed differ only in what training draws (minibatch order, validation cells, dropout, latent samples) and in the
tools' code; the report adds the paired differences atlasvi - scvi-tools of every metric. Both tools' trained modules
are saved (CACHE/atlasvi_trained_SEED.npz, scvi_trained_SEED.npz), and both tools' held-out figures come from one
scorer: scvi-tools' get_reconstruction_error on each tool's weights (atlasvi's mapped in), the mean over
HELD_OUT_DRAWS z draws, the same draws for both (each tool's own one-draw figure kept as *_own_one_draw; cross-scoring
in benchmarks/multivi_cross_score.py found the scorers equal on the same weights and the one draw a noise of up to
~0.7 nats per pair). `--rescore NAME` does the same for a saved --same-start run (and its kNN in one cell order).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.fidelity_data import KNN_FOLDS, KNN_NEIGHBOURS, knn_accuracy, seed_summary

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
SCICAR = SHARED / "scicar_a549_multivi_concat_scai.h5ad"
SCVI_PYTHON = HERE / ".cache" / "scvi-venv" / "bin" / "python"
CACHE = HERE / ".cache" / "multivi_fidelity"
BATCH_KEY, LABELS_KEY, ATAC_KEY = "modality", "treatment_time_h", "atac"
HELD_OUT_FRACTION = 0.1
TRAIN_FIELDS = ("max_epochs", "n_epochs_kl_warmup")  # set alike for both tools (TrainConfig / MULTIVI.train names)
GROUPS = ("expression", "accessibility", "paired")  # RNA only, ATAC only, both
HELD_OUT_DRAWS = 50  # z draws the one held-out scorer averages (torch seeds 0..HELD_OUT_DRAWS - 1)
HELD_OUT_KEYS = {"rna": "heldout_reconstruction_rna", "atac": "heldout_reconstruction_atac"}
HELD_OUT_SCORER = (
    f"scvi-tools' get_reconstruction_error on both tools' trained weights (atlasvi's mapped into its MULTIVAE), the "
    f"mean over {HELD_OUT_DRAWS} z draws (torch seeds 0-{HELD_OUT_DRAWS - 1}, the same for both tools)"
)


def split(n_cells: int) -> dict[str, np.ndarray]:
    """Cell indices of the held-out cells and of the three training groups (default_rng(0).permutation, sorted)."""
    order = np.random.default_rng(0).permutation(n_cells)
    n_held = round(HELD_OUT_FRACTION * n_cells)
    rest = order[n_held:]
    third = len(rest) // 3
    parts = {"heldout": order[:n_held], "expression": rest[:third], "accessibility": rest[third : 2 * third]}
    parts["paired"] = rest[2 * third :]
    return {name: np.sort(cells) for name, cells in parts.items()}


def prepare() -> dict[str, Path]:
    """The files both tools read: train.h5ad / heldout.h5ad (genes in X, peaks in obsm["atac"] with their names in
    uns["atac_names"], zero rows where hidden; the hidden counts in truth.npz) and atlasvi's two stores."""
    import anndata as ad
    import scipy.sparse as sp

    from atlasvi.data import BuildConfig, build_store

    CACHE.mkdir(parents=True, exist_ok=True)
    paths = {"train": CACHE / "train.h5ad", "heldout": CACHE / "heldout.h5ad", "truth": CACHE / "truth.npz"}
    if not all(p.exists() for p in paths.values()):
        full = ad.read_h5ad(SCICAR)
        genes = (full.var["modality"] == "Gene Expression").to_numpy()
        x_all, peaks_all = sp.csr_matrix(full.X[:, genes]), sp.csr_matrix(full.X[:, ~genes])
        parts = split(full.n_obs)
        train_cells = np.sort(np.concatenate([parts[g] for g in GROUPS]))
        group = np.empty(full.n_obs, dtype=object)
        for name in GROUPS:
            group[parts[name]] = name
        group[parts["heldout"]] = "paired"
        for name, cells in (("train", train_cells), ("heldout", parts["heldout"])):
            x, peaks = x_all[cells].tolil(), peaks_all[cells].tolil()
            x[group[cells] == "accessibility"] = 0
            peaks[group[cells] == "expression"] = 0
            obs = full.obs.iloc[cells][[LABELS_KEY]].astype(str)
            obs[BATCH_KEY] = group[cells]
            adata = ad.AnnData(sp.csr_matrix(x, dtype=np.float32), obs=obs, var=full.var[genes][[]])
            adata.obsm[ATAC_KEY] = sp.csr_matrix(peaks, dtype=np.float32)
            adata.uns[f"{ATAC_KEY}_names"] = np.asarray(full.var_names[~genes], dtype=str)
            adata.write_h5ad(paths[name])
        sp.save_npz(paths["truth"].with_suffix(".rna.npz"), x_all[parts["accessibility"]])
        sp.save_npz(paths["truth"].with_suffix(".atac.npz"), peaks_all[parts["expression"]])
        np.savez(
            paths["truth"],
            rna_cells=np.asarray(full.obs_names[parts["accessibility"]], dtype=str),
            atac_cells=np.asarray(full.obs_names[parts["expression"]], dtype=str),
        )
    stores = {"train_store": CACHE / "train.zarr", "heldout_store": CACHE / "heldout.zarr"}
    for name, store in stores.items():
        if not store.exists():
            source = paths["train" if name == "train_store" else "heldout"]
            config = BuildConfig(
                inputs=[str(source)], output=str(store), atac_key=ATAC_KEY, batch_key=BATCH_KEY, labels_key=LABELS_KEY
            )
            build_store(config)
    return paths | stores


def truth(paths: dict) -> dict:
    """The hidden counts: rna (ATAC-only cells x genes) and atac (RNA-only cells x peaks), with their cell names."""
    import scipy.sparse as sp

    names = np.load(paths["truth"])
    return {
        "rna": sp.load_npz(Path(paths["truth"]).with_suffix(".rna.npz")).tocsr(),
        "atac": sp.load_npz(Path(paths["truth"]).with_suffix(".atac.npz")).tocsr(),
        "rna_cells": names["rna_cells"],
        "atac_cells": names["atac_cells"],
    }


def auroc(probabilities: np.ndarray, peaks) -> tuple[float, float]:
    """(AUROC over every (cell, peak), mean per-cell AUROC) of imputed probabilities vs open peaks (count > 0)."""
    from sklearn.metrics import roc_auc_score

    opened = (peaks.toarray() > 0).astype(np.uint8)
    overall = float(roc_auc_score(opened.ravel(), probabilities.ravel()))
    per_cell = [roc_auc_score(o, p) for o, p in zip(opened, probabilities, strict=True) if 0 < o.sum() < len(o)]
    return overall, float(np.mean(per_cell))


def expression_correlation(imputed: np.ndarray, counts) -> tuple[float, float]:
    """(mean per-gene, mean per-cell) Pearson r of log1p(1e4 x imputed) vs log1p(1e4 x counts / library)."""
    dense = counts.toarray().astype(np.float64)
    library = dense.sum(axis=1, keepdims=True)
    keep = library[:, 0] > 0
    a = np.log1p(1e4 * imputed[keep].astype(np.float64))
    b = np.log1p(1e4 * dense[keep] / library[keep])

    def pearson(u: np.ndarray, v: np.ndarray, axis: int) -> np.ndarray:
        u, v = u - u.mean(axis, keepdims=True), v - v.mean(axis, keepdims=True)
        return (u * v).sum(axis) / np.sqrt((u * u).sum(axis) * (v * v).sum(axis))

    detected = b.std(axis=0) > 0
    return float(np.mean(pearson(a[:, detected], b[:, detected], 0))), float(np.mean(pearson(a, b, 1)))


# --------------------------------------------------------------------------------------------- atlasvi
def atlasvi_heldout(model, store: Path) -> dict[str, float]:
    """Held-out reconstruction per modality (nats per cell, one draw from torch seed 0), module in eval mode."""
    import torch

    module, sums, n = model.module, {"rna": 0.0, "atac": 0.0}, 0
    module.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for batch in model._batches(store, None, 1024):
            output = module.loss(module.unpack(batch))
            sums["rna"] += float(output.extra_metrics["reconstruction_rna"]) * len(batch)
            sums["atac"] += float(output.extra_metrics["reconstruction_atac"]) * len(batch)
            n += len(batch)
    return {key: value / n for key, value in sums.items()}


def library_start_at_mean(model) -> float:
    """--library-start-at-mean (an experiment, not atlasvi's or scvi-tools' MULTIVI): the RNA library encoder's
    output bias set to the mean over the store's batches with RNA of their mean log library (the schema's
    library_log_means; the ATAC-only batch has 0 there). A fill, no draw: every other weight is the seed's. Returns
    the value."""
    import torch

    means = [m for m in model.store.schema.library_log_means if m > 0]
    start = sum(means) / len(means)
    with torch.no_grad():
        model.module.l_encoder_expression.output[0].bias.fill_(start)
    return start


def build_atlasvi(paths: dict[str, Path], seed: int):
    """atlasvi's untrained MULTIVI of `seed` on the training store."""
    from atlasvi.api import MULTIVI

    return MULTIVI(paths["train_store"], device="cpu", seed=seed)


def save_atlasvi_validation_cells(paths: dict[str, Path]) -> None:
    """The names of the cells atlasvi's training holds out for validation (the training store's last
    validation_fraction of rows, the same for every seed) to CACHE/atlasvi_validation_cells.npy (--same-split)."""
    import anndata as ad

    from atlasvi.data.sampler import split_rows
    from atlasvi.train import TrainConfig

    names = ad.read_zarr(paths["train_store"]).obs_names
    _, (start, stop) = split_rows(len(names), TrainConfig().validation_fraction)
    np.save(CACHE / "atlasvi_validation_cells.npy", np.asarray(names[start:stop], dtype=str))


def save_atlasvi_init(model, seed: int) -> None:
    """The model's weights to CACHE/atlasvi_init_SEED.npz (atomic), where --same-start's scvi-tools run reads them."""
    state = {k: v.cpu().numpy() for k, v in model.module.state_dict().items()}
    partial = CACHE / f"atlasvi_init_{seed}.partial.npz"
    np.savez(partial, **state)
    os.replace(partial, CACHE / f"atlasvi_init_{seed}.npz")


def atlasvi_side(
    paths: dict[str, Path],
    seed: int,
    fields: dict,
    library_start: bool = False,
    same_start: bool = False,
    train_seed_offset: int = 0,
) -> dict:
    """atlasvi's MULTIVI on the training store; the figures of one seed. same_start: its initial weights are
    written to CACHE/atlasvi_init_SEED.npz first (scvi-tools' run of the seed starts from them);
    train_seed_offset: the weights of `seed`, the training draws (minibatch order, dropout, latent samples) of
    seed + offset. With same_start its trained weights are saved too (CACHE/atlasvi_trained_SEED.npz), for the one
    held-out scorer of both tools (`scvi_score_both`) and benchmarks/multivi_cross_score.py."""
    import anndata as ad
    import torch

    from atlasvi.data import LoaderConfig
    from atlasvi.train import TrainConfig

    torch.set_num_threads(1)
    model = build_atlasvi(paths, seed)
    if library_start:
        library_start_at_mean(model)
    if same_start:
        save_atlasvi_init(model, seed)
    started = time.perf_counter()
    draws = seed + train_seed_offset
    model.fit(TrainConfig(seed=draws, **fields), LoaderConfig(batch_size=128, seed=draws))
    seconds = time.perf_counter() - started
    if same_start:
        np.savez(trained_weights("atlasvi", seed), **{k: v.cpu().numpy() for k, v in model.module.state_dict().items()})
    train_obs = ad.read_zarr(paths["train_store"]).obs
    held_obs = ad.read_zarr(paths["heldout_store"]).obs
    hidden = truth(paths)
    names = train_obs.index
    rna_only = np.flatnonzero(names.isin(hidden["atac_cells"]))
    atac_only = np.flatnonzero(names.isin(hidden["rna_cells"]))
    accessibility = np.concatenate(  # a block of rows at a time: every cell x 52,761 peaks would be ~0.5 GB
        [
            model.get_accessibility_estimates(rows=(start, min(start + 256, len(names))))[
                rna_only[(rna_only >= start) & (rna_only < start + 256)] - start
            ]
            for start in range(0, len(names), 256)
        ]
    )
    expression = model.get_normalized_expression()[atac_only]
    peaks = hidden["atac"][pd_index(hidden["atac_cells"]).get_indexer(names[rna_only])]
    counts = hidden["rna"][pd_index(hidden["rna_cells"]).get_indexer(names[atac_only])]
    latent = np.concatenate(
        [model.get_latent_representation(), model.get_latent_representation(store=paths["heldout_store"])]
    )
    labels = np.concatenate([train_obs[LABELS_KEY].astype(str), held_obs[LABELS_KEY].astype(str)])
    cells = np.concatenate([names, held_obs.index])
    return _row("atlasvi", seed, atlasvi_heldout(model, paths["heldout_store"]), accessibility, peaks, expression,
                counts, latent, labels, cells, len(model.history), seconds)  # fmt: skip


def pd_index(values):
    import pandas as pd

    return pd.Index(values)


def knn_by_name(latent: np.ndarray, labels: np.ndarray, cells: np.ndarray) -> float:
    """`knn_accuracy` with the cells sorted by name: both tools' latents in one order, so the same CV folds."""
    order = np.argsort(np.asarray(cells, dtype=str), kind="stable")
    return knn_accuracy(latent[order], labels[order])


def atlasvi_trained_knn(paths: dict[str, Path], seed: int) -> float:
    """`knn_by_name` of atlasvi's trained model of `seed` (CACHE/atlasvi_trained_SEED.npz): the latent of every
    training and held-out cell, as `atlasvi_side` computes it."""
    import anndata as ad
    import torch

    torch.set_num_threads(1)
    model = build_atlasvi(paths, seed)
    weights = np.load(trained_weights("atlasvi", seed))
    model.module.load_state_dict({k: torch.from_numpy(weights[k]) for k in weights.files})
    model.module.eval()
    train_obs, held_obs = ad.read_zarr(paths["train_store"]).obs, ad.read_zarr(paths["heldout_store"]).obs
    latent = np.concatenate(
        [model.get_latent_representation(), model.get_latent_representation(store=paths["heldout_store"])]
    )
    labels = np.concatenate([train_obs[LABELS_KEY].astype(str), held_obs[LABELS_KEY].astype(str)])
    return knn_by_name(latent, labels, np.concatenate([train_obs.index, held_obs.index]))


def scvi_trained_knn(paths: dict[str, str], seed: int) -> float:
    """(scvi-tools venv) `knn_by_name` of scvi-tools' trained model of `seed` (CACHE/scvi_trained_SEED.npz): the
    latent of every training and held-out cell, as `scvi_side` computes it."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, held = _scvi_mudata(paths)
        model = _scvi_trained(train, "scvi-tools", seed)
        latent = np.concatenate([model.get_latent_representation(train), model.get_latent_representation(held)])
    labels = np.concatenate([train["rna"].obs[LABELS_KEY].astype(str), held["rna"].obs[LABELS_KEY].astype(str)])
    return knn_by_name(latent, labels, np.concatenate([train.obs_names, held.obs_names]))


def _row(tool, seed, heldout, accessibility, peaks, expression, counts, latent, labels, cells, epochs, seconds) -> dict:
    """One seed's figures. The kNN accuracy reads the latent in one cell order for both tools (sorted by cell name:
    atlasvi's store permutes its rows), so both tools' 5-fold CV scores the same folds."""
    overall, per_cell = auroc(accessibility, peaks)
    per_gene, per_cell_r = expression_correlation(expression, counts)
    return {
        "tool": tool,
        "seed": seed,
        "heldout_reconstruction_rna": heldout["rna"],
        "heldout_reconstruction_atac": heldout["atac"],
        "accessibility_auroc": overall,
        "accessibility_auroc_per_cell": per_cell,
        "expression_r_per_gene": per_gene,
        "expression_r_per_cell": per_cell_r,
        "knn_accuracy": knn_by_name(latent, labels, cells),
        "epochs": epochs,
        "train_seconds": seconds,
    }


# --------------------------------------------------------------------------------------------- scvi-tools
def _scvi_mudata(paths: dict[str, str]) -> tuple:
    """(scvi-tools venv) scvi-tools quiet on one thread, and the (train, held-out) MuData, train registered with
    MULTIVI.setup_mudata."""
    import logging

    import scvi

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    train, held = _mudata(paths["train"]), _mudata(paths["heldout"])
    held.obs["_indices"] = np.arange(held.n_obs)  # setup_mudata adds it to the data it registers only
    modalities = {"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"}
    scvi.model.MULTIVI.setup_mudata(train, batch_key=BATCH_KEY, modalities=modalities)
    return train, held


def _scvi_trained(train, tool: str, seed: int):
    """(scvi-tools venv) scvi-tools' MULTIVI on `train` holding `tool`'s trained weights of `seed` (atlasvi's mapped
    by `load_atlasvi_weights`), in eval mode."""
    import scvi
    import torch

    model = scvi.model.MULTIVI(train)
    weights = np.load(trained_weights(tool, seed))
    if tool == "atlasvi":
        load_atlasvi_weights(model, weights)
    else:
        model.module.load_state_dict({k: torch.from_numpy(weights[k]) for k in weights.files})
    model.is_trained_ = True
    model.module.eval()
    return model


def _mudata(path: str):
    import anndata as ad
    import mudata as md

    adata = ad.read_h5ad(path)
    atac = ad.AnnData(adata.obsm[ATAC_KEY], obs=adata.obs[[]].copy())
    atac.var_names = adata.uns[f"{ATAC_KEY}_names"]
    rna = ad.AnnData(adata.X, obs=adata.obs.copy(), var=adata.var)
    return md.MuData({"rna": rna, "atac": atac})


def start_from_atlasvi(model, seed: int) -> None:
    """scvi-tools' MULTIVI `model` (untrained) takes atlasvi's initial weights of `seed` (CACHE/atlasvi_init_SEED.npz):
    its module's (names mapped; the protein modules keep their draw, the third modality weight its 1) and, through
    the training plan MULTIVI.train builds, its adversarial classifier's. Every atlasvi weight is used."""
    import re

    import torch
    from scvi.train import AdversarialTrainingPlan

    weights = np.load(CACHE / f"atlasvi_init_{seed}.npz")
    used = load_atlasvi_weights(model, weights)

    def adversary(name: str) -> str:
        return "adversary." + re.sub(r"fc_layers\.Layer (\d+)", r"layers.\1", name)

    class Plan(AdversarialTrainingPlan):
        def __init__(self, module, **kwargs):
            super().__init__(module, **kwargs)
            classifier = self.adversarial_classifier.state_dict()
            self.adversarial_classifier.load_state_dict(
                {k: torch.from_numpy(weights[adversary(k)]) for k in classifier}
            )
            used.update(adversary(k) for k in classifier)
            unused = sorted(set(weights.files) - used)
            if unused:
                raise SystemExit(f"atlasvi weights not moved into scvi-tools: {unused}")

    model._training_plan_cls = Plan


def load_atlasvi_weights(model, weights) -> set[str]:
    """atlasvi's module weights (an npz of its state dict) into scvi-tools' MULTIVI `model` (names mapped as
    benchmarks/multivi_weights_check.py; the protein modules keep their draw, the third modality weight its 1).
    Returns the atlasvi names used."""
    import torch

    from benchmarks.multivi_weights_check import atlasvi_name

    used = {"mod_weights"}
    state = model.module.state_dict()
    for name in state:
        mine = atlasvi_name(name)
        if mine is not None:
            state[name] = torch.from_numpy(weights[mine])
            used.add(mine)
    state["mod_weights"][:2] = torch.from_numpy(weights["mod_weights"])
    model.module.load_state_dict(state)
    return used


def trained_weights(tool: str, seed: int) -> Path:
    """Where a --same-start run keeps `tool`'s trained module weights of `seed`."""
    return CACHE / f"{'atlasvi' if tool == 'atlasvi' else 'scvi'}_trained_{seed}.npz"


def scvi_score_both(paths: dict[str, str], seed: int) -> dict[str, dict[str, float]]:
    """(scvi-tools venv) The one held-out scorer: both tools' trained weights of `seed` in scvi-tools' MULTIVAE
    (atlasvi's mapped by `load_atlasvi_weights`), eval mode, scored by its get_reconstruction_error on the held-out
    cells, the mean over HELD_OUT_DRAWS draws of z under torch seeds 0..HELD_OUT_DRAWS - 1 (the same draws for both
    tools). Returns {tool: {"rna": nats per cell, "atac": BCE per cell}}."""
    import warnings

    import torch

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, held = _scvi_mudata(paths)
        for tool in ("atlasvi", "scvi-tools"):
            model = _scvi_trained(train, tool, seed)
            sums = {"rna": 0.0, "atac": 0.0}
            for draw in range(HELD_OUT_DRAWS):
                torch.manual_seed(draw)
                error = model.get_reconstruction_error(held)
                sums["rna"] += float(error["reconstruction_loss_expression"])
                sums["atac"] += float(error["reconstruction_loss_accessibility"])
            out[tool] = {key: value / HELD_OUT_DRAWS for key, value in sums.items()}
    return out


def scvi_side(
    paths: dict[str, str],
    seed: int,
    fields: dict,
    same_start: bool = False,
    train_seed_offset: int = 0,
    same_split: bool = False,
) -> dict:
    """scvi-tools' MULTIVI on the same cells (run in the scvi-tools venv); the figures of one seed. same_start: from
    atlasvi's initial weights of the seed (`start_from_atlasvi`); train_seed_offset (with same_start): its global
    seed, which draws its validation cells and training draws, is seed + offset; same_split: its validation cells
    (held out from training) are atlasvi's (CACHE/atlasvi_validation_cells.npy), so it trains on atlasvi's cells;
    with same_start its trained MULTIVAE weights are saved (CACHE/scvi_trained_SEED.npz), as atlasvi's."""
    import warnings

    import scvi
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, held = _scvi_mudata(paths)
        scvi.settings.seed = seed + train_seed_offset
        model = scvi.model.MULTIVI(train)
        if same_start:
            start_from_atlasvi(model, seed)
        split = {}
        if same_split:
            validation = train.obs_names.get_indexer(np.load(CACHE / "atlasvi_validation_cells.npy"))
            cells = np.setdiff1d(np.arange(train.n_obs), validation)
            split = {"datasplitter_kwargs": {"external_indexing": [cells, np.sort(validation), np.array([], int)]}}
        started = time.perf_counter()
        model.train(accelerator="cpu", devices=1, enable_progress_bar=False, **fields, **split)
        seconds = time.perf_counter() - started
        if same_start:
            trained = {k: v.cpu().numpy() for k, v in model.module.state_dict().items()}
            np.savez(trained_weights("scvi-tools", seed), **trained)
        torch.manual_seed(0)
        error = model.get_reconstruction_error(held)
        hidden = truth(paths)
        names = train.obs_names
        rna_only = np.flatnonzero(names.isin(hidden["atac_cells"]))
        atac_only = np.flatnonzero(names.isin(hidden["rna_cells"]))
        accessibility = model.get_normalized_accessibility(train, indices=rna_only, return_numpy=True)
        expression = model.get_normalized_expression(train, indices=atac_only, return_numpy=True)
        latent = np.concatenate([model.get_latent_representation(train), model.get_latent_representation(held)])
    peaks = hidden["atac"][pd_index(hidden["atac_cells"]).get_indexer(names[rna_only])]
    counts = hidden["rna"][pd_index(hidden["rna_cells"]).get_indexer(names[atac_only])]
    labels = np.concatenate([train["rna"].obs[LABELS_KEY].astype(str), held["rna"].obs[LABELS_KEY].astype(str)])
    heldout = {
        "rna": float(error["reconstruction_loss_expression"]),
        "atac": float(error["reconstruction_loss_accessibility"]),
    }
    cells = np.concatenate([names, held.obs_names])
    row = _row("scvi-tools", seed, heldout, np.asarray(accessibility), peaks, np.asarray(expression), counts,
               latent, labels, cells, int(model.history["elbo_train"].shape[0]), seconds)  # fmt: skip
    return row | {"versions": {"scvi-tools": scvi.__version__, "torch": torch.__version__}}


# --------------------------------------------------------------------------------------------- report
METRICS = (
    ("heldout_reconstruction_rna", 1, "held-out -log p(RNA)"),
    ("heldout_reconstruction_atac", 1, "held-out ATAC BCE"),
    ("accessibility_auroc", 4, "accessibility AUROC (RNA-only)"),
    ("accessibility_auroc_per_cell", 4, "per-cell AUROC"),
    ("expression_r_per_gene", 4, "expression r per gene (ATAC-only)"),
    ("expression_r_per_cell", 4, "per-cell r"),
    ("knn_accuracy", 3, "kNN treatment time"),
)


def markdown(rows: list[dict], meta: dict) -> str:
    """Every seed, then mean ± sd [min, max] per tool."""
    cells = meta["cells"]
    lines = [
        "# MultiVI fidelity: atlasvi vs scvi-tools 1.4.2 (sci-CAR A549, 2,641 cells, 1,185 genes + 52,761 peaks)",
        "",
        f"Command: `{meta['command']}`. Machine: {meta['machine']}.",
        "",
        f"Same cells for both tools: {cells['heldout']} held out (paired, never trained on); trained: "
        f"{cells['expression']} RNA-only (ATAC hidden), {cells['accessibility']} ATAC-only (RNA hidden), "
        f"{cells['paired']} paired; batch = the group. Each tool's MULTIVI defaults; training options over them: "
        f"{meta['train_fields'] or 'none'}"
        + (
            " (and atlasvi's RNA library encoder bias started at the store's mean log library: "
            "--library-start-at-mean, an experiment)"
            if meta.get("atlasvi_library_start_at_mean")
            else ""
        )
        + (
            ". Same start: scvi-tools trains from atlasvi's initial weights of the seed (its module's and its "
            "adversarial classifier's)"
            if meta.get("same_start")
            else ""
        )
        + (
            f"; the training draws (minibatch order, dropout, latent samples; scvi-tools' validation cells) of seed "
            f"+ {meta['train_seed_offset']}"
            if meta.get("train_seed_offset")
            else ""
        )
        + (
            "; scvi-tools holds out atlasvi's validation cells (--same-split), so both tools train on the same cells"
            if meta.get("same_split")
            else ""
        )
        + ". Held-out reconstruction: nats per held-out cell (lower is better)"
        + (f", {meta['heldout_scorer']}" if meta.get("heldout_scorer") else "")
        + ". "
        "AUROC: imputed accessibility of the RNA-only cells vs their hidden open peaks. r: imputed expression of the "
        "ATAC-only cells vs their hidden RNA (log1p of 1e4-normalised). kNN: "
        f"{KNN_NEIGHBOURS}-NN accuracy of treatment time, stratified {KNN_FOLDS}-fold CV, latent of every cell"
        + (" (both tools' latents sorted by cell name: the same folds)." if meta.get("knn_cell_order") else "."),
        "",
        "| tool | seed | epochs | " + " | ".join(label for _, _, label in METRICS) + " | train s |",
        "|---|---|---|" + "---|" * (len(METRICS) + 1),
    ]
    for r in sorted(rows, key=lambda r: (r["tool"], r["seed"])):
        values = " | ".join(f"{r[key]:.{digits}f}" for key, digits, _ in METRICS)
        lines.append(f"| {r['tool']} | {r['seed']} | {r['epochs']} | {values} | {r['train_seconds']:.0f} |")
    lines += ["", "| tool | " + " | ".join(label for _, _, label in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for tool in ("atlasvi", "scvi-tools"):
        if not any(r["tool"] == tool for r in rows):
            continue
        parts = []
        for key, digits, _ in METRICS:
            mean, sd, low, high = seed_summary(rows, tool, key)
            parts.append(f"{mean:.{digits}f} ± {sd:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]")
        lines.append(f"| {tool} | " + " | ".join(parts) + " |")
    if meta.get("same_start"):
        lines += ["", "Paired differences atlasvi - scvi-tools (same initial weights per seed):", ""]
        lines += ["| seed | " + " | ".join(label for _, _, label in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        diffs = paired_differences(rows)
        for seed, values in diffs["per_seed"].items():
            lines.append(f"| {seed} | " + " | ".join(f"{values[k]:+.{d}f}" for k, d, _ in METRICS) + " |")
        summary = diffs["summary"]
        lines.append(
            "| mean ± sd (n = "
            + str(len(diffs["per_seed"]))
            + ") | "
            + " | ".join(f"{summary[k]['mean']:+.{d}f} ± {summary[k]['sd']:.{d}f}" for k, d, _ in METRICS)
            + " |"
        )
        if len(diffs["per_seed"]) > 1:
            lines.append(
                "| s.e. (t = mean / s.e.) | "
                + " | ".join(
                    f"{summary[k]['se']:.{d}f} (t {summary[k]['t']:+.2f})" if summary[k]["t"] is not None else "-"
                    for k, d, _ in METRICS
                )
                + " |"
            )
            lines.append(
                "| 95% CI (t, n - 1 df) | "
                + " | ".join(f"[{summary[k]['ci95'][0]:+.{d}f}, {summary[k]['ci95'][1]:+.{d}f}]" for k, d, _ in METRICS)
                + " |"
            )
    own = [r for r in rows if "heldout_reconstruction_rna_own_one_draw" in r]
    if own:
        lines += [
            "",
            "Each tool's own held-out scorer (one z draw under torch seed 0: atlasvi's `atlasvi_heldout`, scvi-tools' "
            "get_reconstruction_error), the figure of earlier runs, and the one scorer's (above):",
            "",
            "| tool | seed | RNA own one draw | RNA one scorer | own - one scorer | ATAC own one draw | ATAC one "
            "scorer |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sorted(own, key=lambda r: (r["tool"], r["seed"])):
            rna, rna_own = r["heldout_reconstruction_rna"], r["heldout_reconstruction_rna_own_one_draw"]
            lines.append(
                f"| {r['tool']} | {r['seed']} | {rna_own:.3f} | {rna:.3f} | {rna_own - rna:+.3f} | "
                f"{r['heldout_reconstruction_atac_own_one_draw']:.3f} | {r['heldout_reconstruction_atac']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def paired_differences(rows: list[dict]) -> dict:
    """atlasvi - scvi-tools per metric for every seed both tools ran; mean, sd, standard error (sd / sqrt(n)), t
    (mean / se; None for fewer than 2 seeds or se 0) and the 95% confidence interval of the mean (Student t with
    n - 1 degrees of freedom; None for fewer than 2 seeds) over those seeds."""
    from scipy.stats import t as student_t

    by = {(r["tool"], r["seed"]): r for r in rows}
    seeds = sorted(s for tool, s in by if tool == "atlasvi" and ("scvi-tools", s) in by)
    per_seed = {s: {k: by["atlasvi", s][k] - by["scvi-tools", s][k] for k, _, _ in METRICS} for s in seeds}
    summary = {}
    for key, _, _ in METRICS:
        values = np.array([per_seed[s][key] for s in seeds])
        sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        mean = float(values.mean()) if len(values) else 0.0
        se = sd / np.sqrt(len(values)) if len(values) > 1 else None
        half = float(student_t.ppf(0.975, len(values) - 1)) * se if se is not None else None
        ci95 = [mean - half, mean + half] if half is not None else None
        summary[key] = {"mean": mean, "sd": sd, "se": se, "t": mean / se if se else None, "ci95": ci95}
    return {"per_seed": per_seed, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--n-epochs-kl-warmup", type=int, default=None)
    parser.add_argument("--scvi-only", action="store_true", help="run the scvi-tools side alone (merge with --merge)")
    parser.add_argument("--atlasvi-only", action="store_true", help="run atlasvi's side alone (merge with --merge)")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="results/MERGE.json files whose rows of the side not run to reuse",
    )
    parser.add_argument(
        "--side",
        choices=["scvi", "scvi-score", "scvi-knn"],
        default=None,
        help="internal: the scvi-tools half / held-out scorer / kNN of its trained weights",
    )
    parser.add_argument("--paths", default=None, help="internal: the JSON of the prepared files")
    parser.add_argument("--out", default="multivi_fidelity", help="results/OUT.json and results/OUT.md")
    parser.add_argument(
        "--library-start-at-mean",
        action="store_true",
        help="experiment: atlasvi's RNA library encoder bias starts at the store's mean log library",
    )
    parser.add_argument(
        "--same-start",
        action="store_true",
        help="paired design: scvi-tools trains from atlasvi's initial weights of each seed",
    )
    parser.add_argument(
        "--same-split",
        action="store_true",
        help="with --same-start: scvi-tools holds out atlasvi's validation cells, so both train on the same cells",
    )
    parser.add_argument(
        "--train-seed-offset",
        type=int,
        default=0,
        help="with --same-start: the initial weights of each seed, the training draws of seed + offset",
    )
    parser.add_argument(
        "--rescore",
        nargs="+",
        default=None,
        help="results/NAME.json of --same-start runs whose trained weights are in the cache: redo their held-out "
        "figures with the one scorer (scvi-tools', mean over HELD_OUT_DRAWS draws), and a run's kNN scored in each "
        "tool's own cell order in one order; rewrite NAME.json and .md",
    )
    args = parser.parse_args()
    fields = {key: value for key, value in vars(args).items() if key in TRAIN_FIELDS and value is not None}
    if args.side == "scvi-knn":
        (seed,) = args.seeds
        print(json.dumps(scvi_trained_knn(json.loads(args.paths), seed)), flush=True)
        return
    if args.side == "scvi-score":
        (seed,) = args.seeds
        print(json.dumps(scvi_score_both(json.loads(args.paths), seed)), flush=True)
        return
    if args.side == "scvi":
        paths = json.loads(args.paths)
        for seed in args.seeds:
            row = scvi_side(paths, seed, fields, args.same_start, args.train_seed_offset, args.same_split)
            print(json.dumps(row), flush=True)
        return
    if args.train_seed_offset and not args.same_start:
        raise SystemExit("--train-seed-offset needs --same-start (scvi-tools' initial weights follow its seed)")
    if args.same_split and not args.same_start:
        raise SystemExit("--same-split needs --same-start")
    if args.same_start and (args.atlasvi_only or args.library_start_at_mean):
        raise SystemExit("--same-start: not with --atlasvi-only or --library-start-at-mean")
    if args.same_start and args.scvi_only and not args.merge:
        raise SystemExit("--same-start --scvi-only reuses atlasvi's rows of the seeds: name them with --merge")
    paths = prepare()
    if args.rescore:
        rescore(args.rescore, paths)
        return
    if args.same_split:
        save_atlasvi_validation_cells(paths)
    earlier = []
    for name in args.merge or []:
        report = json.loads((HERE / "results" / f"{name}.json").read_text())
        if report["meta"]["train_fields"] != fields:
            raise SystemExit(f"results/{name}.json was run with {report['meta']['train_fields']}, not {fields}")
        earlier.append((report["rows"], bool(report["meta"].get("same_start"))))
    reused = "scvi-tools" if args.atlasvi_only else "atlasvi"
    rows = merged_rows(earlier, args.seeds, reused, args.same_start)
    if args.same_start and not args.scvi_only:  # both tools run these seeds now: no earlier row of them
        rows = [r for r in rows if r["seed"] not in args.seeds]
    if args.same_start and args.scvi_only:
        missing = [s for s in args.seeds if not any(r["tool"] == "atlasvi" and r["seed"] == s for r in rows)]
        if missing:
            raise SystemExit(f"--merge {' '.join(args.merge)} has no atlasvi row of seeds {missing}")
    meta = {
        "command": " ".join(["python", "benchmarks/multivi_fidelity.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared, under load), CPU only, 1 torch thread",
        "train_fields": fields,
        "atlasvi_library_start_at_mean": args.library_start_at_mean,
        "same_start": args.same_start,
        "same_split": args.same_split,
        "train_seed_offset": args.train_seed_offset,
        "load_average_at_start": list(os.getloadavg()),
        "started_utc": utc_now(),
        "code_commit": code_commit(),
        "cells": {name: len(part) for name, part in split(2641).items()},
        "knn_cell_order": "cell name",  # earlier runs: each tool's own order (other CV folds per tool)
    }
    if args.same_start:
        meta["heldout_scorer"] = HELD_OUT_SCORER
    results = HERE / "results"
    for seed in args.seeds:  # seed by seed, atlasvi then scvi-tools (a subprocess), the results written after each row
        sides = ([] if args.scvi_only else ["atlasvi"]) + ([] if args.atlasvi_only else ["scvi-tools"])
        for side in sides:
            row = (
                atlasvi_side(
                    paths,
                    seed,
                    fields,
                    args.library_start_at_mean,
                    args.same_start,
                    args.train_seed_offset,
                )  # fmt: skip
                if side == "atlasvi"
                else None
            )
            lines = [json.dumps(row)] if row is not None else []
            if not lines and args.same_start and args.scvi_only:
                save_atlasvi_init(build_atlasvi(paths, seed), seed)  # its run is the merged row: deterministic
            scvi = (seed, fields, paths, args.same_start, args.train_seed_offset, args.same_split)
            for line in lines or _scvi_rows(*scvi):
                rows.append(
                    json.loads(line) | {"load_average_at_end": list(os.getloadavg()), "finished_utc": utc_now()}
                )
                print(line, flush=True)
            if args.same_start and side == sides[-1]:
                rows = one_scorer(rows, seed, paths)
            write_results(results / args.out, meta, rows)
    print(markdown(rows, meta))


def utc_now() -> str:
    """The wall-clock time in UTC, to the second (a run's start, each row's end)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def code_commit() -> str | None:
    """The commit of the code this run uses (`git describe --always --dirty --abbrev=40`: the full hash, "-dirty" when
    tracked files differ from it); None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=HERE, capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def write_results(out: Path, meta: dict, rows: list[dict]) -> None:
    """OUT.json (meta, rows, with --same-start the paired differences) and OUT.md."""
    payload = {"meta": meta, "rows": rows}
    if meta.get("same_start"):
        payload["paired_differences"] = paired_differences(rows)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, meta))


def one_scorer(rows: list[dict], seed: int, paths: dict[str, Path]) -> list[dict]:
    """The rows with both tools' held-out figures of `seed` from one scorer (`scvi_score_both`, a subprocess in the
    scvi-tools venv); each tool's own one-draw figures move to *_own_one_draw. SystemExit with one line when a
    tool's trained weights of the seed are not in the cache."""
    missing = [str(trained_weights(tool, seed)) for tool in ("atlasvi", "scvi-tools")]
    missing = [m for m in missing if not Path(m).exists()]
    if missing:
        raise SystemExit(f"the one held-out scorer needs both tools' trained weights of seed {seed}: no {missing}")
    stdout = _scvi_subprocess("scvi-score", paths, seed, "the scvi-tools held-out scorer")
    scores = json.loads(next(line for line in stdout.splitlines() if line.startswith('{"atlasvi"')))
    return with_scores(rows, seed, scores)


def with_scores(rows: list[dict], seed: int, scores: dict[str, dict[str, float]]) -> list[dict]:
    """The rows with `seed`'s held-out figures from `scores` ({tool: {"rna", "atac"}}); the figures they replace
    move to *_own_one_draw (kept there when a row was scored before)."""
    out = []
    for row in rows:
        if row["seed"] == seed:
            own = {f"{key}_own_one_draw": row.get(f"{key}_own_one_draw", row[key]) for key in HELD_OUT_KEYS.values()}
            row = row | own | {key: scores[row["tool"]][modality] for modality, key in HELD_OUT_KEYS.items()}
        out.append(row)
    return out


def rescore(names: list[str], paths: dict[str, Path]) -> None:
    """--rescore: the one scorer on every seed of results/NAME.json (a --same-start run whose trained weights are in
    the cache); NAME.json and .md rewritten, the scorer named in the meta."""
    for name in names:
        path = HERE / "results" / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"no results/{name}.json")
        report = json.loads(path.read_text())
        if not report["meta"].get("same_start"):
            raise SystemExit(f"results/{name}.json is not a --same-start run: no trained weights of both tools")
        rows, meta = report["rows"], report["meta"] | {"rescored": f"--rescore {name}"}
        for seed in sorted({r["seed"] for r in rows}):
            rows = one_scorer(rows, seed, paths)
            if not report["meta"].get("knn_cell_order"):  # a run that scored kNN in each tool's own order
                rows = with_knn_by_name(rows, seed, paths)
        meta |= {"heldout_scorer": HELD_OUT_SCORER, "knn_cell_order": "cell name"}
        write_results(HERE / "results" / name, meta, rows)


def _scvi_subprocess(side: str, paths: dict[str, Path], seed: int, what: str) -> str:
    """The stdout of this script's `--side SIDE` for `seed` in the scvi-tools venv (one thread); SystemExit naming
    `what` when it fails."""
    prepared = json.dumps({k: str(v) for k, v in paths.items()})
    command = [str(SCVI_PYTHON), __file__, "--side", side, "--paths", prepared, "--seeds", str(seed)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed (exit {done.returncode})")
    return done.stdout


def with_knn_by_name(rows: list[dict], seed: int, paths: dict[str, Path]) -> list[dict]:
    """The rows with `seed`'s kNN accuracy recomputed from the trained weights with both latents in one cell order
    (`knn_by_name`; scvi-tools' in a subprocess in its venv); the own-order figure kept as knn_accuracy_own_order."""
    stdout = _scvi_subprocess("scvi-knn", paths, seed, "the scvi-tools kNN rescoring")
    knn = {
        "scvi-tools": json.loads(stdout.strip().splitlines()[-1]),
        "atlasvi": atlasvi_trained_knn(paths, seed),
    }
    return [
        r | {"knn_accuracy_own_order": r["knn_accuracy"], "knn_accuracy": knn[r["tool"]]} if r["seed"] == seed else r
        for r in rows
    ]


def merged_rows(files: list[tuple[list[dict], bool]], seeds: list[int], reused: str, same_start: bool) -> list[dict]:
    """The rows --merge reuses, from each file's (rows, whether it was a --same-start run) in turn (the first naming
    a (tool, seed) wins): the `reused` tool's; with same_start, the pairs (both tools' rows) of the seeds not run now
    from --same-start files, and atlasvi's rows of the seeds run from any."""
    rows: list[dict] = []
    for earlier, paired_file in files:
        have = {(r["tool"], r["seed"]) for r in rows}
        paired = {r["seed"] for r in earlier if r["tool"] == "atlasvi"} & {
            r["seed"] for r in earlier if r["tool"] == "scvi-tools"
        }
        paired = paired if paired_file else set()
        for r in earlier:
            if same_start:
                keep = r["tool"] == "atlasvi" if r["seed"] in seeds else r["seed"] in paired
            else:
                keep = r["tool"] == reused
            if keep and (r["tool"], r["seed"]) not in have:
                rows.append(r)
    return rows


def _scvi_rows(
    seed: int,
    fields: dict,
    paths: dict[str, Path],
    same_start: bool = False,
    train_seed_offset: int = 0,
    same_split: bool = False,
) -> list[str]:
    """The scvi-tools side's JSON lines for one seed, run in its venv after atlasvi's runs."""
    prepared = json.dumps({k: str(v) for k, v in paths.items()})
    command = [str(SCVI_PYTHON), __file__, "--side", "scvi", "--paths", prepared, "--seeds", str(seed)]
    command += ["--same-start", "--train-seed-offset", str(train_seed_offset)] if same_start else []
    command += ["--same-split"] if same_split else []
    for key, value in fields.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    scvi = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, check=False)
    if scvi.returncode != 0:
        raise SystemExit(f"the scvi-tools side failed (exit {scvi.returncode})")
    return [line for line in scvi.stdout.splitlines() if line.startswith('{"tool"')]


if __name__ == "__main__":
    main()
