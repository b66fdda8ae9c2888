"""PeakVI fidelity: atlasvi's PEAKVI next to scvi-tools 1.4.2's on Granja 2019 BMMC scATAC (600 cells x 5000 peaks).

    .venv/bin/python benchmarks/peakvi_fidelity.py --seeds 0 1 2

Both tools get the same cells: 10% of the file's cells (numpy default_rng(0).choice, h5ad order: 60 cells) are held
out and never trained on; the other 540 are written to one h5ad that both read (counts, batch `Group`, labels
`BioClassification`). Per seed both tools also split those 540 cells the same way into 486 training and 54
validation cells (early stopping's): atlasvi's split of a training store built with that seed's row permutation
(BuildConfig seed; the validation cells are its last 10% rows, `split_rows`), handed to scvi-tools' DataSplitter as
`external_indexing` (`--scvi-split own`: scvi-tools draws its own split from its seed). Which 54 cells are left out
of training moves the held-out BCE by about 2 nats, so with each tool's own split the comparison measures the splits
as much as the training (benchmarks/README.md). Each tool trains with its PEAKVI defaults (n_hidden int(sqrt(5000))
= 70, n_latent int(sqrt(70)) = 8, 2 + 2 layers, AdamW lr 1e-4, weight decay 1e-3, eps 1e-8, KL warm-up 50 epochs,
batch 128, up to 500 epochs with early stopping on the reconstruction of the validation cells, patience 50; `--max-
epochs` / `--n-epochs-kl-warmup` / `--no-early-stopping` change that for both); the table gives the epochs each tool
ran. Per seed and tool:

- held-out reconstruction: BCE(p d f, x > 0) summed over peaks, mean over the 60 held-out cells (nats per cell),
  at z = the posterior mean (deterministic; computed by this script from each tool's module the same way), and
  the tool's own one-draw figure (scvi-tools' get_reconstruction_error, atlasvi's get_reconstruction_error);
- label kNN accuracy of the latent (posterior means of all 600 cells): 15-nearest-neighbour classifier
  (Euclidean), stratified 5-fold cross-validation (sklearn, shuffled with random_state 0) on BioClassification;
  the same function scores both tools' latents, both in the h5ad files' cell order (training then held-out
  cells), so both get the same folds.

The scvi-tools half is this file run with `--side scvi` in the scvi-tools venv (benchmarks/.cache/scvi-venv, `bash
benchmarks/setup_scvi_venv.sh`) as a subprocess after atlasvi's seeds (one process at a time), one torch thread
each. Output: results/peakvi_fidelity.json and .md (`--out NAME` for another name).
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

from benchmarks.fidelity_data import KNN_FOLDS, KNN_NEIGHBOURS, knn_accuracy, paired_differences, seed_summary

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
GRANJA = SHARED / "granja2019_bmmc_scatac_5kpeaks.h5ad"
SCVI_PYTHON = HERE / ".cache" / "scvi-venv" / "bin" / "python"
CACHE = HERE / ".cache" / "peakvi_fidelity"
BATCH_KEY, LABELS_KEY = "Group", "BioClassification"
HELD_OUT_FRACTION = 0.1
SPLITS = {  # --scvi-split: which 54 of the 540 cells each tool validates on
    "atlasvi": "per seed the same 54 for both tools, atlasvi's split of the training store built with the seed's"
    " row permutation, given to scvi-tools as DataSplitter external_indexing",
    "own": "each tool's own split (atlasvi's of its store built with the seed's permutation, scvi-tools' drawn from"
    " its seed)",
}


def atlasvi_knn_accuracy(model, stores: list[Path], h5ads: list[Path]) -> float:
    """`knn_accuracy` of atlasvi's latent (posterior means) of the stores' cells, taken in the cell order of the
    h5ad files the stores were built from (a store permutes its cells), so the folds are those of scvi-tools' run."""
    import anndata as ad

    latent = np.concatenate([model.get_latent_representation(store=store) for store in stores])
    obs = [ad.read_zarr(store).obs for store in stores]
    names = np.concatenate([o.index.to_numpy() for o in obs])
    labels = np.concatenate([o[LABELS_KEY].astype(str).to_numpy() for o in obs])
    wanted = np.concatenate([ad.read_h5ad(h5ad, backed="r").obs_names.to_numpy() for h5ad in h5ads])
    order = {name: i for i, name in enumerate(names)}
    rows = np.array([order[name] for name in wanted])
    return knn_accuracy(latent[rows], labels[rows])


def held_out_mask(n_cells: int) -> np.ndarray:
    """(n_cells,) bool: the held-out cells, numpy default_rng(0).choice of 10% in h5ad order."""
    picked = np.random.default_rng(0).choice(n_cells, size=round(HELD_OUT_FRACTION * n_cells), replace=False)
    mask = np.zeros(n_cells, dtype=bool)
    mask[picked] = True
    return mask


def prepare(seeds: list[int]) -> dict:
    """The train and held-out h5ad files (both tools read them), atlasvi's held-out store and one training store
    per seed (built with the seed's row permutation), and per seed the validation cells: positions in the train
    h5ad of the store's validation rows (`split_rows` at TrainConfig's validation_fraction)."""
    import anndata as ad

    from atlasvi.data import BuildConfig, build_store, split_rows
    from atlasvi.train import TrainConfig

    CACHE.mkdir(parents=True, exist_ok=True)
    paths = {name: CACHE / f"{name}.h5ad" for name in ("train", "heldout")}
    stores = {"heldout_store": CACHE / "heldout.zarr"} | {
        f"train_store_{s}": CACHE / f"train_seed{s}.zarr" for s in seeds
    }
    adata = ad.read_h5ad(GRANJA)
    adata.obs = adata.obs[[BATCH_KEY, LABELS_KEY]].copy()
    held = held_out_mask(adata.n_obs)
    for name, cells in (("train", ~held), ("heldout", held)):
        if not paths[name].exists():
            adata[cells].copy().write_h5ad(paths[name])
    for key, store in stores.items():
        if not store.exists():
            source = paths["heldout" if key == "heldout_store" else "train"]
            seed = 0 if key == "heldout_store" else int(key.rsplit("_", 1)[1])
            config = BuildConfig(
                inputs=[str(source)], output=str(store), batch_key=BATCH_KEY, labels_key=LABELS_KEY, seed=seed
            )
            build_store(config)
    train_names = ad.read_h5ad(paths["train"], backed="r").obs_names
    validation = {}
    for seed in seeds:
        names = ad.read_zarr(stores[f"train_store_{seed}"]).obs_names
        start, stop = split_rows(len(names), TrainConfig().validation_fraction)[1]
        validation[str(seed)] = sorted(train_names.get_indexer(names[start:stop]).tolist())
    return paths | stores | {"validation": validation}


def heldout_bce(model, store: Path) -> float:
    """atlasvi's held-out BCE(p d f, x > 0) at the posterior mean of z, summed over peaks, mean over the cells."""
    import torch
    import torch.nn.functional as F

    from atlasvi.data import open_store

    held = open_store(store)
    module = model.module.eval()
    total = 0.0
    with torch.no_grad():
        for batch in model._batches(held, None, 1024):
            inputs = module.unpack(batch)
            inference = module.inference(inputs)
            probs = module.generative(inference["qz"].loc, inference["library"], inputs)["probs"]
            total += F.binary_cross_entropy(probs, (inputs.x > 0).float(), reduction="none").sum().item()
    return total / held.n_cells


def train_fields(args: argparse.Namespace) -> dict:
    """The training options both sides apply over their PEAKVI defaults."""
    fields: dict = {}
    if args.max_epochs is not None:
        fields["max_epochs"] = args.max_epochs
    if args.n_epochs_kl_warmup is not None:
        fields["n_epochs_kl_warmup"] = args.n_epochs_kl_warmup
    if args.no_early_stopping:
        fields["early_stopping"] = False
    return fields


# --------------------------------------------------------------------------------------------- atlasvi
def atlasvi_side(paths: dict, seed: int, fields: dict, init: Path | None = None) -> dict:
    """atlasvi's PEAKVI on the seed's training store; the figures of one seed. init: where to save the module's
    initial weights under scvi-tools' names (`fidelity_data.save_init`)."""
    import torch

    from atlasvi.api import PEAKVI
    from atlasvi.data import LoaderConfig
    from atlasvi.train import TrainConfig
    from benchmarks.fidelity_data import save_init

    torch.set_num_threads(1)
    train = paths[f"train_store_{seed}"]
    model = PEAKVI(train, device="cpu", seed=seed)
    if init is not None:
        save_init(model.module.state_dict(), "PEAKVI", init)
    started = time.perf_counter()
    model.fit(TrainConfig(seed=seed, **fields), LoaderConfig(batch_size=128, seed=seed))
    seconds = time.perf_counter() - started
    knn = atlasvi_knn_accuracy(model, [train, paths["heldout_store"]], [paths["train"], paths["heldout"]])
    return {
        "tool": "atlasvi",
        "seed": seed,
        "heldout_bce_mean_z": heldout_bce(model, paths["heldout_store"]),
        "heldout_bce_one_draw": model.get_reconstruction_error(store=paths["heldout_store"]),
        "knn_accuracy": knn,
        "epochs": len(model.history),
        "train_seconds": seconds,
        "n_hidden": model.module.n_hidden,
        "n_latent": model.n_latent,
    }


# --------------------------------------------------------------------------------------------- scvi-tools
def scvi_side(paths: dict, seed: int, fields: dict, init: Path | None = None) -> dict:
    """scvi-tools' PEAKVI on the training h5ad with the seed's validation cells (run in the scvi-tools venv); the
    figures of one seed. init: initial weights to start from (`fidelity_data.save_init`'s file)."""
    import logging

    import anndata as ad
    import scvi
    import torch

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = seed
    train, held = ad.read_h5ad(paths["train"]), ad.read_h5ad(paths["heldout"])
    scvi.model.PEAKVI.setup_anndata(train, batch_key=BATCH_KEY)
    model = scvi.model.PEAKVI(train)
    if init is not None:
        from benchmarks.fidelity_data import load_init

        load_init(model.module, init)
    options = {k: v for k, v in fields.items() if k in ("max_epochs", "early_stopping", "n_epochs_kl_warmup")}
    started = time.perf_counter()
    if paths["validation"] is not None:
        validation = np.array(paths["validation"][str(seed)])
        split = [np.setdiff1d(np.arange(train.n_obs), validation), validation, np.array([], dtype=int)]
        options["datasplitter_kwargs"] = {"external_indexing": split}
    model.train(accelerator="cpu", devices=1, enable_progress_bar=False, **options)
    seconds = time.perf_counter() - started
    held = model._validate_anndata(held)  # registered like the training data (same batches)
    module = model.module
    return {
        "tool": "scvi-tools",
        "seed": seed,
        "heldout_bce_mean_z": scvi_heldout_bce(model, held),
        "heldout_bce_one_draw": float(model.get_reconstruction_error(held)["reconstruction_loss"]),
        "knn_accuracy": scvi_knn_accuracy(model, train, held),
        "epochs": int(model.history["reconstruction_loss_train"].shape[0]),
        "train_seconds": seconds,
        "n_hidden": int(module.n_hidden),
        "n_latent": int(module.n_latent),
        "versions": {"scvi-tools": scvi.__version__, "torch": torch.__version__},
    }


def scvi_heldout_bce(model, held) -> float:
    """scvi-tools' held-out BCE at the posterior mean of z, as `heldout_bce` (held: registered with the model)."""
    import scvi
    import torch

    module = model.module.eval()
    total = 0.0
    with torch.no_grad():
        for tensors in model._make_data_loader(adata=held, batch_size=1024):
            inference = module.inference(**module._get_inference_input(tensors))
            generative = module.generative(**module._get_generative_input(tensors, inference), use_z_mean=True)
            factors = torch.sigmoid(module.region_factors)
            x = tensors[scvi.REGISTRY_KEYS.X_KEY]
            total += module.get_reconstruction_loss(generative["px"], inference["d"], factors, x).sum().item()
    return total / held.n_obs


def scvi_knn_accuracy(model, train, held) -> float:
    """`knn_accuracy` of scvi-tools' latent of the training then the held-out cells (the h5ad files' order)."""
    latent = np.concatenate([model.get_latent_representation(train), model.get_latent_representation(held)])
    labels = np.concatenate([train.obs[LABELS_KEY].astype(str), held.obs[LABELS_KEY].astype(str)])
    return knn_accuracy(latent, labels)


# --------------------------------------------------------------------------------------------- report
def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# PeakVI fidelity: atlasvi vs scvi-tools 1.4.2 (Granja 2019 BMMC scATAC, 600 cells x 5000 peaks)",
        "",
        f"Command: `{meta['command']}`. Machine: {meta['machine']}.",
        "",
        "Same 540 training cells and 60 held-out cells (never trained on) for both tools; validation (early"
        f" stopping's) cells: {SPLITS[meta['scvi_split']]}. Each tool's PEAKVI defaults"
        f" (training options over them: {meta['train_fields'] or 'none'}); epochs: those each tool ran (early"
        " stopping's stop, else the maximum). Held-out BCE: nats per cell summed over"
        " peaks at the posterior mean of z (lower is better); one-draw: each tool's own get_reconstruction_error."
        f" kNN: {KNN_NEIGHBOURS}-NN label accuracy, stratified {KNN_FOLDS}-fold CV on the latent of all 600 cells.",
        "",
        "| tool | seed | epochs | held-out BCE (mean z) | held-out BCE (one draw) | kNN accuracy | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["tool"], r["seed"])):
        lines.append(
            f"| {r['tool']} | {r['seed']} | {r['epochs']} | {r['heldout_bce_mean_z']:.2f} | "
            f"{r['heldout_bce_one_draw']:.2f} | {r['knn_accuracy']:.3f} | {r['train_seconds']:.0f} |"
        )
    lines += ["", "| tool | held-out BCE (mean z), mean ± sd [min, max] | kNN accuracy, mean ± sd [min, max] |"]
    lines += ["|---|---|---|"]
    for tool in ("atlasvi", "scvi-tools"):
        bce, knn = seed_summary(rows, tool, "heldout_bce_mean_z"), seed_summary(rows, tool, "knn_accuracy")
        lines.append(
            f"| {tool} | {bce[0]:.2f} ± {bce[1]:.2f} [{bce[2]:.2f}, {bce[3]:.2f}] | "
            f"{knn[0]:.3f} ± {knn[1]:.3f} [{knn[2]:.3f}, {knn[3]:.3f}] |"
        )
    if meta.get("same_init"):
        bce, knn = (paired_differences(rows, key) for key in ("heldout_bce_mean_z", "knn_accuracy"))
        loads = "; ".join(f"seed {s} {load}" for s, load in meta["loads"].items())
        lines += [
            "",
            f"Paired: per seed, scvi-tools' module starts from atlasvi's initial weights of that seed ({bce['n']} "
            "seeds); minibatch order, dropout and the latent draws are each tool's own. atlasvi - scvi-tools, mean ± "
            "standard error of the paired differences (sd; t = mean / se):",
            "",
            f"- held-out BCE (mean z): {bce['mean']:+.2f} ± {bce['se']:.2f} nats per cell (sd {bce['sd']:.2f}; "
            f"t = {bce['t']:.2f}); per seed " + ", ".join(f"{d:+.2f}" for d in bce["differences"]) + ";",
            f"- kNN accuracy: {knn['mean']:+.3f} ± {knn['se']:.3f} (sd {knn['sd']:.3f}; t = {knn['t']:.2f}); per "
            "seed " + ", ".join(f"{d:+.3f}" for d in knn["differences"]) + ".",
            "",
            f"Load average (1, 5, 15 min) at each seed's start: {loads}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--n-epochs-kl-warmup", type=int, default=None)
    parser.add_argument("--no-early-stopping", action="store_true")
    parser.add_argument("--scvi-split", choices=sorted(SPLITS), default="atlasvi", help="scvi-tools' validation cells")
    parser.add_argument(
        "--same-init", action="store_true",
        help="scvi-tools starts each seed from atlasvi's initial weights of that seed (paired differences reported)",
    )  # fmt: skip
    parser.add_argument("--side", choices=["scvi"], default=None, help="internal: run the scvi-tools half")
    parser.add_argument("--paths", default=None, help="internal: the JSON of the prepared files")
    parser.add_argument("--init", default=None, help="internal: the scvi-tools half's initial weights (one seed)")
    parser.add_argument("--out", default="peakvi_fidelity", help="results/OUT.json and results/OUT.md")
    args = parser.parse_args()
    fields = train_fields(args)
    if args.side == "scvi":
        paths = json.loads(args.paths)
        for seed in args.seeds:
            print(json.dumps(scvi_side(paths, seed, fields, Path(args.init) if args.init else None)), flush=True)
        return
    paths = prepare(args.seeds)
    meta = {
        "command": " ".join(["python", "benchmarks/peakvi_fidelity.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), CPU only, 1 torch thread per side",
        "train_fields": fields,
        "scvi_split": args.scvi_split,
        "same_init": args.same_init,
        "held_out_cells": int(round(HELD_OUT_FRACTION * 600)),
        "loads": {},
    }
    given = paths | {"validation": paths["validation"] if args.scvi_split == "atlasvi" else None}
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    rows = []
    for seed in args.seeds:  # one seed of each tool after the other; the results written after every seed
        meta["loads"][str(seed)] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        init = CACHE / f"init_seed{seed}.pt" if args.same_init else None
        rows.append(atlasvi_side(paths, seed, fields, init))
        print(json.dumps(rows[-1]), flush=True)
        command = [str(SCVI_PYTHON), __file__, "--side", "scvi", "--paths", json.dumps(given, default=str)]
        command += ["--seeds", str(seed)] + (["--init", str(init)] if init is not None else [])
        for flag, value in (("--max-epochs", args.max_epochs), ("--n-epochs-kl-warmup", args.n_epochs_kl_warmup)):
            command += [flag, str(value)] if value is not None else []
        command += ["--no-early-stopping"] if args.no_early_stopping else []
        scvi = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
        if scvi.returncode != 0:
            raise SystemExit(f"the scvi-tools side failed (exit {scvi.returncode})")
        for line in scvi.stdout.splitlines():
            if line.startswith('{"tool"'):
                rows.append(json.loads(line))
                print(line, flush=True)
        results = HERE / "results"
        (results / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        (results / f"{args.out}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
