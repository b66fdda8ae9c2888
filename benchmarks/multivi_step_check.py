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


def scvi_side() -> None:
    """scvi-tools' loss terms, gradients and one optimizer step on the cells of CACHE/step_batch.npz."""
    import logging

    import scvi
    from scvi.train import AdversarialTrainingPlan

    sys.path.insert(0, str(HERE.parent))
    from benchmarks.multivi_fidelity import BATCH_KEY, _mudata

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = SEED
    train = _mudata(str(CACHE / "train.h5ad"))
    modalities = {"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"}
    scvi.model.MULTIVI.setup_mudata(train, batch_key=BATCH_KEY, modalities=modalities)
    model = scvi.model.MULTIVI(train)
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
    import logging

    import scvi
    from scvi import REGISTRY_KEYS
    from scvi.train import AdversarialTrainingPlan

    sys.path.insert(0, str(HERE.parent))
    from benchmarks.multivi_fidelity import BATCH_KEY, _mudata

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = SEED
    train = _mudata(str(CACHE / "train.h5ad"))
    scvi.model.MULTIVI.setup_mudata(
        train, batch_key=BATCH_KEY, modalities={"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"}
    )
    model = scvi.model.MULTIVI(train)
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
    report = atlasvi_side()
    (HERE / "results" / "multivi_step_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
