"""Do scvi-tools' own initial scVI weights mix more than atlasvi's? Many draws of each tool's initial weights, all
trained in scvi-tools 1.4.2 on Baron human + mouse (species as batch), paired by stream.

    python benchmarks/scvi_init_draws.py --seeds 5 6 7 8 9 10 11 12 13 14 --untrained 40

Per seed s, two scvi-tools runs by benchmarks/scvi_paired.py's scvi side (atlasvi's split, 400 epochs, each tool's
scVI defaults), on one stream: scvi.settings.seed = s + 1000, set once the weights are in place:
- scvi-tools-stream: atlasvi's initial weights of `SCVI(store, seed=s)`, copied in;
- scvi-tools-own-init-stream: scvi-tools' own initial weights of scvi.settings.seed = s.
No arm's stream seed is an initial weights' seed. In scvi_paired.py --own-init both arms trained on seed s, the seed
that drew both arms' weights, so each run's training replayed its weights' random sequence, in each tool's order of
draws; its five pairs (seeds 0-4) are shown beside. Reported: each run's metrics (sysvi_fidelity.py's iLISI,
batch-neighbour entropy, label kNN accuracy, NMI, and the held-out -ELBO), the paired differences own - atlasvi
(mean, se, t), and the sign test of the pairs.
--untrained N: N more draws of each tool (seeds 0..N-1), not trained: the latent mean of each (eval mode) scored the
same way, and per parameter each draw's mean, sd, largest |value| and largest singular value, both tools side by
side (Welch's t over draws).
Latents are cached in the workdir (a finished run is not trained again). Output: results/<--name>.{json,md}.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.scvi_paired import (  # noqa: E402
    DATASET,
    OWN_INIT,
    OWN_INIT_STREAM,
    UNUSED,
    latent_path,
    paired,
    save_atlasvi_init,
)
from benchmarks.sysvi_fidelity import DATASETS, METRICS, prepare  # noqa: E402

ATLASVI_INIT = "scvi-tools-stream"  # atlasvi's weights of seed s, stream s + 1000 (scvi_paired's run of that name)
ARMS = (OWN_INIT_STREAM, ATLASVI_INIT)  # (minuend, subtrahend)
EARLIER = (OWN_INIT, "scvi-tools")  # scvi_paired --own-init's arms: stream s itself
UNTRAINED = {"atlasvi": "untrained-atlasvi", "scvi-tools": "untrained-scvi-tools"}


def untrained_side(h5ad: Path, n: int, workdir: Path, out: Path) -> None:
    """(scvi-tools venv) Draws 0..n-1 of each tool's initial weights in scvi-tools' SCVI: each one's untrained latent
    mean (saved as latents of epoch 0) and per-parameter statistics (json at `out`)."""
    import logging

    import anndata as ad
    import scvi
    import torch

    from benchmarks.fidelity_data import load_init

    torch.set_num_threads(1)
    scvi.settings.verbosity = logging.WARNING
    adata = ad.read_h5ad(h5ad)
    adata.X = adata.X.astype(np.float32)
    scvi.model.SCVI.setup_anndata(adata, batch_key=DATASETS[DATASET][1])
    stats: dict[str, dict[str, dict[str, list[float]]]] = {tool: {} for tool in UNTRAINED}
    for seed in range(n):
        for tool, run in UNTRAINED.items():
            scvi.settings.seed = seed
            model = scvi.model.SCVI(adata)
            if tool == "atlasvi":
                load_init(model.module, workdir / f"init_s{seed}.pt", UNUSED)
            model.is_trained_ = True  # untrained on purpose: scvi-tools refuses a latent otherwise
            path = latent_path(workdir, run, seed, 0)
            if not path.exists():
                np.savez(path, latent=model.get_latent_representation(adata))
            for name, value in model.module.named_parameters():
                if name.startswith(UNUSED):
                    continue
                row = stats[tool].setdefault(name, {k: [] for k in ("mean", "sd", "max_abs", "top_singular")})
                v = value.detach().double()
                row["mean"].append(float(v.mean()))
                row["sd"].append(float(v.std()) if v.numel() > 1 else 0.0)
                row["max_abs"].append(float(v.abs().max()))
                row["top_singular"].append(float(torch.linalg.matrix_norm(v, ord=2)) if v.dim() == 2 else 0.0)
    out.write_text(json.dumps(stats))


def welch(a: list[float], b: list[float]) -> dict[str, float]:
    """mean of a, mean of b, and Welch's t of a - b (0 where both are constant)."""
    a_, b_ = np.asarray(a), np.asarray(b)
    se = math.sqrt(a_.var(ddof=1) / len(a_) + b_.var(ddof=1) / len(b_))
    return {"a": float(a_.mean()), "b": float(b_.mean()), "t": float((a_.mean() - b_.mean()) / se) if se > 0 else 0.0}


def sign_test(differences: list[float]) -> float:
    """Two-sided sign test p of the differences (ties dropped)."""
    positive = sum(d > 0 for d in differences)
    n = sum(d != 0 for d in differences)
    k = min(positive, n - positive)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def markdown(report: dict) -> str:
    metrics = (*METRICS, "heldout_neg_elbo")
    lines = [
        "# scVI initial weights: scvi-tools' own vs atlasvi's, both trained in scvi-tools 1.4.2 (Baron, species)",
        "",
        f"Command: `{report['command']}`. Machine: {report['machine']}; 1-minute load average at the end of each "
        f"run {report['load_at_run_ends'][0]:.1f}-{report['load_at_run_ends'][1]:.1f}; median seconds per run "
        f"{report['seconds']:.0f}. {report['n_train']} training cells (atlasvi's split), {report['epochs']} epochs. "
        "Design: the script's docstring.",
        "",
        f"## Paired by stream s + 1000: own - atlasvi's weights (seeds {report['seeds']})",
        "",
        "| metric | own weights (mean ± sd) | atlasvi's weights | own - atlasvi (mean ± se, t) | pairs own > atlasvi "
        "| sign test p |",
        "|---|---|---|---|---|---|",
    ]
    for m in metrics:
        own, theirs, pair = report["runs"][ARMS[0]][m], report["runs"][ARMS[1]][m], report["paired"][m]
        above = sum(d > 0 for d in pair["differences"])
        lines.append(
            f"| {m} | {np.mean(own):.3f} ± {np.std(own, ddof=1):.3f} | {np.mean(theirs):.3f} ± "
            f"{np.std(theirs, ddof=1):.3f} | {pair['mean']:+.3f} ± {pair['se']:.3f} (t {pair['t']:.2f}) | "
            f"{above} of {len(pair['differences'])} | {sign_test(pair['differences']):.2f} |"
        )
    lines += ["", "Per seed (own / atlasvi's weights):", "", "| seed | " + " | ".join(metrics) + " |"]
    lines.append("|---|" + "---|" * len(metrics))
    for i, seed in enumerate(report["seeds"]):
        cells = [f"{report['runs'][ARMS[0]][m][i]:.3f} / {report['runs'][ARMS[1]][m][i]:.3f}" for m in metrics]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    earlier = report.get("earlier")
    if earlier:
        lines += [
            "",
            f"## Beside: scvi_paired --own-init, stream s itself (seeds {earlier['seeds']}), own - atlasvi's weights",
            "",
            "| metric | own - atlasvi (mean ± se, t) |",
            "|---|---|",
        ]
        for m in metrics:
            e = earlier["paired"][m]
            lines.append(f"| {m} | {e['mean']:+.3f} ± {e['se']:.3f} (t {e['t']:.2f}) |")
    untrained = report.get("untrained")
    if untrained:
        n = untrained["n"]
        lines += [
            "",
            f"## Untrained: {n} draws of each tool (seeds 0-{n - 1}), the initial latent mean scored as above",
            "",
            "| metric | atlasvi's weights (mean ± sd) | scvi-tools' own | Welch t (atlasvi - own) |",
            "|---|---|---|---|",
        ]
        for m in METRICS:
            a, b = untrained["scores"]["atlasvi"][m], untrained["scores"]["scvi-tools"][m]
            w = welch(a, b)
            lines.append(
                f"| {m} | {w['a']:.3f} ± {np.std(a, ddof=1):.3f} | {w['b']:.3f} ± {np.std(b, ddof=1):.3f} | "
                f"{w['t']:.2f} |"
            )
        lines += [
            "",
            "Per parameter, each statistic's mean over draws, atlasvi / scvi-tools (Welch t); the largest |t| of "
            "all parameters and statistics: "
            f"{untrained['largest_t']:.2f} over {untrained['n_tests']} tests.",
            "",
            "| parameter | mean | sd | max abs | top singular value |",
            "|---|---|---|---|---|",
        ]
        for name, row in untrained["parameters"].items():
            cells = [f"{w['a']:.4g} / {w['b']:.4g} ({w['t']:.1f})" for w in row.values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def untrained_report(h5ad: Path, n: int, workdir: Path, scvi_python: str, env: dict) -> dict:
    """Scores and parameter statistics of `untrained_side`'s draws (run there first)."""
    stats_path = workdir / f"untrained_stats_{n}.json"  # both kept: a second report reuses them
    if not stats_path.exists():
        subprocess.run(
            [scvi_python, str(Path(__file__).resolve()), "--side", "untrained", "--h5ad", str(h5ad), "--untrained",
             str(n), "--workdir", str(workdir), "--out", str(stats_path)],
            env=env, check=True,
        )  # fmt: skip
    latents = [latent_path(workdir, run, s, 0) for run in UNTRAINED.values() for s in range(n)]
    scores_path = workdir / f"untrained_scores_{n}.json"
    if not scores_path.exists():
        subprocess.run(
            [scvi_python, str(HERE / "sysvi_fidelity.py"), "--side", "score", "--datasets", DATASET, "--h5ad",
             str(h5ad), "--latents", *map(str, latents), "--out", str(scores_path)],
            env=env, check=True,
        )  # fmt: skip
    scores = json.loads(scores_path.read_text())
    stats = json.loads(stats_path.read_text())
    parameters = {
        name: {k: welch(row[k], stats["scvi-tools"][name][k]) for k in row} for name, row in stats["atlasvi"].items()
    }
    ts = [abs(w["t"]) for row in parameters.values() for w in row.values() if w["t"] != 0.0]
    return {
        "n": n,
        "scores": {
            tool: {m: [scores[f"{run}_s{s}"][m] for s in range(n)] for m in METRICS} for tool, run in UNTRAINED.items()
        },
        "parameters": parameters,
        "largest_t": max(ts),
        "n_tests": len(ts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["main", "untrained"], default="main")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(5, 15)))
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--untrained", type=int, default=0, help="untrained draws per tool (0: none)")
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "scvi_paired")
    parser.add_argument("--scvi-python", default=str(HERE / ".cache" / "scvi-venv" / "bin" / "python"))
    parser.add_argument("--h5ad", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--name", default="scvi_init_draws", help="results/<NAME>.json and .md")
    args = parser.parse_args()
    if args.side == "untrained":
        return untrained_side(args.h5ad, args.untrained, args.workdir, args.out)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data_dir = HERE / ".cache" / "sysvi_fidelity"
    data_dir.mkdir(parents=True, exist_ok=True)
    store, h5ad = prepare(DATASET, data_dir)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    paired_script = [args.scvi_python, str(HERE / "scvi_paired.py")]
    for seed in args.seeds:  # seed by seed: a stopped run leaves whole pairs
        if all(latent_path(args.workdir, run, seed, args.epochs).exists() for run in ARMS):
            continue
        save_atlasvi_init(store, seed, args.workdir)
        subprocess.run(
            [*paired_script, "--side", "scvi", "--h5ad", str(h5ad), "--seeds", str(seed), "--epochs",
             str(args.epochs), "--workdir", str(args.workdir), "--runs", *ARMS],
            env=env, check=True,
        )  # fmt: skip
    for seed in range(args.untrained):
        save_atlasvi_init(store, seed, args.workdir)
    untrained = untrained_report(h5ad, args.untrained, args.workdir, args.scvi_python, env) if args.untrained else None
    latents = [latent_path(args.workdir, run, s, args.epochs) for run in ARMS for s in args.seeds]
    scores_out = args.workdir / f"init_draws_scores_e{args.epochs}.json"
    subprocess.run(
        [args.scvi_python, str(HERE / "sysvi_fidelity.py"), "--side", "score", "--datasets", DATASET, "--h5ad",
         str(h5ad), "--latents", *map(str, latents), "--out", str(scores_out)],
        env=env, check=True,
    )  # fmt: skip
    scores = json.loads(scores_out.read_text())  # keyed "<run>_s<seed>"
    table: dict[str, dict[str, list[float]]] = {}
    seconds, loads = [], []
    for run in ARMS:
        row = table.setdefault(run, {m: [] for m in (*METRICS, "heldout_neg_elbo")})
        for seed in args.seeds:
            for m in METRICS:
                row[m].append(scores[f"{run}_s{seed}"][m])
            with np.load(latent_path(args.workdir, run, seed, args.epochs)) as data:
                row["heldout_neg_elbo"].append(float(data["heldout_neg_elbo"]))
                seconds.append(float(data["seconds"]))
                loads.append(float(data["load"][0]))
    import anndata as ad

    adata = ad.read_h5ad(h5ad, backed="r")
    n_train = int(adata.n_obs - round(adata.n_obs * 0.1))
    command = f"python benchmarks/scvi_init_draws.py --seeds {' '.join(map(str, args.seeds))} --epochs {args.epochs}"
    report = {
        "command": command + (f" --untrained {args.untrained}" if args.untrained else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared VM), CPU only, 1 torch thread",
        "load_at_run_ends": [min(loads), max(loads)],
        "seconds": float(np.median(seconds)),
        "seeds": args.seeds,
        "epochs": args.epochs,
        "n_train": n_train,
        "runs": table,
        "paired": {m: paired({a: table[a][m] for a in ARMS}, *ARMS) for m in table[ARMS[0]]},
    }
    earlier_path = HERE / "results" / "scvi_paired_own_init.json"
    if earlier_path.exists():
        earlier = json.loads(earlier_path.read_text())
        report["earlier"] = {
            "seeds": earlier["seeds"],
            "paired": {
                m: paired({a: earlier["runs"][a][m] for a in EARLIER}, *EARLIER) for m in earlier["runs"][EARLIER[0]]
            },
        }
    if untrained is not None:
        report["untrained"] = untrained
    results = HERE / "results"
    (results / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (results / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
