"""LDVAE, PeakVI and scVI: atlasvi's training recipe and one training step next to scvi-tools 1.4.2's, from the same
weights.

    python benchmarks/ldvae_peakvi_step.py                                          # LDVAE and PeakVI
    python benchmarks/ldvae_peakvi_step.py --cases scvi-baron --name scvi_baron_step  # scVI, species as the batch

Per model (PeakVI on Granja 2019, the files of benchmarks/peakvi_fidelity.py; LDVAE on Kang with batch `sample`
and with no batch covariate, the stores of benchmarks/ldvae_fidelity.py; scVI with its defaults (ZINB, observed
library size, the batch injected into the decoder) on Baron human + mouse with `species` as the batch, the store of
benchmarks/sysvi_fidelity.py):

1. Recipe: scvi-tools' own `train()` of the class with its defaults (PEAKVI.train; LinearSCVI: the unsupervised
   train of every scvi-tools model) runs with its TrainRunner replaced by one that records what it is given and
   does not train; the training plan's optimizer (class and every hyperparameter of its parameter group), the KL
   weight per epoch (scvi-tools' `_compute_kl_weight`) over the warm-up, early stopping (on, monitored figure,
   patience, min delta), maximum epochs, batch size and validation cells, next to atlasvi's `TrainConfig` with
   the model's registry defaults (`ModelEntry.train_defaults`), its optimizer as `fit` builds it, its `kl_weight`
   and `LoaderConfig`'s batch size.
2. One step: atlasvi's initial weights of seed 0 (the module the fidelity script trains) in both tools' modules,
   the first 128 cells of the training file, training mode with dropout off, the same standard-normal draws for
   every reparametrised sample (z; LDVAE's library too; scVI's library is observed), KL weight 0.5: the loss
   terms, every gradient, and every weight and buffer after one step of each tool's own optimizer (the recipe's)
   on its own loss, as each trains.
   PeakVI's scvi-tools loss is n^2 x atlasvi's per-cell loss (n = 128 cells), the multiple atlasvi's optimizer
   minimises (`LossOutput.objective_scale`, atlasvi/models/peakvi/module.py): the loss is shown per cell, the
   gradients are those of what each optimizer minimises.
The scvi-tools side is this file run with `--side scvi` in the scvi-tools venv (benchmarks/.cache/scvi-venv); it
imports nothing of atlasvi. Writes results/<--name>.{json,md} (default ldvae_peakvi_step).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SCVI_PYTHON = HERE / ".cache" / "scvi-venv" / "bin" / "python"
WORK = HERE / ".cache" / "ldvae_peakvi_step"
STEP_CELLS = 128
KL_WEIGHT = 0.5
SEED = 0
CASES = ("peakvi", "ldvae-sample", "ldvae-none", "scvi-baron")
DEFAULT_CASES = CASES[:3]
SCVI_CLASS = {"peakvi": "PEAKVI", "ldvae": "LinearSCVI", "scvi": "SCVI"}
TITLES = {"peakvi": "PeakVI", "ldvae": "LDVAE", "scvi": "scVI"}
MONITORS = {"reconstruction_loss_validation": "reconstruction", "elbo_validation": "elbo"}
UNUSED = {  # scvi-tools parts unused in the configuration
    "ldvae": ("decoder.px_dropout_decoder.",),
    "peakvi": (),
    "scvi": ("l_encoder.", "decoder.px_r_decoder."),  # observed library size, gene dispersion
}
OPTIMIZER_FIELDS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")


def fixed_draws(draws: list) -> None:
    """Make every torch Normal.rsample return loc + scale * the next of `draws` (checked against its shape)."""
    import torch
    from torch.distributions import Normal

    queue = [torch.as_tensor(d) for d in draws]

    def rsample(self, sample_shape=()):
        eps = queue.pop(0).to(self.loc.dtype)
        if eps.shape != self.loc.shape:
            raise SystemExit(f"a draw of shape {tuple(eps.shape)} for a sample of shape {tuple(self.loc.shape)}")
        return self.loc + eps * self.scale

    Normal.rsample = rsample


def dropout_off(module) -> None:
    """Every Dropout of the module to p = 0 (training mode otherwise: batch norm uses the minibatch)."""
    import torch

    for layer in module.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0


# --------------------------------------------------------------------------------------------- scvi-tools side
def scvi_side(args: argparse.Namespace) -> None:
    """The recipe scvi-tools' train() builds, and one step from the given weights, cells and draws (to --out)."""
    import logging

    import anndata as ad
    import scvi
    import torch
    from scvi.train._trainingplans import _compute_kl_weight

    from benchmarks.fidelity_data import load_init

    torch.set_num_threads(1)
    scvi.settings.verbosity = logging.WARNING
    scvi.settings.seed = SEED
    model_name = args.model
    data = np.load(args.data, allow_pickle=False)
    adata = ad.read_zarr(args.adata) if args.adata.endswith(".zarr") else ad.read_h5ad(args.adata)
    adata.X = adata.X.astype(np.float32)
    batch_key = None if args.batch_key == "none" else args.batch_key
    adata.obs = adata.obs[[batch_key]].copy() if batch_key else adata.obs[[]].copy()
    cls = getattr(scvi.model, SCVI_CLASS[model_name])
    cls.setup_anndata(adata, batch_key=batch_key)
    model = cls(adata)
    captured: dict = {}

    class Recorder:  # stands in for TrainRunner: records what train() built, trains nothing
        def __init__(self, model, training_plan, data_splitter, max_epochs, **trainer_kwargs):
            captured.update(plan=training_plan, splitter=data_splitter, max_epochs=max_epochs, trainer=trainer_kwargs)

        def __call__(self):
            return None

    model._train_runner_cls = Recorder
    model.train()
    plan, splitter, trainer = captured["plan"], captured["splitter"], captured["trainer"]
    module = model.module
    categories = list(model.adata_manager.get_state_registry("batch").categorical_mapping)
    names = [str(c) for c in data["batch_names"]]
    batch = torch.tensor([categories.index(n) if batch_key else 0 for n in names]).view(-1, 1)
    draws = [data[k] for k in sorted(k for k in data.files if k.startswith("draw"))]

    def step(order: np.ndarray):
        """One step from the given weights on the cells in `order` (draws likewise): (losses, optimizer)."""
        load_init(module, Path(args.init), UNUSED[model_name])
        module.train()
        dropout_off(module)
        module.zero_grad(set_to_none=True)
        tensors = {"X": torch.tensor(data["x"][order]), "batch": batch[order], "labels": torch.zeros_like(batch)}
        fixed_draws([d[order] for d in draws])
        _, _, losses = module(tensors, loss_kwargs={"kl_weight": KL_WEIGHT})
        losses.loss.backward()
        optimizer = plan.configure_optimizers()["optimizer"]
        optimizer.step()
        return losses, optimizer

    # the control: the cells in reverse order (the same sums, rounded otherwise) measure float32 rounding
    step(np.arange(len(names))[::-1].copy())
    reversed_state = {f"reversed:{k}": v.detach().numpy().copy() for k, v in module.state_dict().items()}
    losses, optimizer = step(np.arange(len(names)))
    kl = losses.kl_local
    kl = {k: v for k, v in kl.items()} if isinstance(kl, dict) else {"kl_z": kl}
    steps = int(np.ceil(splitter.n_train / STEP_CELLS))
    warmup_epochs = (plan.n_epochs_kl_warmup or 0) + 2
    recipe = {
        "optimizer": type(optimizer).__name__,
        "hyperparameters": {k: _plain(optimizer.param_groups[0][k]) for k in OPTIMIZER_FIELDS},
        "n_tensors": len(optimizer.param_groups[0]["params"]),
        "kl_weight_per_epoch": [
            float(
                _compute_kl_weight(
                    e,
                    e * steps,
                    plan.n_epochs_kl_warmup,
                    plan.n_steps_kl_warmup,
                    plan.max_kl_weight,
                    plan.min_kl_weight,
                )
            )
            for e in range(warmup_epochs)
        ],  # fmt: skip
        "reduce_lr_on_plateau": bool(plan.reduce_lr_on_plateau),
        "early_stopping": bool(trainer.get("early_stopping", False)),
        "early_stopping_monitor": MONITORS.get(trainer.get("early_stopping_monitor", "elbo_validation")),
        "early_stopping_patience": trainer.get("early_stopping_patience", 45),
        "early_stopping_min_delta": trainer.get("early_stopping_min_delta", 0.0),
        "max_epochs": int(captured["max_epochs"]),
        "batch_size": int(splitter.data_loader_kwargs.get("batch_size")),
        "validation_cells": int(splitter.n_val),
        "cells": int(adata.n_obs),
        "batch_categories": [str(c) for c in categories] if batch_key else [],
    }
    state = {f"state:{k}": v.detach().numpy().copy() for k, v in module.state_dict().items()}
    grads = {f"grad:{k}": p.grad.numpy().copy() for k, p in module.named_parameters() if p.grad is not None}
    np.savez(
        args.out, recipe=np.array(json.dumps(recipe)), loss=float(losses.loss),
        reconstruction=float(losses.reconstruction_loss["reconstruction_loss"].mean()
                             if isinstance(losses.reconstruction_loss, dict) else losses.reconstruction_loss.mean()),
        **{f"kl:{k}": float(v.mean()) for k, v in kl.items()}, **state, **grads, **reversed_state,
    )  # fmt: skip


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# --------------------------------------------------------------------------------------------- atlasvi side
def case_files(case: str) -> tuple[Path, Path, str]:
    """(atlasvi training store, the file scvi-tools reads: the same cells in the same order, batch key or "none")."""
    if case == "peakvi":
        from benchmarks.peakvi_fidelity import BATCH_KEY, prepare

        paths = prepare([SEED])
        return Path(paths[f"train_store_{SEED}"]), Path(paths["train"]), BATCH_KEY
    if case == "scvi-baron":
        from benchmarks.sysvi_fidelity import DATASETS, prepare

        workdir = HERE / ".cache" / "sysvi_fidelity"
        workdir.mkdir(parents=True, exist_ok=True)
        store, h5ad = prepare("baron", workdir)
        return store, h5ad, DATASETS["baron"][1]
    from benchmarks.ldvae_fidelity import stores

    config = case.split("-")[1]
    train, _ = stores(config, HERE / ".cache" / "fidelity" / "kang")
    return train, train, config


def atlasvi_module(case: str, store: Path):
    """atlasvi's module of seed SEED as the fidelity script builds it (PEAKVI / SCVI(store, seed), seeded
    LDVAEModule)."""
    import torch

    if case == "peakvi":
        from atlasvi.api import PEAKVI

        return PEAKVI(store, device="cpu", seed=SEED).module
    if case == "scvi-baron":
        from atlasvi.api import SCVI

        return SCVI(store, device="cpu", seed=SEED).module
    from atlasvi.data import open_store
    from atlasvi.models.ldvae import LDVAEModule

    torch.manual_seed(SEED)
    return LDVAEModule(open_store(store).schema)


def atlasvi_recipe(case: str, module, n_cells: int) -> dict:
    """atlasvi's side of the recipe: TrainConfig with the registry defaults, fit's optimizer, kl_weight."""
    from atlasvi.data import LoaderConfig
    from atlasvi.data.sampler import split_rows
    from atlasvi.models.registry import get_entry
    from atlasvi.train import TrainConfig
    from atlasvi.train.loop import _optimizer, kl_weight

    config = TrainConfig(**get_entry(case.split("-")[0]).train_defaults)
    optimizer = _optimizer(module, config)
    start, stop = split_rows(n_cells, config.validation_fraction)[0]
    n_train = stop - start
    steps = int(np.ceil(n_train / STEP_CELLS))
    return {
        "optimizer": type(optimizer).__name__,
        "hyperparameters": {k: _plain(optimizer.param_groups[0][k]) for k in OPTIMIZER_FIELDS},
        "n_tensors": len(optimizer.param_groups[0]["params"]),
        "kl_weight_per_epoch": [kl_weight(config, e, e * steps) for e in range((config.n_epochs_kl_warmup or 0) + 2)],
        "reduce_lr_on_plateau": config.reduce_lr_on_plateau,
        "early_stopping": config.early_stopping,
        "early_stopping_monitor": config.early_stopping_monitor,
        "early_stopping_patience": config.early_stopping_patience,
        "early_stopping_min_delta": config.early_stopping_min_delta,
        "max_epochs": config.epochs_for(n_train),
        "batch_size": LoaderConfig().batch_size,
        "validation_cells": n_cells - n_train,
        "cells": n_cells,
    }, config


def compare(case: str) -> dict:
    """Recipe and one step of atlasvi next to scvi-tools' for one case (see the module docstring)."""
    import anndata as ad
    import scipy.sparse as sp
    import torch

    import atlasvi.models.vae as vae_module
    from atlasvi.data import SparseCounts, open_store
    from atlasvi.models.scvi_tools import to_scvi_tools_name
    from atlasvi.models.vae import VAEInputs
    from atlasvi.train.loop import _optimizer
    from benchmarks.fidelity_data import save_init

    model, method = case.split("-")[0], SCVI_CLASS[case.split("-")[0]]
    store, scvi_file, batch_key = case_files(case)
    WORK.mkdir(parents=True, exist_ok=True)
    module = atlasvi_module(case, store)
    init = save_init(module.state_dict(), method, WORK / f"{case}_init.pt")
    adata = ad.read_zarr(scvi_file) if scvi_file.suffix == ".zarr" else ad.read_h5ad(scvi_file)
    x = adata.X[:STEP_CELLS]
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)
    names = adata.obs[batch_key].astype(str).to_numpy()[:STEP_CELLS] if batch_key != "none" else ["-"] * STEP_CELLS
    generator = np.random.default_rng(SEED)
    n_latent = module.config.n_latent or module.n_latent
    draws = {"draw0": generator.standard_normal((STEP_CELLS, n_latent)).astype(np.float32)}
    if model == "ldvae":
        draws["draw1"] = generator.standard_normal((STEP_CELLS, 1)).astype(np.float32)
    data = WORK / f"{case}_data.npz"
    np.savez(data, x=x, batch_names=np.array(names, dtype=str), **draws)
    out = WORK / f"{case}_scvi.npz"
    command = [str(SCVI_PYTHON), __file__, "--side", "scvi", "--model", model, "--adata", str(scvi_file),
               "--batch-key", batch_key, "--data", str(data), "--init", str(init), "--out", str(out)]  # fmt: skip
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    theirs = np.load(out)

    schema = open_store(store).schema
    recipe, config = atlasvi_recipe(case, module, open_store(store).n_cells)
    their_recipe = json.loads(str(theirs["recipe"]))
    if batch_key != "none" and their_recipe.pop("batch_categories") != list(schema.batch_categories):
        raise SystemExit(f"{case}: scvi-tools' batch categories are not in the store's order (one-hot columns differ)")
    their_recipe.pop("batch_categories", None)
    codes = torch.tensor([schema.batch_categories.index(n) if batch_key != "none" else 0 for n in names])
    # the module's training input: LDVAE and scVI (the scVI family) read the counts as CSR, PeakVI dense
    csr = sp.csr_matrix(x)
    counts = torch.tensor(x)
    if model in ("ldvae", "scvi"):
        counts = SparseCounts(
            *(torch.tensor(a).long() for a in (csr.indptr, csr.indices)), torch.tensor(csr.data), csr.shape[1]
        )
    inputs = VAEInputs(x=counts, batch_index=codes, labels=None, categorical=(), continuous=None)
    initial = {k: v.clone() for k, v in module.state_dict().items()}

    def step() -> tuple:
        """atlasvi's step from the initial weights: (loss output, gradients, weights after its optimizer's step)."""
        module.load_state_dict(initial)
        module.zero_grad(set_to_none=True)
        module.train()
        dropout_off(module)
        fixed_draws([draws[k] for k in sorted(draws)])
        output = module.loss(inputs, kl_weight=KL_WEIGHT)
        (output.loss * output.objective_scale).backward()  # as fit does
        grads = {to_scvi_tools_name(method, k): p.grad.numpy().copy() for k, p in module.named_parameters()}
        _optimizer(module, config).step()
        return (
            output,
            grads,
            {to_scvi_tools_name(method, k): v.detach().numpy().copy() for k, v in module.state_dict().items()},
        )

    scale = STEP_CELLS**2 if model == "peakvi" else 1  # scvi-tools' PeakVI loss is n^2 x atlasvi's per-cell loss
    nb_formula = {}
    if model == "ldvae":  # atlasvi's step with scvi-tools' NB log-likelihood in place of its own
        with patched(vae_module, "log_likelihood", scvi_nb_log_likelihood):
            nb_output, nb_grads, _ = step()
        nb_formula = {
            "loss": [float(nb_output.loss), float(theirs["loss"])],
            "gradient_max_abs_diff": max(float(np.abs(g - theirs[f"grad:{n}"]).max()) for n, g in nb_grads.items()),
            "largest_gradient": max(float(np.abs(theirs[f"grad:{n}"]).max()) for n in nb_grads),
        }
    output, grads, after = step()
    before = {to_scvi_tools_name(method, k): v.numpy() for k, v in initial.items()}
    # biases before a batch norm get a zero gradient up to rounding: compared in absolute terms, the rest relative to
    # their largest element; an update: |difference| over the tensor's largest scvi-tools update, its largest value
    # and the fraction of elements above 1%
    largest = max(float(np.abs(theirs[f"grad:{n}"]).max()) for n in grads)
    grad_rel, zero_abs = {}, {}
    for name, ours in grads.items():
        ref = theirs[f"grad:{name}"]
        if np.abs(ref).max() < 1e-6 * largest:
            zero_abs[name] = float(np.abs(ours - ref).max())
        else:
            grad_rel[name] = float(np.abs(ours - ref).max() / np.abs(ref).max())
    updates, buffers = {}, {}
    for name, ours in after.items():
        ref = theirs[f"state:{name}"]
        if name not in grads:
            buffers[name] = float(np.abs(ours.astype(np.float64) - ref).max())
            continue
        step_ours, step_ref = ours - before[name], ref - before[name]
        largest_step = max(np.abs(step_ref).max(), 1e-300)
        relative = np.abs(step_ours - step_ref) / largest_step
        control = np.abs(theirs[f"reversed:{name}"] - before[name] - step_ref) / largest_step
        updates[name] = {
            "max": float(relative.max()),
            "fraction_over_1pct": float((relative > 0.01).mean()),
            "control_max": float(control.max()),
            "control_fraction_over_1pct": float((control > 0.01).mean()),
        }
    worst_grad = max(grad_rel, key=grad_rel.get)
    worst_update = max(updates, key=lambda n: updates[n]["max"])
    kl_ours = {k: float(v.mean()) for k, v in output.kl_local.items()}
    kl_theirs = {k.removeprefix("kl:"): float(theirs[k]) for k in theirs.files if k.startswith("kl:")}
    return {
        "recipe": {"atlasvi": recipe, "scvi-tools": their_recipe},
        "cells": STEP_CELLS,
        "loss": [float(output.loss), float(theirs["loss"]) / scale],
        "reconstruction": [float(output.reconstruction_loss.mean()), float(theirs["reconstruction"])],
        "kl_total": [sum(kl_ours.values()), sum(kl_theirs.values())],
        "gradient_max_relative_diff": grad_rel[worst_grad],
        "gradient_worst": worst_grad,
        "gradients_compared": len(grad_rel),
        "zero_gradients": sorted(zero_abs),
        "zero_gradient_max_abs_diff": max(zero_abs.values(), default=0.0),
        "update_max_relative_diff": updates[worst_update]["max"],
        "update_worst": worst_update,
        "updates": updates,
        "buffers_max_abs_diff": max(buffers.values(), default=0.0),
        "buffers_compared": len(buffers),
        "with_scvi_tools_nb_formula": nb_formula,
    }


def scvi_nb_log_likelihood(px, inputs):
    """(n,) log NB(x; mu, theta) summed over genes as scvi-tools 1.4.2 computes it (scvi.distributions.
    _negative_binomial.log_nb_positive: eps 1e-8 inside the logs, float32 log-gammas); atlasvi's own is exact (no eps,
    float64 log-gamma ratio)."""
    import torch

    x, mu, theta, eps = inputs.dense_x, px.mu, px.theta, 1e-8
    log_theta_mu_eps = torch.log(theta + mu + eps)
    value = (
        theta * (torch.log(theta + eps) - log_theta_mu_eps)
        + x * (torch.log(mu + eps) - log_theta_mu_eps)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    return value.sum(-1)


@contextmanager
def patched(owner, name: str, value):
    """owner.name = value for the block, restored after."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def markdown(report: dict) -> str:
    lines = [
        f"# {' and '.join(sorted({TITLES[c.split('-')[0]] for c in report['cases']}))}: training recipe and one step, "
        "atlasvi vs scvi-tools 1.4.2 from the same weights",
        "",
        f"Command: `{report['command']}`. Machine: {report['machine']}; {report['load']}. Design: the script's "
        "docstring (recipe from scvi-tools' own train() defaults; one step from atlasvi's seed-0 weights, the first "
        f"{STEP_CELLS} training cells, dropout off, the same draws, KL weight {KL_WEIGHT}).",
    ]
    for case, r in report["cases"].items():
        a, s = r["recipe"]["atlasvi"], r["recipe"]["scvi-tools"]
        lines += [
            "",
            f"## {case}",
            "",
            "| recipe item | atlasvi | scvi-tools | same |",
            "|---|---|---|---|",
        ]
        for key in a:
            same = "yes" if a[key] == s[key] else "**no**"
            if key == "kl_weight_per_epoch":
                equal = len(a[key]) == len(s[key]) and np.allclose(a[key], s[key], atol=1e-7)
                same = "yes" if equal else "**no**"
                shown = [
                    f"{len(v)} epochs: {v[0]:.3g}, {v[1]:.3g}, ..., {v[-2]:.3g}, {v[-1]:.3g}" for v in (a[key], s[key])
                ]
            else:
                shown = [json.dumps(a[key]), json.dumps(s[key])]
            lines.append(f"| {key} | {shown[0]} | {shown[1]} | {same} |")
        if a["n_tensors"] != s["n_tensors"] and case.startswith("ldvae"):
            lines += [
                "",
                f"n_tensors: scvi-tools' LDVAE builds a zero-inflation layer ({s['n_tensors'] - a['n_tensors']} "
                "tensors) that its NB likelihood never uses (no gradient, so Adam never steps them); atlasvi builds "
                "it only for ZINB (atlasvi/models/ldvae/module.py).",
            ]
        if a["n_tensors"] != s["n_tensors"] and case.startswith("scvi"):
            lines += [
                "",
                f"n_tensors: scvi-tools' VAE builds a library encoder and a per-cell dispersion head "
                f"({s['n_tensors'] - a['n_tensors']} tensors) that it never runs with an observed library size and "
                "gene dispersion (no gradient, so Adam never steps them); atlasvi builds them only where they are "
                "used (atlasvi/models/vae.py).",
            ]
        lines += [
            "",
            "| one step | atlasvi | scvi-tools |",
            "|---|---|---|",
            *[f"| {k} (per cell) | {r[k][0]:.6f} | {r[k][1]:.6f} |" for k in ("loss", "reconstruction", "kl_total")],
            "",
            f"Gradients of {r['gradients_compared']} tensors: largest |difference| / max |scvi-tools' gradient| "
            f"{r['gradient_max_relative_diff']:.1e} ({r['gradient_worst']}); {len(r['zero_gradients'])} tensors "
            "whose gradient is zero up to rounding (biases before a batch norm): largest |difference| "
            f"{r['zero_gradient_max_abs_diff']:.1e}. {r['buffers_compared']} buffers after the step (batch-norm "
            f"statistics, counters, library prior) within {r['buffers_max_abs_diff']:.1e}.",
        ]
        if r["with_scvi_tools_nb_formula"]:
            nb = r["with_scvi_tools_nb_formula"]
            lines += [
                "",
                "The difference above is atlasvi's NB log-likelihood (exact: no eps, float64 log-gamma ratio) against "
                "scvi-tools' (eps 1e-8 inside the logs, float32 log-gammas): with scvi-tools' formula in atlasvi's "
                f"module, the loss is {nb['loss'][0]:.6f} vs {nb['loss'][1]:.6f} and every gradient within "
                f"{nb['gradient_max_abs_diff']:.1e} (absolute; the largest gradient element is "
                f"{nb['largest_gradient']:.3g}): "
                "the same function but for the rounding of the sparse first layer.",
            ]
        lines += [
            "",
            "After one step of each tool's optimizer on its own loss, per tensor: largest |difference of the updates| "
            "over the largest |scvi-tools' update|, and the fraction of elements whose difference is above 1% of it; "
            "control: scvi-tools against itself with the 128 cells (and their draws) in reverse order, the same "
            "sums rounded otherwise (float32):",
            "",
            "| tensor | largest | elements above 1% | control: largest | control: elements above 1% |",
            "|---|---|---|---|---|",
            *[
                f"| {name} | {u['max']:.1e} | {u['fraction_over_1pct']:.1e} | {u['control_max']:.1e} | "
                f"{u['control_fraction_over_1pct']:.1e} |"
                for name, u in sorted(r["updates"].items(), key=lambda item: -item[1]["max"])
            ],
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(DEFAULT_CASES))
    parser.add_argument("--name", default="ldvae_peakvi_step", help="results/<NAME>.json and .md")
    parser.add_argument("--side", choices=["scvi"], default=None, help="internal: the scvi-tools side")
    for flag in ("--model", "--adata", "--batch-key", "--data", "--init", "--out"):
        parser.add_argument(flag, help="internal (scvi side)")
    args = parser.parse_args()
    if args.side == "scvi":
        return scvi_side(args)
    import torch

    torch.set_num_threads(1)
    load = "load average at start " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    report = {
        "command": "python benchmarks/ldvae_peakvi_step.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), CPU only, 1 torch thread",
        "load": load,
        "cases": {case: compare(case) for case in args.cases},
    }
    results = HERE / "results"
    (results / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (results / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
