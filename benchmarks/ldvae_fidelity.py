"""LDVAE side by side: atlasvi's `ldvae` and scvi-tools' LinearSCVI on Kang (held-out ELBO, the interferon factor).

    python benchmarks/ldvae_fidelity.py --seeds 0 1 2 --max-epochs 200 --n-epochs-kl-warmup 50

The cells, genes and held-out split are benchmarks/fidelity.py's for Kang (`prepare`: the 2000-HVG rule, which
keeps all 1267 genes, 10% of the cells held out by numpy default_rng(0) as fidelity_data.py's `make_heldout`). Two
setups of the batch covariate: `sample` (fidelity.py's batch key) and `none` (the same cells and genes, one batch):
Kang's samples are each all ctrl or all stim, so with `sample` the decoder's per-batch terms can carry the
interferon response. Both tools train the LDVAE defaults (n_latent 10, n_hidden 128, 1 encoder layer, NB, gene
dispersion, latent library size, no decoder bias) for the same epochs, KL warm-up and batch size on the training
cells; the held-out -ELBO is per cell at KL weight 1, one draw of the latents (atlasvi: the last epoch's record;
scvi-tools: -`get_elbo(heldout)`), and its mean over DRAWS seeded draws; scvi-tools' trained weights are also
evaluated by atlasvi (`cross_evaluate`, the same draws count), so a gap between the tools is training, not the
evaluation. Medians and a Mann-Whitney U test compare the seeds; `--merge` adds seeds to the committed rows. The
scvi-tools side is this file run with `--side scvi` in the scvi venv (benchmarks/.cache/scvi-venv); it imports
nothing of atlasvi.
Each run's figures, loadings and latent are cached under benchmarks/.cache/ldvae_fidelity/<setup>/.

The interferon check, the same code for both tools' loadings (genes x factors) and latents (posterior means of
every cell): the ISG factor is the one whose loadings of ISG15, IFI6, IFIT1, IFIT3, MX1 have the largest |mean|;
reported are whether the five share its sign, their ranks among all genes by loading on it (oriented so the ISGs
are positive; 1 = the top gene), and the AUROC of that oriented factor's latent value for stim vs ctrl cells.
A weights check on the `sample` setup: scvi-tools' trained weights in atlasvi's module give scvi-tools'
per-cell reconstruction, library KL, latent means and loadings. Writes benchmarks/results/ldvae_fidelity.{json,md}.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
KANG = SHARED / "kang2018_pbmc_ifnb_muscat.h5ad"
SCVI_PYTHON = HERE / ".cache" / "scvi-venv" / "bin" / "python"
WORK = HERE / ".cache" / "ldvae_fidelity"
ISGS = ["ISG15", "IFI6", "IFIT1", "IFIT3", "MX1"]
DRAWS = 10  # seeded draws of the latents averaged in the held-out -ELBO's draw mean (draw i: torch seed i)
TAIL = 50  # the last epochs over which the held-out -ELBO's fall is reported (still descending or not)
CONFIGS = ("sample", "none")  # the batch covariate: Kang's sample (fidelity.py's), or none


# --------------------------------------------------------------------------------------------- scvi-tools side
def scvi_side(args: argparse.Namespace) -> None:
    """Train scvi-tools' LinearSCVI on the training store's cells; write loadings, latent and the held-out ELBO."""
    import logging

    import anndata as ad
    import scvi
    import torch

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = args.seed
    train, held = (ad.read_zarr(path) for path in (args.train, args.heldout))
    batch_key = None if args.batch_key == "none" else args.batch_key
    for adata in (train, held):
        adata.X = adata.X.astype(np.float32)
        adata.obs = adata.obs[[batch_key]].copy() if batch_key else adata.obs[[]].copy()
    scvi.model.LinearSCVI.setup_anndata(train, batch_key=batch_key)
    model = scvi.model.LinearSCVI(train)  # scvi-tools' defaults
    from benchmarks.fidelity_data import load_init

    unused = ("decoder.px_dropout_decoder.",)  # the zero-inflation layer, unused for NB, kept as drawn
    if args.init:  # atlasvi's initial weights of the seed
        load_init(model.module, Path(args.init), unused=unused)
    if args.stream is not None:  # the training stream (minibatch order, dropout, latent draws) from its own seed
        scvi.settings.seed = args.stream
    started = time.perf_counter()
    model.train(
        max_epochs=args.max_epochs, accelerator="cpu", devices=1, train_size=1.0, batch_size=args.batch_size,
        early_stopping=False, enable_progress_bar=False,
        plan_kwargs={"n_epochs_kl_warmup": args.n_epochs_kl_warmup, "n_steps_kl_warmup": None},
    )  # fmt: skip
    seconds = time.perf_counter() - started
    neg_elbo = -float(model.get_elbo(held, batch_size=args.batch_size))
    recon = float(model.get_reconstruction_error(held, batch_size=args.batch_size)["reconstruction_loss"])
    draws = []
    for draw in range(DRAWS):  # seeded draws, as `heldout_draws` on the atlasvi side
        torch.manual_seed(draw)
        draws.append(-float(model.get_elbo(held, batch_size=args.batch_size)))
    loadings = model.get_loadings()
    both = ad.concat([train, held])
    latent = model.get_latent_representation(both)
    out = Path(args.out)
    np.save(out / f"scvi_latent_seed{args.seed}.npy", latent)
    (out / f"scvi_cells_seed{args.seed}.txt").write_text("\n".join(both.obs_names) + "\n")
    loadings.to_csv(out / f"scvi_loadings_seed{args.seed}.csv")
    torch.save(model.module.state_dict(), out / f"scvi_state_seed{args.seed}.pt")
    figures = {"neg_elbo": neg_elbo, "neg_elbo_draws": float(np.mean(draws)), "reconstruction_loss": recon}
    if args.score:  # atlasvi's trained weights (save_init's file) in this module, scored as scvi-tools' own above
        load_init(model.module, Path(args.score), unused=unused)
        scored = []
        for draw in range(DRAWS):
            torch.manual_seed(draw)
            scored.append(-float(model.get_elbo(held, batch_size=args.batch_size)))
        figures["atlasvi_weights_scvi_eval"] = float(np.mean(scored))
    print(json.dumps(figures | {"train_seconds": seconds}))


def scvi_weights_side(args: argparse.Namespace) -> None:
    """scvi-tools' LinearSCVI after 3 epochs: its weights and, in eval mode at the posterior means of z and the
    library, the per-cell reconstruction, library KL, latent means and loadings of the first 300 training cells."""
    import logging

    import anndata as ad
    import scvi
    import torch

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = 0
    train = ad.read_zarr(args.train)
    train.X = train.X.astype(np.float32)
    train.obs = train.obs[["sample"]].copy()
    scvi.model.LinearSCVI.setup_anndata(train, batch_key="sample")
    model = scvi.model.LinearSCVI(train)
    model.train(
        max_epochs=3, accelerator="cpu", devices=1, train_size=1.0, batch_size=128, enable_progress_bar=False
    )  # fmt: skip
    module = model.module.eval()
    x = torch.tensor(train.X[:300].toarray())
    batch = torch.tensor(train.obs["sample"].cat.codes.to_numpy()[:300]).long().view(-1, 1)
    with torch.no_grad():
        inference = module.inference(x, batch)
        generative = module.generative(inference["qz"].loc, inference["ql"].loc, batch)
        reconstruction = -generative["px"].log_prob(x).sum(-1)
        kl_library = torch.distributions.kl_divergence(inference["ql"], generative["pl"]).sum(-1)
    weights = {f"weight:{k}": v.numpy() for k, v in module.state_dict().items()}
    np.savez(
        Path(args.out) / "scvi_weights.npz", x=x.numpy(), batch=batch.numpy().ravel(), reconstruction=reconstruction,
        kl_library=kl_library, qz_mean=inference["qz"].loc.numpy(), loadings=model.get_loadings().to_numpy(),
        categories=np.asarray(train.obs["sample"].cat.categories, dtype=str), **weights,
    )  # fmt: skip


def weights_check(train_store: Path) -> dict:
    """scvi-tools' trained weights in atlasvi's LDVAE module (names mapped; the unused zero-inflation layer left
    out): the largest differences from scvi-tools' own outputs on the same cells (see `scvi_weights_side`)."""
    import torch
    from torch.distributions import kl_divergence

    from atlasvi.data import open_store
    from atlasvi.models.ldvae import LDVAEModule
    from atlasvi.models.vae import VAEInputs

    out = WORK / "weights"
    out.mkdir(parents=True, exist_ok=True)
    command = [str(SCVI_PYTHON), __file__, "--side", "scvi-weights", "--train", str(train_store), "--out", str(out)]
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True)
    saved = np.load(out / "scvi_weights.npz")
    module = LDVAEModule(open_store(train_store).schema)
    if list(saved["categories"]) != list(module.schema.batch_categories):
        raise SystemExit("scvi-tools' batch categories differ from the store's")
    prior = {k: module.state_dict()[k].numpy().copy() for k in ("library_log_means", "library_log_vars")}
    module.load_state_dict(atlasvi_names({k.removeprefix("weight:"): saved[k] for k in saved.files if "weight:" in k}))
    module.eval()
    x = torch.tensor(saved["x"])
    inputs = VAEInputs(x=x, batch_index=torch.tensor(saved["batch"]), labels=None, categorical=(), continuous=None)
    with torch.no_grad():
        inference = module.inference(inputs)
        generative = module.generative(inference["qz"].loc, inference["ql"].loc, inputs)
        reconstruction = -generative["px"].log_prob(x).sum(-1).numpy()
        kl_library = kl_divergence(inference["ql"], generative["pl"]).sum(-1).numpy()
    return {
        "cells": len(x),
        "reconstruction_mean": float(reconstruction.mean()),
        "reconstruction_max_abs_diff": float(np.abs(reconstruction - saved["reconstruction"]).max()),
        "kl_library_max_abs_diff": float(np.abs(kl_library - saved["kl_library"]).max()),
        "latent_mean_max_abs_diff": float(np.abs(inference["qz"].loc.numpy() - saved["qz_mean"]).max()),
        "loadings_max_abs_diff": float(np.abs(module.loadings().numpy() - saved["loadings"]).max()),
        "library_prior_max_abs_diff": float(
            max(np.abs(prior[k] - saved[f"weight:{k}"]).max() for k in ("library_log_means", "library_log_vars"))
        ),
    }


def atlasvi_names(state: dict) -> dict:
    """scvi-tools' LDVAE state dict under atlasvi's names (its FCLayers' "fc_layers.Layer 0" is "layers.0"), as
    tensors, less the zero-inflation layer scvi-tools builds unused for NB."""
    import torch

    return {
        k.replace("fc_layers.Layer 0", "layers.0"): torch.as_tensor(v)
        for k, v in state.items()
        if "px_dropout_decoder" not in k
    }


def heldout_draws(module, heldout) -> float:
    """The mean over DRAWS seeded draws of the latents (draw i: torch seed i) of `module`'s held-out -ELBO per cell,
    atlasvi's `evaluate` (eval mode, KL weight 1); the caller's RNG state is left as it was."""
    import torch

    from atlasvi.train import evaluate

    values = []
    with torch.random.fork_rng(devices=[]):
        for draw in range(DRAWS):
            torch.manual_seed(draw)
            values.append(evaluate(module, heldout, torch.device("cpu"))[0])
    return float(np.mean(values))


def cross_evaluate(train_store: Path, heldout_store: Path, state_file: Path) -> float:
    """scvi-tools' trained weights (its saved state dict) in atlasvi's module: their held-out -ELBO under atlasvi's
    evaluation (`heldout_draws`), to set against scvi-tools' own `get_elbo` over as many seeded draws."""
    import torch

    from atlasvi.data import LoaderConfig, StreamingLoader
    from atlasvi.models.ldvae import LDVAEModule

    module = LDVAEModule(StreamingLoader(train_store, LoaderConfig()).store.schema)
    module.load_state_dict(atlasvi_names(torch.load(state_file, weights_only=True)), strict=True)
    heldout = StreamingLoader(heldout_store, LoaderConfig(batch_size=128))
    with heldout:
        return heldout_draws(module, heldout)


# --------------------------------------------------------------------------------------------- atlasvi side
def atlasvi_side(
    train_store: Path,
    heldout_store: Path,
    seed: int,
    out: Path,
    args: argparse.Namespace,
    init: Path | None = None,
    stream: int | None = None,
    trained: Path | None = None,
) -> dict:
    """Train atlasvi's LDVAE module (registry defaults) as fidelity.py trains scVI; the same outputs as scvi_side.
    init: where to save the module's initial weights under scvi-tools' names (`fidelity_data.save_init`); stream:
    the seed of the loader and of fit's draws (dropout, latents; default `seed`, which draws the initial weights);
    trained: where to save the trained weights likewise (scvi-tools scores them: `scvi_side --score`)."""
    import anndata as ad
    import pandas as pd
    import torch

    import atlasvi.models.vae as vae_module
    from atlasvi.data import LoaderConfig, StreamingLoader
    from atlasvi.models.ldvae import LDVAEModule
    from atlasvi.train import TrainConfig, fit
    from benchmarks.fidelity import latent
    from benchmarks.fidelity_data import save_init

    stream = seed if stream is None else stream
    torch.manual_seed(seed)
    train = StreamingLoader(train_store, LoaderConfig(batch_size=args.batch_size, seed=stream))
    heldout = StreamingLoader(heldout_store, LoaderConfig(batch_size=args.batch_size))
    module = LDVAEModule(train.store.schema)
    if init is not None:
        save_init(module.state_dict(), "LinearSCVI", init)
    config = TrainConfig(max_epochs=args.max_epochs, n_epochs_kl_warmup=args.n_epochs_kl_warmup, seed=stream)
    started = time.perf_counter()
    if args.nb_formula == "scvi-tools":  # trained with scvi-tools' NB formula; evaluated (draws) with atlasvi's
        from benchmarks.ldvae_peakvi_step import patched, scvi_nb_log_likelihood

        with patched(vae_module, "log_likelihood", scvi_nb_log_likelihood):
            history = fit(module, train, heldout, config)
    else:
        history = fit(module, train, heldout, config)
    seconds = time.perf_counter() - started
    if trained is not None:
        save_init(module.state_dict(), "LinearSCVI", trained)
    module.eval()
    genes = ad.read_zarr(train_store).var["gene_names"].astype(str).tolist()
    loadings = pd.DataFrame(
        module.loadings().numpy(), index=genes, columns=[f"Z_{i}" for i in range(module.config.n_latent)]
    )
    train_latent, train_names = latent(module, train_store)  # eval mode, posterior means
    held_latent, held_names = latent(module, heldout_store)
    np.save(out / f"atlasvi_latent_seed{seed}.npy", np.concatenate([train_latent, held_latent]))
    (out / f"atlasvi_cells_seed{seed}.txt").write_text("\n".join(train_names + held_names) + "\n")
    loadings.to_csv(out / f"atlasvi_loadings_seed{seed}.csv")
    last, curve = history[-1], [r.validation_elbo for r in history]
    return {
        "neg_elbo": last.validation_elbo,
        "neg_elbo_draws": heldout_draws(module, heldout),
        "neg_elbo_tail_fall": curve[-min(TAIL, len(curve) - 1) - 1] - curve[-1],
        "reconstruction_loss": last.validation_reconstruction,
        "train_seconds": seconds,
    }


# --------------------------------------------------------------------------------------------- ISG check
def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive's score > a negative's), ties counting half (the Mann-Whitney U over n_pos * n_neg)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([positive, negative]))
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def isg_check(loadings, latent: np.ndarray, stim: np.ndarray) -> dict:
    """The ISG factor of (genes x factors) loadings, its sign agreement, the ISGs' ranks and the stim AUROC."""
    isg = loadings.loc[ISGS].to_numpy()
    factor = int(np.argmax(np.abs(isg.mean(axis=0))))
    sign = float(np.sign(isg[:, factor].mean()))
    oriented = sign * loadings.iloc[:, factor].to_numpy()
    order = np.argsort(-oriented)
    rank = {g: int(np.where(loadings.index[order] == g)[0][0]) + 1 for g in ISGS}
    values = sign * latent[:, factor]
    return {
        "factor": factor,
        "same_sign": bool(np.all(np.sign(isg[:, factor]) == sign)),
        "isg_ranks": rank,
        "max_isg_rank": max(rank.values()),
        "auroc_stim_vs_ctrl": auroc(values[stim], values[~stim]),
    }


def evaluate(tool: str, seed: int, out: Path, condition: dict[str, str]) -> dict:
    """The ISG check of one run's written loadings and latent (cells in the order of its cell list)."""
    import pandas as pd

    loadings = pd.read_csv(out / f"{tool}_loadings_seed{seed}.csv", index_col=0)
    latent = np.load(out / f"{tool}_latent_seed{seed}.npy")
    cells = (out / f"{tool}_cells_seed{seed}.txt").read_text().split()
    stim = np.array([condition[c] == "stim" for c in cells])
    return isg_check(loadings, latent, stim) | {"n_genes": len(loadings), "n_factors": loadings.shape[1]}


# --------------------------------------------------------------------------------------------- driver
def heldout_file() -> Path:
    """fidelity.py's held-out list for Kang (fidelity_data.make_heldout: 10%, default_rng(0)), written if absent."""
    import anndata as ad

    from benchmarks.fidelity_data import make_heldout

    path = HERE / ".cache" / f"heldout_{KANG.stem}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(make_heldout(ad.read_h5ad(KANG, backed="r").obs_names, 0.1, 0)) + "\n")
    return path


def summary(rows: list[dict], same_init: bool = False) -> dict:
    """Per tool: the held-out -ELBO's mean, median, sd, range, the ISG figures; the tools against each other: the
    two-sided Mann-Whitney U p-value of the -ELBOs over seeds, and (runs that have them) scvi-tools' weights under
    atlasvi's evaluation against scvi-tools' own, and atlasvi's fall over the last TAIL epochs; with `same_init`
    (both tools started from the same weights per seed) the paired differences of the -ELBO (one draw and the
    mean of DRAWS draws) and the AUROC."""
    from scipy.stats import mannwhitneyu

    from benchmarks.fidelity_data import paired_differences

    out = {}
    for tool in ("atlasvi", "scvi-tools"):
        mine = [r for r in rows if r["tool"] == tool]
        elbo = np.array([r["neg_elbo"] for r in mine])
        out[tool] = {
            "n_seeds": len(mine),
            "neg_elbo_mean": float(elbo.mean()),
            "neg_elbo_median": float(np.median(elbo)),
            "neg_elbo_sd": float(elbo.std(ddof=1)) if len(elbo) > 1 else 0.0,
            "neg_elbo_min": float(elbo.min()),
            "neg_elbo_max": float(elbo.max()),
            "auroc_mean": float(np.mean([r["auroc_stim_vs_ctrl"] for r in mine])),
            "isg_same_sign_seeds": int(sum(r["same_sign"] for r in mine)),
            "max_isg_rank_worst": int(max(r["max_isg_rank"] for r in mine)),
        }
    atlas, ref = out["atlasvi"], out["scvi-tools"]
    out["atlasvi_mean_within_scvi_range"] = bool(ref["neg_elbo_min"] <= atlas["neg_elbo_mean"] <= ref["neg_elbo_max"])
    out["ranges_overlap"] = bool(
        atlas["neg_elbo_max"] >= ref["neg_elbo_min"] and atlas["neg_elbo_min"] <= ref["neg_elbo_max"]
    )
    out["neg_elbo_mean_difference"] = atlas["neg_elbo_mean"] - ref["neg_elbo_mean"]
    out["neg_elbo_median_difference"] = atlas["neg_elbo_median"] - ref["neg_elbo_median"]
    elbos = [[r["neg_elbo"] for r in rows if r["tool"] == tool] for tool in ("atlasvi", "scvi-tools")]
    out["mann_whitney_p"] = float(mannwhitneyu(*elbos, alternative="two-sided").pvalue)
    crossed = [r for r in rows if "neg_elbo_draws_atlasvi_eval" in r]
    if crossed:
        gaps = [abs(r["neg_elbo_draws_atlasvi_eval"] - r["neg_elbo_draws"]) for r in crossed]
        out["cross_evaluation_max_abs_diff"] = float(max(gaps))
        out["cross_evaluation_seeds"] = len(crossed)
    if same_init:
        keys = ("neg_elbo", "neg_elbo_draws", "auroc_stim_vs_ctrl")
        out["paired"] = {key: paired_differences(rows, key) for key in keys}
    falls = [r["neg_elbo_tail_fall"] for r in rows if "neg_elbo_tail_fall" in r]
    if falls:
        out["atlasvi_tail_fall_median"] = float(np.median(falls))
    return out


def markdown(result: dict) -> str:
    w = result["weights_check"] or {}
    lines = [
        "# LDVAE fidelity: atlasvi `ldvae` vs scvi-tools LinearSCVI on Kang",
        "",
        f"Machine: {result['machine']}. Each section names the command that ran it.",
        f"{result['n_train']} training / {result['n_heldout']} held-out cells x {result['n_genes']} genes, "
        f"{result['max_epochs']} epochs, KL warm-up {result['n_epochs_kl_warmup']} epochs, batch size "
        f"{result['batch_size']}, LDVAE defaults (n_latent 10, NB, gene dispersion, latent library size). "
        "Held-out -ELBO: per cell at KL weight 1 in eval mode, one draw of the latents (atlasvi: the last epoch's "
        f"record; scvi-tools: `get_elbo`); 'mean of {DRAWS} draws': the same figure averaged over {DRAWS} seeded "
        "draws. ISG factor: the factor with the largest |mean loading| of ISG15, IFI6, "
        "IFIT1, IFIT3, MX1; ranks are among all genes by the oriented loading (1 = top); AUROC: that factor's "
        "oriented posterior mean, stim vs ctrl, over all cells.",
        "",
        "Kang's samples are each all ctrl or all stim (ctrl101, ctrl107, stim101, stim107), so with `sample` as the "
        "batch (fidelity.py's setup) the decoder's per-batch terms can carry the interferon response and the latent "
        "need not; the second setup has no batch covariate.",
    ]
    if result.get("nb_formula") == "scvi-tools":
        lines += [
            "",
            "atlasvi's runs here trained with scvi-tools' NB log-likelihood patched into its module (eps 1e-8 inside "
            "the logs, float32 log-gammas; benchmarks/ldvae_peakvi_step.py's `scvi_nb_log_likelihood`), atlasvi's "
            "own everywhere else; the held-out 'mean of 10 draws' is evaluated with atlasvi's own; scvi-tools' runs "
            "are those of the same seeds without the patch.",
        ]
    if w:
        lines += [
            "",
            "Same function: scvi-tools' LinearSCVI weights after 3 epochs (batch `sample`) loaded into atlasvi's "
            f"module give, on {w['cells']} training cells in eval mode at the posterior means, per-cell "
            "reconstructions within "
            f"{w['reconstruction_max_abs_diff']:.3g} nats (mean {w['reconstruction_mean']:.0f}, float32), library KL "
            f"within {w['kl_library_max_abs_diff']:.3g}, latent means within {w['latent_mean_max_abs_diff']:.3g}, "
            f"loadings within {w['loadings_max_abs_diff']:.3g}; the store's library prior is scvi-tools' within "
            f"{w['library_prior_max_abs_diff']:.3g}. Differences in the trained figures below come from training "
            "(initial weights, minibatch order), not from the model.",
        ]
    for name, part in result["configs"].items():
        s = part["summary"]
        title = "batch key `sample` (fidelity.py's)" if name == "sample" else "no batch covariate"
        lines += [
            "",
            f"## {title}",
            "",
            "Commands (each row's is in the JSON): "
            + "; ".join(f"`{c}`" for c in dict.fromkeys(r.get("command", result["command"]) for r in part["runs"]))
            + ".",
            "",
            f"| tool | seed | held-out -ELBO | mean of {DRAWS} draws | scvi-tools' weights, atlasvi's evaluation | "
            "held-out recon | ISG factor | same sign | ISG ranks | AUROC stim vs ctrl | train s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]

        def figure(row: dict, key: str) -> str:
            return f"{row[key]:.2f}" if key in row else "-"

        for r in part["runs"]:
            ranks = ", ".join(f"{g} {k}" for g, k in r["isg_ranks"].items())
            lines.append(
                f"| {r['tool']} | {r['seed']} | {r['neg_elbo']:.2f} | {figure(r, 'neg_elbo_draws')} | "
                f"{figure(r, 'neg_elbo_draws_atlasvi_eval')} | {r['reconstruction_loss']:.2f} | "
                f"Z_{r['factor']} | {'yes' if r['same_sign'] else 'no'} | {ranks} | {r['auroc_stim_vs_ctrl']:.3f} | "
                f"{r['train_seconds']:.0f} |"
            )
        lines += [
            "",
            "| tool | -ELBO median | mean [min, max] | sd | AUROC mean | seeds with the ISGs of one sign | "
            "worst ISG rank |",
            "|---|---|---|---|---|---|---|",
        ]
        for tool in ("atlasvi", "scvi-tools"):
            t = s[tool]
            n_seeds = t.get("n_seeds", result.get("n_seeds"))
            lines.append(
                f"| {tool} | {t.get('neg_elbo_median', float('nan')):.2f} | {t['neg_elbo_mean']:.2f} "
                f"[{t['neg_elbo_min']:.2f}, {t['neg_elbo_max']:.2f}] | {t.get('neg_elbo_sd', float('nan')):.2f} | "
                f"{t['auroc_mean']:.3f} | {t['isg_same_sign_seeds']} of {n_seeds} | {t['max_isg_rank_worst']} |"
            )
        within = "within" if s["atlasvi_mean_within_scvi_range"] else "outside"
        overlap = "overlap" if s["ranges_overlap"] else "do not overlap"
        lines += [
            "",
            f"atlasvi's mean held-out -ELBO is {within} scvi-tools' seed range (difference of the means "
            f"{s['neg_elbo_mean_difference']:+.2f} nats per cell); the two tools' ranges {overlap}.",
        ]
        if "mann_whitney_p" in s:
            lines[-1] += (
                f" Difference of the medians {s['neg_elbo_median_difference']:+.2f} nats per cell; two-sided "
                f"Mann-Whitney U over the seeds p = {s['mann_whitney_p']:.2f}"
                + (": not significant at the 5% level." if s["mann_whitney_p"] >= 0.05 else ".")
            )
        if "cross_evaluation_max_abs_diff" in s:
            lines[-1] += (
                f" The held-out evaluation is the same: scvi-tools' trained weights in atlasvi's module, evaluated by "
                f"atlasvi over as many ({DRAWS}) seeded draws, are within "
                f"{s['cross_evaluation_max_abs_diff']:.2f} nats per cell of scvi-tools' `get_elbo` in each of the "
                f"{s['cross_evaluation_seeds']} seeds with that column."
            )
        if "atlasvi_tail_fall_median" in s:
            fall, tail = s["atlasvi_tail_fall_median"], min(TAIL, result["max_epochs"] - 1)
            lines[-1] += (
                f" atlasvi's held-out -ELBO changed by {-fall:+.1f} nats per cell over the last {tail} epochs (median "
                "over seeds)"
                + (
                    ": still falling, each seed's figure a point on a curve that has not converged."
                    if fall > 0
                    else "."
                )
            )
        if "paired" in s:
            d, e, a = (s["paired"][k] for k in ("neg_elbo", "neg_elbo_draws", "auroc_stim_vs_ctrl"))
            lines += [
                "",
                f"Paired (scvi-tools started from atlasvi's initial weights of each seed; {d['n']} seeds), atlasvi - "
                f"scvi-tools: held-out -ELBO {d['mean']:+.2f} ± {d['se']:.2f} nats per cell (mean ± standard error "
                f"of the paired differences; sd {d['sd']:.2f}, t = {d['t']:.2f}); mean of {DRAWS} draws "
                f"{e['mean']:+.2f} ± {e['se']:.2f} (sd {e['sd']:.2f}, t = {e['t']:.2f}); ISG-factor AUROC "
                f"{a['mean']:+.3f} ± {a['se']:.3f} (t = {a['t']:.2f}).",
            ]
    return "\n".join(lines) + "\n"


def stores(config: str, workdir: Path) -> tuple[Path, Path]:
    """(train store, held-out store) of fidelity.py's Kang cells with the batch covariate `config`: `sample` as
    fidelity.py builds them, or `none`: the same cells and genes with one constant batch for every cell."""
    import anndata as ad
    import pandas as pd

    from atlasvi.data import BuildConfig, build_store
    from benchmarks.fidelity import prepare

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sample = prepare("kang", workdir)
        if config == "sample":
            return sample
        built = []
        for part, source in zip(("train", "heldout"), sample, strict=True):
            store = workdir / f"{part}_nobatch.zarr"
            if not store.exists():
                adata = ad.read_zarr(source)
                adata.obs = pd.DataFrame({"all": "kang"}, index=adata.obs_names)
                adata.var = adata.var[["gene_ids"]]
                adata.write_h5ad(workdir / f"{part}_nobatch.h5ad")
                build_store(
                    BuildConfig(
                        inputs=[str(workdir / f"{part}_nobatch.h5ad")], output=str(store), batch_key="all",
                        gene_id_key="gene_ids",
                    )
                )  # fmt: skip
            built.append(store)
    return built[0], built[1]


def run_dir(config: str, tool: str, args) -> Path:
    """The work folder of a tool's runs: per batch setup, with --same-init its own, and atlasvi's runs with
    --nb-formula scvi-tools another (scvi-tools' runs are shared)."""
    name = config + ("_same_init" if args.same_init else "")
    return WORK / (name + ("_scvi_nb" if tool == "atlasvi" and args.nb_formula == "scvi-tools" else ""))


def one_run(config: str, tool: str, seed: int, train_store: Path, heldout_store: Path, args) -> dict:
    """The figures of one tool's run (cached in the work folder; --rerun trains again). With --same-init the
    atlasvi run (first) saves its initial weights and the scvi-tools run starts from them."""
    out = run_dir(config, tool, args)
    out.mkdir(parents=True, exist_ok=True)
    cached = out / f"{tool}_seed{seed}_e{args.max_epochs}.json"
    init = run_dir(config, "scvi-tools", args) / f"init_seed{seed}.pt" if args.same_init else None
    if cached.exists() and not args.rerun:
        return json.loads(cached.read_text())
    if tool == "atlasvi":
        figures = atlasvi_side(train_store, heldout_store, seed, out, args, init)
    else:
        command = [
            str(SCVI_PYTHON), __file__, "--side", "scvi", "--seed", str(seed), "--train", str(train_store),
            "--heldout", str(heldout_store), "--out", str(out), "--max-epochs", str(args.max_epochs),
            "--n-epochs-kl-warmup", str(args.n_epochs_kl_warmup), "--batch-size", str(args.batch_size),
            "--batch-key", config,
        ] + (["--init", str(init)] if init is not None else [])  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
        done = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        figures["neg_elbo_draws_atlasvi_eval"] = cross_evaluate(
            train_store, heldout_store, out / f"scvi_state_seed{seed}.pt"
        )
    cached.write_text(json.dumps(figures))
    return figures


def run(args: argparse.Namespace) -> None:
    import anndata as ad
    import torch

    torch.set_num_threads(1)
    heldout_file()
    obs = ad.read_h5ad(KANG, backed="r").obs
    condition = dict(zip(obs.index.astype(str), obs["condition"].astype(str), strict=True))
    results = HERE / "results"
    previous = json.loads((results / f"{args.out}.json").read_text()) if args.merge else {}
    for key in ("max_epochs", "n_epochs_kl_warmup", "batch_size"):
        if previous and previous[key] != getattr(args, key):
            raise SystemExit(f"--merge: the committed results ran {key} {previous[key]}, not {getattr(args, key)}")
    command = "python benchmarks/ldvae_fidelity.py " + " ".join(sys.argv[1:])
    kept = {  # the committed rows this run does not redo, each with the command that ran it
        c: [{"command": part.get("command", previous["command"])} | r for r in part["runs"]]
        for c, part in previous.get("configs", {}).items()
    }
    configs = {c: {"runs": rows, "summary": summary(rows)} for c, rows in kept.items() if c not in args.configs}
    same_function = previous.get("weights_check") if "sample" not in args.configs else None
    result = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), CPU only, 1 torch thread",
        "max_epochs": args.max_epochs,
        "n_epochs_kl_warmup": args.n_epochs_kl_warmup,
        "batch_size": args.batch_size,
        "same_init": args.same_init,
        "nb_formula": args.nb_formula,
        "weights_check": same_function,
    }
    for config in args.configs:
        train_store, heldout_store = stores(config, HERE / ".cache" / "fidelity" / "kang")
        result["n_train"], result["n_heldout"] = (ad.read_zarr(s).n_obs for s in (train_store, heldout_store))
        rows = [r for r in kept.get(config, []) if r["seed"] not in args.seeds]
        for seed in args.seeds:
            load = "load average at start " + " ".join(f"{x:.2f}" for x in os.getloadavg())
            for tool in ("atlasvi", "scvi-tools"):
                figures = one_run(config, tool, seed, train_store, heldout_store, args)
                row = {"command": command, "load": load, "tool": tool, "seed": seed} | figures
                out = run_dir(config, tool, args)
                row |= evaluate(tool.split("-")[0], seed, out, condition)
                print(json.dumps({"config": config} | row), flush=True)
                rows.append(row)
            rows.sort(key=lambda r: (r["seed"], r["tool"]))
            configs[config] = {"runs": rows, "summary": summary(rows, args.same_init)}
            write(result, configs, args.out)  # after every seed: a stopped run keeps what it measured
        if config == "sample":
            result["weights_check"] = weights_check(train_store)
            print(json.dumps({"weights_check": result["weights_check"]}), flush=True)
    print(write(result, configs, args.out))


def write(result: dict, configs: dict, name: str) -> str:
    """results/NAME.json and .md with the configs measured so far; returns the markdown."""
    result["n_genes"] = next(iter(configs.values()))["runs"][0]["n_genes"]
    result["configs"] = {c: configs[c] for c in CONFIGS if c in configs}
    results = HERE / "results"
    (results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (results / f"{name}.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["driver", "scvi", "scvi-weights"], default="driver")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seed", type=int, default=0, help="(scvi side) the seed")
    parser.add_argument("--train", help="(scvi side) the training store")
    parser.add_argument("--heldout", help="(scvi side) the held-out store")
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--n-epochs-kl-warmup", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="batch covariates")
    parser.add_argument("--batch-key", default="sample", help="(scvi side) the batch key, or none")
    parser.add_argument(
        "--same-init", action="store_true",
        help="scvi-tools starts each seed from atlasvi's initial weights of that seed (paired differences reported)",
    )  # fmt: skip
    parser.add_argument(
        "--nb-formula", choices=["atlasvi", "scvi-tools"], default="atlasvi",
        help="atlasvi trains with its own NB log-likelihood or scvi-tools' (eps 1e-8 in the logs, float32 lgamma)",
    )  # fmt: skip
    parser.add_argument("--init", help="(scvi side) initial weights to start from (fidelity_data.save_init's file)")
    parser.add_argument("--stream", type=int, help="(scvi side) seed torch after the initial weights, for training")
    parser.add_argument("--score", help="(scvi side) atlasvi's trained weights to score too (save_init's file)")
    parser.add_argument("--out", default="ldvae_fidelity", help="results/OUT.json and .md; (scvi side) where to write")
    parser.add_argument("--rerun", action="store_true", help="train again where a run's figures are cached")
    parser.add_argument(
        "--merge", action="store_true",
        help="keep the committed rows of the configs and seeds this run does not redo (each row names its command)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.side == "scvi":
        scvi_side(args)
    elif args.side == "scvi-weights":
        scvi_weights_side(args)
    else:
        run(args)


if __name__ == "__main__":
    sys.exit(main())
