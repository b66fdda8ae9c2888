"""The initial weights of atlasvi's and scvi-tools 1.4.2's CondSCVI and DestVI: drawn from the same distributions?

    .venv/bin/python benchmarks/destvi_init_check.py --draws 20

On the first simulation of benchmarks/destvi_fidelity.py (built by that script if missing), each tool builds its
CondSCVI on the reference and a DestVI from it (the spots) --draws times, seeds 0, 1, ..., untrained (the DestVI's
prototypes are placeholders: they are buffers, not drawn). Per parameter (scvi-tools' names mapped to atlasvi's)
over all draws: the shape, the mean, the standard deviation, the smallest and largest value, and the mean of the
per-draw standard deviations. The CondSCVI weights DestVI takes (decoder, px_decoder, per_ct_bias, px_r) are the
CondSCVI's and are not listed again. Output: results/destvi_init_check.json, with per parameter the relative
difference of the standard deviations and the difference of the means in units of the standard error.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
TAKEN = ("decoder.", "px_decoder.", "per_ct_bias", "px_r", "mean_vprior", "var_vprior", "mp_vprior")


def _rename(name: str) -> str:
    """A scvi-tools FCLayers / embedding weight name -> atlasvi's."""
    name = name.replace("fc_layers.Layer ", "layers.")
    if "embeddings_dict" in name or name.startswith("embedding"):
        return "batch_embedding.weight"
    return name


def _summary(draws: dict[str, list[np.ndarray]]) -> dict[str, dict]:
    """Per parameter: shape, mean, sd, min, max over every draw's values, and the mean of the per-draw sds."""
    out = {}
    for name, values in sorted(draws.items()):
        stacked = np.stack(values).astype(np.float64)
        out[name] = {
            "shape": list(values[0].shape), "mean": float(stacked.mean()), "sd": float(stacked.std()),
            "min": float(stacked.min()), "max": float(stacked.max()),
            "sd_per_draw": float(np.mean([v.std() for v in stacked])), "n": int(stacked.size),
        }  # fmt: skip
    return out


def scvi_side(reference: Path, spots: Path, draws: int) -> dict:
    import anndata as ad
    import scvi
    import torch

    torch.set_num_threads(1)
    sc_adata, st_adata = ad.read_h5ad(reference), ad.read_h5ad(spots)
    scvi.model.CondSCVI.setup_anndata(sc_adata, labels_key="cell_type")
    scvi.model.DestVI.setup_anndata(st_adata)
    cond, deconv = {}, {}
    for seed in range(draws):
        scvi.settings.seed = seed
        sc_model = scvi.model.CondSCVI(sc_adata, prior="normal")
        for k, v in sc_model.module.state_dict().items():
            cond.setdefault(_rename(k), []).append(v.numpy().copy())
        shape = (sc_model.summary_stats.n_labels, 15, sc_model.module.n_latent)
        placeholders = {
            "mean_vprior": torch.zeros(shape), "var_vprior": torch.ones(shape),
            "weights_vprior": torch.full(shape[:2], 1 / 15),
        }  # fmt: skip
        sc_model.get_vamp_prior = lambda *a, placeholders=placeholders, **k: placeholders
        model = scvi.model.DestVI.from_rna_model(st_adata, sc_model)
        for k, v in model.module.state_dict().items():
            name = _rename(k)
            if not name.startswith(TAKEN) and name not in ("V", "gamma"):  # V, gamma: unused when amortized
                deconv.setdefault(name, []).append(v.numpy().copy())
    return {"condscvi": _summary(cond), "destvi": _summary(deconv)}


def atlasvi_side(reference: Path, spots: Path, draws: int, workdir: Path) -> dict:
    import torch

    from atlasvi.api.condscvi import CondSCVI
    from atlasvi.api.destvi import DestVI
    from atlasvi.data import BuildConfig, build_store

    torch.set_num_threads(1)
    ref_store = build_store(
        BuildConfig(inputs=[str(reference)], output=str(workdir / "init_ref.zarr"), labels_key="cell_type",
                    overwrite=True)
    )  # fmt: skip
    spot_store = build_store(BuildConfig(inputs=[str(spots)], output=str(workdir / "init_spots.zarr"), overwrite=True))
    cond, deconv = {}, {}
    for seed in range(draws):
        sc_model = CondSCVI(ref_store, device="cpu", seed=seed)
        for k, v in sc_model.module.state_dict().items():
            if k not in ("mean_vprior", "var_vprior", "mp_vprior", "ct_weight"):
                cond.setdefault(k, []).append(v.numpy().copy())
        sc_model.module.mp_vprior.fill_(1 / sc_model.config.vamp_prior_p)  # placeholders: no k-means of untrained
        model = DestVI.from_rna_model(spot_store, sc_model, device="cpu", seed=seed)
        for k, v in model.module.state_dict().items():
            if not k.startswith(TAKEN):
                deconv.setdefault(k, []).append(v.numpy().copy())
    return {"condscvi": _summary(cond), "destvi": _summary(deconv)}


def compare(atlasvi: dict, scvi: dict) -> dict:
    """Per module and parameter: both summaries, sd ratio - 1 and (mean difference) / standard error."""
    out = {}
    for module in ("condscvi", "destvi"):
        rows = {}
        for name in sorted(set(atlasvi[module]) | set(scvi[module])):
            a, s = atlasvi[module].get(name), scvi[module].get(name)
            row = {"atlasvi": a, "scvi_tools": s}
            if a and s:
                row["same_shape"] = a["shape"] == s["shape"]
                row["sd_relative_diff"] = (a["sd"] / s["sd"] - 1) if s["sd"] > 0 else (0.0 if a["sd"] == 0 else None)
                se = np.sqrt(a["sd"] ** 2 / a["n"] + s["sd"] ** 2 / s["n"])
                row["mean_diff_in_se"] = float((a["mean"] - s["mean"]) / se) if se > 0 else 0.0
            rows[name] = row
        out[module] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "destvi")
    parser.add_argument("--scvi-python", default=str(HERE / ".cache" / "scvi-venv" / "bin" / "python"))
    parser.add_argument("--side", choices=["scvi"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--spots", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "scvi":
        args.out.write_text(json.dumps(scvi_side(args.reference, args.spots, args.draws)))
        return
    from destvi_fidelity import simulate

    reference, spots, _ = simulate(0, args.workdir, 300, 500)
    out = args.workdir / "init_check_scvi.json"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    command = [args.scvi_python, __file__, "--side", "scvi", "--reference", str(reference), "--spots", str(spots)]
    subprocess.run(command + ["--out", str(out), "--draws", str(args.draws)], env=env, check=True)
    report = compare(atlasvi_side(reference, spots, args.draws, args.workdir), json.loads(out.read_text()))
    report = {
        "command": f"benchmarks/destvi_init_check.py --draws {args.draws}", "draws": args.draws,
        "simulation": "seed 0, 300 spots, 500 genes", "machine": f"{platform.node()}: {os.cpu_count()} CPUs",
    } | report  # fmt: skip
    path = HERE / "results" / "destvi_init_check.json"
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(report, indent=1))
    os.replace(partial, path)
    for module in ("condscvi", "destvi"):
        for name, row in report[module].items():
            if "sd_relative_diff" not in row:
                print(f"{module} {name}: only in {'atlasvi' if row['atlasvi'] else 'scvi-tools'}")
                continue
            a, s = row["atlasvi"], row["scvi_tools"]
            print(f"{module:8s} {name:40s} {str(a['shape']):12s} same_shape={row['same_shape']} "
                  f"sd {a['sd']:.4g}/{s['sd']:.4g} ({row['sd_relative_diff']:+.3f}) "
                  f"mean {a['mean']:+.4f}/{s['mean']:+.4f} ({row['mean_diff_in_se']:+.1f} se) "
                  f"max {a['max']:.3g}/{s['max']:.3g}")  # fmt: skip


if __name__ == "__main__":
    main()
