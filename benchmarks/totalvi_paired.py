"""totalVI paired: atlasvi's TOTALVI next to scvi-tools 1.4.2's from identical weights, minibatch and held-out cells.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/totalvi_paired.py --step
    PYTHONPATH=$PWD .venv/bin/python benchmarks/totalvi_paired.py --seeds 0 1 2 3 4 --max-epochs 30 \
        --n-steps-kl-warmup 420

The data are benchmarks/totalvi_fidelity.py's (CBMC: 6,893 cite cells, 862 rna_only cells whose proteins are
hidden, 862 held-out cells; `prepare` builds them); both tools with their adversarial batch classifier on (their
default: the rna_only batch misses every protein).

`--step`, one training step: scvi-tools' TOTALVI (seed 0, untrained) and its AdversarialTrainingPlan under
TOTALVI.train's plan arguments give the initial weights of the module and of the classifier; atlasvi's module loads
them all (names mapped). The minibatch is atlasvi's first training minibatch (`TOTALVI.fit()`'s default loader:
batch 256, seed 0: ~10% rna_only cells, so the protein mask and the per-batch background prior of the missing panel
are in it); scvi-tools takes the same cells. The step check also sets the training recipes side by side: atlasvi's as
`TOTALVI.fit()` resolves it with no arguments (the registry's train and loader defaults) and scvi-tools' read from
the signatures of TOTALVI.train, AdversarialTrainingPlan and Trainer (batch size, optimizer, warm-up, plateau, early
stopping). Both in training mode (batch statistics in every batch norm) with every dropout at 0, and every Normal
draw (the latent z and the log protein background) is loc + scale x one fixed noise tensor, so the step is
deterministic. At KL weight 0.3 (kappa 0.7) scvi-tools replays AdversarialTrainingPlan.training_step (the loss plus
the fooling term, Adam step of the module; the classifier's loss on z.detach(), Adam step of the classifier) and
atlasvi runs its loop's step (one backward, both optimizers). Compared: the per-cell loss terms, the total loss and
the classifier's loss, every parameter's gradient, every weight and batch-norm running statistic after the step, and
the optimizers' settings. Output: results/totalvi_step_check.json.

`--seeds`, paired runs: per seed, scvi-tools' TOTALVI is built with scvi.settings.seed = seed and trained (its
classifier's initial weights recorded as its training plan builds it); atlasvi's module then loads those initial
weights, the classifier's included, and trains. Both train on the same 6,979 cells and validate on the same 776
(atlasvi's split, the training store's last 10% of rows; scvi-tools gets them through `external_indexing`); each
tool's TOTALVI training defaults, batch size included (256 in both; each run records the batch size and minibatches
per epoch it used; seeds 0-6 were run with 256 passed to both), with --max-epochs and --n-steps-kl-warmup over them;
minibatch order, dropout and the draws are each tool's own. Scores as benchmarks/totalvi_fidelity.py (`atlasvi_scores`,
`scvi_scores`: the same kNN folds for both). Per metric: each seed's values and the paired differences atlasvi -
scvi-tools: mean, s.d., s.e. and t = mean / s.e. Seeds run one after another, each tool alone (the machine is
shared); the results are written after each seed. Output: results/totalvi_paired.json and .md.
"""

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.totalvi_fidelity import (  # noqa: E402
    BATCH_KEY,
    CACHE,
    SCVI_PYTHON,
    atlasvi_side,
    prepare,
    scvi_adatas,
    scvi_loader_figures,
    scvi_scores,
    scvi_setup,
)
from benchmarks.totalvi_weights_check import atlasvi_name  # noqa: E402

KL_WEIGHT = 0.3
STEP_SEED = 0
METRICS = ("heldout_elbo", "knn_accuracy", "imputation_pearson_mean")


def weight_name(name: str) -> str | None:
    """atlasvi's name of a scvi-tools weight: "classifier|<name>" (the adversarial Classifier) or a TOTALVAE one."""
    if name.startswith("classifier|"):
        return "adversary." + re.sub(r"fc_layers\.Layer (\d+)", r"layers.\1", name.partition("|")[2])
    return atlasvi_name(name)


def atlasvi_state(saved: "np.lib.npyio.NpzFile") -> dict:
    """atlasvi's state dict from scvi-tools' saved weights (module and classifier; unused heads left out)."""
    import torch

    return {weight_name(k): torch.from_numpy(saved[k]) for k in saved.files if weight_name(k) is not None}


def _fixed_noise(n: int, n_latent: int, n_proteins: int, order: np.ndarray | None = None) -> None:
    """Every Normal.rsample of shape (n, n_latent) or (n, n_proteins) gives loc + scale x one fixed draw (its rows
    in `order`: the cells' noise when they are reordered)."""
    import torch
    from torch.distributions import Normal

    rng = np.random.default_rng(7)
    rows = np.arange(n) if order is None else order
    noise = {
        (n, n_latent): torch.from_numpy(rng.standard_normal((n, n_latent)).astype(np.float32)[rows]),
        (n, n_proteins): torch.from_numpy(rng.standard_normal((n, n_proteins)).astype(np.float32)[rows]),
    }

    def rsample(self, sample_shape=()):  # Normal.rsample's signature
        eps = noise.get(tuple(self.loc.shape))
        return self.loc + self.scale * (torch.randn_like(self.loc) if eps is None else eps)

    Normal.rsample = rsample


def _no_dropout(module) -> None:
    import torch

    for layer in module.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0


def _record_classifier() -> list:
    """Patch scvi-tools' training plans so that each adversarial Classifier they build records its initial state
    (a list of state dicts, one per Classifier built)."""
    import copy

    import scvi.train._trainingplans as plans

    built: list = []
    base = plans.Classifier

    class Recorded(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(copy.deepcopy(self.state_dict()))

    plans.Classifier = Recorded
    return built


def _weights(module, classifier: dict | None) -> dict[str, np.ndarray]:
    state = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    return state | {f"classifier|{k}": v.numpy().copy() for k, v in (classifier or {}).items()}


# --------------------------------------------------------------------------------------------- the step (scvi-tools)
def scvi_step_side(paths: dict[str, str]) -> None:
    """scvi-tools' AdversarialTrainingPlan.training_step replayed on the cells of CACHE/step_batch.npz."""
    import warnings

    import scvi
    from scvi import REGISTRY_KEYS
    from scvi.train import AdversarialTrainingPlan

    scvi_setup(STEP_SEED)
    train, _, _, _ = scvi_adatas(paths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scvi.model.TOTALVI(train)
    module = model.module
    plan = AdversarialTrainingPlan(
        module,
        lr=4e-3,
        adversarial_classifier=True,
        reduce_lr_on_plateau=True,
        n_epochs_kl_warmup=None,
        n_steps_kl_warmup=int(0.75 * train.n_obs),
    )  # TOTALVI.train's update_dict with its defaults
    classifier = plan.adversarial_classifier
    np.savez(CACHE / "step_scvi_init.npz", **_weights(module, classifier.state_dict()))
    names = np.load(CACHE / "step_batch.npz", allow_pickle=True)["names"]
    indices = train.obs_names.get_indexer(names)
    tensors = next(iter(model._make_data_loader(adata=train, indices=indices, batch_size=len(indices))))
    _fixed_noise(len(indices), module.n_latent, module.n_input_proteins)
    module.train()
    classifier.train()
    _no_dropout(module)
    _no_dropout(classifier)
    opt1, opt2 = plan.configure_optimizers()[0]
    batch_tensor = tensors[REGISTRY_KEYS.BATCH_KEY]
    kappa = 1 - KL_WEIGHT
    inference, generative, scvi_loss = module.forward(tensors, loss_kwargs={"kl_weight": KL_WEIGHT})
    z = inference["z"]
    py, efficiency = generative["py_"], generative["per_batch_efficiency"]
    mixture_inputs = {
        "y": tensors[REGISTRY_KEYS.PROTEIN_EXP_KEY], "mu1": efficiency * py["rate_back"],
        "mu2": efficiency * py["rate_fore"], "theta": py["r"], "logits": py["mixing"],
    }  # fmt: skip
    mixture_inputs = {k: v.detach().double().numpy() for k, v in mixture_inputs.items()}
    np.savez(CACHE / "step_mixture.npz", **mixture_inputs)
    from scvi.distributions._negative_binomial import log_mixture_nb

    def scvi_mixture(y, mu1, mu2, theta, logits):
        return log_mixture_nb(y, mu1, mu2, theta, None, logits)

    mixture = {f"{dtype}|{k}": v for dtype in ("float32", "float64") for k, v in
               _mixture_gradients(scvi_mixture, mixture_inputs, dtype).items()}  # fmt: skip
    terms = {
        "rna": scvi_loss.reconstruction_loss["reconst_loss_gene"],
        "protein": scvi_loss.reconstruction_loss["reconst_loss_protein"],
        "kl_z": scvi_loss.kl_local["kl_div_z"],
        "kl_background": scvi_loss.kl_local["kl_div_back_pro"],
    }
    loss = scvi_loss.loss + plan.loss_adversarial_classifier(z, batch_tensor, False) * kappa
    opt1.zero_grad()
    loss.backward()
    grads = {f"grad|{k}": p.grad.numpy().copy() for k, p in module.named_parameters() if p.grad is not None}
    opt1.step()
    adversary_loss = plan.loss_adversarial_classifier(z.detach(), batch_tensor, True) * kappa
    opt2.zero_grad()
    adversary_loss.backward()
    grads |= {f"grad|classifier|{k}": p.grad.numpy().copy() for k, p in classifier.named_parameters()}
    opt2.step()
    after = {f"step|{k}": v for k, v in _weights(module, classifier.state_dict()).items()}
    np.savez(CACHE / "step_scvi_mixture.npz", **mixture)
    np.savez(
        CACHE / "step_scvi.npz",
        recipe=np.array(json.dumps(scvi_recipe(train.n_obs))),
        loss=loss.detach().numpy(),
        adversary_loss=adversary_loss.detach().numpy(),
        optimizers=np.array(json.dumps([_settings(opt1), _settings(opt2)])),
        **{f"term|{k}": v.detach().numpy() for k, v in terms.items()},
        **grads,
        **after,
    )


RECIPE = (
    "batch_size", "lr", "weight_decay", "eps", "n_epochs_kl_warmup", "n_steps_kl_warmup", "reduce_lr_on_plateau",
    "lr_factor", "lr_patience", "lr_threshold", "lr_min", "early_stopping", "early_stopping_patience",
    "early_stopping_min_delta",
)  # fmt: skip


def scvi_recipe(n_obs: int) -> dict:
    """scvi-tools' TOTALVI.train recipe with its defaults, read from its signatures: TOTALVI.train's (the batch
    size, lr, warm-up, plateau and early stopping switches) over its Trainer's and (Adversarial)TrainingPlan's; the
    warm-up in steps as TOTALVI.train resolves None on an AnnData of `n_obs` cells, int(0.75 x n_obs)."""
    import inspect

    import scvi
    from scvi.train import AdversarialTrainingPlan, Trainer, TrainingPlan

    def defaults(function) -> dict:
        return {k: p.default for k, p in inspect.signature(function).parameters.items()}

    plan = defaults(TrainingPlan) | defaults(AdversarialTrainingPlan)  # the latter passes its kwargs on
    values = plan | defaults(Trainer) | defaults(scvi.model.TOTALVI.train)
    if values["n_epochs_kl_warmup"] is None and values["n_steps_kl_warmup"] is None:
        values["n_steps_kl_warmup"] = int(0.75 * n_obs)
    return {k: values[k] for k in RECIPE}


def atlasvi_recipe(model) -> dict:
    """atlasvi's TOTALVI training recipe as `fit()` resolves it with no arguments (registry defaults), on its store."""
    from atlasvi.train.job import loader_config_for, train_config_for

    train = train_config_for(model.config, None).resolved(model.store.n_cells)
    loader = loader_config_for(model.config, None, STEP_SEED)
    return {k: getattr(loader if k == "batch_size" else train, k) for k in RECIPE}


def _mixture_gradients(log_prob, inputs: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """The gradients of sum log_prob(y, mu1, mu2, theta, logits) (a totalVI protein mixture) with respect to mu1,
    mu2, theta and logits, computed in `dtype` ("float32" / "float64") at `inputs` (the step's values)."""
    import torch

    t = {k: torch.tensor(v, dtype=getattr(torch, dtype), requires_grad=k != "y") for k, v in inputs.items()}
    log_prob(t["y"], t["mu1"], t["mu2"], t["theta"], t["logits"]).sum().backward()
    return {k: v.grad.double().numpy() for k, v in t.items() if k != "y"}


def mixture_check() -> dict:
    """Each tool's protein-mixture gradients at the step's values, in float32 and float64, against scvi-tools'
    float64 ones: largest |difference| / largest |gradient| per input (CACHE/step_mixture.npz, written by the
    scvi-tools side with its own gradients)."""
    from atlasvi.distributions import log_mixture_nb

    inputs = dict(np.load(CACHE / "step_mixture.npz"))
    scvi = np.load(CACHE / "step_scvi_mixture.npz")

    def atlasvi_mixture(y, mu1, mu2, theta, logits):
        return log_mixture_nb(y, mu1, mu2, theta.expand_as(mu1), logits)

    ours = {dtype: _mixture_gradients(atlasvi_mixture, inputs, dtype) for dtype in ("float32", "float64")}
    out: dict = {}
    for key in ours["float64"]:
        reference = scvi[f"float64|{key}"]
        scale = np.abs(reference).max()
        out[key] = {
            "scvi_tools_float32": float(np.abs(scvi[f"float32|{key}"] - reference).max() / scale),
            "atlasvi_float32": float(np.abs(ours["float32"][key] - reference).max() / scale),
            "atlasvi_float64": float(np.abs(ours["float64"][key] - reference).max() / scale),
        }
    return out


def _settings(optimizer) -> dict:
    """An optimizer's class and hyper-parameters (lr, betas, eps, weight decay)."""
    d = optimizer.defaults
    return (
        {"class": type(optimizer).__name__}
        | {k: d[k] for k in ("lr", "eps", "weight_decay")}
        | {"betas": list(d["betas"])}
    )


# --------------------------------------------------------------------------------------------- the step (atlasvi)
def step_check(paths: dict) -> dict:
    """atlasvi's first training minibatch, then scvi-tools' step, then atlasvi's on scvi-tools' weights; the
    differences."""
    import anndata as ad
    import torch

    from atlasvi.api import TOTALVI
    from atlasvi.train import TrainConfig
    from atlasvi.train.job import loader_config_for, make_loaders, train_config_for

    torch.set_num_threads(1)
    model = TOTALVI(paths["train_store"], device="cpu", seed=STEP_SEED)
    module = model.module
    config = train_config_for(model.config, TrainConfig(seed=STEP_SEED))
    train_loader, validation_loader = make_loaders(
        model.store, loader_config_for(model.config, None, STEP_SEED), config.validation_fraction,
        code_maps={k: v.numpy() for k, v in model.code_maps.items()}, modalities=module.used_modalities,
    )  # fmt: skip
    with train_loader, validation_loader:
        batch = next(iter(train_loader))
    obs = ad.read_zarr(paths["train_store"]).obs
    names = np.asarray(obs.index[batch.rows.numpy()], dtype=object)
    np.savez(CACHE / "step_batch.npz", names=names)
    _scvi(paths, "--side", "scvi-step")
    init = atlasvi_state(np.load(CACHE / "step_scvi_init.npz"))
    inputs = module.unpack(batch)
    module.load_state_dict(init)  # strict: every weight
    output, terms, optimizers = _atlasvi_step(module, inputs, config, np.arange(len(names)))
    # the float32 floor: the same step in atlasvi with the minibatch's cells (and their noise) in reverse order
    floor_module = TOTALVI(paths["train_store"], device="cpu", seed=STEP_SEED).module
    floor_module.load_state_dict(init)
    reverse = np.arange(len(names))[::-1].copy()
    _atlasvi_step(floor_module, _cells(inputs, reverse), config, reverse)
    floor_grads = {k: p.grad for k, p in floor_module.named_parameters() if p.grad is not None}
    floor_after = dict(floor_module.state_dict())
    ref = np.load(CACHE / "step_scvi.npz")
    recipe = {"atlasvi": atlasvi_recipe(model), "scvi_tools": json.loads(str(ref["recipe"])), "cells": len(obs)}
    recipe["differing"] = [k for k in RECIPE if recipe["atlasvi"][k] != recipe["scvi_tools"][k]]
    report: dict = {
        "recipe": recipe,
        "cells": len(names),
        "rna_only_cells": int((obs[BATCH_KEY].to_numpy()[batch.rows.numpy()] == "rna_only").sum()),
        "kl_weight": KL_WEIGHT,
        "loss_with_fooling_term": {"atlasvi": output.loss.item(), "scvi_tools": float(ref["loss"])},
        "classifier_loss": {"atlasvi": output.adversary_loss.item(), "scvi_tools": float(ref["adversary_loss"])},
        "terms": {},
        "optimizers": {
            "atlasvi": [_settings(opt) for opt in optimizers],
            "scvi_tools": json.loads(str(ref["optimizers"])),
        },
    }
    for key, value in terms.items():
        theirs = ref[f"term|{key}"]
        report["terms"][key] = {
            "max_abs_diff": float(np.abs(value.detach().numpy() - theirs).max()),
            "atlasvi_mean": float(value.detach().mean()),
            "scvi_tools_mean": float(theirs.mean()),
        }
    params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
    grads, steps = {}, {}
    for key in ref.files:
        kind, _, name = key.partition("|")
        mine = weight_name(name) if kind in ("grad", "step") else None
        if mine is None or (mine not in params and mine not in buffers):
            continue
        if kind == "grad":
            value = params[mine].grad
        else:
            value = params[mine].detach() if mine in params else buffers[mine]
        theirs = ref[key]
        diff = np.abs(value.numpy().astype(np.float64) - theirs)
        entry = {"max_abs_diff": float(diff.max()), "scvi_tools_max_abs": float(np.abs(theirs).max())}
        floor = floor_grads[mine] if kind == "grad" else floor_after[mine]
        entry["atlasvi_reversed_max_abs_diff"] = float((value.double() - floor.double()).abs().max())
        (grads if kind == "grad" else steps)[mine] = entry
    zero = _zero_by_construction(module)
    nonzero = {k: g for k, g in grads.items() if k not in zero}

    def relative(g: dict, key: str = "max_abs_diff") -> float:
        return g[key] / g["scvi_tools_max_abs"]

    module_steps = [s["max_abs_diff"] for k, s in steps.items() if not k.startswith("adversary.")]
    report["summary"] = {
        "largest_gradient_diff_relative_to_the_largest_gradient": max(relative(g) for g in nonzero.values()),
        "worst_gradient": max(nonzero, key=lambda k: relative(nonzero[k])),
        "float32_floor_largest_relative": max(relative(g, "atlasvi_reversed_max_abs_diff") for g in nonzero.values()),
        "largest_ratio_to_the_float32_floor": max(
            g["max_abs_diff"] / max(g["atlasvi_reversed_max_abs_diff"], 1e-30) for g in nonzero.values()
        ),
        "largest_classifier_gradient_diff_relative": max(
            relative(g) for k, g in nonzero.items() if k.startswith("adversary.")
        ),
        "zero_by_construction_largest_abs": max(grads[k]["max_abs_diff"] for k in zero),
        "largest_module_weight_or_running_stat_diff_after_the_step_relative_to_lr": max(module_steps) / 4e-3,
        "float32_floor_after_the_step_relative_to_lr": max(
            st["atlasvi_reversed_max_abs_diff"] for k, st in steps.items() if not k.startswith("adversary.")
        )
        / 4e-3,
        "worst_after_the_step": max(
            (k for k in steps if not k.startswith("adversary.")), key=lambda k: steps[k]["max_abs_diff"]
        ),
        "largest_classifier_weight_or_running_stat_diff_after_the_step": max(
            s["max_abs_diff"] for k, s in steps.items() if k.startswith("adversary.")
        ),
        "gradients_compared": len(grads),
        "gradients_zero_by_construction": sorted(zero),
        "tensors_compared_after_the_step": len(steps),
        "atlasvi_tensors": len(module.state_dict()),
    }
    report["protein_mixture_gradients_vs_scvi_tools_float64"] = mixture_check()
    report["gradients"], report["after_one_step"] = grads, steps
    return report


def _atlasvi_step(module, inputs, config, order: np.ndarray) -> tuple:
    """atlasvi's loop step (training mode, dropout 0, the fixed noise's rows in `order`) at KL_WEIGHT: (loss output,
    per-cell terms, (optimizer, adversary optimizer)); the module's gradients and weights are left as after it."""
    from atlasvi.train.loop import _adversary_optimizer, _optimizer

    _fixed_noise(len(order), module.config.n_latent, module.n_proteins, order)
    module.train()
    _no_dropout(module)
    optimizers = (_optimizer(module, config), _adversary_optimizer(module, config))
    running = {k: v.clone() for k, v in module.named_buffers()}
    inference = module.inference(inputs)  # the same values as inside the loss (fixed noise, no dropout)
    generative = module.generative(inference["z"], inference["library"], inputs)
    rna = -generative["px"].log_prob(inputs.x).sum(-1).detach()
    module.load_state_dict(running, strict=False)  # this extra forward's batch-norm updates undone
    output = module.loss(inputs, kl_weight=KL_WEIGHT)
    terms = {
        "rna": rna,
        "protein": output.reconstruction_loss - rna,
        "kl_z": output.kl_local["kl_z"],
        "kl_background": output.kl_local["kl_background"],
    }
    for opt in optimizers:
        opt.zero_grad()
    (output.loss + output.adversary_loss).backward()
    for opt in optimizers:
        opt.step()
    return output, terms, optimizers


def _cells(inputs, order: np.ndarray):
    """TOTALVIInputs with its cells in `order`."""
    import dataclasses

    import torch

    index = torch.from_numpy(order)
    return dataclasses.replace(
        inputs, x=inputs.x[index], y=inputs.y[index], y_mask=inputs.y_mask[index],
        batch_index=inputs.batch_index[index], labels=None if inputs.labels is None else inputs.labels[index],
        categorical=tuple(c[index] for c in inputs.categorical),
        continuous=None if inputs.continuous is None else inputs.continuous[index],
    )  # fmt: skip


def _zero_by_construction(module) -> set[str]:
    """The biases of the Linear layers followed by a batch norm: batch normalisation removes them, so their true
    gradient is 0 and both tools give float noise."""
    import torch

    zero = set()
    for name, block in module.named_modules():
        children = list(block.children())
        if isinstance(block, torch.nn.Sequential) and len(children) > 1:
            if isinstance(children[0], torch.nn.Linear) and isinstance(children[1], torch.nn.BatchNorm1d):
                zero.add(f"{name}.0.bias")
    return zero


# --------------------------------------------------------------------------------------------- paired runs
def scvi_train_side(paths: dict[str, str], seed: int, fields: dict) -> None:
    """scvi-tools' TOTALVI (seed) on atlasvi's split: initial weights (classifier's included) to
    CACHE/paired_init_s{seed}.npz, then the scores as one JSON line."""
    import warnings

    import scvi
    import torch

    scvi_setup(seed)
    train, held, names, hidden = scvi_adatas(paths)
    validation = set(np.load(CACHE / "paired_validation.npz", allow_pickle=True)["names"])
    is_validation = np.array([name in validation for name in train.obs_names])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scvi.model.TOTALVI(train)
    module_init = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    classifiers = _record_classifier()
    started = time.perf_counter()
    model.train(  # the batch size: TOTALVI.train's default
        accelerator="cpu", devices=1, enable_progress_bar=False,
        external_indexing=[np.flatnonzero(~is_validation), np.flatnonzero(is_validation)], **fields,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if len(classifiers) != 1:
        raise SystemExit(f"scvi-tools built {len(classifiers)} adversarial classifiers, not 1")
    init = {k: v.numpy() for k, v in module_init.items()}
    np.savez(
        CACHE / f"paired_init_s{seed}.npz", **init, **{f"classifier|{k}": v.numpy() for k, v in classifiers[0].items()}
    )
    row = {"tool": "scvi-tools", "seed": seed} | scvi_scores(model, train, held, names, hidden)
    row |= scvi_loader_figures(model) | {
        "epochs": int(model.history["elbo_train"].shape[0]),
        "train_seconds": seconds,
        "n_train": int((~is_validation).sum()),
        "n_validation": int(is_validation.sum()),
        "versions": {"scvi-tools": scvi.__version__, "torch": torch.__version__},
    }
    print(json.dumps(row), flush=True)


def validation_names(paths: dict) -> np.ndarray:
    """The cells atlasvi validates on (`split_rows`: the training store's last round(10%) rows)."""
    import anndata as ad

    from atlasvi.data.sampler import split_rows
    from atlasvi.train import TrainConfig

    obs_names = ad.read_zarr(paths["train_store"]).obs_names
    _, (start, stop) = split_rows(len(obs_names), TrainConfig().validation_fraction)
    return np.asarray(obs_names[start:stop], dtype=object)


def paired_summary(rows: list[dict]) -> dict:
    """Per metric: the seeds' values in each tool and the paired differences atlasvi - scvi-tools (mean, sd, se, t,
    the 95% confidence interval of the mean difference from Student's t with n - 1 degrees of freedom)."""
    from scipy.stats import t as student_t

    seeds = sorted(
        {r["seed"] for r in rows if r["tool"] == "atlasvi"} & {r["seed"] for r in rows if r["tool"] != "atlasvi"}
    )
    by = {(r["tool"], r["seed"]): r for r in rows}
    out: dict = {"seeds": seeds}
    for m in METRICS:
        ours = [by["atlasvi", s][m] for s in seeds]
        theirs = [by["scvi-tools", s][m] for s in seeds]
        diff = np.subtract(ours, theirs)
        sd = float(diff.std(ddof=1)) if len(diff) > 1 else float("nan")
        se = sd / math.sqrt(len(diff))
        half = float(student_t.ppf(0.975, len(diff) - 1)) * se if len(diff) > 1 else float("nan")
        out[m] = {
            "atlasvi": ours, "scvi_tools": theirs, "differences": diff.tolist(),
            "atlasvi_mean": float(np.mean(ours)), "scvi_tools_mean": float(np.mean(theirs)),
            "atlasvi_sd": float(np.std(ours, ddof=1)) if len(ours) > 1 else float("nan"),
            "scvi_tools_sd": float(np.std(theirs, ddof=1)) if len(theirs) > 1 else float("nan"),
            "mean_difference": float(diff.mean()), "sd_difference": sd, "se_difference": se,
            "t": float(diff.mean() / se) if se > 0 else float("nan"),
            "ci95": [float(diff.mean() - half), float(diff.mean() + half)],
        }  # fmt: skip
    return out


def markdown(report: dict) -> str:
    lines = [
        "# totalVI: atlasvi vs scvi-tools 1.4.2 from identical weights and held-out cells (CBMC CITE-seq)",
        "",
        f"Machine: {report['machine']}. Design: the docstring of benchmarks/totalvi_paired.py. Data and metrics: "
        "results/totalvi_fidelity.md (862 held-out cells, 862 rna_only cells trained with their proteins hidden).",
        "",
    ]
    if "step" in report:
        st = report["step"]
        s = st["summary"]
        lines += [
            f"## One training step ({st['cells']} cells, {st['rna_only_cells']} of them rna_only; KL weight "
            f"{st['kl_weight']}, adversarial classifier on)",
            "",
            f"Command: `{st['command']}` ({st['load']}).",
            "",
            "| | atlasvi | scvi-tools |",
            "|---|---|---|",
            f"| loss with the fooling term | {st['loss_with_fooling_term']['atlasvi']:.4f} | "
            f"{st['loss_with_fooling_term']['scvi_tools']:.4f} |",
            f"| classifier loss | {st['classifier_loss']['atlasvi']:.6f} | {st['classifier_loss']['scvi_tools']:.6f} |",
            *[
                f"| {k} (per-cell mean; largest per-cell difference {v['max_abs_diff']:.1e}) | "
                f"{v['atlasvi_mean']:.4f} | {v['scvi_tools_mean']:.4f} |"
                for k, v in st["terms"].items()
            ],
            "",
            f"Gradients of {s['gradients_compared']} tensors: largest |difference| / max |scvi-tools' gradient| "
            f"{s['largest_gradient_diff_relative_to_the_largest_gradient']:.1e} ({s['worst_gradient']}). The float32 "
            "floor, atlasvi against itself with the minibatch's cells (and their noise) in reverse order: "
            f"{s['float32_floor_largest_relative']:.1e}; the largest ratio of a tensor's difference to its floor: "
            f"{s['largest_ratio_to_the_float32_floor']:.1f}. Classifier: "
            f"{s['largest_classifier_gradient_diff_relative']:.1e}. The {len(s['gradients_zero_by_construction'])} "
            "biases before a batch norm (true gradient 0): largest |difference| "
            f"{s['zero_by_construction_largest_abs']:.1e}. After one step of both optimizers "
            f"({s['tensors_compared_after_the_step']} tensors incl. batch-norm running statistics): module largest "
            f"|difference| {s['largest_module_weight_or_running_stat_diff_after_the_step_relative_to_lr']:.1e} x lr "
            f"({s['worst_after_the_step']}; float32 floor "
            f"{s['float32_floor_after_the_step_relative_to_lr']:.1e} x lr: Adam's first step is lr g / (|g| + eps), "
            "so a gradient near eps = 0.01 passes its rounding on); classifier "
            f"{s['largest_classifier_weight_or_running_stat_diff_after_the_step']:.1e}.",
            "",
            "Where the protein path's gradients differ: the NB mixture of the protein counts (counts up to thousands). "
            "Its gradients at this step's values, each tool's log_mixture_nb, largest |difference| / largest "
            "|gradient| against scvi-tools' own in float64:",
            "",
            "| input | scvi-tools float32 | atlasvi float32 | atlasvi float64 |",
            "|---|---|---|---|",
            *[
                f"| {k} | {v['scvi_tools_float32']:.1e} | {v['atlasvi_float32']:.1e} | {v['atlasvi_float64']:.1e} |"
                for k, v in st["protein_mixture_gradients_vs_scvi_tools_float64"].items()
            ],
            "",
            "In float64 the two mixtures are the same function (scvi-tools' eps 1e-8 inside its logs the only "
            "difference); in float32 scvi-tools' formula (log(theta + mu + eps) differences) rounds more: its theta "
            "gradient's float32 error, "
            f"{st['protein_mixture_gradients_vs_scvi_tools_float64']['theta']['scvi_tools_float32']:.1e}, is the "
            f"gap of the protein dispersion's gradient (py_r) between the tools, "
            f"{st['gradients']['py_r']['max_abs_diff'] / st['gradients']['py_r']['scvi_tools_max_abs']:.1e}.",
            "",
            "Training recipe with no arguments (atlasvi: `TOTALVI.fit()`'s registry defaults; scvi-tools: the "
            "defaults of TOTALVI.train, AdversarialTrainingPlan and Trainer), the warm-up resolved on the "
            f"training store's {st['recipe']['cells']:,} cells:",
            "",
            "| | atlasvi | scvi-tools |",
            "|---|---|---|",
            *[f"| {k} | {st['recipe']['atlasvi'][k]} | {st['recipe']['scvi_tools'][k]} |" for k in RECIPE],
            "",
            "Differing: " + (", ".join(st["recipe"]["differing"]) or "none") + ".",
            "",
            "Optimizers (the model's; the classifier's): atlasvi "
            + "; ".join(map(_optimizer_text, st["optimizers"]["atlasvi"]))
            + "; scvi-tools "
            + "; ".join(map(_optimizer_text, st["optimizers"]["scvi_tools"]))
            + ".",
            "",
        ]
    if "paired" in report:
        p = report["paired"]
        summary = p["summary"]
        seeds = summary["seeds"]
        lines += [
            f"## Paired runs: seeds {seeds}, training options {p['train_fields']}, adversarial classifier on",
            "",
            "Commands: " + "; ".join(f"`{r['command']}` ({r['load']})" for r in p["runs"]) + ".",
            "",
            f"Both tools: the same initial weights (scvi-tools' draw at the seed, the classifier's included), "
            f"{p['n_train']} training and {p['n_validation']} validation cells (the same cells).",
            "",
            "| seed | held-out -ELBO atlasvi | scvi-tools | kNN atlasvi | scvi-tools | imputation r atlasvi | "
            "scvi-tools |",
            "|---|---|---|---|---|---|---|",
        ]
        for i, s in enumerate(seeds):
            cells = []
            for m, digits in zip(METRICS, (1, 3, 3), strict=True):
                cells += [f"{summary[m]['atlasvi'][i]:.{digits}f}", f"{summary[m]['scvi_tools'][i]:.{digits}f}"]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        by = {(r["tool"], r["seed"]): r for r in p["rows"]}
        loaders = [
            f"seed {s}: " + ", ".join(f"{tool} {by[tool, s]['batch_size']} / {by[tool, s]['steps_per_epoch']}"
                                      for tool in ("atlasvi", "scvi-tools"))
            for s in seeds if "batch_size" in by["atlasvi", s]
        ]  # fmt: skip
        lines += [
            "",
            "Batch size / minibatches per epoch, each tool's default (recorded since `TOTALVI.fit()` defaults to 256; "
            "the seeds not listed ran with 256 passed to both): " + ("; ".join(loaders) or "none") + ".",
            "",
            "| metric | atlasvi mean ± sd | scvi-tools mean ± sd | paired difference (atlasvi - scvi-tools) ± se | t "
            "| 95% CI |",
            "|---|---|---|---|---|---|",
        ]
        for m, digits in zip(METRICS, (1, 4, 4), strict=True):
            r = summary[m]
            lines.append(
                f"| {m} | {r['atlasvi_mean']:.{digits}f} ± {r['atlasvi_sd']:.{digits}f} | "
                f"{r['scvi_tools_mean']:.{digits}f} ± {r['scvi_tools_sd']:.{digits}f} | "
                f"{r['mean_difference']:+.{digits}f} ± {r['se_difference']:.{digits}f} | {r['t']:.2f} | "
                f"[{r['ci95'][0]:+.{digits}f}, {r['ci95'][1]:+.{digits}f}] |"
            )
        lines += ["", "held-out -ELBO: lower is better (a positive difference: atlasvi worse).", ""]
    return "\n".join(lines)


def _optimizer_text(settings: dict) -> str:
    return (
        f"{settings['class']} lr {settings['lr']:g}, betas {tuple(settings['betas'])}, eps {settings['eps']:g}, "
        f"weight decay {settings['weight_decay']:g}"
    )


def _scvi(paths: dict, *args: str) -> str:
    """Run this file's scvi-tools side in the scvi-tools venv; its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    prepared = json.dumps({k: str(v) for k, v in paths.items()})
    command = [str(SCVI_PYTHON), __file__, "--paths", prepared, *args]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the scvi-tools side ({' '.join(args)}) failed (exit {done.returncode})")
    return done.stdout


def write(results: Path, report: dict) -> None:
    """results/totalvi_paired.json and .md, each written whole."""
    for name, text in (
        ("totalvi_paired.json", json.dumps(report, indent=1) + "\n"),
        ("totalvi_paired.md", markdown(report)),
    ):
        tmp = results / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(results / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", action="store_true", help="the one-step check")
    parser.add_argument("--seeds", type=int, nargs="*", default=[])
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--n-steps-kl-warmup", type=int, default=420)
    parser.add_argument("--side", choices=["scvi-step", "scvi-train"], default=None, help="internal")
    parser.add_argument("--paths", default=None, help="internal: the JSON of the prepared files")
    args = parser.parse_args()
    fields = {"max_epochs": args.max_epochs, "n_steps_kl_warmup": args.n_steps_kl_warmup}
    if args.side == "scvi-step":
        return scvi_step_side(json.loads(args.paths))
    if args.side == "scvi-train":
        return scvi_train_side(json.loads(args.paths), args.seeds[0], fields)
    if not args.step and not args.seeds:
        raise SystemExit("nothing to do: give --step and / or --seeds")
    results = HERE / "results"
    existing = results / "totalvi_paired.json"
    report = json.loads(existing.read_text()) if existing.exists() else {}
    report["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), CPU only, 1 torch thread"
    command = "python benchmarks/totalvi_paired.py " + " ".join(sys.argv[1:])
    paths = prepare()

    def load() -> str:
        return "load average at start " + " ".join(f"{x:.2f}" for x in os.getloadavg())

    if args.step:
        report["step"] = {"command": command, "load": load()} | step_check(paths)
        write(results, report)
        print(json.dumps(report["step"]["summary"], indent=1), flush=True)
    if not args.seeds:
        return
    np.savez(CACHE / "paired_validation.npz", names=validation_names(paths))
    paired = report.get("paired")
    if paired is None or paired["train_fields"] != fields:
        paired = report["paired"] = {"train_fields": fields, "runs": [], "rows": []}
    run = {"command": command, "load": load()}
    paired["runs"].append(run)
    for seed in args.seeds:
        started = load()
        line = [x for x in _scvi(paths, "--side", "scvi-train", "--seeds", str(seed), *_flags(fields)).splitlines()]
        theirs = json.loads([x for x in line if x.startswith('{"tool"')][-1])
        init = atlasvi_state(np.load(CACHE / f"paired_init_s{seed}.npz"))
        ours = atlasvi_side(paths, seed, fields, init=init)
        ours.pop("adversarial_classifier")
        paired["rows"] = [r for r in paired["rows"] if r["seed"] != seed] + [
            theirs | {"load": started},
            ours | {"load_after": load()},
        ]
        paired["n_train"], paired["n_validation"] = theirs["n_train"], theirs["n_validation"]
        paired["summary"] = paired_summary(paired["rows"])
        write(results, report)
        print(json.dumps({"seed": seed, "atlasvi": ours, "scvi-tools": theirs}), flush=True)
    print(markdown(report))


def _flags(fields: dict) -> list[str]:
    return ["--max-epochs", str(fields["max_epochs"]), "--n-steps-kl-warmup", str(fields["n_steps_kl_warmup"])]


if __name__ == "__main__":
    main()
