"""totalVI weights check: scvi-tools 1.4.2's trained TOTALVAE weights in atlasvi's TOTALVIModule give its values.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/totalvi_weights_check.py

Run after benchmarks/totalvi_fidelity.py has prepared its files (`.cache/totalvi_fidelity/`): scvi-tools' TOTALVI (its
defaults) trains 2 epochs on the 862 held-out CBMC cells (one batch), then, in eval mode, gives for every cell the
posterior of z, and at z = its mean the decoder's outputs and the per-cell terms of the loss with the protein
background at its mean (exp(back_alpha): the decoder draws it otherwise): -log p(x), -log p(y), KL of z and of the
background. atlasvi's module, built on the store of the same cells, takes those weights (names mapped: scvi-tools'
`fc_layers.Layer i` is atlasvi's `layers.i`, its `encoder` atlasvi's `z_encoder`; scvi-tools' unused library encoder
and zero-inflation head are left out) and computes the same quantities. Output: results/totalvi_weights_check.json,
the largest absolute and the mean difference of each. The RNA term differs by design: scvi-tools' NB adds 1e-8 to
the mean inside its logs (x log(mu + 1e-8)), atlasvi's shared NB does not (atlasvi/distributions), which matters
where a cell has counts of a gene whose predicted mean is below ~1e-7.
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
CACHE = HERE / ".cache" / "totalvi_fidelity"
OUTPUTS = ("qz_loc", "qz_scale", "px_scale", "back_alpha", "back_beta", "fore_scale", "mixing", "efficiency")
TERMS = ("rna", "protein", "kl_z", "kl_background")


def scvi_side() -> None:
    """Train scvi-tools' TOTALVI on the held-out cells; write its weights and values to the cache (scvi-tools venv)."""
    import logging

    import anndata as ad
    import scvi
    import torch
    from scvi.distributions import NegativeBinomial, NegativeBinomialMixture
    from torch.distributions import Normal, kl_divergence

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = 0
    adata = ad.read_h5ad(CACHE / "heldout.h5ad")
    adata.X = adata.X.astype(np.float32)
    adata.obsm["protein_expression"] = adata.obsm["protein_expression"].astype(np.float32)
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="source")
    model = scvi.model.TOTALVI(adata)
    model.train(max_epochs=2, accelerator="cpu", devices=1, enable_progress_bar=False)
    module = model.module.eval()
    tensors = next(iter(model._make_data_loader(adata=adata, batch_size=adata.n_obs)))
    with torch.no_grad():
        inference = module.inference(**module._get_inference_input(tensors))
        qz = inference["qz"]
        inputs = module._get_generative_input(tensors, inference) | {"z": qz.loc}
        generative = module.generative(**inputs)
        px, py = generative["px_"], generative["py_"]
        efficiency = generative["per_batch_efficiency"]
        x, y = tensors[scvi.REGISTRY_KEYS.X_KEY], tensors[scvi.REGISTRY_KEYS.PROTEIN_EXP_KEY]
        back = torch.exp(py["back_alpha"])
        mixture = NegativeBinomialMixture(
            mu1=efficiency * back, mu2=efficiency * back * py["fore_scale"], theta1=py["r"],
            mixture_logits=py["mixing"],
        )  # fmt: skip
        values = {
            "qz_loc": qz.loc, "qz_scale": qz.scale, "px_scale": px["scale"], "back_alpha": py["back_alpha"],
            "back_beta": py["back_beta"], "fore_scale": py["fore_scale"], "mixing": py["mixing"],
            "efficiency": efficiency,
            "rna": -NegativeBinomial(mu=px["rate"], theta=px["r"]).log_prob(x).sum(-1),
            "protein": -mixture.log_prob(y).sum(-1),
            "kl_z": kl_divergence(qz, Normal(0, 1)).sum(-1),
            "kl_background": kl_divergence(
                Normal(py["back_alpha"], py["back_beta"]), inference["back_mean_prior"]
            ).sum(-1),
        }  # fmt: skip
    np.savez(CACHE / "scvi_values.npz", names=adata.obs_names.to_numpy(), **{k: v.numpy() for k, v in values.items()})
    np.savez(CACHE / "scvi_weights.npz", **{k: v.numpy() for k, v in module.state_dict().items()})


def atlasvi_name(name: str) -> str | None:
    """atlasvi's name of a scvi-tools TOTALVAE weight, or None for one atlasvi does not build."""
    if name.startswith(("encoder.l_gene_", "decoder.px_dropout_decoder_gene")):
        return None
    name = re.sub(r"fc_layers\.Layer (\d+)", r"layers.\1", name)
    name = name.replace("encoder.z_mean_encoder", "encoder.mean_encoder").replace(
        "encoder.z_var_encoder", "encoder.var_encoder"
    )
    return "z_" + name if name.startswith("encoder.") else name


def atlasvi_side() -> dict:
    """scvi-tools' weights in atlasvi's module on the same cells; the largest absolute difference of each value."""
    import anndata as ad
    import torch
    from torch.distributions import Normal, kl_divergence

    from atlasvi.analysis import minibatches
    from atlasvi.data import open_store
    from atlasvi.distributions import NegativeBinomial, NegativeBinomialMixture
    from atlasvi.models.totalvi import TOTALVIModule

    torch.set_num_threads(1)
    store = open_store(CACHE / "heldout.zarr")
    module = TOTALVIModule(store.schema).eval()
    weights = np.load(CACHE / "scvi_weights.npz")
    state = {atlasvi_name(k): torch.from_numpy(weights[k]) for k in weights.files if atlasvi_name(k) is not None}
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
        back = torch.exp(out["back_alpha"])
        mixture = NegativeBinomialMixture(
            out["efficiency"] * back, out["efficiency"] * back * out["fore_scale"], torch.exp(module.py_r),
            out["mixing"],
        )  # fmt: skip
        posterior = Normal(out["back_alpha"], out["back_beta"])
        values = {
            "qz_loc": qz.loc, "qz_scale": qz.scale, "px_scale": out["scale"], "back_alpha": out["back_alpha"],
            "back_beta": out["back_beta"], "fore_scale": out["fore_scale"], "mixing": out["mixing"],
            "efficiency": out["efficiency"],
            "rna": -NegativeBinomial(out["rate"], torch.exp(module.px_r)).log_prob(inputs.x).sum(-1),
            "protein": -mixture.log_prob(inputs.y).sum(-1),
            "kl_z": kl_divergence(qz, Normal(0.0, 1.0)).sum(-1),
            "kl_background": kl_divergence(posterior, module.background_prior(inputs.batch_index)).sum(-1),
        }  # fmt: skip
    report = {}
    for key, value in values.items():
        theirs = reference[key][rows]
        report[key] = {
            "max_abs_diff": float(np.abs(value.numpy() - theirs).max()),
            "mean_diff": float((value.numpy() - theirs).mean()),  # atlasvi - scvi-tools
            "scvi_tools_mean_abs": float(np.abs(theirs).mean()),
        }
    return report


def main() -> None:
    if sys.argv[1:] == ["--side", "scvi"]:
        scvi_side()
        return
    if not (CACHE / "heldout.zarr").exists():
        raise SystemExit("run benchmarks/totalvi_fidelity.py first (it prepares .cache/totalvi_fidelity/)")
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    subprocess.run([str(SCVI_PYTHON), __file__, "--side", "scvi"], env=env, check=True)
    report = {
        "command": "python benchmarks/totalvi_weights_check.py",
        "cells": 862,
        "scvi_tools_epochs": 2,
        "values": atlasvi_side(),
    }
    (HERE / "results" / "totalvi_weights_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
