"""DestVI on the real pairs at long training, atlasvi vs scvi-tools 1.4.2: agreement and known anatomy.

    PYTHONPATH=. .venv/bin/python benchmarks/destvi_real.py --datasets lymph_node --epochs 300,100

Each tool trains CondSCVI then DestVI on the pairs of benchmarks/destvi_fidelity.py (`real`: the RCTD human lymph
node, 1,000 Visium spots, and the Moncada 2020 PDAC-A ST section; the reference's --n-genes HVGs) with the same
settings as there (`side`; KL warm-ups scaled with the epochs, `warmups`), for each --epochs pair (CondSCVI,DestVI);
each --seeds. The proportions of each run are kept in the workdir as {dataset}_{seed}_{tool}_e{condscvi}-{destvi}.csv
with its timings, CPU seconds and load (.json) and the trained models (.models/condscvi, .models/destvi), and reused
when present.

Per run: (1) agreement, the per-type Pearson r of the two tools' proportions across the same spots (and, with two
--seeds, of each tool's first seed with its second, with three or more of each seed with the next and the last with
the first: how far a tool agrees with itself); (2) anatomy, the
per-type Pearson r of each tool's proportions with marker scores of the spots (the mean log-normalised expression of
the type's markers over the spots' whole gene panel, `marker_scores`): known markers (`CANONICAL`, those the spots
file has), the reference's signature of the type (`signatures`: its 10 most enriched genes among those both files
have) and that signature drawn from the genes the models did not train on (held out); (3) Moran's I of each
proportion on the spots' 6-nearest-neighbour graph (regions vs scatter). Output: results/destvi_real.json and .md (a
run replaces the entries of its datasets, seeds and epochs); the figure of the first seed at the longest training
replaces results/destvi_{dataset}.png, with a row of the signature scores (2nd to 98th percentile) under the tools'
proportions.
"""

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from benchmarks import destvi_fidelity as fidelity

HERE = Path(__file__).resolve().parent

RESULTS = HERE / "results"
CANONICAL = {
    # dataset: {cell type: known markers; those the spots file lacks are dropped (the lymph-node Visium file keeps
    # RCTD's 2,000 genes: of the B-cell markers only SPIB and FCRL4; its immunoglobulin genes, in no reference, mark
    # plasma cells)}
    "lymph_node": {
        "B": ["MS4A1", "CD19", "CR2", "CD79A", "SPIB", "FCRL4"],
        "B_Plasma": ["IGLC1", "IGKV3-11", "IGKV3D-15", "IGLV1-41", "IGLV1-50", "IGLV5-52", "IGKV2D-26", "IGLV4-3"],
        "Monocytes": ["CD14"],
        "Macrophages": ["MS4A7", "C1QA", "CD68"],
    },
    "pdac": {
        "Acinar cells": ["PRSS1", "CTRB2", "CPA1", "REG1A", "CELA3A", "CTRC", "PNLIP", "CPB1"],
        "Fibroblasts": ["COL1A1", "COL1A2", "COL3A1", "DCN", "LUM"],
        "Endocrine cells": ["INS", "GCG", "SST", "TTR"],
        "Endothelial cells": ["PECAM1", "VWF", "PLVAP"],
        "T cells & NK cells": ["CD3E", "CD2", "NKG7", "GNLY"],
        "Mast cells": ["TPSAB1", "CPA3", "KIT"],
        "RBCs": ["HBB", "HBA1", "HBA2"],
        "Ductal - CRISP3 high/centroacinar like": ["CRISP3"],
    },
}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(dataset: str, seed: int, tool: str, epochs: tuple[int, int], n_genes: int, workdir: Path, python: str) -> Path:
    """Train `tool` on `dataset` (or reuse the kept run): the proportions' csv; its timings, CPU seconds and the
    load average before and after in the .json beside it."""
    reference, spots = fidelity.real(dataset, workdir, n_genes)
    out = workdir / f"{dataset}_{seed}_{tool}_e{epochs[0]}-{epochs[1]}.csv"
    record = out.with_suffix(".json")
    if out.exists() and record.exists():
        return out
    load_before = os.getloadavg()
    cpu = time.process_time() + _children_cpu()
    timing = fidelity.side(tool, reference, spots, out, seed, epochs, python, models=out.with_suffix(".models"))
    cpu = time.process_time() + _children_cpu() - cpu
    record.write_text(json.dumps(timing | {"cpu_seconds": cpu, "load_before": load_before,
                                           "load_after": os.getloadavg()}))  # fmt: skip
    return out


def log_normalized(x) -> np.ndarray:
    """log1p of counts per 10,000 of each row's total (dense)."""
    x = np.asarray(x.todense() if sp.issparse(x) else x, dtype=np.float64)
    return np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)


def signatures(reference, genes: list[str], n: int = 10, min_fraction: float = 0.25) -> dict[str, list[str]]:
    """Each cell type (obs "cell_type") of `reference`: its n genes among `genes` with the largest mean
    log-normalised expression in the type minus that of the other cells, of those detected in >= min_fraction of
    the type's cells and higher in it (fewer when fewer qualify)."""
    x = log_normalized(reference.X)
    keep = np.flatnonzero(reference.var_names.isin(genes))
    x, names = x[:, keep], reference.var_names[keep]
    labels = reference.obs["cell_type"].astype(str).to_numpy()
    types = sorted(set(labels))
    member = np.stack([labels == t for t in types]).astype(np.float64)  # (types, cells)
    sizes = member.sum(1, keepdims=True)
    inside = member @ x / sizes
    outside = (x.sum(0, keepdims=True) - member @ x) / (len(labels) - sizes)
    detected = member @ (x > 0) / sizes
    out = {}
    for i, t in enumerate(types):
        gap = inside[i] - outside[i]
        eligible = (detected[i] >= min_fraction) & (gap > 0)
        out[t] = [str(names[j]) for j in np.argsort(-gap, kind="stable") if eligible[j]][:n]
    return out


def marker_scores(spots, markers: dict[str, list[str]]) -> pd.DataFrame:
    """Per spot (rows of `spots`), each type's mean log-normalised expression of its markers that `spots` has
    (normalised by the spots' totals over all their genes); types with none are left out."""
    x = log_normalized(spots.X)
    index = {g: i for i, g in enumerate(spots.var_names)}
    columns = {t: x[:, [index[g] for g in genes if g in index]].mean(1) for t, genes in markers.items()
               if any(g in index for g in genes)}  # fmt: skip
    return pd.DataFrame(columns, index=spots.obs_names)


def morans_i(coordinates: np.ndarray, values: np.ndarray, k: int = 6) -> float:
    """Moran's I of `values` on the k-nearest-neighbour graph of `coordinates`, row-standardised weights: about 0
    for values scattered at random, towards 1 for smooth regions, negative for alternation."""
    from scipy.spatial import cKDTree

    _, neighbours = cKDTree(coordinates).query(coordinates, k + 1)
    z = np.asarray(values, dtype=np.float64) - np.mean(values)
    denominator = float((z**2).sum())
    return float((z * z[neighbours[:, 1:]].mean(1)).sum() / denominator) if denominator > 0 else 0.0


def _pearson(a, b) -> float | None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else None


def anatomy(dataset: str, workdir: Path, n_genes: int) -> dict:
    """The marker sets of `dataset` and their scores on its spots: {"markers": {set: {type: genes}}, "scores":
    {set: DataFrame spots x types}, "coordinates": (n, 2)}; sets "known", "signature", "signature_held_out"."""
    import anndata as ad

    spots_file, reference_file, labels_key = fidelity.REAL[dataset]
    spots = ad.read_h5ad(fidelity.SHARED / spots_file)
    reference = ad.read_h5ad(fidelity.SHARED / reference_file)
    reference.obs["cell_type"] = reference.obs[labels_key].astype(str)
    trained = set(ad.read_h5ad(fidelity.real(dataset, workdir, n_genes)[0], backed="r").var_names)
    both = [g for g in reference.var_names if g in set(spots.var_names)]
    known = {t: [g for g in genes if g in set(spots.var_names)] for t, genes in CANONICAL[dataset].items()}
    markers = {
        "known": {t: genes for t, genes in known.items() if genes},
        "signature": signatures(reference, both),
        "signature_held_out": signatures(reference, [g for g in both if g not in trained]),
    }
    scores = {name: marker_scores(spots, sets) for name, sets in markers.items()}
    return {"markers": markers, "scores": scores, "coordinates": pd.DataFrame(spots.obsm["spatial"][:, :2],
                                                                              index=spots.obs_names)}  # fmt: skip


def compare(tables: dict[str, pd.DataFrame], marks: dict, other_seed: dict[str, pd.DataFrame] | None = None) -> dict:
    """Agreement of the tools' proportions (per type Pearson r across spots) and each tool's anatomy: per marker
    set and type, the Pearson r of the type's proportion with its marker score; Moran's I of each proportion.
    other_seed: each tool's proportions at another seed; "self_agreement" is then, per tool, the per-type r of its
    two seeds (how far the tool agrees with itself)."""
    tools = list(tables)
    first = tables[tools[0]]
    tables = {t: v.loc[first.index, first.columns] for t, v in tables.items()}
    coordinates = marks["coordinates"].loc[first.index].to_numpy()
    out: dict = {"n_spots": len(first)}
    if len(tools) == 2:
        a, b = tables.values()
        out["agreement"] = {t: _pearson(a[t], b[t]) for t in first.columns}
    if other_seed:
        out["self_agreement"] = {
            tool: {t: _pearson(tables[tool][t], other.loc[first.index, t]) for t in first.columns}
            for tool, other in other_seed.items()
        }
    out["anatomy"] = {
        tool: {name: {t: _pearson(table[t], scores.loc[first.index, t]) for t in scores.columns if t in table}
               for name, scores in marks["scores"].items()}
        for tool, table in tables.items()
    }  # fmt: skip
    out["morans_i"] = {tool: {t: morans_i(coordinates, table[t].to_numpy()) for t in first.columns}
                       for tool, table in tables.items()}  # fmt: skip
    out["morans_i"]["signature score"] = {
        t: morans_i(coordinates, s.to_numpy()) for t, s in marks["scores"]["signature"].loc[first.index].items()
    }
    return out


def _kept(path: Path, runs: set[tuple[str, int, tuple[int, int]]]) -> dict:
    """The results at `path` without the entries of `runs` ((dataset, seed, epochs): a run replaces those), or
    empty ones."""
    results = json.loads(path.read_text()) if path.exists() else {}

    def replaced(entry: dict) -> bool:
        return (entry["dataset"], entry["seed"], tuple(entry["epochs"])) in runs

    return {
        "commands": results.get("commands", []),
        "runs": [r for r in results.get("runs", []) if not replaced(r)],
        "comparisons": {k: c for k, c in results.get("comparisons", {}).items() if not replaced(c)},
        "markers": results.get("markers", {}),
    }


def _partner(seeds: list[int], i: int) -> int | None:
    """The seed that seeds[i]'s proportions are compared with for a tool's self-agreement: with two seeds the first
    with the second only; with three or more each with the next, the last with the first (every pair of three)."""
    if len(seeds) < 2 or (len(seeds) == 2 and i == 1):
        return None
    return seeds[(i + 1) % len(seeds)]


def _epochs(text: str) -> tuple[int, int]:
    condscvi, destvi = (int(v) for v in text.split(","))
    return condscvi, destvi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["lymph_node", "pdac"], choices=sorted(fidelity.REAL))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tools", nargs="+", default=["atlasvi", "scvi-tools"], choices=["atlasvi", "scvi-tools"])
    parser.add_argument("--epochs", type=_epochs, nargs="+", default=[(300, 250)], help="CONDSCVI,DESTVI pairs")
    parser.add_argument("--n-genes", type=int, default=500, help="the reference's top HVGs the models train on")
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "destvi")
    parser.add_argument("--scvi-python", default=None)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    python = fidelity.scvi_python(args.scvi_python)
    results = _kept(RESULTS / "destvi_real.json", {(d, s, e) for d in args.datasets for s in args.seeds
                                                    for e in args.epochs})  # fmt: skip
    command = "python benchmarks/destvi_real.py " + " ".join(sys.argv[1:])
    results["commands"] = [c for c in results["commands"] if c != command] + [command]
    longest = max(args.epochs, key=lambda e: (e[1], e[0]))
    for dataset in args.datasets:
        marks = anatomy(dataset, args.workdir, args.n_genes)
        results["markers"][dataset] = marks["markers"]
        for epochs in args.epochs:
            tables = {}
            for seed in args.seeds:
                for tool in args.tools:
                    out = run(dataset, seed, tool, epochs, args.n_genes, args.workdir, python)
                    tables[seed, tool] = pd.read_csv(out, index_col=0)
                    results["runs"].append({"dataset": dataset, "seed": seed, "tool": tool, "epochs": list(epochs),
                                            "kl_warmup": list(fidelity.warmups(epochs))}
                                           | json.loads(out.with_suffix(".json").read_text()))  # fmt: skip
                    print(out, flush=True)
            for i, seed in enumerate(args.seeds):
                own = {tool: tables[seed, tool] for tool in args.tools}
                partner = _partner(args.seeds, i)
                other = {tool: tables[partner, tool] for tool in args.tools} if partner is not None else None
                key = f"{dataset}_{seed}_e{epochs[0]}-{epochs[1]}"
                results["comparisons"][key] = {"dataset": dataset, "seed": seed, "epochs": list(epochs)} | compare(
                    own, marks, other
                )
                if other:
                    results["comparisons"][key]["self_agreement_seed"] = partner
                if epochs == longest and i == 0:
                    first = next(iter(own.values()))
                    score = marks["scores"]["signature"].reindex(index=first.index, columns=first.columns)
                    low, high = score.quantile(0.02), score.quantile(0.98)  # each panel's 2nd to 98th percentile
                    shown = own | {"signature score (2-98%)": ((score - low) / (high - low)).clip(0, 1).fillna(0.0)}
                    spots = fidelity.real(dataset, args.workdir, args.n_genes)[1]
                    fidelity.figure(f"{dataset}, epochs {epochs}", spots, shown, RESULTS / f"destvi_{dataset}.png")
    results["machine"] = f"{platform.node()}: {os.cpu_count()} CPUs, shared; load average at the end {os.getloadavg()}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "destvi_real.json").write_text(json.dumps(results, indent=1))
    (RESULTS / "destvi_real.md").write_text(render(results))


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _mean(values: dict) -> float | None:
    kept = [v for v in values.values() if v is not None]
    return float(np.mean(kept)) if kept else None


def _summary(comparisons: dict) -> list[str]:
    """One row per comparison: the tools' mean per-type r, each tool's mean per-type r with itself at another seed
    and each tool's mean known-marker r."""
    tools = sorted(set.intersection(*(set(c["anatomy"]) for c in comparisons.values()))) if comparisons else []
    header = ["dataset", "epochs", "seed", "tools' r mean (median)"]
    header += [f"{tool} vs itself (seed)" for tool in tools] + [f"{tool} known-marker r" for tool in tools]
    lines = ["", "## Per seed: agreement between the tools, with itself, and known markers (means over types)", "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]  # fmt: skip
    for c in sorted(comparisons.values(), key=lambda c: (c["dataset"], c["epochs"], c["seed"])):
        agreement = c.get("agreement", {})
        values = [v for v in agreement.values() if v is not None]
        row = [c["dataset"], str(c["epochs"]), str(c["seed"])]
        row.append(f"{np.mean(values):.3f} ({np.median(values):.3f})" if values else "-")
        for tool in tools:
            own = c.get("self_agreement", {}).get(tool)
            row.append(f"{_cell(_mean(own))} ({c['self_agreement_seed']})" if own else "-")
        row += [_cell(_mean(c["anatomy"][tool].get("known", {}))) for tool in tools]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def render(results: dict) -> str:
    """The markdown of `results` (see main): runs, then per comparison the agreement and anatomy tables."""
    lines = ["# DestVI on real data at long training: atlasvi vs scvi-tools 1.4.2", "",
             "Commands (each replaces the entries of its datasets, seeds and epochs):", "",
             *(f"    {command}" for command in results["commands"]), "", f"Machine: {results.get('machine', '')}", "",
             "| dataset | seed | tool | epochs (CondSCVI, DestVI) | KL warm-up | CondSCVI s | DestVI s | CPU s "
             "| load before / after |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["runs"]:
        load = f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f}"
        seconds = f"{r['condscvi_seconds']:.0f} | {r['destvi_seconds']:.0f} | {r['cpu_seconds']:.0f}"
        run = f"{r['dataset']} | {r['seed']} | {r['tool']} | {r['epochs']} | {r['kl_warmup']}"
        lines.append(f"| {run} | {seconds} | {load} |")
    lines += _summary(results["comparisons"])
    for key, c in results["comparisons"].items():
        tools = list(c["anatomy"])
        lines += ["", f"## {key}: {c['n_spots']} spots", ""]
        if "agreement" in c:
            values = [v for v in c["agreement"].values() if v is not None]
            lines.append(f"Agreement (Pearson r of the tools' proportions per type): mean {np.mean(values):.3f}, "
                         f"median {np.median(values):.3f}, min {np.min(values):.3f}.")  # fmt: skip
            lines.append("")
        selves = c.get("self_agreement", {})
        for tool, agreement in selves.items():
            values = [v for v in agreement.values() if v is not None]
            lines.append(f"{tool} against itself (seed {c['seed']} vs {c['self_agreement_seed']}), per type r: "
                         f"mean {np.mean(values):.3f}, median {np.median(values):.3f}, "
                         f"min {np.min(values):.3f}.")  # fmt: skip
            lines.append("")
        sets = list(c["anatomy"][tools[0]])
        header = ["cell type"] + (["tools' r"] if "agreement" in c else [])
        header += [f"{tool} seeds' r" for tool in selves]
        header += [f"{tool}: {name}" for name in sets for tool in tools]
        header += [f"Moran's I {tool}" for tool in c["morans_i"]]
        lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for t in c["morans_i"][tools[0]]:
            row = [t] + ([_cell(c["agreement"][t])] if "agreement" in c else [])
            row += [_cell(agreement[t]) for agreement in selves.values()]
            row += [_cell(c["anatomy"][tool][name].get(t)) for name in sets for tool in tools]
            row += [_cell(c["morans_i"][tool].get(t)) for tool in c["morans_i"]]
            lines.append("| " + " | ".join(row) + " |")
        means = ["mean", *([""] if "agreement" in c else []), *([""] * len(selves))]
        for name in sets:
            for tool in tools:
                values = [v for v in c["anatomy"][tool][name].values() if v is not None]
                means.append(_cell(float(np.mean(values))) if values else "-")
        lines.append("| " + " | ".join(means + [""] * len(c["morans_i"])) + " |")
    for dataset, sets in results["markers"].items():
        lines += ["", f"## Markers, {dataset}", ""]
        for name, markers in sets.items():
            lines.append(f"- {name}: " + "; ".join(f"{t}: {', '.join(g) or '(none)'}" for t, g in markers.items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
