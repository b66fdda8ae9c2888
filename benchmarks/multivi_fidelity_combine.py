"""Combine paired MultiVI fidelity runs (results/NAME.json of `multivi_fidelity.py --same-start --same-split`) into one
paired table: every seed's rows, the paired differences atlasvi - scvi-tools over all seeds (mean, sd, s.e., t, 95% CI
from multivi_fidelity.paired_differences; the Wilcoxon signed-rank and the sign test's p), and per metric whether
atlasvi is >= scvi-tools, equal within noise, or below (from the 95% CI, and from the Wilcoxon signed-rank test where
the CI contains 0). Each source's loads, start and finish (UTC) and code commit are kept where it recorded them.

    .venv/bin/python benchmarks/multivi_fidelity_combine.py --inputs multivi_fidelity_same_split \
        multivi_fidelity_same_split_s67 multivi_fidelity_same_split_s89 multivi_fidelity_same_split_s1011 \
        --out multivi_fidelity_paired12

Every input must be a --same-start --same-split run with the same training options and no training-draw offset; a
(tool, seed) given by two inputs is an error. Output: results/OUT.json and results/OUT.md.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from benchmarks.multivi_fidelity import METRICS, markdown, paired_differences, split

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ALPHA = 0.05
MEANINGFUL_MEAN = 0.01  # scvi-tools' means below this (r per gene, ~0 in both tools) get no relative bound


def lower_is_better(key: str) -> bool:
    """The held-out reconstructions are nats (lower is better); AUROC, r and kNN accuracy are higher-is-better."""
    return key.startswith("heldout_")


def verdict(key: str, ci95: list[float], median: float, p_wilcoxon: float) -> str:
    """atlasvi against scvi-tools on `key`: above or below when the 95% CI of atlasvi - scvi-tools excludes 0; when it
    contains 0 but the Wilcoxon signed-rank test rejects 0 at 5%, above or below by rank (the side of the median);
    else equal within noise."""
    sign = -1.0 if lower_is_better(key) else 1.0
    low, high = sorted((sign * ci95[0], sign * ci95[1]))  # oriented: > 0 favours atlasvi
    if low > 0:
        return "atlasvi better (95% CI excludes 0)"
    if high < 0:
        return "atlasvi below scvi-tools (95% CI excludes 0)"
    if p_wilcoxon < ALPHA:
        side = "better" if sign * median > 0 else "below scvi-tools"
        return f"atlasvi {side} by rank (signed-rank p < {ALPHA}), within noise by t (95% CI contains 0)"
    return "equal within noise (95% CI contains 0)"


def combine(reports: dict[str, dict]) -> tuple[list[dict], dict]:
    """The rows of every report (each tagged with its source) and the checked common settings; SystemExit with one
    line when a report is not a same-start, same-split run, its settings differ, or a (tool, seed) repeats."""
    rows: list[dict] = []
    fields = None
    knn_order = heldout_scorer = ""  # not yet read ("" is neither recorded value)
    for name, report in reports.items():
        meta = report["meta"]
        if not (meta.get("same_start") and meta.get("same_split")) or meta.get("train_seed_offset"):
            raise SystemExit(f"results/{name}.json is not a --same-start --same-split run without a seed offset")
        if fields is not None and meta["train_fields"] != fields:
            raise SystemExit(f"results/{name}.json was run with {meta['train_fields']}, not {fields}")
        fields = meta["train_fields"]
        order = meta.get("knn_cell_order")  # None: each tool's own order (runs before it was recorded)
        if knn_order != "" and order != knn_order:
            raise SystemExit(f"results/{name}.json scores kNN in cell order {order!r}, the others in {knn_order!r}")
        knn_order = order
        scorer = meta.get("heldout_scorer")  # None: each tool's own scorer, one draw
        if heldout_scorer != "" and scorer != heldout_scorer:
            raise SystemExit(
                f"results/{name}.json scores held-out cells by {scorer!r}, the others by {heldout_scorer!r}"
            )
        heldout_scorer = scorer
        have = {(r["tool"], r["seed"]) for r in rows}
        for r in report["rows"]:
            if (r["tool"], r["seed"]) in have:
                raise SystemExit(f"results/{name}.json repeats {r['tool']}'s seed {r['seed']}")
            rows.append(r | {"source": name})
    return rows, {"train_fields": fields or {}, "knn_cell_order": knn_order, "heldout_scorer": heldout_scorer}


def recorded_loads(report: dict) -> list[float]:
    """The 1-minute loads a report recorded: at its start, then at each row's end where the row has it."""
    return [report["meta"]["load_average_at_start"][0]] + [
        r["load_average_at_end"][0] for r in report["rows"] if "load_average_at_end" in r
    ]


def sign_test_p(values: np.ndarray) -> float:
    """Two-sided sign test of paired differences: the binomial p of the positive count among the non-zero ones under
    p = 1/2 (1.0 when all are zero)."""
    nonzero = values[values != 0]
    if not len(nonzero):
        return 1.0
    return float(stats.binomtest(int(np.sum(nonzero > 0)), len(nonzero), 0.5).pvalue)


def source_times(report: dict) -> dict:
    """A run's code commit, start and last row's finish (UTC) where it recorded them (runs since they do), else None."""
    finished = [r["finished_utc"] for r in report["rows"] if "finished_utc" in r]
    return {
        "code_commit": report["meta"].get("code_commit"),
        "started_utc": report["meta"].get("started_utc"),
        "finished_utc": max(finished) if finished else None,
    }


def goals(rows: list[dict], diffs: dict) -> dict[str, dict]:
    """Per metric: the paired summary plus the median, the two-sided t-test p, the Wilcoxon signed-rank p, the sign
    test's p, how many seeds favour atlasvi, scvi-tools' mean, the CI's bound on atlasvi's unfavourable side relative to
    that mean, and the verdict."""
    out = {}
    seeds = list(diffs["per_seed"])
    for key, _, _ in METRICS:
        summary = diffs["summary"][key]
        values = np.array([diffs["per_seed"][s][key] for s in seeds])
        sign = -1.0 if lower_is_better(key) else 1.0
        scvi_mean = float(np.mean([r[key] for r in rows if r["tool"] == "scvi-tools" and r["seed"] in seeds]))
        worst = summary["ci95"][1] if lower_is_better(key) else summary["ci95"][0]
        p_wilcoxon = float(stats.wilcoxon(values).pvalue) if np.any(values != 0) else 1.0
        out[key] = {
            "mean": summary["mean"],
            "median": float(np.median(values)),
            "se": summary["se"],
            "t": summary["t"],
            "ci95": summary["ci95"],
            "p_t": float(2 * stats.t.sf(abs(summary["t"]), len(values) - 1)) if summary["t"] is not None else None,
            "p_wilcoxon": p_wilcoxon,
            "p_sign": sign_test_p(values),
            "seeds_favouring_atlasvi": int(np.sum(sign * values > 0)),
            "n": len(values),
            "scvi_tools_mean": scvi_mean,
            "worst_bound": worst,
            "worst_bound_relative": worst / abs(scvi_mean) if abs(scvi_mean) >= MEANINGFUL_MEAN else None,
            "verdict": verdict(key, summary["ci95"], float(np.median(values)), p_wilcoxon),
        }
    return out


def report_markdown(payload: dict) -> str:
    """multivi_fidelity's table of the combined rows, then the sources and the goals, one line per metric."""
    meta = payload["meta"]
    lines = [markdown(payload["rows"], meta).rstrip("\n"), "", "Sources (results/NAME.json, seeds, 1-minute load):", ""]
    for source in meta["sources"]:
        loads = source["recorded_loads"]
        load = (
            f"1-minute load {min(loads):.1f}-{max(loads):.1f} at its start and each row's end"
            if len(loads) > 1
            else f"1-minute load {loads[0]:.1f} at its start"
        )
        when = (
            f"; {source['started_utc']} to {source['finished_utc']}, code {source['code_commit']}"
            if source.get("started_utc")
            else ""
        )
        lines.append(
            f"- `{source['name']}`: seeds {', '.join(map(str, source['seeds']))}; {load}; `{source['command']}`; "
            f"{source['machine']}{when}"
        )
    lines += [
        "",
        f"Goals (issue 19: atlasvi >= scvi-tools), over {meta['n_pairs']} paired seeds. Difference atlasvi - "
        "scvi-tools (on nats, + means atlasvi is worse); worst bound: the 95% CI's end on atlasvi's unfavourable side, "
        "relative to scvi-tools' mean:",
        "",
        "| metric | difference ± s.e. | median | t (p) | Wilcoxon p | sign test p | 95% CI | seeds favouring atlasvi | "
        "scvi-tools mean | worst bound | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, digits, label in METRICS:
        g = payload["goals"][key]
        relative = f" ({100 * g['worst_bound_relative']:+.2f}%)" if g["worst_bound_relative"] is not None else ""
        lines.append(
            f"| {label} | {g['mean']:+.{digits}f} ± {g['se']:.{digits}f} | {g['median']:+.{digits}f} | "
            f"{g['t']:+.2f} ({g['p_t']:.3f}) | "
            f"{g['p_wilcoxon']:.3f} | {g['p_sign']:.3f} | [{g['ci95'][0]:+.{digits}f}, {g['ci95'][1]:+.{digits}f}] | "
            f"{g['seeds_favouring_atlasvi']} of {g['n']} | {g['scvi_tools_mean']:.{digits}f} | "
            f"{g['worst_bound']:+.{digits}f}{relative} | {g['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", required=True, help="results/NAME.json files of paired runs")
    parser.add_argument("--out", required=True, help="results/OUT.json and results/OUT.md")
    args = parser.parse_args()
    reports = {}
    for name in args.inputs:
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"no results/{name}.json")
        reports[name] = json.loads(path.read_text())
    rows, common = combine(reports)
    diffs = paired_differences(rows)
    if len(diffs["per_seed"]) < 2:
        raise SystemExit("fewer than 2 paired seeds: nothing to combine")
    meta = {
        "command": " ".join(["python", "benchmarks/multivi_fidelity_combine.py", *sys.argv[1:]]),
        "machine": "each source's, below",
        "train_fields": common["train_fields"],
        "same_start": True,
        "same_split": True,
        "train_seed_offset": 0,
        "cells": {name: len(part) for name, part in split(2641).items()},
        "n_pairs": len(diffs["per_seed"]),
        "knn_cell_order": common["knn_cell_order"],
        "heldout_scorer": common["heldout_scorer"],
        "sources": [
            {
                "name": name,
                "seeds": sorted({r["seed"] for r in report["rows"]}),
                "command": report["meta"]["command"],
                "machine": report["meta"]["machine"],
                "recorded_loads": recorded_loads(report),
            }
            | source_times(report)
            for name, report in reports.items()
        ],
    }
    payload = {"meta": meta, "rows": rows, "paired_differences": diffs, "goals": goals(rows, diffs)}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / f"{args.out}.md").write_text(report_markdown(payload))
    print(report_markdown(payload))


if __name__ == "__main__":
    main()
