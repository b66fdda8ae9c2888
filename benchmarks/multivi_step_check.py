"""MultiVI one-step check: atlasvi's and scvi-tools 1.4.2's loss terms, gradients and AdamW step on identical weights
and an identical minibatch.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/multivi_step_check.py

Run after benchmarks/multivi_fidelity.py has prepared its files (`.cache/multivi_fidelity/`). atlasvi's training
loader (the fidelity benchmark's: batch 128, seed 0) gives its first minibatch of the training store; scvi-tools'
MULTIVI (seed 0, untrained) takes the same cells from the same training file, and atlasvi's module its initial weights
(names mapped as benchmarks/multivi_weights_check.py). Dropout off (eval mode), and every Normal reparametrised draw
is loc + scale x one fixed noise tensor in both tools, so the losses are deterministic. Compared: the per-cell loss
terms (RNA, ATAC, KL z, paired penalty) at KL weight 0.3, the gradient of every weight, and the weights after one step
of each tool's MULTIVI optimizer (scvi-tools' AdversarialTrainingPlan.configure_optimizers under MULTIVI.train's
plan arguments; atlasvi's registry defaults). Output: results/multivi_step_check.json.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/multivi_step_check.py --adversary

The same with the adversarial batch classifier, which the check above leaves out: scvi-tools' side replays
AdversarialTrainingPlan.training_step under MULTIVI.train's plan arguments (kappa 1: the loss plus the fooling term,
AdamW step of the module; then the classifier's loss on z.detach(), Adam step of the classifier), atlasvi's side its
loop's step (one backward of loss + adversary_loss, both optimizers step), from scvi-tools' initial module and
classifier weights. The module in eval mode as above; the classifier in training mode (batch statistics in its batch
norm, running statistics updated) with its dropout set to 0 in both tools, so the step is deterministic. Compared:
the total loss and the classifier's loss, the gradient of every weight (the classifier's included), the weights and
the classifier's batch-norm running statistics after the step. Output: results/multivi_step_check_adversary.json.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/multivi_step_check.py --steps --epochs 15 --n-epochs-kl-warmup 5

Many steps (results/multivi_step_check_steps.json and .md): both tools TRAIN through their own loops (atlasvi's
MULTIVI.fit, scvi-tools' MULTIVI.train with its AdversarialTrainingPlan: adversary, KL warm-up by epoch, AdamW and
the classifier's Adam) from atlasvi's initial weights of seed 0 (module and classifier), on the same minibatches in
the same order (atlasvi's loader draws them; scvi-tools' training loader replays them, its validation cells are
atlasvi's), with dropout off in both (p 0, training mode otherwise: the classifier's batch norm on batch statistics)
and the same noise: in training step k every reparametrised Normal draw is loc + scale x eps_k, eps_k =
default_rng([7, k]) standard normal (cells of the step x n_latent); outside training (validation, no gradient) the
draw is the mean. Recorded per step: the loss (with the fooling term), the KL weight, and 2,048 fixed entries of
every weight and buffer (all of a smaller tensor); every weight in full after the steps of SNAPSHOTS and the last.
The float-drift reference (on by default, `--no-reference` skips it) is atlasvi trained a second time with each
minibatch's cells, and their noise rows (and dropout masks), in another order (default_rng([13, k]).permutation in
step k): the same run in exact arithmetic, its sums rounded otherwise; how far a rounding-sized difference grows over
the same steps. The tools train alike if their difference stays at the reference's size; a difference in the training
shows as a step where the tools part while the reference does not.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/multivi_step_check.py --steps --dropout --epochs 12 \
        --n-epochs-kl-warmup 5

The same with dropout ON (results/multivi_step_check_steps_dropout.{json,md}; records in CACHE/steps_dropout/): every
nn.Dropout keeps its rate (0.1 in both tools' encoders and classifier) and, in training mode, applies a mask both
tools share: call c of the layer named L (the block it ends, under atlasvi's names: scvi-tools' mapped as
benchmarks/multivi_weights_check.py maps its weights) in training step k keeps the entries where
default_rng([MASK_SEED, k, crc32(L), c]).random(shape) < 1 - p, scaled by 1 / (1 - p) (torch's dropout). Keyed by
name and call, not by the order the layers run, so scvi-tools' protein encoder (run on no proteins, its own names)
takes nothing from the others; the classifier's call 0 is the fooling term's forward, call 1 its own loss's, in both
tools. Each run records the calls per layer and step; the report compares them, and scores every run's final weights
on the held-out cells with one evaluator (atlasvi's module, z the posterior mean).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/multivi_step_check.py --steps --dropout --epochs 10 \
        --n-epochs-kl-warmup 5 --seed 2

Another start (`--seed`, default 0): atlasvi's initial weights and loader of that seed, its noise and masks keyed by
the seed too (default_rng([7, k, seed]), [MASK_SEED, k, crc32(L), c, seed]); results/..._seedS.{json,md}.
`--ulp-reference` adds atlasvi's 1-ulp twin (its initial weights x (1 + s 2^-23), s = +-1 per entry, the draw of
benchmarks/condscvi_step_check.py): a second float-drift reference, the perturbation of every weight at once;
`--reuse` keeps the runs already recorded in the folder (the report names them).
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SCVI_PYTHON = HERE / ".cache" / "scvi-venv" / "bin" / "python"
CACHE = HERE / ".cache" / "multivi_fidelity"
KL_WEIGHT = 0.3
ZERO_GRADIENT = 1e-6  # a tensor whose largest gradient is below this has none (float noise)
SEED = 0


def _fixed_noise(n: int, n_latent: int) -> None:
    """Every Normal.rsample gives loc + scale x one fixed (n, n_latent) standard-normal draw."""
    import torch
    from torch.distributions import Normal

    eps = torch.from_numpy(np.random.default_rng(7).standard_normal((n, n_latent)).astype(np.float32))

    def rsample(self, sample_shape=()):  # Normal.rsample's signature
        if self.loc.shape != eps.shape:  # scvi-tools' empty protein background
            return self.loc + self.scale * torch.randn_like(self.loc)
        return self.loc + self.scale * eps

    Normal.rsample = rsample


def _scvi_multivi():
    """scvi-tools' MULTIVI on CACHE/train.h5ad (seed SEED, one thread, no loader workers): (the MuData, the model)."""
    import logging

    import scvi

    sys.path.insert(0, str(HERE.parent))
    from benchmarks.multivi_fidelity import BATCH_KEY, _mudata

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = SEED
    train = _mudata(str(CACHE / "train.h5ad"))
    modalities = {"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"}
    scvi.model.MULTIVI.setup_mudata(train, batch_key=BATCH_KEY, modalities=modalities)
    return train, scvi.model.MULTIVI(train)


def scvi_side() -> None:
    """scvi-tools' loss terms, gradients and one optimizer step on the cells of CACHE/step_batch.npz."""
    from scvi.train import AdversarialTrainingPlan

    train, model = _scvi_multivi()
    module = model.module
    np.savez(CACHE / "step_scvi_init.npz", **{k: v.detach().numpy() for k, v in module.state_dict().items()})
    names = np.load(CACHE / "step_batch.npz", allow_pickle=True)["names"]
    indices = train.obs_names.get_indexer(names)
    tensors = next(iter(model._make_data_loader(adata=train, indices=indices, batch_size=len(indices))))
    _fixed_noise(len(indices), module.n_latent)
    module.eval()
    inference = module.inference(**module._get_inference_input(tensors))
    generative = module.generative(**module._get_generative_input(tensors, inference))
    loss = module.loss(tensors, inference, generative, kl_weight=KL_WEIGHT)
    terms = {
        "rna": loss.reconstruction_loss["reconstruction_loss_expression"],
        "atac": loss.reconstruction_loss["reconstruction_loss_accessibility"],
        "kl_z": loss.kl_local["kl_divergence_z"],
        "kl_paired": loss.kl_local["kl_divergence_paired"],
        "libsize_expr": inference["libsize_expr"][:, 0],
        "x_rna": inference["x"][:, : module.n_input_genes],
    }
    plan_kwargs = {"lr": 1e-4, "adversarial_classifier": False, "weight_decay": 1e-3, "eps": 1e-8}
    plan = AdversarialTrainingPlan(module, optimizer="AdamW", n_epochs_kl_warmup=50, **plan_kwargs)
    optimizer = plan.configure_optimizers()["optimizer"]
    optimizer.zero_grad()
    loss.loss.backward()
    grads = {f"grad|{k}": p.grad.numpy().copy() for k, p in module.named_parameters() if p.grad is not None}
    optimizer.step()
    stepped = {f"step|{k}": p.detach().numpy().copy() for k, p in module.named_parameters()}
    out = {f"term|{k}": v.detach().numpy() for k, v in terms.items()} | grads | stepped
    np.savez(CACHE / "step_scvi.npz", loss=loss.loss.detach().numpy(), **out)


def _first_batch(model, config) -> tuple:
    """(atlasvi's first training minibatch of the fidelity benchmark's loader, its cells' names), the names also
    to CACHE/step_batch.npz (scvi-tools' side takes the same cells)."""
    import anndata as ad
    import torch

    from atlasvi.data import LoaderConfig
    from atlasvi.train.job import make_loaders

    train_loader, validation_loader = make_loaders(
        model.store, LoaderConfig(batch_size=128, seed=SEED), config.validation_fraction,
        code_maps={k: v.numpy() for k, v in model.code_maps.items()}, modalities=model.module.used_modalities,
        device=torch.device("cpu"),
    )  # fmt: skip
    with train_loader, validation_loader:
        batch = next(iter(train_loader))
    obs_names = ad.read_zarr(CACHE / "train.zarr").obs_names
    names = np.asarray(obs_names[batch.rows.numpy()], dtype=object)
    np.savez(CACHE / "step_batch.npz", names=names)
    return batch, names


def atlasvi_side() -> dict:
    """atlasvi's first training minibatch (to CACHE/step_batch.npz), then scvi-tools' side, then atlasvi's terms,
    gradients and step on scvi-tools' initial weights; the largest differences."""
    import torch

    from atlasvi.api import MULTIVI
    from atlasvi.train import TrainConfig
    from atlasvi.train.job import train_config_for
    from atlasvi.train.loop import _optimizer
    from benchmarks.multivi_weights_check import atlasvi_name

    torch.set_num_threads(1)
    model = MULTIVI(CACHE / "train.zarr", device="cpu", seed=SEED)
    module = model.module
    config = train_config_for(model.config, TrainConfig(seed=SEED))
    batch, names = _first_batch(model, config)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    subprocess.run([str(SCVI_PYTHON), __file__, "--side", "scvi"], env=env, check=True)
    weights = np.load(CACHE / "step_scvi_init.npz")
    state = {atlasvi_name(k): torch.from_numpy(weights[k]) for k in weights.files if atlasvi_name(k)}
    state["mod_weights"] = torch.from_numpy(weights["mod_weights"][:2])
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("adversary.") for k in missing), (missing, unexpected)
    module.adversary = None  # scvi-tools' side runs without its classifier
    ref = np.load(CACHE / "step_scvi.npz")
    inputs = module.unpack(batch)
    _fixed_noise(len(names), module.n_latent)
    module.eval()
    output = module.loss(inputs, kl_weight=KL_WEIGHT)
    inference = module.inference(inputs)  # the same values as inside the loss (fixed noise, no dropout)
    mask = inputs.rna_mask.float()
    generative = module.generative(inference["z"], inference["library"], inputs)
    rna = -generative["px"].log_prob(inputs.x).sum(-1) * mask
    terms = {
        "rna": rna,
        "atac": output.reconstruction_loss - rna,
        "kl_z": output.kl_local["kl_z"],
        "kl_paired": output.kl_local["kl_paired"],
        "libsize_expr": inference["library"][:, 0],
        "x_rna": inputs.x,
    }
    report: dict = {"loss": {"atlasvi": float(output.loss), "scvi_tools": float(ref["loss"])}, "terms": {}}
    for key, value in terms.items():
        theirs = ref[f"term|{key}"]
        report["terms"][key] = {
            "max_abs_diff": float(np.abs(value.detach().numpy() - theirs).max()),
            "scvi_tools_mean_abs": float(np.abs(theirs).mean()),
        }
    optimizer = _optimizer(module, config)
    optimizer.zero_grad()
    output.loss.backward()
    optimizer.step()
    grads, steps = {}, {}
    for key in ref.files:
        kind, _, name = key.partition("|")
        mine = atlasvi_name(name) if kind in ("grad", "step") else None
        if mine is None or mine not in dict(module.named_parameters()):
            continue
        p = dict(module.named_parameters())[mine]
        value = p.grad if kind == "grad" else p.detach()
        theirs = ref[key]
        diff = np.abs(value.numpy() - theirs)
        entry = {"max_abs_diff": float(diff.max()), "scvi_tools_max_abs": float(np.abs(theirs).max())}
        if kind == "step":  # the gradient where the step differs most (Adam's first step: lr g / (|g| + eps))
            entry["scvi_tools_abs_gradient_there"] = float(np.abs(ref[f"grad|{name}"]).ravel()[diff.argmax()])
        (grads if kind == "grad" else steps)[mine] = entry
    report["summary"] = {
        "largest_gradient_diff_relative_to_the_largest_gradient": max(
            g["max_abs_diff"] / g["scvi_tools_max_abs"] for g in grads.values() if g["scvi_tools_max_abs"] > 0
        ),
        "largest_weight_diff_after_the_step_relative_to_lr": max(s["max_abs_diff"] for s in steps.values()) / 1e-4,
        "scvi_tools_abs_gradient_there": max(steps.values(), key=lambda s: s["max_abs_diff"])[
            "scvi_tools_abs_gradient_there"
        ],
        "weights_compared": len(steps),
    }
    report["optimizer"] = {"atlasvi": repr(optimizer.defaults)}
    report["gradients"] = grads
    report["after_one_step"] = steps
    return report


def _classifier_name(name: str) -> str:
    """atlasvi's name of a weight of scvi-tools' adversarial Classifier."""
    return "adversary." + re.sub(r"fc_layers\.Layer (\d+)", r"layers.\1", name)


def _no_dropout(module) -> None:
    import torch

    for layer in module.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0


def scvi_adversary_side() -> None:
    """scvi-tools' AdversarialTrainingPlan.training_step, replayed on the cells of CACHE/step_batch.npz."""
    from scvi import REGISTRY_KEYS
    from scvi.train import AdversarialTrainingPlan

    train, model = _scvi_multivi()
    module = model.module
    plan_kwargs = {"lr": 1e-4, "weight_decay": 1e-3, "eps": 1e-8, "n_epochs_kl_warmup": 50, "n_steps_kl_warmup": None}
    plan = AdversarialTrainingPlan(
        module, optimizer="AdamW", adversarial_classifier=True, scale_adversarial_loss=1, **plan_kwargs
    )  # MULTIVI.train's update_dict
    classifier = plan.adversarial_classifier
    init = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    init |= {f"classifier|{k}": v.detach().numpy() for k, v in classifier.state_dict().items()}
    np.savez(CACHE / "step_adversary_scvi_init.npz", **init)
    names = np.load(CACHE / "step_batch.npz", allow_pickle=True)["names"]
    indices = train.obs_names.get_indexer(names)
    tensors = next(iter(model._make_data_loader(adata=train, indices=indices, batch_size=len(indices))))
    _fixed_noise(len(indices), module.n_latent)
    module.eval()
    classifier.train()
    _no_dropout(classifier)
    opt1, opt2 = plan.configure_optimizers()
    batch_tensor = tensors[REGISTRY_KEYS.BATCH_KEY]
    # training_step, kappa = scale_adversarial_loss = 1
    inference, _, scvi_loss = module.forward(tensors, loss_kwargs={"kl_weight": KL_WEIGHT})
    z = inference["z"]
    loss = scvi_loss.loss + plan.loss_adversarial_classifier(z, batch_tensor, False) * 1
    opt1.zero_grad()
    loss.backward()
    grads = {f"grad|{k}": p.grad.numpy().copy() for k, p in module.named_parameters() if p.grad is not None}
    opt1.step()
    adversary_loss = plan.loss_adversarial_classifier(z.detach(), batch_tensor, True) * 1
    opt2.zero_grad()
    adversary_loss.backward()
    grads |= {f"grad|classifier|{k}": p.grad.numpy().copy() for k, p in classifier.named_parameters()}
    opt2.step()
    after = {f"step|{k}": p.detach().numpy().copy() for k, p in module.named_parameters()}
    after |= {f"step|classifier|{k}": v.detach().numpy().copy() for k, v in classifier.state_dict().items()}
    np.savez(
        CACHE / "step_adversary_scvi.npz",
        loss=loss.detach().numpy(),
        adversary_loss=adversary_loss.detach().numpy(),
        **grads,
        **after,
    )


def atlasvi_adversary_side() -> dict:
    """atlasvi's loop step with its adversary on scvi-tools' initial weights (module and classifier)."""
    import torch

    from atlasvi.api import MULTIVI
    from atlasvi.train import TrainConfig
    from atlasvi.train.job import train_config_for
    from atlasvi.train.loop import _adversary_optimizer, _optimizer
    from benchmarks.multivi_weights_check import atlasvi_name

    torch.set_num_threads(1)
    model = MULTIVI(CACHE / "train.zarr", device="cpu", seed=SEED)
    module = model.module
    config = train_config_for(model.config, TrainConfig(seed=SEED))
    batch, names = _first_batch(model, config)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    subprocess.run([str(SCVI_PYTHON), __file__, "--side", "scvi-adversary"], env=env, check=True)
    weights = np.load(CACHE / "step_adversary_scvi_init.npz")
    state = {}
    for key in weights.files:
        mine = _classifier_name(key.partition("|")[2]) if key.startswith("classifier|") else atlasvi_name(key)
        if mine is not None:
            state[mine] = torch.from_numpy(weights[key])
    state["mod_weights"] = torch.from_numpy(weights["mod_weights"][:2])
    module.load_state_dict(state)  # strict: every atlasvi weight, the adversary's included, is scvi-tools'
    inputs = module.unpack(batch)
    _fixed_noise(len(names), module.n_latent)
    module.eval()
    module.adversary.train()
    _no_dropout(module.adversary)
    optimizer, adversary_optimizer = _optimizer(module, config), _adversary_optimizer(module, config)
    output = module.loss(inputs, kl_weight=KL_WEIGHT)
    optimizer.zero_grad()
    adversary_optimizer.zero_grad()
    (output.loss + output.adversary_loss).backward()
    optimizer.step()
    adversary_optimizer.step()
    ref = np.load(CACHE / "step_adversary_scvi.npz")
    report: dict = {
        "loss_with_fooling_term": {"atlasvi": float(output.loss), "scvi_tools": float(ref["loss"])},
        "classifier_loss": {"atlasvi": float(output.adversary_loss), "scvi_tools": float(ref["adversary_loss"])},
    }
    params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
    grads, steps = {}, {}
    for key in ref.files:
        kind, _, name = key.partition("|")
        if kind not in ("grad", "step"):
            continue
        mine = _classifier_name(name.partition("|")[2]) if name.startswith("classifier|") else atlasvi_name(name)
        if mine is None or (mine not in params and mine not in buffers):
            continue
        if kind == "grad":
            value = params[mine].grad
        else:
            value = params[mine].detach() if mine in params else buffers[mine]
        theirs = ref[key]
        diff = np.abs(value.numpy().astype(np.float64) - theirs)
        entry = {"max_abs_diff": float(diff.max()), "scvi_tools_max_abs": float(np.abs(theirs).max())}
        (grads if kind == "grad" else steps)[mine] = entry
    report["summary"] = adversary_summary(grads, steps)
    report["optimizers"] = {"atlasvi": [repr(optimizer.defaults), repr(adversary_optimizer.defaults)]}
    report["gradients"] = grads
    report["after_one_step"] = steps
    return report


def adversary_summary(grads: dict, steps: dict) -> dict:
    """The largest differences of --adversary: gradients relative to the tensor's largest (scvi-tools') gradient,
    over the tensors whose gradient is not numerically 0 (a bias before a batch norm has none: its float noise is
    reported apart), module weights after the step relative to lr, the classifier's weights and running statistics
    after the step (absolute)."""
    nonzero = {k: g for k, g in grads.items() if g["scvi_tools_max_abs"] > ZERO_GRADIENT}
    classifier = [k for k in steps if k.startswith("adversary.")]
    return {
        "largest_gradient_diff_relative_to_the_largest_gradient": max(
            g["max_abs_diff"] / g["scvi_tools_max_abs"] for g in nonzero.values()
        ),
        "largest_classifier_gradient_diff_relative": max(
            g["max_abs_diff"] / g["scvi_tools_max_abs"] for k, g in nonzero.items() if k.startswith("adversary.")
        ),
        "gradients_numerically_zero": {k: g["max_abs_diff"] for k, g in grads.items() if k not in nonzero},
        "largest_module_weight_diff_after_the_step_relative_to_lr": max(
            s["max_abs_diff"] for k, s in steps.items() if not k.startswith("adversary.")
        )
        / 1e-4,
        "largest_classifier_weight_or_running_stat_diff_after_the_step": max(
            steps[k]["max_abs_diff"] for k in classifier
        ),
        "gradients_compared": len(grads),
        "tensors_compared_after_the_step": len(steps),
    }


# --------------------------------------------------------------------------------------------- many steps
SNAPSHOTS = (1, 2, 5, 10, 20, 50, 100, 150, 200, 250, 300, 400, 500)  # steps after which every weight is kept
SAMPLED = 2048  # entries of each tensor recorded before every step
NOISE_SEED = 7
MASK_SEED = 11
DROPOUT_FOLDER = CACHE / "steps_dropout"  # the --dropout runs' records


class _StepRecord:
    """One tool's run, step by step: the noise eps_k of training step k, the sampled entries of every tensor before
    each step and after the last, each step's loss and KL weight, every weight after the steps of SNAPSHOTS; its files
    in `folder` (default CACHE); `sampled` entries of each tensor (default SAMPLED)."""

    current: "_StepRecord | None" = None  # the run whose noise Normal.rsample reads

    def __init__(self, tool: str, n_latent: int, folder: Path = CACHE, sampled: int = SAMPLED, key: tuple = ()):
        self.tool, self.n_latent, self.step, self.folder, self.sampled = tool, n_latent, 0, folder, sampled
        self.key = key  # appended to the noise's and the masks' seeds (another seed's draws)
        self.samples: list[dict[str, np.ndarray]] = []
        self.losses: list[float] = []
        self.kl_weights: list[float] = []
        self.rows: list[np.ndarray] = []
        self.eps = None
        self.order = None  # the reference run's order of the step's cells (its masks follow it)
        self.dropout_calls: list[dict[str, int]] = []  # per step: the shared-mask calls per layer
        _StepRecord.current = self

    def start(self, state: dict[str, np.ndarray], rows: np.ndarray) -> None:
        """Before training step self.step (on the cells `rows`): record the weights, draw the step's noise."""
        import torch

        self._record(state)
        self.rows.append(np.asarray(rows))
        rng = np.random.default_rng([NOISE_SEED, self.step, *self.key])
        self.eps = torch.from_numpy(rng.standard_normal((len(rows), self.n_latent)).astype(np.float32))
        self.order = None
        self.dropout_calls.append({})
        self.step += 1

    def finish(self, state: dict[str, np.ndarray]) -> None:
        """After the last step: record the weights, and keep them all."""
        self._record(state, keep=True)

    def _record(self, state: dict[str, np.ndarray], keep: bool = False) -> None:
        self.samples.append({k: v.ravel()[_positions(k, v.size, self.sampled)].copy() for k, v in state.items()})
        if keep or self.step in SNAPSHOTS:
            np.savez(self.folder / f"steps_{self.tool}_{self.step}.npz", **state)

    def save(self, **extra) -> None:
        """FOLDER/steps_TOOL.npz: the samples (tensor -> (steps + 1, entries)), losses, KL weights, extra arrays."""
        names = self.samples[0].keys()
        samples = {f"sample|{k}": np.stack([s[k] for s in self.samples]) for k in names}
        arrays = {"loss": np.array(self.losses), "kl_weight": np.array(self.kl_weights)}
        arrays["dropout_calls"] = np.array(json.dumps(self.dropout_calls))
        np.savez(self.folder / f"steps_{self.tool}.npz", **samples, **arrays, **extra)

    def recorded(self, forward):
        """A module's `forward(inputs, kl_weight)` that also records each training step's (under autograd) loss and
        KL weight."""
        import torch

        def forward_step(inputs, kl_weight: float = 1.0):
            output = forward(inputs, kl_weight)
            if torch.is_grad_enabled():
                self.losses.append(float(output.loss.detach()))
                self.kl_weights.append(float(kl_weight))
            return output

        return forward_step

    def save_fit(self, history: list, obs_names, dropout: dict) -> tuple[np.ndarray, np.ndarray]:
        """`save` of an atlasvi fit: each step's cell names (its rows of `obs_names`), the steps of each epoch, the
        dropout rates and the epoch records' validation figures; returns (the names per step, the epoch steps)."""
        batches = np.empty(len(self.rows), dtype=object)
        batches[:] = [np.asarray(obs_names[r], dtype=str) for r in self.rows]
        epoch_steps = np.array([len(r.step_losses) for r in history])
        self.save(
            batches=batches,
            epoch_steps=epoch_steps,
            dropout=json.dumps(dropout),
            validation_elbo=np.array([r.validation_elbo for r in history]),
            validation_reconstruction=np.array([r.validation_reconstruction for r in history]),
        )
        return batches, epoch_steps


_POSITIONS: dict[tuple[str, int, int], np.ndarray] = {}


def _positions(name: str, size: int, sampled: int = SAMPLED) -> np.ndarray:
    """The `sampled` entries recorded of a tensor (all of a smaller one), fixed by its (atlasvi) name."""
    import zlib

    if (name, size, sampled) not in _POSITIONS:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        _POSITIONS[name, size, sampled] = (
            np.sort(rng.choice(size, sampled, replace=False)) if size > sampled else np.arange(size)
        )
    return _POSITIONS[name, size, sampled]


def _step_noise() -> None:
    """Normal.rsample under autograd (a training step): loc + scale x the current step's eps (an error for any
    other non-empty shape); without autograd (validation): the mean."""
    import torch
    from torch.distributions import Normal

    def rsample(self, sample_shape=()):  # Normal.rsample's signature
        if not torch.is_grad_enabled():
            return self.loc.expand(torch.Size(sample_shape) + self.loc.shape).clone()
        if self.loc.numel() == 0:  # scvi-tools' protein background of no proteins
            return self.loc + self.scale
        eps = _StepRecord.current.eps
        if tuple(sample_shape) or eps is None or self.loc.shape != eps.shape:
            raise RuntimeError(f"a draw of shape {tuple(sample_shape)} + {tuple(self.loc.shape)} outside a step")
        return self.loc + self.scale * eps

    Normal.rsample = rsample


def _dropout_rates(module, rename) -> dict[str, float]:
    """The rate of every nn.Dropout of `module`, by the layer (block) it ends, under `rename` (to atlasvi's names;
    None: a module atlasvi does not build)."""
    import torch

    rates = {rename(k): m.p for k, m in module.named_modules() if isinstance(m, torch.nn.Dropout)}
    return {k.rpartition(".")[0]: p for k, p in rates.items() if k is not None}


def _dropout_names(module, rename, prefix: str = "") -> dict[int, str]:
    """id of every nn.Dropout of `module` -> the name of the block it ends under `rename` (atlasvi's names); a layer
    `rename` maps to None keeps its own name behind "own:" (prefix: the module's own name in front of it)."""
    import torch

    names = {}
    for k, m in module.named_modules():
        if isinstance(m, torch.nn.Dropout):
            name = rename(k)
            names[id(m)] = name.rpartition(".")[0] if name is not None else f"own:{prefix}{k}".rpartition(".")[0]
    return names


def dropout_mask(step: int, name: str, call: int, shape: tuple[int, ...], p: float, key: tuple = ()) -> np.ndarray:
    """The shared mask of call `call` of layer `name` in training step `step`: 1 / (1 - p) where
    default_rng([MASK_SEED, step, crc32(name), call, *key]).random(shape) < 1 - p, else 0 (float32)."""
    import zlib

    draw = np.random.default_rng([MASK_SEED, step, zlib.crc32(name.encode()), call, *key]).random(shape)
    return (draw < 1.0 - p).astype(np.float32) / np.float32(1.0 - p)


def _shared_dropout(names: dict[int, str]) -> None:
    """nn.Dropout.forward replaced: in training mode, layer names[id(layer)] applies `dropout_mask` of the current
    step (`_StepRecord.current`) and of its call within the step (counted there), its rows in the step's cell order;
    an error outside a step or for a layer without a name."""
    import torch

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        record = _StepRecord.current
        if record is None or not record.dropout_calls or id(self) not in names:
            raise RuntimeError("a dropout layer in training mode outside a step, or one without a shared name")
        name, calls = names[id(self)], record.dropout_calls[-1]
        call = calls[name] = calls.get(name, 0) + 1
        mask = torch.from_numpy(dropout_mask(record.step - 1, name, call - 1, tuple(x.shape), self.p, record.key))
        return x * (mask if record.order is None else mask[record.order])

    torch.nn.Dropout.forward = forward


def _atlasvi_state(module) -> dict[str, np.ndarray]:
    """Every weight and buffer of atlasvi's module but the fixed modality weights (numpy views)."""
    return {k: v.detach().numpy() for k, v in module.state_dict().items() if k != "mod_weights"}


def _scvi_state(module, classifier) -> dict[str, np.ndarray]:
    """scvi-tools' module and classifier weights and buffers under atlasvi's names (those atlasvi builds)."""
    from benchmarks.multivi_weights_check import atlasvi_name

    state = {atlasvi_name(k): v for k, v in module.state_dict().items() if k != "mod_weights"}
    state |= {_classifier_name(k): v for k, v in classifier.state_dict().items()}
    return {k: v.detach().numpy() for k, v in state.items() if k is not None}


def atlasvi_steps(
    epochs: int,
    warmup: int,
    tool: str,
    reorder: bool = False,
    dropout: bool = False,
    folder: Path = CACHE,
    seed: int = SEED,
    ulp: bool = False,
) -> None:
    """atlasvi's MULTIVI.fit of `seed` for `epochs` (KL warm-up `warmup` epochs), dropout off (dropout: on, the
    shared masks), the step noise (a seed other than 0 adds itself to the noise's and masks' keys); its record saved
    as `tool` in `folder`. Its initial weights to CACHE/atlasvi_init_SEED.npz (scvi-tools starts from them) and its
    minibatches' and validation cells' names to
    FOLDER/steps_batches.npz. reorder (the float-drift reference): each minibatch's cells, and their noise rows and
    dropout masks, in another order (default_rng([13, k]).permutation in step k): the same run in exact arithmetic,
    its sums rounded otherwise. ulp (the 1-ulp twin): every initial weight x (1 + s 2^-23), s = +-1 per entry
    (benchmarks/condscvi_step_check.py's draw, seeded by `seed`), after the unperturbed ones are saved. Its record
    holds the epoch records' validation figures."""
    import anndata as ad
    import torch

    from atlasvi.api import MULTIVI
    from atlasvi.data import LoaderConfig
    from atlasvi.train import TrainConfig
    from benchmarks.multivi_fidelity import save_atlasvi_init

    torch.set_num_threads(1)
    model = MULTIVI(CACHE / "train.zarr", device="cpu", seed=seed)
    module = model.module
    save_atlasvi_init(model, seed)
    if ulp:
        from benchmarks.condscvi_step_check import _ulp

        module.load_state_dict(_ulp(dict(module.named_parameters()), seed), strict=False)
    rates = _dropout_rates(module, str)
    if dropout:
        _shared_dropout(_dropout_names(module, str))
    else:
        _no_dropout(module)
    _step_noise()
    record, validation_rows = _StepRecord(tool, module.n_latent, folder, key=_draw_key(seed)), set()
    unpack, forward = module.unpack, module.forward

    def unpack_step(batch):
        inputs = unpack(batch)
        if not torch.is_grad_enabled():  # evaluation runs without autograd
            validation_rows.update(batch.rows.tolist())
            return inputs
        record.start(_atlasvi_state(module), batch.rows.numpy())
        if reorder:
            order = torch.from_numpy(np.random.default_rng([13, record.step - 1]).permutation(len(batch)))
            record.eps, record.order = record.eps[order], order
            inputs = _reordered(inputs, order)
        return inputs

    module.unpack, module.forward = unpack_step, record.recorded(forward)
    history = model.fit(
        TrainConfig(seed=seed, max_epochs=epochs, n_epochs_kl_warmup=warmup), LoaderConfig(batch_size=128, seed=seed)
    )
    record.finish(_atlasvi_state(module))
    names = ad.read_zarr(CACHE / "train.zarr").obs_names
    batches, epoch_steps = record.save_fit(history, names, rates)
    if not (reorder or ulp):
        validation = np.asarray(names[sorted(validation_rows)], dtype=str)
        np.savez(folder / "steps_batches.npz", batches=batches, epoch_steps=epoch_steps, validation=validation)


def _draw_key(seed: int) -> tuple[int, ...]:
    """The key a run of `seed` appends to its noise's and masks' seeds: none for seed 0 (the committed runs)."""
    return (seed,) if seed else ()


def steps_folder(dropout: bool, seed: int) -> Path:
    """Where a --steps run keeps its records: CACHE (dropout off, seed 0), DROPOUT_FOLDER (dropout on, seed 0), or a
    folder of its own for another seed."""
    if seed == 0:
        return DROPOUT_FOLDER if dropout else CACHE
    return CACHE / f"steps{'_dropout' if dropout else ''}_seed{seed}"


def _reordered(inputs, order):
    """MULTIVIInputs with every per-cell tensor taken in `order`."""
    import dataclasses

    def take(value):
        if value is None:
            return None
        return tuple(v[order] for v in value) if isinstance(value, tuple) else value[order]

    return dataclasses.replace(inputs, **{f.name: take(getattr(inputs, f.name)) for f in dataclasses.fields(inputs)})


def replay_splitter(model, per_epoch: list[list[np.ndarray]]) -> type:
    """A subclass of `model`'s (scvi-tools) data splitter whose training loader gives, in epoch e, the minibatches
    per_epoch[e] (each an array of the AnnData's cell indices) in order."""
    import torch

    class Replay(torch.utils.data.Sampler):
        """The recorded minibatches, epoch by epoch, in order."""

        def __init__(self):
            self.epoch = 0

        def __len__(self):
            return len(per_epoch[min(self.epoch, len(per_epoch) - 1)])

        def __iter__(self):
            batches, self.epoch = per_epoch[self.epoch], self.epoch + 1
            return iter([b.tolist() for b in batches])

    class ReplaySplitter(model._data_splitter_cls):
        def train_dataloader(self):
            dataset = self.adata_manager.create_torch_dataset(indices=np.arange(self.adata_manager.adata.n_obs))
            return torch.utils.data.DataLoader(dataset, sampler=Replay(), batch_size=None, num_workers=0)

    return ReplaySplitter


def scvi_steps(epochs: int, warmup: int, dropout: bool = False, folder: Path = CACHE, seed: int = SEED) -> None:
    """scvi-tools' MULTIVI.train from atlasvi's initial weights of `seed`, on atlasvi's minibatches (replayed by
    its training loader, in order) and validation cells (FOLDER/steps_batches.npz), dropout off (dropout: on, the
    shared masks under atlasvi's layer names), the step noise; its record saved as "scvi_tools" in `folder` with the
    validation figures of its history."""
    from scvi import REGISTRY_KEYS

    train, model = _scvi_multivi()
    from benchmarks.multivi_fidelity import start_from_atlasvi
    from benchmarks.multivi_weights_check import atlasvi_name

    start_from_atlasvi(model, seed)  # module weights now; the classifier's when the plan is built
    recorded = np.load(folder / "steps_batches.npz", allow_pickle=True)
    steps = [train.obs_names.get_indexer(names) for names in recorded["batches"]]
    bounds = np.cumsum([0, *recorded["epoch_steps"]])
    per_epoch = [steps[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    record, rates = _StepRecord("scvi_tools", model.module.n_latent, folder, key=_draw_key(seed)), {}
    plans = []

    def rename(k: str) -> str | None:
        return (atlasvi_name(k + ".x") or "")[:-2] or None

    class StepPlan(model._training_plan_cls):
        def __init__(self, module, **kwargs):
            super().__init__(module, **kwargs)
            plans.append(self)
            rates.update(_dropout_rates(self.module, rename))
            rates.update(_dropout_rates(self.adversarial_classifier, _classifier_name))
            if dropout:
                names = _dropout_names(self.module, rename, "module.")
                _shared_dropout(names | _dropout_names(self.adversarial_classifier, _classifier_name))
            else:
                _no_dropout(self.module)
                _no_dropout(self.adversarial_classifier)

        def training_step(self, batch, batch_idx):
            cells = batch[REGISTRY_KEYS.INDICES_KEY].view(-1).long().numpy()
            if not np.array_equal(cells, steps[record.step]):
                raise RuntimeError(f"step {record.step}: scvi-tools' loader gave other cells than atlasvi's")
            record.start(_scvi_state(self.module, self.adversarial_classifier), cells)
            kl_weight = float(self.kl_weight)
            loss = super().training_step(batch, batch_idx)  # the loss with the fooling term (added in place)
            record.losses.append(float(loss.detach()))
            record.kl_weights.append(kl_weight)
            return loss

    model._data_splitter_cls, model._training_plan_cls = replay_splitter(model, per_epoch), StepPlan
    _step_noise()
    train_cells = np.sort(np.concatenate(per_epoch[0]))
    validation = train.obs_names.get_indexer(recorded["validation"])
    model.train(
        max_epochs=epochs, n_epochs_kl_warmup=warmup, accelerator="cpu", devices=1, enable_progress_bar=False,
        datasplitter_kwargs={"external_indexing": [train_cells, np.sort(validation), np.array([], dtype=int)]},
    )  # fmt: skip
    record.finish(_scvi_state(model.module, plans[0].adversarial_classifier))
    history = model.history
    record.save(
        dropout=json.dumps(rates),
        validation_elbo=np.asarray(history["elbo_validation"], dtype=float).ravel(),
        validation_reconstruction=np.asarray(history["reconstruction_loss_validation"], dtype=float).ravel(),
    )


def _step_differences(mine, theirs) -> dict:
    """Per step (before step k, k = 0..steps; after the last): the largest over tensors of max |a - b| / max |a| on
    the sampled entries (and that tensor), the median over tensors; per step the loss's |a - b| / |a|."""
    names = sorted(k for k in mine.files if k.startswith("sample|"))
    missing = sorted(set(names) ^ {k for k in theirs.files if k.startswith("sample|")})
    if missing:
        raise SystemExit(f"tensors recorded by one run only: {missing}")
    relative = []
    for name in names:
        a, b = mine[name].astype(np.float64), theirs[name].astype(np.float64)
        relative.append(np.abs(a - b).max(axis=1) / np.maximum(np.abs(a).max(axis=1), 1e-12))
    relative = np.stack(relative)  # (tensors, steps + 1)
    worst = relative.argmax(axis=0)
    loss_a, loss_b = mine["loss"], theirs["loss"]
    return {
        "weights_largest": relative.max(axis=0).tolist(),
        "weights_largest_tensor": [names[i].partition("|")[2] for i in worst],
        "weights_median": np.median(relative, axis=0).tolist(),
        "loss_relative": (np.abs(loss_a - loss_b) / np.abs(loss_a)).tolist(),
        "kl_weight_largest_diff": float(np.abs(mine["kl_weight"] - theirs["kl_weight"]).max()),
    }


def _snapshot_differences(tools: tuple[str, str], steps: list[int], folder: Path = CACHE) -> dict:
    """At each kept step, every tensor in full (the records in `folder`): max |a - b| / max |a| (the largest tensor
    and the median)."""
    out = {}
    for step in steps:
        a, b = (np.load(folder / f"steps_{tool}_{step}.npz") for tool in tools)
        relative = {k: float(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-12)) for k in a.files}
        worst = max(relative, key=relative.get)
        out[step] = {"largest": relative[worst], "tensor": worst, "median": float(np.median(list(relative.values())))}
    return out


def steps_report(
    epochs: int, warmup: int, reference: bool, reuse: bool, dropout: bool = False, seed: int = SEED, ulp: bool = False
) -> dict:
    """The many-step check (see the module docstring): atlasvi, scvi-tools (a subprocess in its venv), then the
    float-drift reference (and with `ulp` the 1-ulp twin); their step-by-step differences. reuse: a run whose record
    of as many epochs is in its folder (`steps_folder`) is not run again."""
    started = time.perf_counter()
    folder = steps_folder(dropout, seed)
    folder.mkdir(parents=True, exist_ok=True)
    tools = ["atlasvi", "scvi_tools"] + (["atlasvi_reordered"] if reference else []) + (["atlasvi_ulp"] if ulp else [])
    records, reused = {}, []
    for tool in tools:
        path = folder / f"steps_{tool}.npz"
        if reuse and path.exists() and len(np.load(path).get("validation_elbo", [])) == epochs:
            reused.append(tool)
        else:
            if tool == "scvi_tools":
                env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
                command = [str(SCVI_PYTHON), __file__, "--side", "scvi-steps", "--epochs", str(epochs)]
                command += ["--n-epochs-kl-warmup", str(warmup), "--seed", str(seed)]
                subprocess.run(command + (["--dropout"] if dropout else []), env=env, check=True)
            else:
                reorder, twin = tool == "atlasvi_reordered", tool == "atlasvi_ulp"
                atlasvi_steps(epochs, warmup, tool, reorder, dropout, folder, seed, twin)
        records[tool] = np.load(path, allow_pickle=True)
    pairs = {"atlasvi - scvi-tools": ("atlasvi", "scvi_tools")}
    for tool in tools[2:]:
        same = all(
            np.array_equal(np.sort(a), np.sort(b))
            for a, b in zip(records["atlasvi"]["batches"], records[tool]["batches"], strict=True)
        )
        if not same:
            raise SystemExit(f"the reference run {tool} trained on other minibatches")
    if reference:
        pairs["atlasvi - atlasvi reordered (float-drift reference)"] = ("atlasvi", "atlasvi_reordered")
    if ulp:
        pairs["atlasvi - atlasvi 1-ulp twin"] = ("atlasvi", "atlasvi_ulp")
    validation = {
        tool: {k: r[k].tolist() for k in ("validation_elbo", "validation_reconstruction")}
        for tool, r in records.items()
    }
    n_steps = len(records["atlasvi"]["loss"])
    kept = [s for s in SNAPSHOTS if s < n_steps] + [n_steps]
    report = {
        "meta": {
            "command": " ".join(["python", "benchmarks/multivi_step_check.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), CPU only, 1 torch thread",
            "load_average_at_end": list(os.getloadavg()),
            "seconds": time.perf_counter() - started,
            "epochs": epochs,
            "n_epochs_kl_warmup": warmup,
            "steps": n_steps,
            "epoch_steps": records["atlasvi"]["epoch_steps"].tolist(),
            "dropout": "on, shared masks" if dropout else "off",
            "seed": seed,
            "runs_reused_from_an_earlier_invocation": reused,
        },
        "dropout_rates_in_normal_training": {
            tool: json.loads(str(records[tool]["dropout"])) for tool in ("atlasvi", "scvi_tools")
        },
        "losses": {tool: r["loss"].tolist() for tool, r in records.items()},
        "kl_weights": {tool: r["kl_weight"].tolist() for tool, r in records.items()},
        "validation": validation,
        "differences": {label: _step_differences(records[a], records[b]) for label, (a, b) in pairs.items()},
        "snapshots": {label: _snapshot_differences((a, b), kept, folder) for label, (a, b) in pairs.items()},
    }
    if dropout:
        report["dropout_calls"] = {tool: dropout_calls(r) for tool, r in records.items()}
        report["heldout_at_the_end"] = heldout_scores(folder, list(records), n_steps, seed)
    return report


def heldout_scores(folder: Path, tools: list[str], steps: int, seed: int = SEED) -> dict[str, dict[str, float]]:
    """Each run's weights after `steps` steps (FOLDER/steps_TOOL_STEPS.npz, atlasvi's names) in atlasvi's module,
    eval mode, z the posterior mean: the held-out cells' (CACHE/heldout.zarr) reconstruction, nats per cell (RNA,
    ATAC), one evaluator for every run."""
    import torch

    from atlasvi.api import MULTIVI
    from benchmarks.multivi_fidelity import atlasvi_heldout

    torch.set_num_threads(1)
    _step_noise()  # no autograd: every draw is the mean
    model, scores = MULTIVI(CACHE / "train.zarr", device="cpu", seed=seed), {}
    for tool in tools:
        weights = np.load(folder / f"steps_{tool}_{steps}.npz")
        state = {k: torch.from_numpy(weights[k]) for k in weights.files}
        missing, unexpected = model.module.load_state_dict(state, strict=False)
        if unexpected or missing != ["mod_weights"]:
            raise SystemExit(f"{tool}: weights missing {missing}, unexpected {unexpected}")
        scores[tool] = atlasvi_heldout(model, CACHE / "heldout.zarr")
    return scores


def dropout_calls(record) -> dict[str, dict[str, int]]:
    """A --dropout run's shared-mask calls per layer: {layer: {calls in a step: steps with that many}}."""
    counts: dict[str, dict[str, int]] = {}
    for step in json.loads(str(record["dropout_calls"])):
        for layer, calls in step.items():
            counts.setdefault(layer, {})
            counts[layer][str(calls)] = counts[layer].get(str(calls), 0) + 1
    return dict(sorted(counts.items()))


def step_table(report: dict, shown: list[int]) -> list[str]:
    """The many-step table (markdown lines) at the steps `shown`: KL weight, both tools' losses, and per pair of
    runs (report["differences"]) the loss's relative difference and the weights' (largest, median over tensors)."""
    losses, pairs = report["losses"], list(report["differences"])
    lines = [
        "| step | KL weight | loss atlasvi | loss scvi-tools | "
        + " | ".join(f"{p}: loss | {p}: weights (largest) | {p}: weights (median)" for p in pairs)
        + " |",
        "|---|---|---|---|" + "---|---|---|" * len(pairs),
    ]
    for step in shown:
        row = [str(step), f"{report['kl_weights']['atlasvi'][step]:.3f}"]
        row += [f"{losses['atlasvi'][step]:.3f}", f"{losses['scvi_tools'][step]:.3f}"]
        for p in pairs:
            d = report["differences"][p]
            row += [f"{d['loss_relative'][step]:.1e}", f"{d['weights_largest'][step]:.1e}"]
            row += [f"{d['weights_median'][step]:.1e}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def snapshot_table(report: dict) -> list[str]:
    """The kept steps' every-tensor differences per pair of runs (markdown lines)."""
    pairs = list(report["snapshots"])
    lines = ["| steps done | " + " | ".join(pairs) + " |", "|---|" + "---|" * len(pairs)]
    for step in report["snapshots"][pairs[0]]:
        cells = []
        for p in pairs:
            s = report["snapshots"][p][step]
            cells.append(f"{s['largest']:.1e} ({s['tensor']}); {s['median']:.1e}")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


def validation_table(report: dict) -> list[str]:
    """Every run's validation -ELBO / reconstruction per epoch (markdown lines)."""
    tools = list(report["validation"])
    lines = ["| epoch | " + " | ".join(tools) + " |", "|---|" + "---|" * len(tools)]
    for epoch in range(report["meta"]["epochs"]):
        cells = [
            f"{v['validation_elbo'][epoch]:.3f} / {v['validation_reconstruction'][epoch]:.3f}"
            for v in report["validation"].values()
        ]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return lines


def steps_markdown(report: dict) -> str:
    """The many-step check's tables."""
    meta, losses, pairs = report["meta"], report["losses"], list(report["differences"])
    shown = sorted({0, *(s for s in SNAPSHOTS if s < meta["steps"]), meta["steps"] - 1})
    dropout = meta.get("dropout", "off") != "off"
    lines = [
        "# MultiVI: many training steps of atlasvi and scvi-tools 1.4.2 from the same weights, minibatches and noise"
        + (", dropout on with the same masks" if dropout else ""),
        "",
        f"Command: `{meta['command']}`. Machine: {meta['machine']}; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in meta['load_average_at_end'])}; {meta['seconds']:.0f} s in all"
        + (
            f" (the runs {', '.join(meta['runs_reused_from_an_earlier_invocation'])} reused from an earlier one)."
            if meta.get("runs_reused_from_an_earlier_invocation")
            else "."
        ),
        "",
        f"{meta['steps']} steps ({meta['epochs']} epochs of {meta['epoch_steps'][0]} minibatches of the sci-CAR "
        f"training store, KL warm-up {meta['n_epochs_kl_warmup']} epochs, the adversarial classifier on), seed "
        f"{meta.get('seed', 0)}'s "
        "initial weights of atlasvi in both tools, "
        + ("dropout on (rate 0.1, the same masks)" if dropout else "dropout off")
        + ", the same noise per step (see "
        "benchmarks/multivi_step_check.py). Weights: max |a - b| / max |a| per tensor on 2,048 fixed entries of each "
        "(all of a smaller one), the largest over every tensor (weights and buffers, the classifier's included), "
        "before the step (step = steps done). Loss: the step's loss with the fooling term, |a - b| / |a|."
        + (
            " Reference: atlasvi against itself with each minibatch's cells in another order (exactly the same run, "
            f"rounded otherwise{': the masks follow the cells' if dropout else ''})."
            if any("reordered" in p for p in pairs)
            else ""
        )
        + (
            " 1-ulp twin: atlasvi from its initial weights x (1 +- 2^-23), a seeded sign per entry."
            if any("ulp" in p for p in pairs)
            else ""
        ),
        "",
        *step_table(report, shown),
    ]
    signed = np.array(losses["atlasvi"]) - np.array(losses["scvi_tools"])
    gaps = {
        key: np.abs(
            np.array(report["validation"]["atlasvi"][key]) - np.array(report["validation"]["scvi_tools"][key])
        ).max()
        for key in ("validation_elbo", "validation_reconstruction")
    }
    lines += [
        "",
        f"Over the {meta['steps']} steps: the KL weights agree to "
        f"{report['differences'][pairs[0]]['kl_weight_largest_diff']:.1e}; the step loss atlasvi - scvi-tools is "
        f"{signed.mean():+.4f} ± {signed.std(ddof=1):.4f} nats (largest |difference| {np.abs(signed).max():.4f}, "
        f"atlasvi's higher in {100 * (signed > 0).mean():.0f}% of the steps); the validation -ELBO and reconstruction "
        f"per cell differ by at most {gaps['validation_elbo']:.4f} and {gaps['validation_reconstruction']:.4f} nats "
        "over the epochs.",
    ]
    lines += ["", "Every weight in full (max |a - b| / max |a|, the largest tensor; median over tensors):", ""]
    lines += snapshot_table(report)
    rates = report["dropout_rates_in_normal_training"]
    same = rates["atlasvi"] == rates["scvi_tools"]
    lines += [
        "",
        f"Dropout ({'on' if dropout else 'off'} in this check) in the tools' normal training: "
        f"{len(rates['atlasvi'])} nn.Dropout layers in "
        f"atlasvi, {len(rates['scvi_tools'])} in scvi-tools (under atlasvi's names; scvi-tools' protein modules and "
        f"layers of rate 0 included): {'the same layers with the same rates' if same else 'DIFFERENT'} "
        f"({', '.join(f'{k} {v:g}' for k, v in sorted(rates['atlasvi'].items()))}).",
    ]
    if dropout:
        lines += ["", *dropout_calls_table(report["dropout_calls"])]
        held = report["heldout_at_the_end"]
        lines += [
            "",
            f"Held-out cells after the {meta['steps']} steps (each run's weights in atlasvi's module, z the posterior "
            "mean; nats per cell, RNA / ATAC): "
            + "; ".join(f"{tool} {v['rna']:.3f} / {v['atac']:.3f}" for tool, v in held.items())
            + f"; atlasvi - scvi-tools RNA {held['atlasvi']['rna'] - held['scvi_tools']['rna']:+.4f}"
            + (
                f", atlasvi - reference {held['atlasvi']['rna'] - held['atlasvi_reordered']['rna']:+.4f}"
                if "atlasvi_reordered" in held
                else ""
            )
            + (
                f", atlasvi - 1-ulp twin {held['atlasvi']['rna'] - held['atlasvi_ulp']['rna']:+.4f}"
                if "atlasvi_ulp" in held
                else ""
            )
            + ".",
        ]
    lines += ["", "Validation per epoch (KL weight 1, the mean as z; -ELBO / reconstruction per cell):", ""]
    lines += validation_table(report)
    return "\n".join(lines) + "\n"


def dropout_calls_table(calls: dict[str, dict[str, dict[str, int]]]) -> list[str]:
    """The shared-mask calls of every layer in each run (markdown lines): calls in a step x steps with that many."""
    runs = list(calls)
    layers = sorted({layer for run in calls.values() for layer in run})
    lines = [
        "Shared-mask calls per training step (calls x steps; own: a layer atlasvi does not build):",
        "",
        "| layer | " + " | ".join(runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for layer in layers:
        cells = [", ".join(f"{c} x {n}" for c, n in calls[run].get(layer, {}).items()) or "-" for run in runs]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    if sys.argv[1:] == ["--side", "scvi"]:
        scvi_side()
        return
    if sys.argv[1:] == ["--side", "scvi-adversary"]:
        scvi_adversary_side()
        return
    if sys.argv[1:] == ["--adversary"]:
        report = atlasvi_adversary_side()
        (HERE / "results" / "multivi_step_check_adversary.json").write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report["summary"] | {k: report[k] for k in ("loss_with_fooling_term", "classifier_loss")}))
        return
    if "--steps" in sys.argv[1:] or "scvi-steps" in sys.argv[1:]:
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--steps", action="store_true", help="the many-step check")
        parser.add_argument("--side", choices=["scvi-steps"], default=None, help="internal: scvi-tools' run")
        parser.add_argument("--epochs", type=int, default=15)
        parser.add_argument("--n-epochs-kl-warmup", type=int, default=5)
        parser.add_argument("--no-reference", action="store_true", help="skip the float-drift reference run")
        parser.add_argument("--reuse", action="store_true", help="reuse the runs recorded in the cache (same epochs)")
        parser.add_argument("--dropout", action="store_true", help="dropout on in both tools, with shared masks")
        parser.add_argument("--seed", type=int, default=SEED, help="initial weights, loader and draws (default 0)")
        parser.add_argument("--ulp-reference", action="store_true", help="also atlasvi from 1-ulp-perturbed weights")
        args = parser.parse_args()
        if args.seed < 0:
            raise SystemExit(f"--seed must be >= 0, not {args.seed}")
        folder = steps_folder(args.dropout, args.seed)
        if args.side == "scvi-steps":
            scvi_steps(args.epochs, args.n_epochs_kl_warmup, args.dropout, folder, args.seed)
            return
        report = steps_report(
            args.epochs, args.n_epochs_kl_warmup, not args.no_reference, args.reuse, args.dropout, args.seed,
            args.ulp_reference,
        )  # fmt: skip
        stem = (
            "multivi_step_check_steps" + ("_dropout" if args.dropout else "") + (f"_seed{args.seed}" * (args.seed > 0))
        )
        (HERE / "results" / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
        (HERE / "results" / f"{stem}.md").write_text(steps_markdown(report))
        print(steps_markdown(report))
        return
    report = atlasvi_side()
    (HERE / "results" / "multivi_step_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
