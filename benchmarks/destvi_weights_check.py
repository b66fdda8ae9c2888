"""scvi-tools 1.4.2's trained CondSCVI and DestVI weights in atlasvi's modules: the same outputs and losses?

    .venv/bin/python benchmarks/destvi_weights_check.py --epochs 5

scvi-tools trains CondSCVI and DestVI (its defaults, --epochs each) on the first simulation of
benchmarks/destvi_fidelity.py (300 spots, 500 genes; built by that script if missing); both modules' weights
are copied into atlasvi's CondSCVIModule and DestVIModule (names mapped; atlasvi's FCLayers hold the same Linear
layers). In eval mode, on every cell and spot: CondSCVI's posterior means and variances, its reconstruction and
KL per cell; DestVI's proportions v, per-type states gamma and their weights, the spots' NB means, and the
loss terms per spot without augmentation (scvi-tools' MRDeconv.loss in eval mode needs its training-time
augmentation draws, so both modules compute it with augmentation off). Output: results/destvi_weights_check.json.
CondSCVI's reconstruction per cell is at one latent draw in each tool (different draws: equal means over cells),
and at the posterior mean (the same z in both).
A training step as well (`_scvi_training_step`): both modules in training mode with dropout off, on the first 64
spots, scvi-tools' augmentation draws (simulated spots, blend ratios, prior draws) fed to atlasvi's loss, KL weight
0.5: the loss, its augmentation term and the largest relative difference of every trained parameter's gradient.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def scvi_side(reference: Path, spots: Path, out: Path, epochs: int) -> None:
    """Train in scvi-tools; save both state dicts and the outputs on every cell / spot (eval mode)."""
    import anndata as ad
    import scvi
    import torch

    torch.set_num_threads(1)
    scvi.settings.seed = 0
    sc_adata, st_adata = ad.read_h5ad(reference), ad.read_h5ad(spots)
    sc_adata.obs["cell_type"] = sc_adata.obs["cell_type"].astype(str).astype("category")  # sorted, as atlasvi's
    scvi.model.CondSCVI.setup_anndata(sc_adata, labels_key="cell_type")
    sc_model = scvi.model.CondSCVI(sc_adata, prior="normal")
    sc_model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False)
    scvi.model.DestVI.setup_anndata(st_adata)
    vamp = type(sc_model).get_vamp_prior
    sc_model.get_vamp_prior = lambda *a, **k: {
        key: torch.as_tensor(value, dtype=torch.float32) for key, value in vamp(sc_model, *a, **k).items()
    }
    model = scvi.model.DestVI.from_rna_model(st_adata, sc_model)
    model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False)
    vae, deconv = sc_model.module.eval(), model.module.eval()
    x = torch.as_tensor(sc_adata.X.toarray(), dtype=torch.float32)
    y = torch.as_tensor(sc_adata.obs["cell_type"].cat.codes.to_numpy(), dtype=torch.long).view(-1, 1)
    batch = torch.zeros_like(y)
    tensors = {"X": x, "labels": y, "batch": batch}
    with torch.no_grad():
        inference, generative, losses = vae(tensors)
        at_mean = vae.generative(inference["qz"].loc, inference["library"], y, batch)["px"]
        reconstruction_at_mean = -at_mean.log_prob(x).sum(-1)
        spot_x = torch.as_tensor(st_adata.X.toarray(), dtype=torch.float32)
        spot_tensors = {
            "X": spot_x, "batch": torch.zeros(len(spot_x), 1, dtype=torch.long),
            "ind_x": torch.arange(len(spot_x)).view(-1, 1),
        }  # fmt: skip
        deconv.augmentation = False
        inference_s, generative_s, losses_s = deconv(spot_tensors)
    arrays = {
        "qz_loc": inference["qz"].loc, "qz_var": inference["qz"].scale ** 2,
        "cond_reconstruction": _total(losses.reconstruction_loss), "cond_kl": _total(losses.kl_local),
        "cond_reconstruction_at_mean": reconstruction_at_mean,
        "v": generative_s["v"], "gamma": generative_s["gamma"], "proportion_modes": generative_s["proportion_modes"],
        "px_rate": generative_s["px_rate"], "reconstruction": _total(losses_s.reconstruction_loss),
        "prior": _total(losses_s.kl_local), "loss": losses_s.loss,
    }  # fmt: skip
    state = {f"cond.{k}": v for k, v in vae.state_dict().items()} | {
        f"deconv.{k}": v for k, v in deconv.state_dict().items()
    }
    arrays |= _scvi_training_step(deconv, spot_tensors)
    np.savez(out, **{k: v.detach().numpy() for k, v in arrays.items()}, **{k: v.numpy() for k, v in state.items()})


TRAIN_SPOTS, TRAIN_KL_WEIGHT = 64, 0.5  # the training-step check: a minibatch of the first spots, a KL weight


def _no_dropout(module) -> None:
    """Dropout off (p 0) everywhere, so a module in training mode computes deterministically."""
    import torch

    for child in module.modules():
        if isinstance(child, torch.nn.Dropout):
            child.p = 0.0


def _scvi_training_step(deconv, spot_tensors: dict) -> dict:
    """MRDeconv in training mode (augmentation on, dropout off) on the first TRAIN_SPOTS spots: its augmentation
    draws, the loss at TRAIN_KL_WEIGHT and every gradient (arrays named "draw.*", "train_loss", "grad.NAME")."""
    import torch

    deconv.train()
    deconv.augmentation = True
    _no_dropout(deconv)
    tensors = {k: v[:TRAIN_SPOTS] for k, v in spot_tensors.items()}
    torch.manual_seed(0)
    inference_inputs = deconv._get_inference_input(tensors)
    inference = deconv.inference(**inference_inputs)
    generative = deconv.generative(**deconv._get_generative_input(tensors, inference))
    losses = deconv.loss(tensors, inference, generative, kl_weight=TRAIN_KL_WEIGHT)
    deconv.zero_grad()
    losses.loss.backward()
    draws = ("x_augmented", "prior_sampled", "ratios_ct_augmentation", "ratio_augmentation")
    return (
        {f"draw.{k}": inference_inputs[k] for k in draws}
        | {"train_loss": losses.loss, "train_augmentation": losses.extra_metrics["augmentation"]}
        | {f"grad.{k}": v.grad for k, v in deconv.named_parameters() if v.grad is not None}
    )


def _atlasvi_training_step(deconv, saved, spot_inputs) -> dict:
    """atlasvi's DestVIModule the same way (`_scvi_training_step`), on scvi-tools' augmentation draws: the loss,
    the augmentation term and the largest relative gradient difference per parameter."""
    import torch

    from atlasvi.models.destvi import DestVIInputs

    deconv.train()
    _no_dropout(deconv)
    inputs = DestVIInputs(*(t[:TRAIN_SPOTS] for t in (spot_inputs.x, spot_inputs.batch_index, spot_inputs.rows)))
    draws = {
        "x_augmented": torch.as_tensor(saved["draw.x_augmented"]),
        "prior_sampled": torch.as_tensor(saved["draw.prior_sampled"]),
        "ratios": torch.as_tensor(saved["draw.ratios_ct_augmentation"]),
        "ratio": torch.as_tensor(saved["draw.ratio_augmentation"]),
    }
    deconv.augment = lambda _: dict(draws)
    output = deconv.loss(inputs, kl_weight=TRAIN_KL_WEIGHT)
    deconv.zero_grad()
    output.loss.backward()
    gradients = {}
    for name, parameter in deconv.named_parameters():
        theirs = [k for k in saved.files if k.startswith("grad.") and _rename(k[5:]) == name]
        if parameter.grad is None or not theirs:
            gradients[name] = "missing in " + ("atlasvi" if parameter.grad is None else "scvi-tools")
            continue
        reference = torch.as_tensor(saved[theirs[0]])
        scale = float(reference.abs().max()) or 1.0
        gradients[name] = float((parameter.grad - reference).abs().max()) / scale
    return {
        "loss_atlasvi": float(output.loss), "loss_scvi_tools": float(saved["train_loss"]),
        "augmentation_atlasvi": float(output.extra_metrics["augmentation"]),
        "augmentation_scvi_tools": float(saved["train_augmentation"]),
        "max_relative_gradient_diff": max(v for v in gradients.values() if isinstance(v, float)),
        "relative_gradient_diff": gradients,
    }  # fmt: skip


def _total(value):
    """scvi-tools' LossOutput keeps its terms as dicts of tensors: their sum."""
    return sum(value.values()) if isinstance(value, dict) else value


def _rename(name: str) -> str:
    """A scvi-tools FCLayers / embedding weight name -> atlasvi's."""
    name = name.replace("fc_layers.Layer ", "layers.")
    if "embeddings_dict" in name or name.startswith("embedding"):
        return "batch_embedding.weight"
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "destvi")
    parser.add_argument("--scvi-python", default=str(HERE / ".cache" / "scvi-venv" / "bin" / "python"))
    parser.add_argument("--side", choices=["scvi"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--spots", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "scvi":
        scvi_side(args.reference, args.spots, args.out, args.epochs)
        return
    import anndata as ad
    import torch
    from destvi_fidelity import simulate

    from atlasvi.data import BuildConfig, build_store, open_store
    from atlasvi.models.condscvi import CondSCVIConfig, CondSCVIInputs, CondSCVIModule
    from atlasvi.models.destvi import DestVIConfig, DestVIInputs, DestVIModule

    torch.set_num_threads(1)
    reference, spots, _ = simulate(0, args.workdir, 300, 500)
    out = args.workdir / "weights_check.npz"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    command = [args.scvi_python, __file__, "--side", "scvi", "--reference", str(reference), "--spots", str(spots)]
    subprocess.run(command + ["--out", str(out), "--epochs", str(args.epochs)], env=env, check=True)
    saved = np.load(out)
    store = build_store(
        BuildConfig(inputs=[str(reference)], output=str(args.workdir / "check_ref.zarr"), labels_key="cell_type",
                    overwrite=True)
    )  # fmt: skip
    schema = open_store(store).schema
    sc_adata = ad.read_h5ad(reference)
    sc_adata.obs["cell_type"] = sc_adata.obs["cell_type"].astype(str).astype("category")
    # the store's label order is sorted, as pandas' categories of the h5ad
    assert list(schema.categorical["cell_type"]) == list(sc_adata.obs["cell_type"].astype("category").cat.categories)
    cond = CondSCVIModule(schema, CondSCVIConfig()).eval()
    state = {_rename(k[5:]): torch.as_tensor(saved[k]) for k in saved.files if k.startswith("cond.")}
    missing, unexpected = cond.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"mean_vprior", "var_vprior", "mp_vprior"}, (missing, unexpected)
    x = torch.as_tensor(sc_adata.X.toarray(), dtype=torch.float32)
    y = torch.as_tensor(sc_adata.obs["cell_type"].astype("category").cat.codes.to_numpy(), dtype=torch.long)
    inputs = CondSCVIInputs(x, y, torch.zeros_like(y))
    report = {"epochs": args.epochs}
    with torch.no_grad():
        inference = cond.inference(inputs)
        output = cond.loss(inputs)
    report["condscvi"] = {
        "qz_loc_max_abs_diff": float((inference["qz"].loc - torch.as_tensor(saved["qz_loc"])).abs().max()),
        "qz_var_max_abs_diff": float((inference["qz"].variance - torch.as_tensor(saved["qz_var"])).abs().max()),
        "reconstruction_max_abs_diff": float(
            (output.reconstruction_loss - torch.as_tensor(saved["cond_reconstruction"])).abs().max()
        ),
        "kl_max_abs_diff": float((output.kl_local["kl_z"] - torch.as_tensor(saved["cond_kl"])).abs().max()),
        "reconstruction_mean_abs_diff": float(
            (output.reconstruction_loss - torch.as_tensor(saved["cond_reconstruction"])).abs().mean()
        ),
        "reconstruction_mean": float(output.reconstruction_loss.mean()),
        "reconstruction_mean_scvi_tools": float(saved["cond_reconstruction"].mean()),
        "reconstruction_at_posterior_mean_max_abs_diff": float(
            (
                -cond.generative(inference["qz"].loc, inference["library"], inputs)["px"].log_prob(x).sum(-1)
                - torch.as_tensor(saved["cond_reconstruction_at_mean"])
            )
            .abs()
            .max()
        ),
    }
    spot_adata = ad.read_h5ad(spots)
    spot_store = build_store(
        BuildConfig(inputs=[str(spots)], output=str(args.workdir / "check_spots.zarr"), overwrite=True)
    )
    registry = DestVIModule.init_registry(schema, open_store(spot_store).schema)
    deconv = DestVIModule(registry, DestVIConfig(augmentation=False)).eval()
    state = {_rename(k[7:]): torch.as_tensor(saved[k]) for k in saved.files if k.startswith("deconv.")}
    state = {k: v for k, v in state.items() if k in deconv.state_dict()}  # V, gamma: unused with amortization
    deconv.load_state_dict(state)
    sx = torch.as_tensor(spot_adata.X.toarray(), dtype=torch.float32)
    spot_inputs = DestVIInputs(sx, torch.zeros(len(sx), dtype=torch.long), torch.arange(len(sx)))
    with torch.no_grad():
        inference = deconv.inference(spot_inputs)
        out_g = deconv.generative(inference["z_all"], inference["library"], spot_inputs)
        loss = deconv.loss(spot_inputs)
    prior = loss.kl_local["prior"]
    report["destvi"] = {
        name: float((out_g[name] - torch.as_tensor(saved[name])).abs().max())
        for name in ("v", "gamma", "proportion_modes", "px_rate")
    } | {
        "reconstruction_max_abs_diff": float(
            (loss.reconstruction_loss - torch.as_tensor(saved["reconstruction"]).squeeze(0)).abs().max()
        ),
        "prior_max_abs_diff": float((prior - torch.as_tensor(saved["prior"]).squeeze(0)).abs().max()),
        "loss_atlasvi": float(loss.loss), "loss_scvi_tools": float(saved["loss"]),
        "reconstruction_mean": float(loss.reconstruction_loss.mean()),
    }  # fmt: skip
    train_deconv = DestVIModule(registry, DestVIConfig())
    train_deconv.load_state_dict(state)
    report["destvi_training_step"] = _atlasvi_training_step(train_deconv, saved, spot_inputs)
    (HERE / "results" / "destvi_weights_check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
