"""Is a scArches accuracy gap atlasvi's or the seed's? atlasvi and scvi-tools 1.4.2 swap trained weights on Kang.

    .venv/bin/python benchmarks/scanvi_crosscheck.py --seeds 0 1 2 3 4 5

The split, HVGs, architecture and epochs of `label_transfer.py`'s surgery task (Kang ctrl101, ctrl107 ->
stim101, stim107; scVI 100 epochs, scANVI 20, query 50). Weights move between the tools by renaming
parameters only (the architectures are the same tensors).
1. Objective: scvi-tools' reference scANVI of the first seed loaded into atlasvi; both latents must agree.
   On the same 128 labelled cells, with dropout off and z at its posterior mean, both tools' loss (KL
   weight 0.3, cross-entropy on the same cells) and every parameter's gradient are compared.
2. Stages swapped: per seed each tool trains a reference scVI and scANVI on it, and scANVI on the other
   tool's scVI. The four references (scVI by / scANVI by) are mapped by atlasvi's surgery, and the two
   single-tool references also by scvi-tools' `load_query_data`: the same reference through either
   mapping. Query accuracy before and after query training.
The scvi-tools half runs in its venv (`bash benchmarks/setup_scvi_venv.sh`), started by this script.
Output: results/scanvi_crosscheck.{json,md}.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from label_transfer import ARCHES, SCVI_PYTHON, UNLABELED, prepare, scores, split_stores  # noqa: E402

KANG = HERE / ".cache" / "label_transfer" / "kang"
STORES = KANG / "stores_seed0"  # one row permutation (so one held-out 10%) for atlasvi's stages on every seed
WORK = HERE / ".cache" / "scanvi_crosscheck"
EPOCHS = {"scvi": 100, "kl_warmup": 30, "scanvi": 20, "query": 50}
TRAINER = {"batch_size": 128, "train_size": 0.9, "accelerator": "cpu", "enable_progress_bar": False}
MAP_SEED = 100
RENAMES = (  # scvi-tools -> atlasvi, after "fc_layers.Layer i." -> "layers.i."
    ("decoder.px_scale_decoder.0.", "decoder.px_scale_decoder."),
    ("classifier.classifier.", "classifier."),
    ("decoder_z1_z2.decoder.", "decoder_z1_z2.encoder."),
    ("decoder_z1_z2.mean_decoder", "decoder_z1_z2.mean_encoder"),
    ("decoder_z1_z2.var_decoder", "decoder_z1_z2.var_encoder"),
)


def scvi_to_atlasvi(state: dict) -> dict:
    """scvi-tools parameter names -> atlasvi's (the library encoder and px_r_decoder are unused here: dropped)."""
    renamed = {}
    for key, value in state.items():
        if key.startswith(("l_encoder.", "decoder.px_r_decoder")):
            continue
        key = re.sub(r"fc_layers\.Layer (\d+)\.", r"layers.\1.", key)
        for theirs, ours in RENAMES:
            key = key.replace(theirs, ours)
        renamed[key] = value
    return renamed


def atlasvi_to_scvi(state: dict, template: dict) -> dict:
    """atlasvi weights into a scvi-tools state dict (`template` keeps the parameters atlasvi does not have)."""
    names = {new: old for old in template for new in scvi_to_atlasvi({old: None})}
    return template | {names[key]: value for key, value in state.items()}


@contextmanager
def posterior_means():
    """Normal.rsample returns the mean: the loss is deterministic given the weights."""
    from torch.distributions import Normal

    rsample = Normal.rsample
    Normal.rsample = lambda self, sample_shape=(): self.loc.expand(torch.Size(sample_shape) + self.loc.shape)
    try:
        yield
    finally:
        Normal.rsample = rsample


def truth() -> "dict[str, str]":
    import anndata as ad

    obs = ad.read_h5ad(KANG / "input.h5ad", backed="r").obs
    return dict(zip(obs.index, obs["cell_type"].astype(str), strict=True))


def check_cells() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(counts (128, genes), batch codes, label codes) of the reference's first 128 cells, codes in sorted order."""
    import anndata as ad

    reference = ad.read_h5ad(KANG / "reference.h5ad")[:128]
    x = reference.X.toarray() if hasattr(reference.X, "toarray") else np.asarray(reference.X)
    codes = [reference.obs[k].astype("category").cat.codes.to_numpy() for k in ("sample", "cell_type")]
    return x.astype(np.float32), codes[0].astype(np.int64), codes[1].astype(np.int64)


# ---- scvi-tools side (run in the scvi venv: --side scvi) ----


def scvi_reference(seed: int):
    import anndata as ad
    import scvi

    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    reference = ad.read_h5ad(KANG / "reference.h5ad")
    reference.obs["masked"] = reference.obs["cell_type"].astype(str)
    scvi.model.SCVI.setup_anndata(reference, batch_key="sample", labels_key="masked")
    return reference, scvi.model.SCVI(reference, **ARCHES)


def scvi_side(step: str, seed: int) -> list[dict]:
    import anndata as ad
    import scvi

    torch.set_num_threads(1)
    reference, vae = scvi_reference(seed)
    if step == "reference":
        vae.train(**TRAINER, max_epochs=EPOCHS["scvi"], plan_kwargs={"n_epochs_kl_warmup": EPOCHS["kl_warmup"]})
        torch.save(vae.module.state_dict(), WORK / f"vae_scvi_{seed}.pt")
        model = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNLABELED)
        model.train(**TRAINER, max_epochs=EPOCHS["scanvi"])
        torch.save(model.module.state_dict(), WORK / f"ref_scvi_{seed}.pt")
        np.save(WORK / f"latent_scvi_{seed}.npy", model.get_latent_representation(reference))
        (WORK / f"names_scvi_{seed}.json").write_text(json.dumps(list(reference.obs_names)))
        return []
    if step == "scanvi":  # scANVI by scvi-tools on atlasvi's scVI
        state = torch.load(WORK / f"vae_atlasvi_{seed}.pt", weights_only=True)
        vae.module.load_state_dict(atlasvi_to_scvi(state, vae.module.state_dict()))
        vae.is_trained_ = True
        model = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNLABELED)
        model.train(**TRAINER, max_epochs=EPOCHS["scanvi"])
        torch.save(model.module.state_dict(), WORK / f"ref_atlasvi+scvi_{seed}.pt")
        return []
    model = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNLABELED)
    if step == "loss":
        model.module.load_state_dict(torch.load(WORK / f"ref_scvi_{seed}.pt", weights_only=True))
        module = model.module.eval()
        x, batch, labels = (torch.from_numpy(a) for a in check_cells())
        tensors = {"X": x, "batch": batch[:, None], "labels": labels[:, None]}
        with posterior_means():
            _, _, out = module.forward(
                tensors, loss_kwargs={"kl_weight": 0.3, "labelled_tensors": tensors, "classification_ratio": 50}
            )
        out.loss.backward()
        grads = {k: p.grad for k, p in module.named_parameters() if p.grad is not None}
        torch.save(scvi_to_atlasvi(grads), WORK / "loss_check_scvi.pt")
        return [{"loss": float(out.loss), "classification_loss": float(out.classification_loss)}]
    labels = truth()
    query = ad.read_h5ad(KANG / "query.h5ad")
    query.obs["masked"] = UNLABELED
    expected = np.array([labels[c] for c in query.obs_names])
    rows = []
    for origin in ("scvi", "atlasvi"):  # step == "map": both single-tool references through scvi-tools' mapping
        state = torch.load(WORK / f"ref_{origin}_{seed}.pt", weights_only=True)
        template = model.module.state_dict()
        model.module.load_state_dict(atlasvi_to_scvi(state, template) if origin == "atlasvi" else state)
        model.is_trained_ = True
        scvi.settings.seed = MAP_SEED
        mapped = scvi.model.SCANVI.load_query_data(query.copy(), model)
        mapped.is_trained_ = True  # only to predict with the untrained query columns
        before = float(np.mean(np.asarray(mapped.predict()) == expected))
        mapped.is_trained_ = False
        mapped.train(**(TRAINER | {"plan_kwargs": {"weight_decay": 0.0}}), max_epochs=EPOCHS["query"])
        after = scores(expected, np.asarray(mapped.predict()))
        rows.append(
            {"seed": seed, "scvi_by": origin, "scanvi_by": origin, "mapped_by": "scvi-tools", "before": before} | after
        )
    return rows


# ---- atlasvi side ----


def atlasvi_reference(state: dict | None, seed: int, scvi_state: dict | None = None):
    """An atlasvi SCANVI on the reference store: with `state`, those weights; else trained (scVI from
    `scvi_state` when given, else trained too) with `seed`. Returns (scvi state, SCANVI)."""
    from atlasvi.api import SCANVI, SCVI
    from atlasvi.models.scanvi import SCANVIConfig
    from atlasvi.models.scvi import SCVIConfig
    from atlasvi.train import TrainConfig

    store = STORES / "atlasvi_reference.zarr"
    if state is not None:
        model = SCANVI(store, SCANVIConfig(**ARCHES), device="cpu")
        model.module.load_state_dict(state)
        return None, model
    torch.manual_seed(seed)
    vae = SCVI(store, SCVIConfig(**ARCHES), device="cpu")
    if scvi_state is None:
        vae.fit(TrainConfig(max_epochs=EPOCHS["scvi"], n_epochs_kl_warmup=EPOCHS["kl_warmup"], seed=seed))
    else:
        vae.module.load_state_dict(scvi_state)
    model = SCANVI.from_scvi_model(vae, unlabeled_category=UNLABELED)
    model.fit(TrainConfig(max_epochs=EPOCHS["scanvi"], seed=seed))
    return vae.module.state_dict(), model


def atlasvi_map(reference, labels: dict) -> dict:
    """Query accuracy of `reference` (an atlasvi SCANVI) before and after atlasvi's surgery and query training."""
    import anndata as ad

    from atlasvi.api import SCANVI
    from atlasvi.train import TrainConfig

    store = STORES / "atlasvi_query.zarr"
    expected = np.array([labels[c] for c in ad.read_zarr(store).obs_names])
    query = SCANVI.load_query_data(store, reference, device="cpu", seed=MAP_SEED)
    before = float(np.mean(query.predict() == expected))
    query.fit(TrainConfig(max_epochs=EPOCHS["query"], seed=MAP_SEED))
    return {"before": before} | scores(expected, query.predict())


def loss_check(seed: int) -> dict:
    """scvi-tools' reference in atlasvi: latent agreement, then loss and gradients against scvi-tools' (step "loss")."""
    import anndata as ad

    from atlasvi.models.vae import VAEInputs

    _, model = atlasvi_reference(scvi_to_atlasvi(torch.load(WORK / f"ref_scvi_{seed}.pt", weights_only=True)), seed)
    order = {n: i for i, n in enumerate(json.loads((WORK / f"names_scvi_{seed}.json").read_text()))}
    names = ad.read_zarr(STORES / "atlasvi_reference.zarr").obs_names
    theirs = np.load(WORK / f"latent_scvi_{seed}.npy")[[order[n] for n in names]]
    latent_diff = float(np.abs(model.get_latent_representation() - theirs).max())
    theirs_loss = run_scvi("loss", seed)[0]
    module = model.module.eval()
    x, batch, labels = (torch.from_numpy(a) for a in check_cells())
    with posterior_means():
        out = module.loss(VAEInputs(x, batch, labels, (), None), kl_weight=0.3)
    out.loss.backward()
    grads = {k: p.grad for k, p in module.named_parameters() if p.grad is not None}
    reference = torch.load(WORK / "loss_check_scvi.pt", weights_only=True)
    relative = {
        k: float((g - reference[k]).abs().max() / reference[k].abs().max().clamp_min(1e-12)) for k, g in grads.items()
    }
    worst = max(relative, key=relative.get)
    return {
        "latent_max_abs_diff": latent_diff, "loss_atlasvi": float(out.loss), "loss_scvi_tools": theirs_loss["loss"],
        "ce_atlasvi": float(out.extra_metrics["classification_loss"]),
        "ce_scvi_tools": theirs_loss["classification_loss"],
        "n_gradients": len(grads), "same_parameters": sorted(grads) == sorted(reference),
        "worst_gradient": worst, "worst_gradient_relative_diff": relative[worst],
    }  # fmt: skip


def run_scvi(step: str, seed: int, wait: bool = True):
    command = [str(SCVI_PYTHON), __file__, "--side", "scvi", "--step", step, "--seeds", str(seed)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    return finish(child) if wait else child


def finish(child: subprocess.Popen) -> list[dict]:
    out, _ = child.communicate()
    if child.returncode != 0:
        raise SystemExit(f"scvi-tools side failed ({child.returncode}): {' '.join(child.args)}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scanvi_crosscheck")
    parser.add_argument("--side", choices=["atlasvi", "scvi"], default="atlasvi", help=argparse.SUPPRESS)
    parser.add_argument("--step", choices=["reference", "scanvi", "loss", "map"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    WORK.mkdir(parents=True, exist_ok=True)
    if args.side == "scvi":
        print(json.dumps(scvi_side(args.step, args.seeds[0])), flush=True)
        return
    torch.set_num_threads(1)
    split_stores("kang", prepare("kang", KANG), KANG, store_seed=0)
    labels, rows, check = truth(), [], None
    for seed in args.seeds:
        child = run_scvi("reference", seed, wait=False)
        vae, model = atlasvi_reference(None, seed)
        torch.save(vae, WORK / f"vae_atlasvi_{seed}.pt")
        torch.save(model.module.state_dict(), WORK / f"ref_atlasvi_{seed}.pt")
        finish(child)
        if check is None:
            check = loss_check(seed)
            print(json.dumps(check), flush=True)
        child = run_scvi("scanvi", seed, wait=False)
        scvi_vae = scvi_to_atlasvi(torch.load(WORK / f"vae_scvi_{seed}.pt", weights_only=True))
        references = {("atlasvi", "atlasvi"): model, ("scvi", "atlasvi"): atlasvi_reference(None, seed, scvi_vae)[1]}
        finish(child)
        child = run_scvi("map", seed, wait=False)
        for scvi_by, scanvi_by in (("scvi", "scvi"), ("atlasvi", "scvi")):
            name = "scvi" if scvi_by == "scvi" else "atlasvi+scvi"
            state = scvi_to_atlasvi(torch.load(WORK / f"ref_{name}_{seed}.pt", weights_only=True))
            references[(scvi_by, scanvi_by)] = atlasvi_reference(state, seed)[1]
        for (scvi_by, scanvi_by), reference in references.items():
            row = {"seed": seed, "scvi_by": scvi_by, "scanvi_by": scanvi_by, "mapped_by": "atlasvi"}
            rows.append(row | atlasvi_map(reference, labels))
            print(json.dumps(rows[-1]), flush=True)
        rows += finish(child)
        write_results(args.out, check, rows)


def write_results(out: Path, check: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"epochs": EPOCHS, "arches_architecture": ARCHES, "map_seed": MAP_SEED, "command": " ".join(sys.argv)}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "loss_check": check, "rows": rows}, indent=1))
    lines = [
        "# scANVI / scArches on Kang: atlasvi and scvi-tools 1.4.2 with each other's weights\n",
        json.dumps(meta) + "\n",
        "## 1. The same weights, the same cells (dropout off, z at the posterior mean)\n",
        f"- latent of scvi-tools' reference in atlasvi: max |difference| {check['latent_max_abs_diff']:.1e}",
        f"- loss (KL weight 0.3, cross-entropy x 50): atlasvi {check['loss_atlasvi']:.4f}, "
        f"scvi-tools {check['loss_scvi_tools']:.4f}; cross-entropy {check['ce_atlasvi']:.6f} / "
        f"{check['ce_scvi_tools']:.6f}",
        f"- gradients: {check['n_gradients']} parameters, same set: {check['same_parameters']}; largest relative "
        f"difference {check['worst_gradient_relative_diff']:.1e} ({check['worst_gradient']})\n",
        "## 2. Query accuracy by who trained each stage and who mapped (mean over seeds)\n",
        "| scVI by | scANVI by | mapped by | seeds | before query training | after | macro-F1 | per seed (after) |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    for key in sorted({(r["scvi_by"], r["scanvi_by"], r["mapped_by"]) for r in rows}):
        mine = sorted(
            (r for r in rows if (r["scvi_by"], r["scanvi_by"], r["mapped_by"]) == key), key=lambda r: r["seed"]
        )
        mean = {m: np.mean([r[m] for r in mine]) for m in ("before", "accuracy", "macro_f1")}
        seeds = ", ".join(f"{r['seed']}: {r['accuracy']:.3f}" for r in mine)
        figures = f"{mean['before']:.3f} | {mean['accuracy']:.3f} | {mean['macro_f1']:.3f}"
        lines.append(f"| {' | '.join(key)} | {len(mine)} | {figures} | {seeds} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
