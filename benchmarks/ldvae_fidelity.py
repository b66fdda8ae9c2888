"""LDVAE side by side: atlasvi's `ldvae` and scvi-tools' LinearSCVI on Kang (held-out ELBO, the interferon factor).

    python benchmarks/ldvae_fidelity.py --seeds 0 1 2 --max-epochs 200 --n-epochs-kl-warmup 50

The cells, genes and held-out split are benchmarks/fidelity.py's for Kang (`prepare`: the 2000-HVG rule, which
keeps all 1267 genes, 10% of the cells held out by numpy default_rng(0) as fidelity_data.py's `make_heldout`). Two
setups of the batch covariate: `sample` (fidelity.py's batch key) and `none` (the same cells and genes, one batch):
Kang's samples are each all ctrl or all stim, so with `sample` the decoder's per-batch terms can carry the
interferon response. Both tools train the LDVAE defaults (n_latent 10, n_hidden 128, 1 encoder layer, NB, gene
dispersion, latent library size, no decoder bias) for the same epochs, KL warm-up and batch size on the training
cells; the held-out -ELBO is per cell at KL weight 1 (scvi-tools: -`get_elbo(heldout)`). The scvi-tools side is
this file run with `--side scvi` in the scvi venv (benchmarks/.cache/scvi-venv); it imports nothing of atlasvi.
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
CONFIGS = ("sample", "none")  # the batch covariate: Kang's sample (fidelity.py's), or none


# --------------------------------------------------------------------------------------------- scvi-tools side
def scvi_side(args: argparse.Namespace) -> None:
    """Train scvi-tools' LinearSCVI on the training store's cells; write loadings, latent and the held-out ELBO."""
    import logging

    import anndata as ad
    import scvi

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
    started = time.perf_counter()
    model.train(
        max_epochs=args.max_epochs, accelerator="cpu", devices=1, train_size=1.0, batch_size=args.batch_size,
        early_stopping=False, enable_progress_bar=False,
        plan_kwargs={"n_epochs_kl_warmup": args.n_epochs_kl_warmup, "n_steps_kl_warmup": None},
    )  # fmt: skip
    seconds = time.perf_counter() - started
    neg_elbo = -float(model.get_elbo(held, batch_size=args.batch_size))
    recon = float(model.get_reconstruction_error(held, batch_size=args.batch_size)["reconstruction_loss"])
    loadings = model.get_loadings()
    both = ad.concat([train, held])
    latent = model.get_latent_representation(both)
    out = Path(args.out)
    np.save(out / f"scvi_latent_seed{args.seed}.npy", latent)
    (out / f"scvi_cells_seed{args.seed}.txt").write_text("\n".join(both.obs_names) + "\n")
    loadings.to_csv(out / f"scvi_loadings_seed{args.seed}.csv")
    print(json.dumps({"neg_elbo": neg_elbo, "reconstruction_loss": recon, "train_seconds": seconds}))


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
    state = {
        k.removeprefix("weight:").replace("fc_layers.Layer 0", "layers.0"): torch.tensor(saved[k])
        for k in saved.files
        if k.startswith("weight:") and "px_dropout_decoder" not in k
    }
    module.load_state_dict(state, strict=True)
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


# --------------------------------------------------------------------------------------------- atlasvi side
def atlasvi_side(train_store: Path, heldout_store: Path, seed: int, out: Path, args: argparse.Namespace) -> dict:
    """Train atlasvi's LDVAE module (registry defaults) as fidelity.py trains scVI; the same outputs as scvi_side."""
    import anndata as ad
    import pandas as pd
    import torch

    from atlasvi.data import LoaderConfig, StreamingLoader
    from atlasvi.models.ldvae import LDVAEModule
    from atlasvi.train import TrainConfig, fit
    from benchmarks.fidelity import latent

    torch.manual_seed(seed)
    train = StreamingLoader(train_store, LoaderConfig(batch_size=args.batch_size, seed=seed))
    heldout = StreamingLoader(heldout_store, LoaderConfig(batch_size=args.batch_size))
    module = LDVAEModule(train.store.schema)
    config = TrainConfig(max_epochs=args.max_epochs, n_epochs_kl_warmup=args.n_epochs_kl_warmup, seed=seed)
    started = time.perf_counter()
    history = fit(module, train, heldout, config)
    seconds = time.perf_counter() - started
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
    last = history[-1]
    return {
        "neg_elbo": last.validation_elbo,
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


def summary(rows: list[dict]) -> dict:
    out = {}
    for tool in ("atlasvi", "scvi-tools"):
        mine = [r for r in rows if r["tool"] == tool]
        elbo = np.array([r["neg_elbo"] for r in mine])
        out[tool] = {
            "neg_elbo_mean": float(elbo.mean()),
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
    return out


def markdown(result: dict) -> str:
    w = result["weights_check"] or {}
    lines = [
        "# LDVAE fidelity: atlasvi `ldvae` vs scvi-tools LinearSCVI on Kang",
        "",
        f"Command: `{result['command']}`; machine: {result['machine']}.",
        f"{result['n_train']} training / {result['n_heldout']} held-out cells x {result['n_genes']} genes, "
        f"{result['max_epochs']} epochs, KL warm-up {result['n_epochs_kl_warmup']} epochs, batch size "
        f"{result['batch_size']}, LDVAE defaults (n_latent 10, NB, gene dispersion, latent library size), "
        f"{result['n_seeds']} seeds per tool. ISG factor: the factor with the largest |mean loading| of ISG15, IFI6, "
        "IFIT1, IFIT3, MX1; ranks are among all genes by the oriented loading (1 = top); AUROC: that factor's "
        "oriented posterior mean, stim vs ctrl, over all cells.",
        "",
        "Kang's samples are each all ctrl or all stim (ctrl101, ctrl107, stim101, stim107), so with `sample` as the "
        "batch (fidelity.py's setup) the decoder's per-batch terms can carry the interferon response and the latent "
        "need not; the second setup has no batch covariate.",
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
            "| tool | seed | held-out -ELBO | held-out recon | ISG factor | same sign | ISG ranks | AUROC stim vs ctrl "
            "| train s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in part["runs"]:
            ranks = ", ".join(f"{g} {k}" for g, k in r["isg_ranks"].items())
            lines.append(
                f"| {r['tool']} | {r['seed']} | {r['neg_elbo']:.2f} | {r['reconstruction_loss']:.2f} | "
                f"Z_{r['factor']} | {'yes' if r['same_sign'] else 'no'} | {ranks} | {r['auroc_stim_vs_ctrl']:.3f} | "
                f"{r['train_seconds']:.0f} |"
            )
        lines += [
            "",
            "| tool | -ELBO mean [min, max] | AUROC mean | seeds with the ISGs of one sign | worst ISG rank |",
            "|---|---|---|---|---|",
        ]
        for tool in ("atlasvi", "scvi-tools"):
            t = s[tool]
            lines.append(
                f"| {tool} | {t['neg_elbo_mean']:.2f} [{t['neg_elbo_min']:.2f}, {t['neg_elbo_max']:.2f}] | "
                f"{t['auroc_mean']:.3f} | {t['isg_same_sign_seeds']} of {result['n_seeds']} | "
                f"{t['max_isg_rank_worst']} |"
            )
        within = "within" if s["atlasvi_mean_within_scvi_range"] else "outside"
        overlap = "overlap" if s["ranges_overlap"] else "do not overlap"
        lines += [
            "",
            f"atlasvi's mean held-out -ELBO is {within} scvi-tools' seed range (difference of the means "
            f"{s['neg_elbo_mean_difference']:+.2f} nats per cell); the two tools' ranges {overlap}.",
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


def one_run(config: str, tool: str, seed: int, train_store: Path, heldout_store: Path, args) -> dict:
    """The figures of one tool's run (cached in the work folder; --rerun trains again)."""
    out = WORK / config
    out.mkdir(parents=True, exist_ok=True)
    cached = out / f"{tool}_seed{seed}_e{args.max_epochs}.json"
    if cached.exists() and not args.rerun:
        return json.loads(cached.read_text())
    if tool == "atlasvi":
        figures = atlasvi_side(train_store, heldout_store, seed, out, args)
    else:
        command = [
            str(SCVI_PYTHON), __file__, "--side", "scvi", "--seed", str(seed), "--train", str(train_store),
            "--heldout", str(heldout_store), "--out", str(out), "--max-epochs", str(args.max_epochs),
            "--n-epochs-kl-warmup", str(args.n_epochs_kl_warmup), "--batch-size", str(args.batch_size),
            "--batch-key", config,
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
        done = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
        figures = json.loads(done.stdout.strip().splitlines()[-1])
    cached.write_text(json.dumps(figures))
    return figures


def run(args: argparse.Namespace) -> None:
    import anndata as ad
    import torch

    torch.set_num_threads(1)
    heldout_file()
    obs = ad.read_h5ad(KANG, backed="r").obs
    condition = dict(zip(obs.index.astype(str), obs["condition"].astype(str), strict=True))
    configs, same_function = {}, None
    for config in args.configs:
        train_store, heldout_store = stores(config, HERE / ".cache" / "fidelity" / "kang")
        rows = []
        for seed in args.seeds:
            for tool in ("atlasvi", "scvi-tools"):
                figures = one_run(config, tool, seed, train_store, heldout_store, args)
                row = {"tool": tool, "seed": seed} | figures
                row |= evaluate(tool.split("-")[0], seed, WORK / config, condition)
                print(json.dumps({"config": config} | row), flush=True)
                rows.append(row)
        configs[config] = {"runs": rows, "summary": summary(rows)}
        if config == "sample":
            same_function = weights_check(train_store)
            print(json.dumps({"weights_check": same_function}), flush=True)
    n_train, n_held = (ad.read_zarr(s).n_obs for s in (train_store, heldout_store))
    result = {
        "command": "python benchmarks/ldvae_fidelity.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), CPU only, 1 torch thread",
        "n_train": n_train,
        "n_heldout": n_held,
        "n_genes": rows[0]["n_genes"],
        "n_seeds": len(args.seeds),
        "max_epochs": args.max_epochs,
        "n_epochs_kl_warmup": args.n_epochs_kl_warmup,
        "batch_size": args.batch_size,
        "weights_check": same_function,
        "configs": configs,
    }
    results = HERE / "results"
    (results / "ldvae_fidelity.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / "ldvae_fidelity.md").write_text(markdown(result))
    print(markdown(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["driver", "scvi", "scvi-weights"], default="driver")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seed", type=int, default=0, help="(scvi side) the seed")
    parser.add_argument("--train", help="(scvi side) the training store")
    parser.add_argument("--heldout", help="(scvi side) the held-out store")
    parser.add_argument("--out", help="(scvi side) where to write")
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--n-epochs-kl-warmup", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="batch covariates")
    parser.add_argument("--batch-key", default="sample", help="(scvi side) the batch key, or none")
    parser.add_argument("--rerun", action="store_true", help="train again where a run's figures are cached")
    args = parser.parse_args()
    if args.side == "scvi":
        scvi_side(args)
    elif args.side == "scvi-weights":
        scvi_weights_side(args)
    else:
        run(args)


if __name__ == "__main__":
    sys.exit(main())
