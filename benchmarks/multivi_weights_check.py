"""MultiVI weights check: scvi-tools 1.4.2's trained MULTIVAE weights in atlasvi's MULTIVIModule give its values.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/multivi_weights_check.py

Run after benchmarks/multivi_fidelity.py has prepared its files (`.cache/multivi_fidelity/`): scvi-tools' MULTIVI (its
defaults) trains 2 epochs on the 264 held-out sci-CAR A549 cells (paired, one batch), then, in eval mode, gives for
every cell the modality posteriors and their mixture, the two size factors, and at z = the mixed mean the per-cell
reconstruction terms of its loss (-log p(x_rna), the ATAC BCE); also its get_reconstruction_error per cell (one draw
of z), the figure benchmarks/multivi_fidelity.py reports. atlasvi's module, built on the store of the same cells, takes
those weights (names mapped: scvi-tools' `fc_layers.Layer i` is atlasvi's `layers.i`, the Linear inside scvi-tools'
`px_scale_decoder` / PeakVI `output` Sequentials is atlasvi's Linear; scvi-tools' protein modules, unused gene-cell
dispersion head and third modality weight are left out) and computes the same quantities. Output:
results/multivi_weights_check.json, the largest absolute and the mean difference of each.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/multivi_weights_check.py --dynamics 3 0 1 2

Training dynamics: scvi-tools' MULTIVI trains EPOCHS epochs on the fidelity benchmark's training cells (KL warm-up 10
epochs, as its table) per seed; atlasvi's trains as long from scvi-tools' seed-0 initial weights (names mapped as
above; its adversary keeps its own) and from its own initialisation per seed; each gives the held-out -log p(RNA)
per cell as multivi_fidelity.py computes it. Output: results/multivi_training_dynamics.json.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/multivi_weights_check.py --init-library 40

Initial RNA library: each tool's MULTIVI built (untrained) on the fidelity benchmark's training cells for seeds 0 to
N-1, the mean over the cells with RNA of its RNA library encoder's output (the log-library training starts from);
both tools' LibrarySizeEncoder classes built standalone under the same torch seeds (0-4), weight for weight; the
standalone encoder's mean output over 400 seeds (the distribution either tool draws from). Output:
results/multivi_init_library.json.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/multivi_weights_check.py --swap 10 5 2 0

Swapped starts: per seed, scvi-tools' MULTIVI trains EPOCHS epochs (KL warm-up WARMUP epochs, the fidelity table's
options) from atlasvi's initial weights of that seed, and atlasvi's from scvi-tools' (names mapped as above; each
tool's adversary keeps its own); each gives the held-out -log p(RNA) per cell as multivi_fidelity.py computes it.
Output: results/multivi_swap.json.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SCVI_PYTHON = HERE / ".cache" / "scvi-venv" / "bin" / "python"
CACHE = HERE / ".cache" / "multivi_fidelity"
EPOCHS = 2
SKIPPED = ("z_encoder_protein", "z_decoder_pro", "py_r", "background_pro", "mod_weights")


def scvi_side() -> None:
    """Train scvi-tools' MULTIVI on the held-out cells; write its weights and values to the cache (scvi-tools venv)."""
    import logging

    import scvi
    import torch
    from torch.distributions import Normal, kl_divergence

    sys.path.insert(0, str(HERE.parent))
    from benchmarks.multivi_fidelity import BATCH_KEY, _mudata

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = 0
    mdata = _mudata(str(CACHE / "heldout.h5ad"))
    modalities = {"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"}
    scvi.model.MULTIVI.setup_mudata(mdata, batch_key=BATCH_KEY, modalities=modalities)
    model = scvi.model.MULTIVI(mdata)
    model.train(max_epochs=EPOCHS, accelerator="cpu", devices=1, enable_progress_bar=False)
    module = model.module.eval()
    tensors = next(iter(model._make_data_loader(adata=mdata, batch_size=mdata.n_obs)))
    with torch.no_grad():
        inference = module.inference(**module._get_inference_input(tensors))
        inputs = module._get_generative_input(tensors, inference) | {"z": inference["qz_m"]}
        generative = module.generative(**inputs)
        x = inference["x"]
        x_rna, x_atac = x[:, : module.n_input_genes], x[:, module.n_input_genes :]
        values = {
            "qzm_expr": inference["qzm_expr"], "qzv_expr": inference["qzv_expr"],
            "qzm_acc": inference["qzm_acc"], "qzv_acc": inference["qzv_acc"],
            "qz_m": inference["qz_m"], "qz_v": inference["qz_v"],
            "libsize_expr": inference["libsize_expr"][:, 0], "libsize_acc": inference["libsize_acc"][:, 0],
            "px_scale": generative["px_scale"], "p": generative["p"],
            "rna": module.get_reconstruction_loss_expression(
                x_rna, generative["px_rate"], generative["px_r"], generative["px_dropout"]
            ),
            "atac": module.get_reconstruction_loss_accessibility(x_atac, generative["p"], inference["libsize_acc"]),
            "kl_z": kl_divergence(Normal(inference["qz_m"], inference["qz_v"].sqrt()), Normal(0, 1)).sum(-1),
        }  # fmt: skip
    torch.manual_seed(0)
    error = model.get_reconstruction_error(mdata, return_mean=False)
    reported = {
        "reported_rna": error["reconstruction_loss_expression"],
        "reported_atac": error["reconstruction_loss_accessibility"],
    }
    arrays = {k: v.numpy() for k, v in values.items()} | {k: np.asarray(v) for k, v in reported.items()}
    np.savez(CACHE / "scvi_values.npz", names=mdata.obs_names.to_numpy(), **arrays)
    np.savez(CACHE / "scvi_weights.npz", **{k: v.numpy() for k, v in module.state_dict().items()})


def atlasvi_name(name: str) -> str | None:
    """atlasvi's name of a scvi-tools MULTIVAE weight, or None for one atlasvi does not build."""
    if name.startswith(SKIPPED) or ".px_r_decoder." in name:
        return None
    name = re.sub(r"fc_layers\.Layer (\d+)", r"layers.\1", name)
    name = name.replace("px_scale_decoder.0.", "px_scale_decoder.")
    if name.startswith(("z_decoder_accessibility.output.0.", "l_encoder_accessibility.output.0.")):
        name = name.replace("output.0.", "output.")
    return name


def atlasvi_side() -> dict:
    """scvi-tools' weights in atlasvi's module on the same cells; the largest absolute difference of each value."""
    import anndata as ad
    import torch
    from torch.distributions import Normal, kl_divergence

    from atlasvi.analysis import minibatches
    from atlasvi.data import open_store
    from atlasvi.models.multivi import MULTIVIModule

    torch.set_num_threads(1)
    store = open_store(CACHE / "heldout.zarr")
    module = MULTIVIModule(store.schema).eval()
    weights = np.load(CACHE / "scvi_weights.npz")
    state = {atlasvi_name(k): torch.from_numpy(weights[k]) for k in weights.files if atlasvi_name(k) is not None}
    state["mod_weights"] = torch.from_numpy(weights["mod_weights"][:2])  # RNA, ATAC (scvi-tools' third: protein)
    module.load_state_dict(state)  # strict: every atlasvi weight comes from scvi-tools
    reference = np.load(CACHE / "scvi_values.npz", allow_pickle=True)
    order = {name: i for i, name in enumerate(reference["names"])}
    rows = [order[name] for name in ad.read_zarr(CACHE / "heldout.zarr").obs_names]
    batch = next(minibatches(store, None, store.n_cells, None, module.used_modalities))
    with torch.no_grad():
        inputs = module.unpack(batch)
        inference = module.inference(inputs)
        qz = inference["qz"]
        out = module.generative(qz.loc, inference["library"], inputs)
        probs = module.accessibility_probabilities(out["p"], inference["depth"])
        values = {
            "qzm_expr": inference["qz_expression"].loc, "qzv_expr": inference["qz_expression"].scale ** 2,
            "qzm_acc": inference["qz_accessibility"].loc, "qzv_acc": inference["qz_accessibility"].scale ** 2,
            "qz_m": qz.loc, "qz_v": qz.scale**2,
            "libsize_expr": inference["library"][:, 0], "libsize_acc": inference["depth"][:, 0],
            "px_scale": out["px_scale"], "p": out["p"],
            "rna": -out["px"].log_prob(inputs.x).sum(-1),
            "atac": torch.nn.functional.binary_cross_entropy(
                probs, (inputs.atac > 0).float(), reduction="none"
            ).sum(-1),
            "kl_z": kl_divergence(qz, Normal(0.0, 1.0)).sum(-1),
        }  # fmt: skip
        torch.manual_seed(0)
        output = module.loss(inputs)  # one draw of z, as the fidelity benchmark's held-out figure
    report = {}
    for key, value in values.items():
        theirs = reference[key][rows]
        report[key] = {
            "max_abs_diff": float(np.abs(value.numpy() - theirs).max()),
            "mean_diff": float((value.numpy() - theirs).mean()),  # atlasvi - scvi-tools
            "scvi_tools_mean_abs": float(np.abs(theirs).mean()),
        }
    rna_mask = inputs.rna_mask.float()
    report["reported_heldout_rna_per_cell"] = {
        "atlasvi": float(output.extra_metrics["reconstruction_rna"]),
        "atlasvi_at_z_mean": float(values["rna"].mul(rna_mask).mean()),
        "scvi_tools_get_reconstruction_error": float(reference["reported_rna"].mean()),
        "scvi_tools_at_z_mean": float(reference["rna"].mean()),
    }
    return report


def dynamics(epochs: int, seeds: list[int]) -> dict:
    """Training dynamics: scvi-tools' held-out -log p(RNA) after `epochs` epochs per seed (subprocesses), then
    atlasvi's from scvi-tools' seed-0 initial weights and from its own initialisation per seed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    scvi_tools = {}
    for seed in sorted(seeds):  # seed 0 first: it writes the initial weights atlasvi starts from
        command = [str(SCVI_PYTHON), __file__, "--dynamics-scvi", str(epochs), str(seed)]
        lines = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()
        scvi_tools[f"seed{seed}"] = json.loads(next(line for line in lines if line.startswith("{")))["scvi_heldout_rna"]
    return {
        "command": f"python benchmarks/multivi_weights_check.py --dynamics {epochs} {' '.join(map(str, seeds))}",
        "what": "held-out -log p(RNA) per cell (264 paired held-out cells, one draw of z, torch seed 0) after "
        f"{epochs} epochs on the fidelity benchmark's training cells, KL warm-up 10 epochs",
        "scvi_tools": scvi_tools,
        "atlasvi": atlasvi_dynamics(epochs, seeds),
    }


def main() -> None:
    if sys.argv[1:] == ["--side", "scvi"]:
        scvi_side()
        return
    if sys.argv[1:2] == ["--init-library-scvi"]:
        scvi_init_library(int(sys.argv[2]))
        return
    if sys.argv[1:2] == ["--init-library"]:
        report = init_library(int(sys.argv[2]))
        (HERE / "results" / "multivi_init_library.json").write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report, indent=1))
        return
    if sys.argv[1:2] == ["--swap-scvi"]:
        scvi_swap(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    if sys.argv[1:2] == ["--swap"]:
        report = swap(int(sys.argv[2]), int(sys.argv[3]), [int(s) for s in sys.argv[4:]])
        (HERE / "results" / "multivi_swap.json").write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report, indent=1))
        return
    if sys.argv[1:2] == ["--dynamics-scvi"]:
        scvi_dynamics(int(sys.argv[2]), int(sys.argv[3]))
        return
    if not (CACHE / "train.zarr").exists():
        raise SystemExit("run benchmarks/multivi_fidelity.py first (it prepares .cache/multivi_fidelity/)")
    if sys.argv[1:2] == ["--dynamics"]:
        report = dynamics(int(sys.argv[2]), [int(s) for s in sys.argv[3:]] or [0])
        (HERE / "results" / "multivi_training_dynamics.json").write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report, indent=1))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    if "--reuse" not in sys.argv:
        subprocess.run([str(SCVI_PYTHON), __file__, "--side", "scvi"], env=env, check=True)
    report = {
        "command": "python benchmarks/multivi_weights_check.py",
        "cells": 264,
        "scvi_tools_epochs": EPOCHS,
        "values": atlasvi_side(),
    }
    (HERE / "results" / "multivi_weights_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


def scvi_dynamics(epochs: int, seed: int = 0) -> None:
    """scvi-tools' MULTIVI on the fidelity benchmark's training cells: its initial weights, then its held-out
    -log p(RNA) per cell after `epochs` epochs (KL warm-up 10 epochs, as the benchmark's table)."""
    import logging

    import scvi
    import torch

    sys.path.insert(0, str(HERE.parent))
    from benchmarks.multivi_fidelity import BATCH_KEY, _mudata

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = seed
    train, held = _mudata(str(CACHE / "train.h5ad")), _mudata(str(CACHE / "heldout.h5ad"))
    held.obs["_indices"] = np.arange(held.n_obs)
    modalities = {"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"}
    scvi.model.MULTIVI.setup_mudata(train, batch_key=BATCH_KEY, modalities=modalities)
    model = scvi.model.MULTIVI(train)
    if seed == 0:
        np.savez(CACHE / "scvi_init.npz", **{k: v.numpy() for k, v in model.module.state_dict().items()})
    model.train(max_epochs=epochs, n_epochs_kl_warmup=10, accelerator="cpu", devices=1, enable_progress_bar=False)
    torch.manual_seed(0)
    error = model.get_reconstruction_error(held)
    print(json.dumps({"seed": seed, "scvi_heldout_rna": float(error["reconstruction_loss_expression"])}), flush=True)


def atlasvi_dynamics(epochs: int, seeds: list[int]) -> dict:
    """atlasvi's MULTIVI from scvi-tools' initial weights and from its own, `epochs` epochs each."""
    import torch

    from atlasvi.api import MULTIVI
    from atlasvi.data import LoaderConfig
    from atlasvi.train import TrainConfig
    from benchmarks.multivi_fidelity import atlasvi_heldout

    torch.set_num_threads(1)
    out = {}
    for start in ["scvi_init"] + [f"own_init_seed{seed}" for seed in seeds]:
        seed = 0 if start == "scvi_init" else int(start.rsplit("seed", 1)[1])
        model = MULTIVI(CACHE / "train.zarr", device="cpu", seed=seed)
        if start == "scvi_init":
            weights = np.load(CACHE / "scvi_init.npz")
            state = {atlasvi_name(k): torch.from_numpy(weights[k]) for k in weights.files if atlasvi_name(k)}
            state["mod_weights"] = torch.from_numpy(weights["mod_weights"][:2])
            missing, unexpected = model.module.load_state_dict(state, strict=False)
            assert not unexpected and all(k.startswith("adversary.") for k in missing), (missing, unexpected)
        model.fit(
            TrainConfig(seed=seed, max_epochs=epochs, n_epochs_kl_warmup=10), LoaderConfig(batch_size=128, seed=seed)
        )
        out[start] = atlasvi_heldout(model, CACHE / "heldout.zarr")["rna"]
        print(start, out[start], file=sys.stderr, flush=True)
    return out


STANDALONE_SEEDS = 5
LIBRARY_ENCODER = {"n_layers": 2, "n_hidden": 128, "use_batch_norm": False, "use_layer_norm": True}


def scvi_init_library(n_seeds: int) -> None:
    """scvi-tools' side of --init-library (its venv): per seed its MULTIVI's mean initial RNA log-library over the
    training cells with RNA; its LibrarySizeEncoder's weights built standalone under torch seeds 0-4 (to the cache)."""
    import logging

    import scvi
    import torch
    from scvi.module._multivae import LibrarySizeEncoder

    sys.path.insert(0, str(HERE.parent))
    from benchmarks.multivi_fidelity import BATCH_KEY, _mudata

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    train = _mudata(str(CACHE / "train.h5ad"))
    modalities = {"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"}
    scvi.model.MULTIVI.setup_mudata(train, batch_key=BATCH_KEY, modalities=modalities)
    tensors = None
    means = []
    for seed in range(n_seeds):
        scvi.settings.seed = seed
        model = scvi.model.MULTIVI(train)
        module = model.module.eval()
        if tensors is None:
            tensors = next(iter(model._make_data_loader(adata=train, batch_size=train.n_obs)))
        with torch.no_grad():
            inference = module.inference(**module._get_inference_input(tensors))
        has_rna = inference["x"][:, : module.n_input_genes].sum(1) > 0
        means.append(float(inference["libsize_expr"][has_rna, 0].mean()))
    weights = {}
    for seed in range(STANDALONE_SEEDS):
        torch.manual_seed(seed)
        encoder = LibrarySizeEncoder(module.n_input_genes, deep_inject_covariates=False, **LIBRARY_ENCODER)
        weights |= {f"{seed}|{k}": v.numpy() for k, v in encoder.state_dict().items()}
    np.savez(CACHE / "scvi_library_encoders.npz", **weights)
    print(json.dumps({"means": means}), flush=True)


def init_library(n_seeds: int) -> dict:
    """--init-library: both tools' mean initial RNA log-library per seed, the same-seed weight check and the
    standalone encoder's distribution over 400 seeds."""
    import torch
    from scipy.stats import mannwhitneyu

    from atlasvi.analysis import minibatches
    from atlasvi.api import MULTIVI
    from atlasvi.models.multivi.module import LibrarySizeEncoder

    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    command = [str(SCVI_PYTHON), __file__, "--init-library-scvi", str(n_seeds)]
    lines = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()
    scvi_tools = json.loads(next(line for line in lines if line.startswith("{")))["means"]
    torch.set_num_threads(1)
    atlasvi, x = [], []
    for seed in range(n_seeds):
        model = MULTIVI(CACHE / "train.zarr", device="cpu", seed=seed)
        libraries = []
        with torch.no_grad():
            for batch in minibatches(model.store, None, 1024, None, model.module.used_modalities):
                inputs = model.module.unpack(batch)
                libraries.append(model.module.l_encoder_expression(inputs.x)[inputs.rna_mask, 0])
                x += [inputs.x[inputs.rna_mask]] if seed == 0 else []
        atlasvi.append(float(torch.cat(libraries).mean()))
    reference, worst, population = np.load(CACHE / "scvi_library_encoders.npz"), 0.0, []
    counts = torch.cat(x)
    for seed in range(400):
        torch.manual_seed(seed)
        encoder = LibrarySizeEncoder(counts.shape[1], [], **LIBRARY_ENCODER)
        if seed < STANDALONE_SEEDS:
            for name, value in encoder.state_dict().items():
                theirs = reference[f"{seed}|" + re.sub(r"layers\.(\d+)", r"fc_layers.Layer \1", name)]
                worst = max(worst, float(np.abs(value.numpy() - theirs).max()))
        with torch.no_grad():
            population.append(float(encoder(counts).mean()))

    def summary(values: list[float]) -> dict:
        v = np.asarray(values)
        return {
            "mean": float(v.mean()),
            "median": float(np.median(v)),
            "sd": float(v.std(ddof=1)),
            "fraction_above_0.1": float((v > 0.1).mean()),
            "fraction_below_0.02": float((v < 0.02).mean()),
        }

    return {
        "command": f"python benchmarks/multivi_weights_check.py --init-library {n_seeds}",
        "what": "mean over the fidelity benchmark's training cells with RNA of the untrained RNA library encoder's "
        "output (log-library; LeakyReLU, slope 0.01 below 0), per seed",
        "same_seed_standalone_encoders_max_abs_weight_diff": worst,
        "scvi_tools": {"per_seed": scvi_tools, "summary": summary(scvi_tools)},
        "atlasvi": {"per_seed": atlasvi, "summary": summary(atlasvi)},
        "standalone_encoder_400_seeds": summary(population),
        "mann_whitney_p": {
            "atlasvi_vs_scvi_tools": float(mannwhitneyu(atlasvi, scvi_tools).pvalue),
            "atlasvi_vs_standalone": float(mannwhitneyu(atlasvi, population).pvalue),
            "scvi_tools_vs_standalone": float(mannwhitneyu(scvi_tools, population).pvalue),
        },
    }


def scvi_swap(epochs: int, warmup: int, seed: int) -> None:
    """scvi-tools' side of --swap (its venv): its seed's initial weights to the cache, then its MULTIVI trained from
    atlasvi's seed-`seed` initial weights (CACHE/atlasvi_init_SEED.npz, names mapped); held-out -log p(RNA)."""
    import logging

    import scvi
    import torch

    sys.path.insert(0, str(HERE.parent))
    from benchmarks.multivi_fidelity import BATCH_KEY, _mudata

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = seed
    train, held = _mudata(str(CACHE / "train.h5ad")), _mudata(str(CACHE / "heldout.h5ad"))
    held.obs["_indices"] = np.arange(held.n_obs)
    modalities = {"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"}
    scvi.model.MULTIVI.setup_mudata(train, batch_key=BATCH_KEY, modalities=modalities)
    model = scvi.model.MULTIVI(train)
    state = model.module.state_dict()
    np.savez(CACHE / f"scvi_init_{seed}.npz", **{k: v.numpy() for k, v in state.items()})
    theirs = np.load(CACHE / f"atlasvi_init_{seed}.npz")
    for name in state:
        mine = atlasvi_name(name)
        if mine is not None:
            state[name] = torch.from_numpy(theirs[mine])
    state["mod_weights"][:2] = torch.from_numpy(theirs["mod_weights"])
    model.module.load_state_dict(state)
    model.train(max_epochs=epochs, n_epochs_kl_warmup=warmup, accelerator="cpu", devices=1, enable_progress_bar=False)
    torch.manual_seed(0)
    error = model.get_reconstruction_error(held)
    print(json.dumps({"seed": seed, "scvi_heldout_rna": float(error["reconstruction_loss_expression"])}), flush=True)


def swap(epochs: int, warmup: int, seeds: list[int]) -> dict:
    """--swap: per seed, scvi-tools trained from atlasvi's initial weights and atlasvi from scvi-tools'."""
    import torch

    from atlasvi.api import MULTIVI
    from atlasvi.data import LoaderConfig
    from atlasvi.train import TrainConfig
    from benchmarks.multivi_fidelity import atlasvi_heldout

    torch.set_num_threads(1)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    out = {}
    for seed in seeds:
        model = MULTIVI(CACHE / "train.zarr", device="cpu", seed=seed)
        np.savez(CACHE / f"atlasvi_init_{seed}.npz", **{k: v.numpy() for k, v in model.module.state_dict().items()})
        command = [str(SCVI_PYTHON), __file__, "--swap-scvi", str(epochs), str(warmup), str(seed)]
        lines = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()
        out[f"scvi_tools_from_atlasvi_seed{seed}"] = json.loads(next(x for x in lines if x.startswith("{")))[
            "scvi_heldout_rna"
        ]
        print(out, file=sys.stderr, flush=True)
        weights = np.load(CACHE / f"scvi_init_{seed}.npz")
        state = {atlasvi_name(k): torch.from_numpy(weights[k]) for k in weights.files if atlasvi_name(k)}
        state["mod_weights"] = torch.from_numpy(weights["mod_weights"][:2])
        missing, unexpected = model.module.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith("adversary.") for k in missing), (missing, unexpected)
        model.fit(
            TrainConfig(seed=seed, max_epochs=epochs, n_epochs_kl_warmup=warmup),
            LoaderConfig(batch_size=128, seed=seed),
        )
        out[f"atlasvi_from_scvi_tools_seed{seed}"] = atlasvi_heldout(model, CACHE / "heldout.zarr")["rna"]
        print(out, file=sys.stderr, flush=True)
    return out


if __name__ == "__main__":
    main()
