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
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SCVI_PYTHON = HERE / ".cache" / "scvi-venv" / "bin" / "python"
CACHE = HERE / ".cache" / "multivi_fidelity"
KL_WEIGHT = 0.3
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


def atlasvi_side() -> dict:
    """atlasvi's first training minibatch (to CACHE/step_batch.npz), then scvi-tools' side, then atlasvi's terms,
    gradients and step on scvi-tools' initial weights; the largest differences."""
    import anndata as ad
    import torch

    from atlasvi.api import MULTIVI
    from atlasvi.data import LoaderConfig
    from atlasvi.train import TrainConfig
    from atlasvi.train.job import make_loaders, train_config_for
    from atlasvi.train.loop import _optimizer
    from benchmarks.multivi_weights_check import atlasvi_name

    torch.set_num_threads(1)
    model = MULTIVI(CACHE / "train.zarr", device="cpu", seed=SEED)
    module = model.module
    config = train_config_for(model.config, TrainConfig(seed=SEED))
    train_loader, validation_loader = make_loaders(
        model.store, LoaderConfig(batch_size=128, seed=SEED), config.validation_fraction,
        code_maps={k: v.numpy() for k, v in model.code_maps.items()}, modalities=module.used_modalities,
        device=torch.device("cpu"),
    )  # fmt: skip
    with train_loader, validation_loader:
        batch = next(iter(train_loader))
    obs_names = ad.read_zarr(CACHE / "train.zarr").obs_names
    names = np.asarray(obs_names[batch.rows.numpy()], dtype=object)
    np.savez(CACHE / "step_batch.npz", names=names)
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


def main() -> None:
    if sys.argv[1:] == ["--side", "scvi"]:
        scvi_side()
        return
    report = atlasvi_side()
    (HERE / "results" / "multivi_step_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
