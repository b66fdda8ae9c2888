"""Where sysVI and scVI mix the systems differently: per-cell mixing of benchmarks/sysvi_fidelity.py's latents.

    /path/to/scvi-venv/bin/python benchmarks/sysvi_mixing.py --datasets baron --seeds 0 1 2 --cycle-weights 10

Reads the latents that sysvi_fidelity.py keeps in its workdir (it trains nothing; run that script first, with
the same datasets, seeds, epochs and cycle weights) and the unintegrated PCA of the same cells (`unintegrated`).
Per latent:
- per-cell iLISI (scib-metrics `lisi_knn`, 90 neighbours, perplexity 30, scaled to [0, 1]) and per-cell batch
  entropy (sysvi_fidelity's `entropy_mixing` over 50 neighbours), each summarised by the mean and the median over
  cells (scib's iLISI is the median, sysvi_fidelity's batch entropy the mean), and the fraction of cells whose
  15 nearest neighbours hold no cell of another system ("unmixed");
- batch entropy at 15, 30, 50 and 90 neighbours;
- per label (cell type), the mean batch entropy and the unmixed fraction.
Summaries are means over seeds. Runs in the scvi-tools environment (scib-metrics). Output: results/sysvi_mixing.json
and .md.
"""

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sysvi_fidelity import (  # noqa: E402
    DATASETS,
    DEFAULT_CYCLE_WEIGHT,
    ROWS,
    cached,
    entropy_mixing,
    run_key,
    unintegrated,
)

KS = (15, 30, 50, 90)
K = 50
K_UNMIXED = 15


def per_cell(latent: np.ndarray, systems: np.ndarray, labels: np.ndarray) -> dict:
    """The mixing summaries of one latent (see the module docstring)."""
    from scib_metrics import lisi_knn
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    distances, indices = NearestNeighbors(n_neighbors=max(KS) + 1).fit(latent).kneighbors(latent)
    codes = np.unique(systems, return_inverse=True)[1]
    n = codes.max() + 1
    lisi = np.asarray(lisi_knn(NeighborsResults(indices=indices[:, :90], distances=distances[:, :90]), codes)) - 1
    lisi = lisi / (n - 1)
    neighbours = indices[:, 1 : K + 1]
    entropy = np.array([entropy_mixing(neighbours[i : i + 1], systems) for i in range(len(latent))])
    entropy = np.where(np.isnan(entropy), 0.0, entropy)
    unmixed = (codes[indices[:, 1 : K_UNMIXED + 1]] == codes[:, None]).all(axis=1)
    out = {
        "ilisi_mean": float(np.nanmean(lisi)),
        "ilisi_median": float(np.nanmedian(lisi)),
        "entropy_mean": float(entropy.mean()),
        "entropy_median": float(np.median(entropy)),
        "unmixed": float(unmixed.mean()),
    }
    for k in KS:
        out[f"entropy_k{k}"] = entropy_mixing(indices[:, 1 : k + 1], systems)
    for label in sorted(np.unique(labels)):
        mask = labels == label
        out[f"entropy:{label}"] = float(entropy[mask].mean())
        out[f"unmixed:{label}"] = float(unmixed[mask].mean())
    return out


def dataset(name: str, workdir: Path, seeds: list[int], epochs: int, cycle_weights: list[float]) -> dict:
    """{row label: {summary: mean over seeds}} for every model with latents (atlasvi sysVI also at each of
    cycle_weights), and the unintegrated PCA."""
    import anndata as ad

    _, system_key, labels_key, _ = DATASETS[name]
    h5ad = workdir / f"{name}_store.h5ad"
    obs = ad.read_h5ad(h5ad).obs
    systems, labels = obs[system_key].astype(str).to_numpy(), obs[labels_key].astype(str).to_numpy()
    rows = {}
    others = [("atlasvi", "sysvi", f"atlasvi sysVI, cycle weight {w:g}", w) for w in cycle_weights]
    for tool, model, label, weight in [*((*row, DEFAULT_CYCLE_WEIGHT) for row in ROWS), *others]:
        paths = [cached(workdir, name, epochs, run_key(tool, model, seed, weight)) for seed in seeds]
        if not all(p.exists() for p in paths):
            continue
        per_seed = []
        for path in paths:
            with np.load(path) as data:
                per_seed.append(per_cell(np.asarray(data["latent"], dtype=np.float32), systems, labels))
        rows[label] = {k: float(np.mean([s[k] for s in per_seed])) for k in per_seed[0]}
    rows["no integration (PCA 15)"] = per_cell(unintegrated(h5ad), systems, labels)
    return rows


def markdown(report: dict) -> str:
    lines = [
        "# Where sysVI and scVI mix the systems differently (benchmarks/sysvi_mixing.py)",
        "",
        f"Machine: {report['machine']}; load average at start "
        f"{' '.join(f'{x:.2f}' for x in report['load_at_start'])}. Command: `{report['command']}`. The latents of "
        "results/sysvi_fidelity.md (the same runs); means over seeds. iLISI scaled to [0, 1] (90 neighbours, "
        f"perplexity 30); batch entropy over {K} neighbours / log n_systems; unmixed: the fraction of cells whose "
        f"{K_UNMIXED} nearest neighbours are all of their own system. scib's iLISI is the median over cells, "
        "sysvi_fidelity's batch entropy the mean.",
        "",
    ]
    for name, rows in report["datasets"].items():
        labels = sorted(k.split(":", 1)[1] for k in next(iter(rows.values())) if k.startswith("entropy:"))
        lines += [f"## {name}", "", "| model | iLISI mean | iLISI median | entropy mean | entropy median | unmixed | "
                  + " | ".join(f"entropy k={k}" for k in KS) + " |", "|---" * (6 + len(KS)) + "|"]  # fmt: skip
        for label, r in rows.items():
            cells = [r["ilisi_mean"], r["ilisi_median"], r["entropy_mean"], r["entropy_median"], r["unmixed"]]
            cells += [r[f"entropy_k{k}"] for k in KS]
            lines.append(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
        lines += ["", f"Per label: mean batch entropy ({K} neighbours) / unmixed ({K_UNMIXED} neighbours).", "",
                  "| model | " + " | ".join(labels) + " |", "|---" * (1 + len(labels)) + "|"]  # fmt: skip
        for label, r in rows.items():
            cells = [f"{r[f'entropy:{x}']:.3f} / {r[f'unmixed:{x}']:.2f}" for x in labels]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--cycle-weights", nargs="*", type=float, default=[], help="atlasvi sysVI's other weights")
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "sysvi_fidelity")
    args = parser.parse_args()
    missing = [n for n in args.datasets if not (args.workdir / f"{n}_store.h5ad").exists()]
    if missing:
        raise SystemExit(f"no store for {', '.join(missing)} in {args.workdir}: run benchmarks/sysvi_fidelity.py first")
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, CPU only",
        "command": f"python benchmarks/sysvi_mixing.py --datasets {' '.join(args.datasets)} --seeds "
        f"{' '.join(map(str, args.seeds))} --epochs {args.epochs}"
        f"{' --cycle-weights ' * bool(args.cycle_weights)}{' '.join(f'{w:g}' for w in args.cycle_weights)}",
        "load_at_start": list(os.getloadavg()),
        "datasets": {n: dataset(n, args.workdir, args.seeds, args.epochs, args.cycle_weights) for n in args.datasets},
    }
    results = HERE / "results"
    (results / "sysvi_mixing.json").write_text(json.dumps(report, indent=1) + "\n")
    (results / "sysvi_mixing.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
