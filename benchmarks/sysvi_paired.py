"""atlasvi's sysVI next to scvi-tools 1.4.2's SysVI from the same initial weights, on Baron human + mouse.

    .venv/bin/python benchmarks/sysvi_paired.py --seeds 0 1 2 3 4 --epochs 400 --n-inits 200 \
        --scvi-python /path/to/scvi-venv/bin/python

Three checks of whether a systematic difference remains between the two implementations (the data, store and
metrics are benchmarks/sysvi_fidelity.py's; species is the system):
1. Initial weights (`--n-inits N`): N scvi-tools SysVAE modules (torch seeds 0..N-1) and N atlasvi SysVIModules
   (`SysVI(store, seed=i)`, seeds N..2N-1: independent draws); per parameter,
   the mean over the inits of its elements' mean and standard deviation in each tool and the z-score of the
   difference (atlasvi's pseudo-inputs are set at the first training step; the paired runs copy scvi-tools').
2. One training step: scvi-tools' initial weights and pseudo-inputs (seed 0) in atlasvi's module with
   cycle_input "own_system" (scvi-tools' cycle); both in training mode with dropout off, on the first 128
   training cells, with scvi-tools' draw of z: the loss terms, every parameter's gradient (largest difference
   over the largest magnitude) and the encoder's batch-norm running statistics after the forward pass.
3. Paired runs (`--seeds`): per seed, scvi-tools' SysVI is built with scvi.settings.seed = seed and its initial
   weights and pseudo-inputs are copied into atlasvi's module, which trains with scvi-tools' cycle ("own_system")
   and with its default, the paper's ("cross_system"). Both tools train on the same cells (atlasvi holds out the
   store's last 10% of rows; scvi-tools gets the same split through `external_indexing`), batch size 128, Adam
   lr 1e-3, weight decay 1e-6, eps 0.01, no KL warm-up, --epochs epochs; minibatch order, dropout and the latent
   draws are each tool's own. The runs go one after another (one process at a time: the machine is shared).
   Scores per seed and the paired differences atlasvi - scvi-tools (mean, sd, t = mean / (sd / sqrt(n))), and
   the last epoch's training loss terms per cell (atlasvi's reconstruction less 0.5 log(2 pi) per gene, which
   scvi-tools' GaussianNLLLoss leaves out).
Output: results/sysvi_paired.json and .md.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sysvi_fidelity import DATASETS, METRICS, TARGET_SUM, atlasvi_name, atlasvi_state, prepare  # noqa: E402

DATASET = "baron"
BATCH_SIZE = 128
VALIDATION_FRACTION = 0.1
STEP_CELLS = 128
VARIANTS = ("own_system", "cross_system")


def _scvi_adata(h5ad: Path):
    """The store's counts log-normalised by scanpy, registered for scvi-tools' SysVI."""
    import anndata as ad
    import scanpy as sc
    import scvi

    adata = ad.read_h5ad(h5ad)
    adata.X = np.asarray(adata.X.todense() if hasattr(adata.X, "todense") else adata.X, dtype=np.float32)
    sc.pp.normalize_total(adata, target_sum=TARGET_SUM)
    sc.pp.log1p(adata)
    scvi.external.SysVI.setup_anndata(adata, batch_key=DATASETS[DATASET][1])
    return adata


def _weights(module, prefix: str) -> dict[str, np.ndarray]:
    """scvi-tools SysVAE state as "<prefix><name>" arrays (the VampPrior's copy of the encoder left out)."""
    return {
        f"{prefix}{k}": v.detach().numpy().copy()
        for k, v in module.state_dict().items()
        if not k.startswith("prior.encoder.")
    }


def split(n_cells: int) -> int:
    """Training cells of atlasvi's split (`atlasvi.data.sampler.split_rows`): the rest of the rows validate."""
    return n_cells - round(n_cells * VALIDATION_FRACTION)


def scvi_init_side(h5ad: Path, n_inits: int, out: Path) -> None:
    """Per init i (torch and numpy seeded i): each SysVAE parameter's element mean and sd -> `out` (npz)."""
    import torch
    from scvi.external.sysvi._module import SysVAE

    torch.set_num_threads(1)
    adata = _scvi_adata(h5ad)
    x = torch.tensor(adata.X)
    batch = torch.tensor(adata.obs[DATASETS[DATASET][1]].cat.codes.to_numpy(), dtype=torch.long).view(-1, 1)
    stats: dict[str, list[tuple[float, float]]] = {}
    for i in range(n_inits):
        torch.manual_seed(i)
        cells = np.random.default_rng(i).integers(0, len(x), 5)  # as SysVI: 5 random cells (with replacement)
        module = SysVAE(x.shape[1], 2, pseudoinput_data={"X": x[cells], "batch": batch[cells]})
        for name, p in module.named_parameters():
            if name.startswith("prior."):
                continue
            stats.setdefault(atlasvi_name(name), []).append((float(p.mean()), float(p.std())))
    np.savez(out, **{k: np.array(v) for k, v in stats.items()})


def atlasvi_init_stats(store: Path, seeds: range) -> dict[str, np.ndarray]:
    """Per seed i (`SysVI(store, seed=i)`): each parameter's (element mean, sd), (len(seeds), 2) per name."""
    from atlasvi.api import SysVI

    stats: dict[str, list[tuple[float, float]]] = {}
    for i in seeds:
        module = SysVI(store, device="cpu", seed=i).module
        for name, p in module.named_parameters():
            if name.startswith(("pseudo_", "prior_")):
                continue
            stats.setdefault(name, []).append((float(p.mean()), float(p.std())))
    return {k: np.array(v) for k, v in stats.items()}


def init_check(theirs: dict[str, np.ndarray], ours: dict[str, np.ndarray]) -> dict:
    """Per parameter: mean over inits of the element mean / sd in each tool, and z-scores of the differences."""
    if set(theirs) != set(ours):
        raise SystemExit(f"parameters differ: {sorted(set(theirs) ^ set(ours))}")
    rows = {}
    for name in sorted(ours):
        row = {}
        for j, stat in enumerate(("mean", "sd")):
            a, s = ours[name][:, j], theirs[name][:, j]
            se = math.sqrt(a.var(ddof=1) / len(a) + s.var(ddof=1) / len(s))
            row[f"atlasvi_{stat}"], row[f"scvi_tools_{stat}"] = float(a.mean()), float(s.mean())
            row[f"z_{stat}"] = float((a.mean() - s.mean()) / se) if se > 0 else 0.0
        rows[name] = row
    return rows


def scvi_step_side(h5ad: Path, out: Path) -> None:
    """scvi-tools' SysVI (seed 0): initial weights, then one training-mode forward (dropout off) on the first
    STEP_CELLS cells, its draw of z as eps, the loss terms, the gradients and the encoder's running statistics."""
    import scvi
    import torch

    torch.set_num_threads(1)
    scvi.settings.seed = 0
    adata = _scvi_adata(h5ad)
    model = scvi.external.SysVI(adata)
    module = model.module
    weights = _weights(module, "weight:")
    module.train()
    for layer in module.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0
    x = torch.tensor(adata.X[:STEP_CELLS])
    batch = torch.tensor(adata.obs[DATASETS[DATASET][1]].cat.codes.to_numpy()[:STEP_CELLS], dtype=torch.long)
    torch.manual_seed(1)
    inference, _, losses = module({"X": x, "batch": batch.view(-1, 1)}, loss_kwargs={"kl_weight": 1.0})
    qz, z = inference["qz"], inference["z"]
    eps = ((z - qz.loc) / qz.scale).detach()
    losses.loss.backward()
    grads = {
        f"grad:{atlasvi_name(k)}": p.grad.numpy().copy() for k, p in module.named_parameters() if p.grad is not None
    }
    running = {
        f"running:{atlasvi_name(k)}": v.numpy().copy() for k, v in module.encoder.state_dict().items() if "running" in k
    }
    np.savez(
        out, x=x.numpy(), batch=batch.numpy(), eps=eps.numpy(), loss=float(losses.loss),
        reconstruction=float(losses.reconstruction_loss["reconstruction_loss"].mean()),
        kl=float(losses.kl_local["kl_local"].mean()), cycle=float(losses.extra_metrics["cycle_loss"]),
        **weights, **grads, **running,
    )  # fmt: skip


def step_check(store: Path, saved: "np.lib.npyio.NpzFile") -> dict:
    """atlasvi's loss and gradients from scvi-tools' weights, cells and draw of z (see `scvi_step_side`)."""
    import torch

    from atlasvi.data import open_store
    from atlasvi.models.sysvi import SysVIConfig, SysVIModule
    from atlasvi.models.sysvi.module import SysVIInputs

    module = SysVIModule(open_store(store).schema, SysVIConfig(cycle_input="own_system"))
    module.load_state_dict(atlasvi_state(saved), strict=True)
    module.train()
    for layer in module.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0
    eps = torch.tensor(saved["eps"])

    def inference(inputs: SysVIInputs) -> dict:
        qz = module._encode(inputs.x, inputs.system, inputs)
        return {"qz": qz, "z": qz.loc + qz.scale * eps}

    module.inference = inference
    x = torch.tensor(saved["x"])
    inputs = SysVIInputs(x=x, system=torch.tensor(saved["batch"]), categorical=(), continuous=None)
    torch.manual_seed(1)
    output = module.loss(inputs, kl_weight=1.0)
    constant = 0.5 * math.log(2 * math.pi) * x.shape[1]
    output.loss.backward()
    grads = {
        name: (p.grad.numpy().reshape(-1), saved[f"grad:{name}"].reshape(-1)) for name, p in module.named_parameters()
    }
    # biases before a batch norm, and the latent mean's bias (the cycle distance is standardised), get a zero
    # gradient up to rounding: compared in absolute terms, the rest relative to their largest element
    scale = max(float(np.abs(theirs).max()) for _, theirs in grads.values())
    zero = {n for n, (_, theirs) in grads.items() if np.abs(theirs).max() < 1e-5 * scale}
    relative = {n: float(np.abs(a - t).max() / np.abs(t).max()) for n, (a, t) in grads.items() if n not in zero}
    worst = max(relative, key=relative.get)
    state = module.encoder.state_dict()
    running = max(
        float(np.abs(state[k.removeprefix("running:")].numpy() - saved[k]).max())
        for k in saved.files
        if k.startswith("running:")
    )
    return {
        "cells": len(x),
        "loss": [float(output.loss) - constant, float(saved["loss"])],
        "reconstruction": [float(output.reconstruction_loss.mean()) - constant, float(saved["reconstruction"])],
        "kl": [float(output.kl_local["kl_z"].mean()), float(saved["kl"])],
        "cycle": [float(output.extra_metrics["cycle_loss"]), float(saved["cycle"])],
        "gradient_max_relative_diff": relative[worst],
        "gradient_worst_parameter": worst,
        "gradients_compared": len(relative),
        "zero_gradients": sorted(zero),
        "zero_gradient_max_abs_diff": max((float(np.abs(grads[n][0] - grads[n][1]).max()) for n in zero), default=0.0),
        "encoder_running_stats_max_abs_diff": running,
    }


def scvi_train_side(h5ad: Path, seeds: list[int], epochs: int, out: Path) -> None:
    """Per seed: scvi-tools' SysVI's initial weights, then trained on atlasvi's split; latent and last epoch."""
    import scvi
    import torch

    torch.set_num_threads(1)
    scvi.settings.dl_num_workers = 0
    adata = _scvi_adata(h5ad)
    n_train = split(adata.n_obs)
    indexing = [np.arange(n_train), np.arange(n_train, adata.n_obs)]
    arrays, info = {}, {}
    for seed in seeds:
        scvi.settings.seed = seed
        model = scvi.external.SysVI(adata)
        arrays |= _weights(model.module, f"init_s{seed}:")
        started = time.perf_counter()
        model.train(
            max_epochs=epochs, batch_size=BATCH_SIZE, accelerator="cpu", enable_progress_bar=False,
            check_val_every_n_epoch=epochs,  # held-out figures once, at the end
            datasplitter_kwargs={"external_indexing": [i.copy() for i in indexing]},
        )  # fmt: skip
        history = model.history
        info[f"s{seed}"] = {
            "seconds": time.perf_counter() - started,
            "train_reconstruction": float(history["reconstruction_loss_train"].iloc[-1, 0]),
            "train_kl": float(history["kl_local_train"].iloc[-1, 0]),
            "train_cycle": float(history["cycle_loss_train"].iloc[-1, 0]),
            "validation_reconstruction": float(history["reconstruction_loss_validation"].iloc[-1, 0]),
        }
        arrays[f"scvi-tools_s{seed}"] = model.get_latent_representation(adata)
        print(json.dumps({"seed": seed} | info[f"s{seed}"]), flush=True)
    np.savez(out, info=np.array(json.dumps(info)), version=np.array(scvi.__version__), **arrays)


def atlasvi_train_side(store: Path, saved: "np.lib.npyio.NpzFile", seeds: list[int], epochs: int) -> tuple:
    """Per seed and cycle variant: atlasvi's sysVI from scvi-tools' initial weights; (latents, info)."""
    import torch

    from atlasvi.api import SysVI
    from atlasvi.data import LoaderConfig
    from atlasvi.models.sysvi import SysVIConfig
    from atlasvi.train import TrainConfig

    torch.set_num_threads(1)
    latents, info = {}, {}
    for seed in seeds:
        for variant in VARIANTS:
            model = SysVI(store, SysVIConfig(cycle_input=variant), device="cpu", seed=seed)
            model.module.load_state_dict(atlasvi_state(saved, f"init_s{seed}:"), strict=True)
            started = time.perf_counter()
            train = TrainConfig(
                max_epochs=epochs, n_epochs_kl_warmup=0, validation_fraction=VALIDATION_FRACTION, seed=seed
            )
            history = model.fit(train, LoaderConfig(batch_size=BATCH_SIZE, seed=seed))
            last = history[-1]
            key = f"atlasvi-{variant}_s{seed}"
            info[key] = {
                "seconds": time.perf_counter() - started,
                "train_reconstruction": last.train_reconstruction - 0.5 * math.log(2 * math.pi) * model.schema.n_genes,
                "train_kl": last.train_kl,
                "train_cycle": last.extra_metrics["cycle_loss"],
                "validation_reconstruction": last.validation_reconstruction
                - 0.5 * math.log(2 * math.pi) * model.schema.n_genes,
            }
            latents[key] = model.get_latent_representation()
            print(json.dumps({"run": key} | info[key]), flush=True)
    return latents, info


def paired_summary(scores: dict[str, dict[str, float]], seeds: list[int]) -> dict:
    """Per variant and metric: values per seed in each tool, paired differences atlasvi - scvi-tools, t."""
    out = {}
    for variant in VARIANTS:
        out[variant] = {}
        for m in METRICS:
            ours = [scores[f"atlasvi-{variant}_s{s}"][m] for s in seeds]
            theirs = [scores[f"scvi-tools_s{s}"][m] for s in seeds]
            diff = np.subtract(ours, theirs)
            sd = float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
            out[variant][m] = {
                "atlasvi": ours,
                "scvi_tools": theirs,
                "differences": diff.tolist(),
                "mean_difference": float(diff.mean()),
                "sd_difference": sd,
                "t": float(diff.mean() / (sd / math.sqrt(len(diff)))) if sd > 0 else 0.0,
            }
    return out


def markdown(report: dict) -> str:
    lines = [
        "# sysVI: atlasvi vs scvi-tools 1.4.2 SysVI from the same initial weights (Baron human + mouse)",
        "",
        f"Machine: {report['machine']}. See the script's docstring for the design; metrics as "
        "results/sysvi_fidelity.md.",
        "",
    ]
    if "init" in report:
        init = report["init"]
        worst = max(max(abs(r["z_mean"]), abs(r["z_sd"])) for r in init["parameters"].values())
        lines += [
            f"## Initial weights ({init['n_inits']} inits per tool)",
            "",
            f"Command: `{init['command']}` ({init['load']}).",
            "",
            f"scvi-tools: torch seeds 0..{init['n_inits'] - 1}; atlasvi: seeds {init['n_inits']}.."
            f"{2 * init['n_inits'] - 1} (independent draws). At the same seed the two tools draw "
            f"{'the same' if init['same_seed_identical'] else 'different'} initial weights (seed 0: every "
            "parameter's element mean and sd equal).",
            "",
            "Mean over inits of each parameter's element mean and sd; z: the difference over its standard error. "
            f"Largest |z| over {len(init['parameters'])} parameters x 2 statistics: {worst:.2f}.",
            "",
            "| parameter | sd atlasvi | sd scvi-tools | z (sd) | mean atlasvi | mean scvi-tools | z (mean) |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in init["parameters"].items():
            lines.append(
                f"| {name} | {r['atlasvi_sd']:.5f} | {r['scvi_tools_sd']:.5f} | {r['z_sd']:.2f} | "
                f"{r['atlasvi_mean']:.2e} | {r['scvi_tools_mean']:.2e} | {r['z_mean']:.2f} |"
            )
        lines.append("")
    if "step" in report:
        st = report["step"]
        lines += [
            f"## One training step (seed 0 weights, {st['cells']} cells, dropout off, scvi-tools' draw of z)",
            "",
            f"Command: `{st['command']}` ({st['load']}).",
            "",
            "| | atlasvi | scvi-tools |",
            "|---|---|---|",
            *[
                f"| {k} (per cell) | {st[k][0]:.5f} | {st[k][1]:.5f} |"
                for k in ("loss", "reconstruction", "kl", "cycle")
            ],
            "",
            f"Gradients of {st['gradients_compared']} parameters: largest |difference| / max |scvi-tools' gradient| "
            f"{st['gradient_max_relative_diff']:.1e} ({st['gradient_worst_parameter']}); the "
            f"{len(st['zero_gradients'])} whose gradient is zero up to rounding (biases before a batch norm, the "
            f"latent mean's bias): largest |difference| {st['zero_gradient_max_abs_diff']:.1e}; encoder batch-norm "
            "running statistics after the forward pass: largest |difference| "
            f"{st['encoder_running_stats_max_abs_diff']:.1e}.",
            "",
        ]
    if "paired" in report:
        p = report["paired"]
        seeds = p["seeds"]
        lines += [
            f"## Paired runs: seeds {seeds}, {p['epochs']} epochs, {p['n_train']} training cells in both tools",
            "",
            "Commands: " + "; ".join(f"`{r['command']}` ({r['load']})" for r in p["runs"]) + ".",
            "",
            "atlasvi own_system = scvi-tools' cycle (the like-for-like comparison); cross_system = atlasvi's default.",
            "",
        ]
        for m in METRICS:
            lines += [
                f"### {m}",
                "",
                "| seed | scvi-tools | atlasvi own_system | atlasvi cross_system |",
                "|---|---|---|---|",
            ]
            own, cross = p["summary"]["own_system"][m], p["summary"]["cross_system"][m]
            for i, s in enumerate(seeds):
                lines.append(
                    f"| {s} | {own['scvi_tools'][i]:.3f} | {own['atlasvi'][i]:.3f} | {cross['atlasvi'][i]:.3f} |"
                )
            lines.append(
                f"| mean | {np.mean(own['scvi_tools']):.3f} | {np.mean(own['atlasvi']):.3f} | "
                f"{np.mean(cross['atlasvi']):.3f} |"
            )
            lines += [
                "",
                *[
                    f"- {v}: atlasvi - scvi-tools {p['summary'][v][m]['mean_difference']:+.3f} ± "
                    f"{p['summary'][v][m]['sd_difference']:.3f} (sd of the {len(seeds)} paired differences), "
                    f"t = {p['summary'][v][m]['t']:.2f}"
                    for v in VARIANTS
                ],
                "",
            ]
        lines += [
            "### Last training epoch, per cell (mean over seeds)",
            "",
            "| run | reconstruction | KL | cycle | held-out reconstruction |",
            "|---|---|---|---|---|",
        ]
        for run, label in (("scvi-tools", "scvi-tools"), *((f"atlasvi-{v}", f"atlasvi {v}") for v in VARIANTS)):
            rows = [p["info"][k] for k in p["info"] if k.startswith(f"{run}_s")]
            cells = [
                f"{np.mean([r[c] for r in rows]):.2f}"
                for c in ("train_reconstruction", "train_kl", "train_cycle", "validation_reconstruction")
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["main", "scvi-init", "scvi-step", "scvi-train", "render"], default="main")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--n-inits", type=int, default=0, help="initial-weight draws per tool (0: no init check)")
    parser.add_argument("--no-step", action="store_true", help="skip the one-step check")
    parser.add_argument("--keep-paired", action="store_true", help="add the seeds to the paired runs already saved")
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "sysvi_fidelity")
    parser.add_argument("--scvi-python", default=str(HERE / ".cache" / "scvi-venv" / "bin" / "python"))
    parser.add_argument("--h5ad", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.side == "scvi-init":
        return scvi_init_side(args.h5ad, args.n_inits, args.out)
    if args.side == "scvi-step":
        return scvi_step_side(args.h5ad, args.out)
    if args.side == "scvi-train":
        return scvi_train_side(args.h5ad, args.seeds, args.epochs, args.out)
    results = HERE / "results"
    if args.side == "render":
        report = json.loads((results / "sysvi_paired.json").read_text())
        return (results / "sysvi_paired.md").write_text(markdown(report))

    args.workdir.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    me = [args.scvi_python, str(Path(__file__).resolve())]
    store, h5ad = prepare(DATASET, args.workdir)
    existing = results / "sysvi_paired.json"
    report = json.loads(existing.read_text()) if existing.exists() else {}
    report["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, CPU only, 1 torch thread, one process at a time"
    )
    load = "load average at start " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    command = (
        f"python benchmarks/sysvi_paired.py --seeds {' '.join(map(str, args.seeds))} --epochs {args.epochs} "
        f"--n-inits {args.n_inits}{' --no-step' * args.no_step}{' --keep-paired' * args.keep_paired} "
        "--scvi-python SCVI_PYTHON"
    )

    def scvi(side: str, out: Path, *extra: str) -> "np.lib.npyio.NpzFile":
        subprocess.run([*me, "--side", side, "--h5ad", str(h5ad), "--out", str(out), *extra], env=env, check=True)
        return np.load(out)

    if args.n_inits:
        theirs = scvi("scvi-init", args.workdir / "paired_init.npz", "--n-inits", str(args.n_inits))
        theirs = {k: theirs[k] for k in theirs.files}
        rows = init_check(theirs, atlasvi_init_stats(store, range(args.n_inits, 2 * args.n_inits)))
        same_seed = atlasvi_init_stats(store, range(1))  # atlasvi's seed 0 next to scvi-tools' torch seed 0
        identical = all(np.array_equal(v[0], theirs[k][0]) for k, v in same_seed.items())
        report["init"] = {"n_inits": args.n_inits, "command": command, "load": load, "same_seed_identical": identical}
        report["init"]["parameters"] = rows
    if not args.no_step:
        report["step"] = {"command": command, "load": load} | step_check(
            store, scvi("scvi-step", args.workdir / "paired_step.npz")
        )
        print(json.dumps(report["step"], indent=1), flush=True)
    write(results, report)
    if args.seeds and not args.keep_paired:
        report.pop("paired", None)
    for seed in args.seeds:  # one seed at a time, the results written after each
        common = ["--seeds", str(seed), "--epochs", str(args.epochs)]
        saved = scvi("scvi-train", args.workdir / f"paired_scvi_s{seed}.npz", *common)
        latents, info = atlasvi_train_side(store, saved, [seed], args.epochs)
        info |= {f"scvi-tools_{k}": v for k, v in json.loads(str(saved["info"])).items()}
        ours = args.workdir / f"paired_atlasvi_s{seed}.npz"
        np.savez(ours, **latents)
        scores_out = args.workdir / f"paired_scores_s{seed}.json"
        subprocess.run(
            [*me[:1], str(HERE / "sysvi_fidelity.py"), "--side", "score", "--datasets", DATASET, "--h5ad", str(h5ad),
             "--latents", str(ours), str(args.workdir / f"paired_scvi_s{seed}.npz"), "--out", str(scores_out)],
            env=env, check=True,
        )  # fmt: skip
        report["scvi_tools_version"] = str(saved["version"])
        paired = report.setdefault("paired", {"seeds": [], "epochs": args.epochs, "runs": [], "scores": {}, "info": {}})
        if {"command": command, "load": load} not in paired["runs"]:
            paired["runs"].append({"command": command, "load": load})
        if paired["epochs"] != args.epochs:
            raise SystemExit(f"results/sysvi_paired.json holds {paired['epochs']}-epoch runs, not {args.epochs}")
        paired["seeds"] = sorted(set(paired["seeds"]) | {seed})
        paired["n_train"] = split(len(next(iter(latents.values()))))
        paired["scores"] |= json.loads(scores_out.read_text())
        paired["info"] |= info
        paired["summary"] = paired_summary(paired["scores"], paired["seeds"])
        write(results, report)
    print(markdown(report))


def write(results: Path, report: dict) -> None:
    """results/sysvi_paired.json and .md, each written whole (a temporary file renamed over it)."""
    for name, text in (
        ("sysvi_paired.json", json.dumps(report, indent=1) + "\n"),
        ("sysvi_paired.md", markdown(report)),
    ):
        tmp = results / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(results / name)


if __name__ == "__main__":
    main()
