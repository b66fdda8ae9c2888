"""sysVI side by side with scvi-tools 1.4.2's SysVI, and both against scVI on the same data: system mixing and
label conservation of the latent.

    .venv/bin/python benchmarks/sysvi_fidelity.py --datasets baron cellbench --seeds 0 1 2 --epochs 400 \
        --scvi-python /path/to/scvi-venv/bin/python
    .venv/bin/python benchmarks/sysvi_fidelity.py --datasets baron --seeds 0 1 2 --epochs 400 --own-cycle \
        --weights-epochs 20 --cycle-weights 2 10 --scvi-python /path/to/scvi-venv/bin/python

400 epochs is scvi-tools' default for both datasets (min(round(20000 / n_cells * 400), 400)). Each run
replaces its datasets' entries in results/<name>.json (`--name`, default sysvi_fidelity) and keeps the others.
Per dataset and seed, on the same store, cells and split: atlasvi's sysVI, scvi-tools' SysVI, atlasvi's scVI and
scvi-tools' SCVI, in that order, one process at a time (scvi-tools' in its venv as a subprocess, each on one torch
thread); every latent is scored by the same code. Each run's latent is kept in the workdir
(latents/<dataset>_e<epochs>_<run>.npz, with its seconds and the load average at its end) and not trained again:
an interrupted run resumes, and a changed metric re-scores without training (delete the workdir to retrain).
`--side atlasvi --runs model:weight ...` trains only those atlasvi runs into the workdir (e.g. a committed seed
again, to check that it reproduces); `--tools atlasvi` trains and scores atlasvi's runs only, `--models scvi` the
scVI runs only. Each scVI run also keeps its held-out -ELBO at the last epoch, its own tool's figure per cell on its
own held-out cells (atlasvi's 33, the same for every seed; scvi-tools' 32, drawn per seed: it validates once, after
the last epoch, which leaves its training stream as it was).
`--own-cycle` also trains atlasvi's sysVI with scvi-tools' cycle (cycle_input "own_system"); `--cycle-weights`
trains atlasvi's sysVI at each z_distance_cycle_weight (2, scvi-tools' default, has no suffix; scvi-tools' SysVI
runs at its default only, to keep the runs few on the shared machine).
Weights check (`--weights-epochs N`): scvi-tools' SysVI trained N epochs, its weights loaded into atlasvi's
module; on every cell, in eval mode, with the same draws, the latent, reconstruction, KL and both cycle
variants are compared.

Datasets (system = the store's batch key): Baron 2016 pancreas human + mouse (CIDER subset, 328 cells,
system `species`, labels `cell_type`) and CellBench sc_mixology CEL-seq2 vs Drop-seq (demuxlet singlets,
system `technology`, labels `cell_line`). Each is built into an atlas store with 2000 Seurat v3 HVGs
(system-aware); both tools read that store's counts: atlasvi's module log-normalises each cell
(normalize_total 1e4 over the store's genes, log1p), scvi-tools' SysVI gets the same values made by scanpy
(`normalize_total(target_sum=1e4)`, `log1p`) as its X, and both scVIs the counts. sysVI in both tools:
scvi-tools' SysVI defaults (n_latent 15, n_hidden 256, 2 layers, VampPrior with 5 pseudo-inputs, cycle weight
2, no KL warm-up, Adam lr 1e-3, weight decay 1e-6, eps 0.01, batch size 128, 10% of the cells held out). scVI in
both tools: its defaults (n_latent 10, n_hidden 128, 1 layer, ZINB, KL warm-up over 400 epochs, Adam lr 1e-3,
weight decay 1e-6, eps 0.01), batch size 128, 10% held out. The same number of epochs for every model.

Metrics of each latent (computed in the scvi-tools environment, which has scib-metrics): iLISI (scib-metrics
`ilisi_knn`, 90 neighbours with the cell itself, as scib's Benchmarker; scaled to [0, 1]), batch-neighbour
entropy (entropy of the systems among each cell's 50 nearest other cells over log n_systems, mean over cells;
1 = perfectly mixed), label kNN accuracy (15 neighbours, 5-fold stratified cross-validation) and NMI of
k-means clusters (k = the number of labels, 10 starts) with the labels. The same metrics of the unintegrated
data (the first 15 principal components of the log-normalised counts, scanpy's PCA) show how strong the system
effect is. Output: results/<name>.json and .md.
"""

import argparse
import json
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
DATASETS = {
    # file, system key, labels key, obs filters
    "baron": ("baron2016_pancreas_human_mouse_subset350_cider.h5ad", "species", "cell_type", {}),
    "cellbench": ("cellbench_sc_mixology_3tech.h5ad", "technology", "cell_line", {"demuxlet_cls": "SNG"}),
}
N_TOP_GENES = 2000
TARGET_SUM = 1e4
DEFAULT_CYCLE_WEIGHT = 2.0  # scvi-tools 1.4.2's z_distance_cycle_weight
UNINTEGRATED = "unintegrated"  # the scores' key of the PCA of the log-normalised counts


def prepare(name: str, workdir: Path) -> tuple[Path, Path]:
    """(atlas store, h5ad of the store's counts with the system and labels) of a dataset."""
    import anndata as ad

    from atlasvi.data import BuildConfig, build_store

    file, system_key, labels_key, filters = DATASETS[name]
    store, h5ad = workdir / f"{name}.zarr", workdir / f"{name}_store.h5ad"
    if not store.exists():
        adata = ad.read_h5ad(SHARED / file)
        for key, value in filters.items():
            adata = adata[adata.obs[key].astype(str) == value].copy()
        adata.obs = adata.obs[[system_key, labels_key]]
        adata.write_h5ad(workdir / f"{name}_input.h5ad")
        config = BuildConfig(
            inputs=[str(workdir / f"{name}_input.h5ad")], output=str(store), batch_key=system_key,
            labels_key=labels_key, n_top_genes=N_TOP_GENES,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_store(config)
    if not h5ad.exists():
        adata = ad.read_zarr(store)
        adata = ad.AnnData(adata.X, obs=adata.obs[[system_key, labels_key]].copy(), var=adata.var[[]].copy())
        adata.write_h5ad(h5ad)
    return store, h5ad


def run_key(tool: str, model: str, seed: int, cycle_weight: float = DEFAULT_CYCLE_WEIGHT) -> str:
    """The name of one trained latent: "<tool>_<model>[-cw<weight>]_s<seed>" (sysVI at the default cycle weight
    has no suffix)."""
    suffix = f"-cw{cycle_weight:g}" if model.startswith("sysvi") and cycle_weight != DEFAULT_CYCLE_WEIGHT else ""
    return f"{tool}_{model}{suffix}_s{seed}"


def cached(workdir: Path, name: str, epochs: int, key: str) -> Path:
    """Where one run's latent and seconds are kept (a finished run is not trained again)."""
    return workdir / "latents" / f"{name}_e{epochs}_{key}.npz"


def atlasvi_side(name: str, store: Path, seeds: list[int], epochs: int, runs: list[tuple[str, float]],
                 workdir: Path) -> None:  # fmt: skip
    """atlasvi's runs, one after another: per seed, each (model, cycle weight) of `runs`, model "sysvi" (the
    paper's cycle, the default), "sysvi-own" (scvi-tools 1.4.2's cycle, cycle_input="own_system") or "scvi"
    (SCVI with its defaults, KL warm-up over 400 epochs as scvi-tools); latents in store row order."""
    import torch

    from atlasvi.api import SCVI, SysVI
    from atlasvi.data import LoaderConfig
    from atlasvi.models.scvi import SCVIConfig
    from atlasvi.models.sysvi import SysVIConfig
    from atlasvi.train import TrainConfig

    torch.set_num_threads(1)
    for seed in seeds:
        loader = LoaderConfig(batch_size=128, seed=seed)
        for model_name, weight in runs:
            out = cached(workdir, name, epochs, run_key("atlasvi", model_name, seed, weight))
            if out.exists():
                continue
            started = time.perf_counter()
            if model_name == "scvi":
                model = SCVI(store, SCVIConfig(), device="cpu", seed=seed)
                train = TrainConfig(max_epochs=epochs, seed=seed)
            else:
                cycle = "own_system" if model_name == "sysvi-own" else "cross_system"
                config = SysVIConfig(cycle_input=cycle, z_distance_cycle_weight=weight)
                model = SysVI(store, config, device="cpu", seed=seed)
                train = TrainConfig(max_epochs=epochs, n_epochs_kl_warmup=0, seed=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                history = model.fit(train, loader)
            latent, seconds = model.get_latent_representation(), time.perf_counter() - started
            np.savez(
                out, latent=latent, seconds=seconds, load=np.array(os.getloadavg()),
                heldout_neg_elbo=history[-1].validation_elbo,
            )  # fmt: skip
            print(json.dumps({"dataset": name, "run": out.stem, "seconds": round(seconds, 1)}), flush=True)


def scvi_side(name: str, h5ad: Path, seeds: list[int], epochs: int, runs: list[tuple[str, float]],
              workdir: Path) -> None:  # fmt: skip
    """scvi-tools' runs, one after another: per seed, each (model, cycle weight) of `runs`, "sysvi" (SysVI on the
    store's counts log-normalised by scanpy) or "scvi" (SCVI on the counts, its defaults)."""
    import anndata as ad
    import scanpy as sc
    import scvi
    import torch

    torch.set_num_threads(1)
    scvi.settings.dl_num_workers = 0
    _, system_key, _, _ = DATASETS[name]
    counts = ad.read_h5ad(h5ad)
    counts.X = counts.X.astype(np.float32)
    lognorm = counts.copy()
    sc.pp.normalize_total(lognorm, target_sum=TARGET_SUM)
    sc.pp.log1p(lognorm)
    for seed in seeds:
        for model_name, weight in runs:
            out = cached(workdir, name, epochs, run_key("scvi-tools", model_name, seed, weight))
            if out.exists():
                continue
            scvi.settings.seed = seed
            started = time.perf_counter()
            if model_name == "scvi":
                adata = counts.copy()
                scvi.model.SCVI.setup_anndata(adata, batch_key=system_key)
                model, plan = scvi.model.SCVI(adata), {}
            else:
                adata = lognorm.copy()
                scvi.external.SysVI.setup_anndata(adata, batch_key=system_key)
                model, plan = scvi.external.SysVI(adata), {"z_distance_cycle_weight": weight}
            model.train(
                max_epochs=epochs, batch_size=128, train_size=0.9, accelerator="cpu", enable_progress_bar=False,
                plan_kwargs=plan, check_val_every_n_epoch=epochs,
            )  # fmt: skip
            latent, seconds = model.get_latent_representation(adata), time.perf_counter() - started
            elbo = float(model.history["elbo_validation"].iloc[-1, 0])
            np.savez(
                out, latent=latent, seconds=seconds, load=np.array(os.getloadavg()), version=scvi.__version__,
                heldout_neg_elbo=elbo,
            )  # fmt: skip
            print(json.dumps({"dataset": name, "run": out.stem, "seconds": round(seconds, 1)}), flush=True)


def scvi_weights_side(name: str, h5ad: Path, epochs: int, out: Path) -> None:
    """scvi-tools' SysVI after `epochs` epochs (seed 0): its weights and, in eval mode on every cell, with one
    saved draw of z and of the other system per cell, its latent means, reconstruction, KL and both cycle
    distances (own-system decoding re-encoded as scvi-tools does, cross-system decoding as the paper)."""
    import anndata as ad
    import scanpy as sc
    import scvi
    import torch

    torch.set_num_threads(1)
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = 0
    _, system_key, _, _ = DATASETS[name]
    adata = ad.read_h5ad(h5ad)
    adata.X = adata.X.astype(np.float32)
    sc.pp.normalize_total(adata, target_sum=TARGET_SUM)
    sc.pp.log1p(adata)
    scvi.external.SysVI.setup_anndata(adata, batch_key=system_key)
    model = scvi.external.SysVI(adata)
    model.train(max_epochs=epochs, batch_size=128, accelerator="cpu", enable_progress_bar=False)
    module = model.module.eval()
    x = torch.tensor(np.asarray(adata.X.todense() if hasattr(adata.X, "todense") else adata.X))
    batch = torch.tensor(adata.obs[system_key].cat.codes.to_numpy()).long().view(-1, 1)
    with torch.no_grad():
        qz = module.encoder(x, batch_index=batch, cat_list=[])["q_dist"]
        eps = torch.randn_like(qz.loc)
        z = qz.loc + qz.scale * eps
        px = module.decoder(z, batch_index=batch, cat_list=[])["q_dist"]
        reconstruction = torch.nn.GaussianNLLLoss(reduction="none")(px.loc, x, px.scale).sum(1)
        kl = module.prior.kl(qz=qz, z=z)
        other = module.random_select_batch(batch)
        own = module.encoder(px.loc, batch_index=other, cat_list=[])["q_dist"]
        cross_px = module.decoder(z, batch_index=other, cat_list=[])["q_dist"]
        cross = module.encoder(cross_px.loc, batch_index=other, cat_list=[])["q_dist"]
        cycle_own = module.latent_cycle_consistency(qz, own)
        cycle_cross = module.latent_cycle_consistency(qz, cross)
    weights = {f"weight:{k}": v.numpy() for k, v in module.state_dict().items() if not k.startswith("prior.encoder")}
    np.savez(
        out, x=x.numpy(), batch=batch.numpy().ravel(), eps=eps.numpy(), other=other.numpy().ravel(),
        qz_mean=qz.loc.numpy(), qz_scale=qz.scale.numpy(), reconstruction=reconstruction.numpy(), kl=kl.numpy(),
        cycle_own=cycle_own.numpy(), cycle_cross=cycle_cross.numpy(),
        categories=np.asarray(adata.obs[system_key].cat.categories, dtype=str), **weights,
    )  # fmt: skip


RENAMES = {  # scvi-tools' SysVAE parameter names -> atlasvi's SysVIModule's
    "decoder_y.fc_layers.Layer ": "fc.layers.",
    "mean_encoder": "mean",
    "var_encoder.encoder": "var",
    "var_encoder.var_param": "var_param",
}


def atlasvi_name(key: str) -> str:
    """atlasvi's name of a scvi-tools SysVAE parameter or buffer (not the VampPrior's pseudo-inputs)."""
    if key == "prior.u":
        return "pseudo_x"
    if key == "prior.w":
        return "prior_logits"
    for old, new in RENAMES.items():
        key = key.replace(old, new)
    return key


def atlasvi_state(saved: "np.lib.npyio.NpzFile | dict[str, np.ndarray]", prefix: str = "weight:") -> dict:
    """atlasvi's SysVIModule state dict from scvi-tools' SysVAE weights saved as "<prefix><name>" arrays (the
    VampPrior's one-hot category weights become the pseudo-inputs' codes)."""
    import torch

    keys = saved.files if hasattr(saved, "files") else list(saved)
    state = {}
    for key in keys:
        if not key.startswith(prefix) or key.startswith(f"{prefix}prior.u_cat."):
            continue
        value, name = torch.tensor(saved[key]), atlasvi_name(key.removeprefix(prefix))
        state[name] = value.flatten() if name == "prior_logits" else value
    state["pseudo_codes"] = torch.tensor(saved[f"{prefix}prior.u_cat.0"]).argmax(-1).view(1, -1)
    state["pseudo_initialised"] = torch.tensor(True)
    return state


def weights_check(name: str, store: Path, h5ad: Path, scvi_python: str, workdir: Path, epochs: int) -> dict:
    """scvi-tools' trained SysVI weights in atlasvi's module (names mapped): the largest differences from
    scvi-tools' own outputs on the same cells and draws (see `scvi_weights_side`). The reconstruction is
    compared less 0.5 log(2 pi) per gene, which scvi-tools' GaussianNLLLoss leaves out."""
    import math

    import torch

    from atlasvi.data import open_store
    from atlasvi.models.sysvi import SysVIConfig, SysVIModule
    from atlasvi.models.sysvi.module import SysVIInputs

    out = workdir / f"{name}_scvi_weights.npz"
    me = [scvi_python, str(Path(__file__).resolve())]
    command = [*me, "--side", "scvi-weights", "--datasets", name, "--h5ad", str(h5ad), "--epochs", str(epochs)]
    subprocess.run([*command, "--out", str(out)], check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    saved = np.load(out)
    module = SysVIModule(open_store(store).schema, SysVIConfig())
    if list(saved["categories"]) != list(module.schema.categorical[module.system_key]):
        raise SystemExit("scvi-tools' system categories differ from the store's")
    module.load_state_dict(atlasvi_state(saved), strict=True)
    module.eval()
    x, system = torch.tensor(saved["x"]), torch.tensor(saved["batch"])
    other = torch.tensor(saved["other"])
    inputs = SysVIInputs(x=x, system=system, categorical=(), continuous=None)
    with torch.no_grad():
        qz = module.inference(inputs)["qz"]
        z = qz.loc + qz.scale * torch.tensor(saved["eps"])
        px = module.generative(z, inputs)["px"]
        nll = torch.nn.functional.gaussian_nll_loss(px.loc, x, px.scale, full=True, reduction="none").sum(-1)
        reconstruction = nll - 0.5 * math.log(2 * math.pi) * x.shape[1]
        kl = (qz.log_prob(z) - module.prior_log_prob(z)).sum(-1)
        cycle_own = module.cycle_distance(qz, module._encode(px.loc, other, inputs))
        cross = module.generative(z, inputs, other)["px"].loc
        cycle_cross = module.cycle_distance(qz, module._encode(cross, other, inputs))

    def diff(ours: torch.Tensor, key: str) -> float:
        return float(np.abs(ours.numpy() - saved[key]).max())

    return {
        "epochs": epochs,
        "cells": len(x),
        "latent_mean_max_abs_diff": diff(qz.loc, "qz_mean"),
        "latent_scale_max_abs_diff": diff(qz.scale, "qz_scale"),
        "reconstruction_mean": float(reconstruction.mean()),
        "reconstruction_max_abs_diff": diff(reconstruction, "reconstruction"),
        "kl_mean": float(kl.mean()),
        "kl_max_abs_diff": diff(kl, "kl"),
        "cycle_own_system_mean": float(cycle_own.mean()),
        "cycle_own_system_max_abs_diff": diff(cycle_own, "cycle_own"),
        "cycle_cross_system_mean": float(cycle_cross.mean()),
        "cycle_cross_system_max_abs_diff": diff(cycle_cross, "cycle_cross"),
    }


def entropy_mixing(neighbours: np.ndarray, systems: np.ndarray) -> float:
    """Mean over cells of the entropy of the systems among its neighbours (n_cells, k), over log n_systems."""
    codes = np.unique(systems, return_inverse=True)[1]
    n = codes.max() + 1
    counts = np.stack([(codes[neighbours] == s).sum(axis=1) for s in range(n)], axis=1) / neighbours.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(counts > 0, counts * np.log(counts), 0.0), axis=1)
    return float(entropy.mean() / np.log(n))


def score(latent: np.ndarray, systems: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """iLISI, batch-neighbour entropy, label kNN accuracy and NMI of one latent (n_cells, n_latent)."""
    from scib_metrics import ilisi_knn
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

    distances, indices = NearestNeighbors(n_neighbors=90).fit(latent).kneighbors(latent)
    ilisi = float(ilisi_knn(NeighborsResults(indices=indices, distances=distances), systems))
    entropy = entropy_mixing(indices[:, 1:51], systems)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    knn = float(cross_val_score(KNeighborsClassifier(n_neighbors=15), latent, labels, cv=folds).mean())
    clusters = KMeans(n_clusters=len(np.unique(labels)), n_init=10, random_state=seed).fit_predict(latent)
    nmi = float(normalized_mutual_info_score(labels, clusters))
    return {"ilisi": ilisi, "batch_entropy": entropy, "knn_accuracy": knn, "nmi": nmi}


def score_side(name: str, h5ad: Path, latents: list[Path], out: Path) -> None:
    """Scores of every latent (npz files named by `cached`; run with the scvi-tools environment's Python)."""
    import anndata as ad

    _, system_key, labels_key, _ = DATASETS[name]
    obs = ad.read_h5ad(h5ad).obs
    systems, labels = obs[system_key].astype(str).to_numpy(), obs[labels_key].astype(str).to_numpy()
    scores = {}
    for path in latents:
        with np.load(path) as data:
            scores[path.stem.split("_", 2)[2]] = score(np.asarray(data["latent"], dtype=np.float32), systems, labels)
    scores[UNINTEGRATED] = score(unintegrated(h5ad), systems, labels)
    out.write_text(json.dumps(scores, indent=1))


def unintegrated(h5ad: Path, n_comps: int = 15) -> np.ndarray:
    """The first n_comps principal components of the store's counts log-normalised by scanpy (no integration)."""
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(h5ad)
    adata.X = adata.X.astype(np.float32)
    sc.pp.normalize_total(adata, target_sum=TARGET_SUM)
    sc.pp.log1p(adata)
    return sc.pp.pca(adata.X, n_comps=n_comps, random_state=0)


ROWS = (
    ("atlasvi", "sysvi", "atlasvi sysVI"),
    ("atlasvi", "sysvi-own", "atlasvi sysVI, scvi-tools' cycle"),
    ("scvi-tools", "sysvi", "scvi-tools SysVI"),
    ("atlasvi", "scvi", "atlasvi scVI"),
    ("scvi-tools", "scvi", "scvi-tools scVI"),
)
METRICS = ("ilisi", "batch_entropy", "knn_accuracy", "nmi")


def rows(scores: dict[str, dict[str, float]]) -> list[tuple[str, str, str]]:
    """(tool, model key, label) of every row with scores: ROWS, then sysVI at other cycle weights."""
    models = {k.rsplit("_s", 1)[0] for k in scores}
    extra = sorted((m for m in models if "-cw" in m), key=lambda m: (m.split("_")[0], float(m.split("-cw")[1])))
    out = [row for row in ROWS if f"{row[0]}_{row[1]}" in models]
    for m in extra:
        tool, model = m.split("_", 1)
        base, weight = model.split("-cw")
        label = next(label for t, b, label in ROWS if (t, b) == (tool, base))
        out.append((tool, model, f"{label}, cycle weight {weight}"))
    return out


def summary(scores: dict[str, dict[str, float]]) -> dict[str, dict[str, dict[str, float]]]:
    """{row: {metric: {"mean", "sd", "values"}}} over seeds, rows as in ROWS (those with scores)."""
    out = {}
    for tool, model, label in rows(scores):
        keys = sorted(k for k in scores if k.startswith(f"{tool}_{model}_s"))
        out[label] = {
            m: {
                "mean": float(np.mean([scores[k][m] for k in keys])),
                "sd": float(np.std([scores[k][m] for k in keys], ddof=1)) if len(keys) > 1 else 0.0,
                "values": [scores[k][m] for k in keys],
            }
            for m in METRICS
        }
    return out


def markdown(report: dict) -> str:
    lines = [
        "# sysVI fidelity: atlasvi vs scvi-tools 1.4.2 SysVI, and both tools' scVI on the same data",
        "",
        f"Machine: {report['machine']}. Metrics: iLISI (scaled, 90 neighbours), batch-neighbour entropy (50 "
        "neighbours, / log n_systems), label kNN accuracy (15 neighbours, 5-fold CV), NMI of k-means (k = labels). "
        "Mean ± sd over seeds. See the script's docstring.",
        "",
        "atlasvi's default cycle re-encodes the decoding as the other system (the published method); scvi-tools "
        "1.4.2 re-encodes the own-system decoding with the other system's label. The row \"atlasvi sysVI, "
        'scvi-tools\' cycle" is atlasvi with `cycle_input="own_system"` (`atlasvi/models/sysvi/module.py`).',
        "",
    ]
    if "weights_check" in report:
        w = report["weights_check"]
        lines += [
            f"## Weights check ({w['dataset']}, `{w['command']}`)",
            "",
            f"scvi-tools' SysVI weights after {w['epochs']} epochs (seed 0) loaded into atlasvi's module, eval mode, "
            f"all {w['cells']} cells, the same draw of z and of the other system per cell; largest absolute "
            "difference from scvi-tools' own figures:",
            "",
            "| latent means | latent scales | reconstruction (nats) | KL (nats) | cycle (own) | cycle (cross) |",
            "|---|---|---|---|---|---|",
            "| " + " | ".join(f"{w[k]:.1e}" for k in (
                "latent_mean_max_abs_diff", "latent_scale_max_abs_diff", "reconstruction_max_abs_diff",
                "kl_max_abs_diff", "cycle_own_system_max_abs_diff", "cycle_cross_system_max_abs_diff")) + " |",
            "",
            f"(means per cell: reconstruction {w['reconstruction_mean']:.1f}, KL {w['kl_mean']:.2f}, cycle "
            f"{w['cycle_own_system_mean']:.3f} own-system, {w['cycle_cross_system_mean']:.3f} cross-system.)",
            "",
        ]  # fmt: skip
    for name, result in report["datasets"].items():
        lines += [f"## {name}: system `{result['system_key']}`, labels `{result['labels_key']}`, "
                  f"{result['n_cells']} cells x {result['n_genes']} genes", "",
                  f"Command: `{result['command']}`. Seeds {result['seeds']}, {result['epochs']} epochs each; "
                  f"scvi-tools {report.get('scvi_tools_version', 'not run')}.", ""]  # fmt: skip
        if "systems" in result:
            counts = np.array(list(result["systems"].values()), dtype=float)
            even = float(-(counts / counts.sum() * np.log(counts / counts.sum())).sum() / np.log(len(counts)))
            seconds = [r["seconds"] for r in result["runs"].values()]
            lines += [
                f"Systems: {', '.join(f'{k} {v}' for k, v in result['systems'].items())}; a neighbourhood with these "
                f"proportions has batch entropy {even:.3f}. Runs one at a time; load average at start "
                f"{' '.join(f'{x:.2f}' for x in result['load_at_start'])}; seconds per run {min(seconds):.0f}-"
                f"{max(seconds):.0f} (the JSON has each run's seconds and load).",
                "",
            ]  # fmt: skip
        if "code" in result:
            lines += [f"Code: atlasvi at {result['code']}.", ""]
        lines += ["| model | iLISI | batch entropy | kNN accuracy | NMI |", "|---|---|---|---|---|"]
        for label, metrics in result["summary"].items():
            cells = [f"{metrics[m]['mean']:.3f} ± {metrics[m]['sd']:.3f}" for m in METRICS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if "unintegrated" in result:
            cells = [f"{result['unintegrated'][m]:.3f}" for m in METRICS]
            lines.append("| no integration (PCA 15 of log-normalised counts) | " + " | ".join(cells) + " |")
        lines += [""] + [f"- {line}" for line in result["checks"]] + [""]
        if "note" in result:
            lines += [f"Note: {result['note']}", ""]
    return "\n".join(lines)


def checks(summ: dict) -> list[str]:
    """The issue's comparisons, as measured (means over seeds): atlasvi sysVI against scvi-tools' SysVI, and each
    tool's sysVI against each tool's scVI on mixing (none without both sysVIs)."""
    if "atlasvi sysVI" not in summ or "scvi-tools SysVI" not in summ:
        return []
    ours, theirs = summ["atlasvi sysVI"], summ["scvi-tools SysVI"]
    out = []
    for m in METRICS:
        verdict = ">=" if ours[m]["mean"] >= theirs[m]["mean"] else "<"
        out.append(f"{m}: atlasvi sysVI {ours[m]['mean']:.3f} {verdict} scvi-tools SysVI {theirs[m]['mean']:.3f}")
    for sysvi in ("atlasvi sysVI", "scvi-tools SysVI"):
        for baseline in ("atlasvi scVI", "scvi-tools scVI"):
            if baseline not in summ:
                continue
            for m in ("ilisi", "batch_entropy"):
                a, b = summ[sysvi][m]["mean"], summ[baseline][m]["mean"]
                out.append(f"{m}: {sysvi} {a:.3f} {'>' if a > b else '<='} {baseline} {b:.3f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--side", choices=["main", "atlasvi", "scvi", "scvi-weights", "weights", "score", "render"], default="main"
    )
    parser.add_argument("--name", default="sysvi_fidelity", help="results/<name>.json and .md")
    parser.add_argument(
        "--tools", nargs="+", choices=["atlasvi", "scvi-tools"], default=["atlasvi", "scvi-tools"],
        help="(main) train and score only these tools' runs",
    )  # fmt: skip
    parser.add_argument(
        "--models", nargs="+", choices=["sysvi", "scvi"], default=["sysvi", "scvi"],
        help="(main) train and score only these models' runs",
    )  # fmt: skip
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--own-cycle", action="store_true", help="also atlasvi sysVI with scvi-tools' cycle")
    parser.add_argument(
        "--cycle-weights", nargs="+", type=float, default=[DEFAULT_CYCLE_WEIGHT],
        help="atlasvi sysVI's z_distance_cycle_weight, one run per weight (scvi-tools' SysVI at its default)",
    )  # fmt: skip
    parser.add_argument("--weights-epochs", type=int, default=0, help="weights check after N epochs (0: none)")
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "sysvi_fidelity")
    parser.add_argument("--scvi-python", default=str(HERE / ".cache" / "scvi-venv" / "bin" / "python"))
    parser.add_argument("--h5ad", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--latents", nargs="*", type=Path, default=[])
    parser.add_argument("--runs", nargs="*", default=[], help="(--side atlasvi / scvi) model:weight pairs")
    args = parser.parse_args()
    runs = [(r.split(":")[0], float(r.split(":")[1])) for r in args.runs]
    if args.side == "atlasvi":
        (args.workdir / "latents").mkdir(parents=True, exist_ok=True)
        store, _ = prepare(args.datasets[0], args.workdir)
        return atlasvi_side(args.datasets[0], store, args.seeds, args.epochs, runs, args.workdir)
    if args.side == "scvi":
        return scvi_side(args.datasets[0], args.h5ad, args.seeds, args.epochs, runs, args.workdir)
    if args.side == "scvi-weights":
        return scvi_weights_side(args.datasets[0], args.h5ad, args.epochs, args.out)
    if args.side == "weights":
        args.workdir.mkdir(parents=True, exist_ok=True)
        store, h5ad = prepare(args.datasets[0], args.workdir)
        check = weights_check(args.datasets[0], store, h5ad, args.scvi_python, args.workdir, args.weights_epochs)
        return print(json.dumps(check, indent=1))
    if args.side == "score":
        return score_side(args.datasets[0], args.h5ad, args.latents, args.out)
    if args.side == "render":
        return render(args.name)

    (args.workdir / "latents").mkdir(parents=True, exist_ok=True)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    me = [args.scvi_python, str(Path(__file__).resolve())]
    results = HERE / "results"
    existing = results / f"{args.name}.json"
    report = json.loads(existing.read_text()) if existing.exists() else {"datasets": {}}  # other datasets kept
    report["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores, CPU only, 1 torch thread per tool"
    command = (
        f"python benchmarks/sysvi_fidelity.py --datasets {' '.join(args.datasets)} --seeds "
        f"{' '.join(map(str, args.seeds))} --epochs {args.epochs}{' --own-cycle' * args.own_cycle}"
        f" --cycle-weights {' '.join(f'{w:g}' for w in args.cycle_weights)}"
        f"{f' --weights-epochs {args.weights_epochs}' * bool(args.weights_epochs)} --scvi-python SCVI_PYTHON"
        f"{f' --name {args.name}' * (args.name != 'sysvi_fidelity')}"
        f"{f' --tools {args.tools[0]}' * (len(set(args.tools)) == 1)}"
        f"{f' --models {args.models[0]}' * (len(set(args.models)) == 1)}"
    )
    if args.weights_epochs:
        store, h5ad = prepare(args.datasets[0], args.workdir)
        check = weights_check(args.datasets[0], store, h5ad, args.scvi_python, args.workdir, args.weights_epochs)
        report["weights_check"] = {"dataset": args.datasets[0], "command": command} | check
    ours = [("sysvi", w) for w in args.cycle_weights]
    ours += [*([("sysvi-own", w) for w in args.cycle_weights] if args.own_cycle else []), ("scvi", 0.0)]
    theirs = [("sysvi", DEFAULT_CYCLE_WEIGHT), ("scvi", 0.0)]
    ours, theirs = [r for r in ours if "atlasvi" in args.tools], [r for r in theirs if "scvi-tools" in args.tools]
    ours, theirs = [[r for r in runs if r[0].split("-")[0] in args.models] for runs in (ours, theirs)]
    load_start = os.getloadavg()
    for seed in args.seeds:  # seed by seed, so that a stopped run leaves whole seeds of every model and dataset
        for name in args.datasets:
            store, h5ad = prepare(name, args.workdir)
            for is_scvi in (False, True):  # both sysVIs first, then both scVIs; one process at a time
                mine = [r for r in ours if (r[0] == "scvi") == is_scvi]
                atlasvi_side(name, store, [seed], args.epochs, mine, args.workdir)
                if not any((m == "scvi") == is_scvi for m, _ in theirs):
                    continue
                subprocess.run(
                    [*me, "--side", "scvi", "--datasets", name, "--h5ad", str(h5ad), "--seeds", str(seed),
                     "--epochs", str(args.epochs), "--workdir", str(args.workdir), "--runs",
                     *(f"{m}:{w}" for m, w in theirs if (m == "scvi") == is_scvi)],
                    env=env, check=True,
                )  # fmt: skip
    for name in args.datasets:
        store, h5ad = prepare(name, args.workdir)
        common = ["--datasets", name, "--h5ad", str(h5ad), "--seeds", *map(str, args.seeds)]
        keys = [run_key(t, m, s, w) for s in args.seeds for t, runs in (("atlasvi", ours), ("scvi-tools", theirs))
                for m, w in runs]  # fmt: skip
        latents = [cached(args.workdir, name, args.epochs, k) for k in keys]
        scores_out = args.workdir / f"{name}_scores.json"
        subprocess.run(
            [*me, "--side", "score", *common, "--latents", *map(str, latents), "--out", str(scores_out)],
            env=env, check=True,
        )  # fmt: skip
        scores = json.loads(scores_out.read_text())
        baseline = scores.pop(UNINTEGRATED)
        runs = {}
        for key, path in zip(keys, latents, strict=True):
            with np.load(path) as data:
                runs[key] = {"seconds": float(data["seconds"]), "load_at_end": [float(x) for x in data["load"]]}
                if "heldout_neg_elbo" in data.files:
                    runs[key]["heldout_neg_elbo"] = float(data["heldout_neg_elbo"])
                if "version" in data.files:
                    report["scvi_tools_version"] = str(data["version"])
        import anndata as ad

        adata = ad.read_h5ad(h5ad, backed="r")
        summ = summary(scores)
        report["datasets"][name] = {
            "command": command,
            "seeds": args.seeds,
            "epochs": args.epochs,
            "system_key": DATASETS[name][1],
            "labels_key": DATASETS[name][2],
            "n_cells": int(adata.n_obs),
            "n_genes": int(adata.n_vars),
            "systems": {str(k): int(v) for k, v in adata.obs[DATASETS[name][1]].value_counts().items()},
            "load_at_start": list(load_start),
            "code": code_version(),
            "runs": runs,
            "scores": scores,
            "unintegrated": baseline,
            "summary": summ,
            "checks": checks(summ),
        }
        (results / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (results / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


def code_version() -> str:
    """The checkout's commit ("<short hash>", "+ changes" when the work tree differs from it), or "unknown"."""
    try:
        git = ["git", "-C", str(HERE)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + (" + changes" if dirty.stdout.strip() else "")


def render(name: str = "sysvi_fidelity") -> None:
    """results/<name>.md again from results/<name>.json, each dataset's checks recomputed from its summary
    (`--side render`)."""
    results = HERE / "results"
    report = json.loads((results / f"{name}.json").read_text())
    for result in report["datasets"].values():
        result["checks"] = checks(result["summary"])
    (results / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (results / f"{name}.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
