"""MultiVI cross-scoring: both tools' trained models of one seed, each scored by both tools' held-out scorers.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/multivi_fidelity.py --seeds 0 --max-epochs 10 \
        --n-epochs-kl-warmup 5 --same-start --same-split --out multivi_fidelity_one_scorer_s0
    PYTHONPATH=$PWD .venv/bin/python benchmarks/multivi_cross_score.py --seed 0 --draws 100

The first command trains the pair (atlasvi's MULTIVI and scvi-tools 1.4.2's from atlasvi's initial weights of the
seed, on the same cells); --same-start saves both trained modules (CACHE/atlasvi_trained_SEED.npz,
scvi_trained_SEED.npz). Here each trained model is loaded into BOTH tools' modules (names mapped as
benchmarks/multivi_weights_check.py; the adversary is not used in scoring) and the 264 held-out cells' -log p(RNA | z)
per cell is computed by each tool's scorer, in eval mode:

- "protocol": each tool's own one-draw figure (benchmarks/multivi_fidelity.py's before its one scorer): atlasvi's
  `atlasvi_heldout` (one z draw, torch seed 0) and scvi-tools' `get_reconstruction_error` (one z draw,
  torch.manual_seed(0) first);
- "draws": the mean over DRAWS draws of z (torch seeds 0..DRAWS-1, the same protocol each), with its standard error
  over draws;
- "z_mean": z = the joint posterior mean.

If the atlasvi - scvi-tools gap follows the weights (same under both scorers) it comes from training; if it follows
the scorer it comes from scoring. Per-cell values are compared too (the largest |atlasvi scorer - scvi-tools scorer|
on the same weights at z = mean). Output: results/multivi_cross_score_sSEED.json and .md.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.multivi_fidelity import CACHE, trained_weights

HERE = Path(__file__).resolve().parent
SCVI_PYTHON = HERE / ".cache" / "scvi-venv" / "bin" / "python"
WEIGHTS = ("atlasvi", "scvi-tools")  # whose trained weights


def _summary(per_draw: np.ndarray) -> dict:
    """(draws, cells) per-cell values -> mean over cells per draw, its mean and s.e. over draws."""
    means = per_draw.mean(axis=1)
    se = float(means.std(ddof=1) / np.sqrt(len(means))) if len(means) > 1 else None
    return {"mean": float(means.mean()), "se": se, "first_draws": [float(m) for m in means[:5]]}


# --------------------------------------------------------------------------------------------- atlasvi scorer
def atlasvi_scores(seed: int, draws: int) -> dict:
    """Each trained model in atlasvi's MULTIVIModule, scored by atlasvi: protocol, draws, z = mean; per-cell RNA at
    z = mean, keyed by cell name."""
    import anndata as ad
    import torch

    from atlasvi.api import MULTIVI
    from benchmarks.multivi_fidelity import atlasvi_heldout
    from benchmarks.multivi_weights_check import atlasvi_name

    torch.set_num_threads(1)
    held = CACHE / "heldout.zarr"
    names = np.asarray(ad.read_zarr(held).obs_names, dtype=str)
    out = {}
    for tool in WEIGHTS:
        model = MULTIVI(CACHE / "train.zarr", device="cpu", seed=seed)
        weights = np.load(trained_weights(tool, seed))
        if tool == "atlasvi":
            model.module.load_state_dict({k: torch.from_numpy(weights[k]) for k in weights.files})
        else:
            state = {atlasvi_name(k): torch.from_numpy(weights[k]) for k in weights.files if atlasvi_name(k)}
            state["mod_weights"] = torch.from_numpy(weights["mod_weights"][:2])
            missing, unexpected = model.module.load_state_dict(state, strict=False)
            if unexpected or not all(k.startswith("adversary.") for k in missing):
                raise SystemExit(f"scvi-tools' weights do not map onto atlasvi's module: {missing} {unexpected}")
        module = model.module.eval()
        protocol = atlasvi_heldout(model, held)["rna"]
        (batch,) = list(model._batches(held, None, 1024))
        inputs = module.unpack(batch)
        per_draw = []
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            inference = module.inference(inputs)
            mask = inputs.rna_mask.float()
            at_mean = module.generative(inference["qz"].loc, inference["library"], inputs)
            z_mean = (-at_mean["px"].log_prob(inputs.x).sum(-1) * mask).numpy()
            for draw in range(draws):
                torch.manual_seed(draw)
                inference = module.inference(inputs)
                px = module.generative(inference["z"], inference["library"], inputs)["px"]
                per_draw.append((-px.log_prob(inputs.x).sum(-1) * mask).numpy())
        out[tool] = {
            "protocol": protocol,
            "draws": _summary(np.stack(per_draw)),
            "z_mean": float(z_mean.mean()),
            "per_cell_z_mean": dict(zip(names.tolist(), z_mean.astype(float).tolist(), strict=True)),
            "per_cell_draws": dict(zip(names.tolist(), np.stack(per_draw).mean(0).astype(float).tolist(), strict=True)),
        }
    return out


# --------------------------------------------------------------------------------------------- scvi-tools scorer
def scvi_scores(seed: int, draws: int) -> None:
    """(scvi-tools venv) Each trained model in scvi-tools' MULTIVAE, scored by scvi-tools; JSON on stdout."""
    import logging
    import warnings

    import scvi
    import torch

    from benchmarks.multivi_fidelity import BATCH_KEY, _mudata, load_atlasvi_weights

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = seed
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, held = _mudata(str(CACHE / "train.h5ad")), _mudata(str(CACHE / "heldout.h5ad"))
        held.obs["_indices"] = np.arange(held.n_obs)
        modalities = {"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"}
        scvi.model.MULTIVI.setup_mudata(train, batch_key=BATCH_KEY, modalities=modalities)
        for tool in WEIGHTS:
            model = scvi.model.MULTIVI(train)
            weights = np.load(trained_weights(tool, seed))
            if tool == "scvi-tools":
                model.module.load_state_dict({k: torch.from_numpy(weights[k]) for k in weights.files})
            else:
                load_atlasvi_weights(model, weights)
            model.is_trained_ = True
            module = model.module.eval()
            torch.manual_seed(0)
            protocol = float(model.get_reconstruction_error(held)["reconstruction_loss_expression"])
            per_draw = []
            for draw in range(draws):
                torch.manual_seed(draw)
                error = model.get_reconstruction_error(held, return_mean=False)
                per_draw.append(np.asarray(error["reconstruction_loss_expression"]))
            (tensors,) = list(model._make_data_loader(adata=held, batch_size=held.n_obs))
            with torch.no_grad():
                inference = module.inference(**module._get_inference_input(tensors))
                inputs = module._get_generative_input(tensors, inference) | {"z": inference["qz_m"]}
                generative = module.generative(**inputs)
                x_rna = inference["x"][:, : module.n_input_genes]
                z_mean = module.get_reconstruction_loss_expression(
                    x_rna, generative["px_rate"], generative["px_r"], generative["px_dropout"]
                ).numpy()
            names = held.obs_names.to_numpy().astype(str)
            out[tool] = {
                "protocol": protocol,
                "draws": _summary(np.stack(per_draw)),
                "z_mean": float(z_mean.mean()),
                "per_cell_z_mean": dict(zip(names.tolist(), z_mean.astype(float).tolist(), strict=True)),
                "per_cell_draws": dict(
                    zip(names.tolist(), np.stack(per_draw).mean(0).astype(float).tolist(), strict=True)
                ),
            }
    print(json.dumps(out), flush=True)


# --------------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    """The 2 x 2 table (weights x scorer) for each figure, and the gaps."""
    lines = [
        f"# MultiVI cross-scoring, seed {report['seed']}: held-out -log p(RNA) per cell (264 paired cells)",
        "",
        f"Command: `{report['command']}`. Machine: {report['machine']}; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in report['load_average_at_end'])}.",
        "",
        "Rows: whose trained weights (the pair of `multivi_fidelity.py --same-start --same-split`); "
        "columns: whose scorer. protocol = each tool's own one-draw figure (torch seed 0; multivi_fidelity.py's "
        "before its one scorer); draws = mean over "
        f"{report['draws']} z draws (± s.e. over draws); z = mean: the posterior mean.",
        "",
        "| weights | scorer | protocol | draws | z = mean |",
        "|---|---|---|---|---|",
    ]
    scores = report["scores"]
    for weights in WEIGHTS:
        for scorer in WEIGHTS:
            s = scores[scorer][weights]
            lines.append(
                f"| {weights} | {scorer} | {s['protocol']:.3f} | {s['draws']['mean']:.3f} ± {s['draws']['se']:.3f} "
                f"| {s['z_mean']:.3f} |"
            )
    lines += ["", "Gaps atlasvi weights - scvi-tools weights (+: atlasvi's model worse):", ""]
    lines += ["| scorer | protocol | draws | z = mean |", "|---|---|---|---|"]
    for scorer, gap in report["gap_by_scorer"].items():
        lines.append(f"| {scorer} | {gap['protocol']:+.3f} | {gap['draws']:+.3f} | {gap['z_mean']:+.3f} |")
    lines += ["", "Scorers on the same weights (atlasvi scorer - scvi-tools scorer):", ""]
    lines += ["| weights | draws | z = mean | largest per-cell at z = mean |", "|---|---|---|---|"]
    for weights, gap in report["scorer_difference"].items():
        lines.append(
            f"| {weights} | {gap['draws']:+.4f} | {gap['z_mean']:+.4f} | {gap['per_cell_z_mean_max_abs']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--side", choices=["scvi"], default=None, help="internal: the scvi-tools scorer")
    args = parser.parse_args()
    if args.draws < 2:
        raise SystemExit("--draws must be at least 2")
    missing = [str(trained_weights(t, args.seed).name) for t in WEIGHTS if not trained_weights(t, args.seed).exists()]
    if missing:
        raise SystemExit(f"no trained weights {missing}: run multivi_fidelity.py --same-start for the seed first")
    if args.side == "scvi":
        scvi_scores(args.seed, args.draws)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    command = [str(SCVI_PYTHON), __file__, "--side", "scvi", "--seed", str(args.seed), "--draws", str(args.draws)]
    scvi = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, check=False)
    if scvi.returncode != 0:
        raise SystemExit(f"the scvi-tools scorer failed (exit {scvi.returncode})")
    scores = {
        "scvi-tools": json.loads(scvi.stdout.strip().splitlines()[-1]),
        "atlasvi": atlasvi_scores(args.seed, args.draws),
    }
    gap_by_scorer = {
        scorer: {
            key: (scores[scorer]["atlasvi"][key]["mean"] if key == "draws" else scores[scorer]["atlasvi"][key])
            - (scores[scorer]["scvi-tools"][key]["mean"] if key == "draws" else scores[scorer]["scvi-tools"][key])
            for key in ("protocol", "draws", "z_mean")
        }
        for scorer in WEIGHTS
    }
    scorer_difference = {}
    for weights in WEIGHTS:
        a, s = scores["atlasvi"][weights], scores["scvi-tools"][weights]
        cells = sorted(a["per_cell_z_mean"])
        diff = np.array([a["per_cell_z_mean"][c] - s["per_cell_z_mean"][c] for c in cells])
        scorer_difference[weights] = {
            "draws": a["draws"]["mean"] - s["draws"]["mean"],
            "z_mean": a["z_mean"] - s["z_mean"],
            "per_cell_z_mean_max_abs": float(np.abs(diff).max()),
        }
    report = {
        "command": " ".join(["python", "benchmarks/multivi_cross_score.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (the shared VM), CPU only, 1 torch thread",
        "seed": args.seed,
        "draws": args.draws,
        "gap_by_scorer": gap_by_scorer,
        "scorer_difference": scorer_difference,
        "scores": scores,
        "load_average_at_end": list(os.getloadavg()),
    }
    out = HERE / "results" / f"multivi_cross_score_s{args.seed}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
