"""MultiVI initial weights: do atlasvi's and scvi-tools 1.4.2's MULTIVI draw their untrained weights from the same
distribution? (issue 19: the 10-epoch held-out RNA figure follows the initial RNA log-library draw.)

    PYTHONPATH=$PWD .venv/bin/python benchmarks/multivi_init_distribution.py --seeds 200

Run after benchmarks/multivi_fidelity.py has prepared its files (`.cache/multivi_fidelity/`). For seeds 0 to N-1,
each tool builds its MULTIVI on the fidelity benchmark's training cells (scvi-tools: `scvi.settings.seed = seed`,
MULTIVI(mudata) and the AdversarialTrainingPlan's batch classifier MULTIVI.train builds; atlasvi: MULTIVI(store,
seed=seed), adversary included); no training. Per seed and weight tensor (names mapped as
benchmarks/multivi_weights_check.py; scvi-tools' protein modules, unused heads and third modality weight left out):
the tensor's mean, standard deviation and largest absolute value over its entries (a different init scheme, bound or
fan-in shows in the s.d. and the bound, every seed). Per seed, the statistics that start the run: the mean over the
training cells with RNA of the untrained RNA library encoder's output (the log-library training starts from; the
10-epoch held-out RNA figure follows it) and over the first 256 cells with ATAC of the ATAC depth factor, both on
the same dense counts read from train.h5ad. Compared per quantity: mean and s.d. over seeds per tool, the two-sample
KS and Mann-Whitney p-values; shapes must match. Output: results/multivi_init_distribution.json and .md.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SCVI_PYTHON = HERE / ".cache" / "scvi-venv" / "bin" / "python"
CACHE = HERE / ".cache" / "multivi_fidelity"
ATAC_CELLS = 256  # the depth factor's start on the first 256 cells with ATAC (52,761 peaks each: the costly part)


def _counts() -> tuple[np.ndarray, np.ndarray]:
    """(RNA counts of the training cells with RNA, peak counts of the first ATAC_CELLS with ATAC), dense float32."""
    import anndata as ad

    adata = ad.read_h5ad(CACHE / "train.h5ad")
    x, peaks = adata.X.tocsr(), adata.obsm["atac"].tocsr()
    rna = x[np.asarray(x.sum(1)).ravel() > 0].toarray().astype(np.float32)
    atac = peaks[np.flatnonzero(np.asarray(peaks.sum(1)).ravel() > 0)[:ATAC_CELLS]].toarray().astype(np.float32)
    return rna, atac


def _tensor_stats(state: dict) -> dict[str, list[float]]:
    """name -> [mean, sd, max |value|, n entries] of every floating tensor."""
    out = {}
    for name, value in state.items():
        if value.is_floating_point() and value.numel() > 0:
            v = value.double()
            sd = float(v.std()) if v.numel() > 1 else 0.0
            out[name] = [float(v.mean()), sd, float(v.abs().max()), int(v.numel())]
    return out


def scvi_side(n_seeds: int) -> None:
    """scvi-tools' draws (its venv): one JSON line per seed on stdout."""
    import logging
    import warnings

    import scvi
    import torch
    from scvi.train import AdversarialTrainingPlan

    sys.path.insert(0, str(HERE.parent))
    from benchmarks.multivi_fidelity import BATCH_KEY, _mudata

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = 1
    torch.set_num_threads(1)
    train = _mudata(str(CACHE / "train.h5ad"))
    modalities = {"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"}
    scvi.model.MULTIVI.setup_mudata(train, batch_key=BATCH_KEY, modalities=modalities)
    rna, atac = (torch.from_numpy(a) for a in _counts())
    for seed in range(n_seeds):
        scvi.settings.seed = seed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = scvi.model.MULTIVI(train)
            plan = AdversarialTrainingPlan(model.module, adversarial_classifier=True)  # as MULTIVI.train builds it
        module = model.module.eval()
        with torch.no_grad():
            library = float(module.l_encoder_expression(rna).mean())
            depth = float(module.l_encoder_accessibility(atac).mean())
        state = dict(module.state_dict()) | {
            f"adversary.{k}": v for k, v in plan.adversarial_classifier.state_dict().items()
        }
        stats = _tensor_stats(state)
        print(json.dumps({"seed": seed, "library": library, "depth": depth, "tensors": stats}), flush=True)


def atlasvi_draws(n_seeds: int) -> list[dict]:
    """atlasvi's draws, one dict per seed."""
    import torch

    from atlasvi.api import MULTIVI

    torch.set_num_threads(1)
    rna, atac = (torch.from_numpy(a) for a in _counts())
    out = []
    for seed in range(n_seeds):
        module = MULTIVI(CACHE / "train.zarr", device="cpu", seed=seed).module.eval()
        with torch.no_grad():
            library = float(module.l_encoder_expression(rna).mean())
            depth = float(module.l_encoder_accessibility(atac).mean())
        out.append({"seed": seed, "library": library, "depth": depth, "tensors": _tensor_stats(module.state_dict())})
        print(f"atlasvi seed {seed}: library {library:.4f}", file=sys.stderr, flush=True)
    return out


def scvi_to_atlasvi(name: str) -> str | None:
    """atlasvi's name of a scvi-tools weight (its adversary's too), None for one atlasvi does not build."""
    import re

    from benchmarks.multivi_weights_check import atlasvi_name

    if name.startswith("adversary."):
        return re.sub(r"fc_layers\.Layer (\d+)", r"layers.\1", name)
    return atlasvi_name(name)


def compare(a: np.ndarray, s: np.ndarray) -> dict:
    """Per-tool mean and s.d. over seeds, KS and Mann-Whitney p-values of two samples."""
    from scipy.stats import ks_2samp, mannwhitneyu

    same = np.ptp(np.concatenate([a, s])) == 0
    return {
        "atlasvi_mean": float(a.mean()),
        "atlasvi_sd": float(a.std(ddof=1)),
        "scvi_tools_mean": float(s.mean()),
        "scvi_tools_sd": float(s.std(ddof=1)),
        "ks_p": 1.0 if same else float(ks_2samp(a, s).pvalue),
        "mannwhitney_p": 1.0 if same else float(mannwhitneyu(a, s).pvalue),
    }


def report(atlasvi: list[dict], scvi_tools: list[dict], n_seeds: int, seconds: dict) -> dict:
    """The comparison: the start statistics, then every mapped tensor's mean, s.d. and bound."""
    ours = {k for k in atlasvi[0]["tensors"]}
    mapped = {scvi_to_atlasvi(k): k for k in scvi_tools[0]["tensors"] if scvi_to_atlasvi(k) is not None}
    mapped["mod_weights"] = "mod_weights"  # scvi-tools' has a third (protein) entry: the same ones, compared as is
    missing = sorted(ours - set(mapped))
    if missing:
        raise SystemExit(f"atlasvi weights with no scvi-tools counterpart: {missing}")
    tensors, shapes = {}, {}
    for name in sorted(ours):
        theirs = mapped[name]
        n_ours, n_theirs = atlasvi[0]["tensors"][name][3], scvi_tools[0]["tensors"][theirs][3]
        shapes[name] = [n_ours, n_theirs]
        tensors[name] = {"entries": n_ours, "scvi_tools_entries": n_theirs}
        for i, stat in enumerate(("mean", "sd", "absmax")):
            a = np.array([d["tensors"][name][i] for d in atlasvi])
            s = np.array([d["tensors"][theirs][i] for d in scvi_tools])
            tensors[name][stat] = compare(a, s)
    starts = {
        key: compare(np.array([d[key] for d in atlasvi]), np.array([d[key] for d in scvi_tools]))
        for key in ("library", "depth")
    }
    p_values = [v[stat]["ks_p"] for v in tensors.values() for stat in ("mean", "sd", "absmax")]
    return {
        "command": f"python benchmarks/multivi_init_distribution.py --seeds {n_seeds}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), CPU only, 1 torch thread",
        "seconds": seconds,
        "what": "untrained MULTIVI of each tool on the fidelity benchmark's training cells, seeds 0.."
        f"{n_seeds - 1}: library = mean initial RNA log-library over the training cells with RNA, depth = mean "
        "initial ATAC depth factor over the first 256 with ATAC; per weight tensor the mean, s.d. and max |value| of "
        "its entries, compared over seeds (KS, Mann-Whitney p)",
        "n_seeds": n_seeds,
        "starts": starts,
        "per_seed_library": {
            "atlasvi": [d["library"] for d in atlasvi],
            "scvi_tools": [d["library"] for d in scvi_tools],
        },
        "tensors_compared": len(tensors),
        "entry_counts_differ": sorted(k for k, (a, b) in shapes.items() if a != b and k != "mod_weights"),
        "smallest_ks_p": float(min(p_values)),
        "bonferroni_smallest_ks_p": float(min(1.0, min(p_values) * len(p_values))),
        "tensors": tensors,
    }


def markdown(r: dict) -> str:
    """The start statistics and the tensors whose statistics differ most."""
    lines = [
        "# MultiVI initial weights: atlasvi vs scvi-tools 1.4.2, distribution over seeds",
        "",
        f"Command: `{r['command']}`. Machine: {r['machine']}. Seconds: {r['seconds']}.",
        "",
        r["what"] + ".",
        "",
        "| quantity | atlasvi mean ± sd | scvi-tools mean ± sd | KS p | Mann-Whitney p |",
        "|---|---|---|---|---|",
    ]
    for key, v in r["starts"].items():
        lines.append(
            f"| {key} | {v['atlasvi_mean']:.4f} ± {v['atlasvi_sd']:.4f} | {v['scvi_tools_mean']:.4f} ± "
            f"{v['scvi_tools_sd']:.4f} | {v['ks_p']:.3f} | {v['mannwhitney_p']:.3f} |"
        )
    lines += [
        "",
        f"{r['tensors_compared']} weight tensors compared (3 statistics each); entry counts that differ: "
        f"{r['entry_counts_differ'] or 'none'}; smallest KS p {r['smallest_ks_p']:.3g} (Bonferroni "
        f"{r['bonferroni_smallest_ks_p']:.3g}). Per tensor (the s.d. and bound show the init scheme):",
        "",
        "| tensor | entries | sd: atlasvi | sd: scvi-tools | KS p (sd) | max: atlasvi | max: scvi-tools "
        "| KS p (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in r["tensors"].items():
        lines.append(
            f"| {name} | {v['entries']} | {v['sd']['atlasvi_mean']:.5g} | {v['sd']['scvi_tools_mean']:.5g} | "
            f"{v['sd']['ks_p']:.3f} | {v['absmax']['atlasvi_mean']:.5g} | {v['absmax']['scvi_tools_mean']:.5g} | "
            f"{v['mean']['ks_p']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--side", choices=["scvi"], default=None, help="internal: the scvi-tools half")
    args = parser.parse_args()
    if args.side == "scvi":
        scvi_side(args.seeds)
        return
    if not (CACHE / "train.zarr").exists():
        raise SystemExit("run benchmarks/multivi_fidelity.py first (it prepares .cache/multivi_fidelity/)")
    started = time.perf_counter()
    atlasvi = atlasvi_draws(args.seeds)
    middle = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    command = [str(SCVI_PYTHON), __file__, "--side", "scvi", "--seeds", str(args.seeds)]
    lines = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()
    scvi_tools = [json.loads(line) for line in lines if line.startswith('{"seed"')]
    seconds = {"atlasvi": round(middle - started, 1), "scvi_tools": round(time.perf_counter() - middle, 1)}
    result = report(atlasvi, scvi_tools, args.seeds, seconds)
    results = HERE / "results"
    for suffix, text in ((".json", json.dumps(result, indent=1) + "\n"), (".md", markdown(result))):
        path = results / f"multivi_init_distribution{suffix}"
        partial = path.with_suffix(suffix + ".partial")
        partial.write_text(text)
        os.replace(partial, path)
    print(markdown(result))


if __name__ == "__main__":
    main()
