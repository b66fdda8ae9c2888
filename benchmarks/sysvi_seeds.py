"""sysVI over more seeds: the per-seed scores of several `sysvi_fidelity.py` results files merged into one table
(mean ± s.e. per model and metric, every seed's value), with the issue's comparisons read against the noise.

    .venv/bin/python benchmarks/sysvi_seeds.py --dataset baron --inputs benchmarks/results/sysvi_fidelity.json \
        benchmarks/results/sysvi_baron_s345.json --reproduced W/repro_scores.json --name sysvi_baron_6seeds

Rows: the four models every `sysvi_fidelity.py` run trains (atlasvi sysVI at scvi-tools' default cycle weight,
scvi-tools' SysVI, both tools' scVI); runs at other cycle weights are left out. A seed found in two inputs must have
the same scores in both. Seeds are not paired across tools (each tool draws its own initial weights, and
scvi-tools its own split), so a difference of two rows is the difference of their means, its s.e.
sqrt(se_a^2 + se_b^2), and its 95% interval Welch's (Student t on the Welch-Satterthwaite degrees of freedom);
beside it the two-sided Mann-Whitney U test's p (exact), which assumes no shape of the seeds' spread. Verdict:
"above" / "below" when the interval excludes 0, else "equal within noise". `--reproduced` takes the
scores (`sysvi_fidelity.py --side score`) of committed seeds trained again (`--reproduced-code`: with which code)
and reports how far they are from the committed scores. A section compares both tools' scVI on every metric and on
the held-out -ELBO (each run's own tool's figure on its own held-out cells at the last epoch: atlasvi's 33 fixed
cells, scvi-tools' 32 drawn per seed; only runs that saved it). A model may have seeds the others lack
(`sysvi_fidelity.py --models scvi`). Output: results/<name>.json and .md.
"""

import argparse
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = (  # (run key prefix, label)
    ("atlasvi_sysvi", "atlasvi sysVI"),
    ("scvi-tools_sysvi", "scvi-tools SysVI"),
    ("atlasvi_scvi", "atlasvi scVI"),
    ("scvi-tools_scvi", "scvi-tools scVI"),
)
METRICS = (("ilisi", "iLISI"), ("batch_entropy", "batch entropy"), ("knn_accuracy", "kNN accuracy"), ("nmi", "NMI"))
MIXING = ("ilisi", "batch_entropy")
SCVIS = ("atlasvi scVI", "scvi-tools scVI")
ELBO = "heldout_neg_elbo"


def merge(
    results: list[dict], dataset: str, models: list[set[str] | None] | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    """{model prefix: {seed: scores}} of the four models over the inputs (`sysvi_fidelity.py` reports), from each
    input only the model prefixes in `models` (None: all); a seed in two inputs must have equal scores."""
    out: dict[str, dict[str, dict[str, float]]] = {prefix: {} for prefix, _ in MODELS}
    for report, only in zip(results, models or [None] * len(results), strict=True):
        for key, scores in report["datasets"][dataset]["scores"].items():
            prefix, _, seed = key.rpartition("_s")
            if prefix not in out or (only is not None and prefix not in only):
                continue
            if seed in out[prefix] and out[prefix][seed] != scores:
                raise SystemExit(f"{key}: two inputs give different scores")
            out[prefix][seed] = scores
    return {prefix: dict(sorted(seeds.items(), key=lambda kv: int(kv[0]))) for prefix, seeds in out.items()}


def heldout(results: list[dict], dataset: str, models: list[set[str] | None] | None = None) -> dict:
    """{model prefix: {seed: held-out -ELBO}} of the runs that saved one (`sysvi_fidelity.py`'s runs), from each
    input only the model prefixes in `models` (None: all)."""
    out: dict[str, dict[str, float]] = {prefix: {} for prefix, _ in MODELS}
    for report, only in zip(results, models or [None] * len(results), strict=True):
        for key, run in report["datasets"][dataset].get("runs", {}).items():
            prefix, _, seed = key.rpartition("_s")
            if prefix in out and (only is None or prefix in only) and ELBO in run:
                out[prefix][seed] = run[ELBO]
    return {prefix: dict(sorted(seeds.items(), key=lambda kv: int(kv[0]))) for prefix, seeds in out.items()}


def scvi_comparison(merged: dict, elbo: dict) -> dict:
    """atlasvi scVI - scvi-tools scVI on every metric and, where both tools saved it for >= 2 seeds, the held-out
    -ELBO: per metric each tool's seeds and mean ± s.e., and the Welch difference."""
    prefixes = ("atlasvi_scvi", "scvi-tools_scvi")
    rows = {m: {p: {s: v[m] for s, v in merged[p].items()} for p in prefixes} for m, _ in METRICS}
    rows[ELBO] = {p: elbo[p] for p in prefixes}
    out = {}
    for m, by_seed in rows.items():
        values = [list(by_seed[p].values()) for p in prefixes]
        if min(map(len, values)) < 2:
            continue
        out[m] = {
            "seeds": {label: [int(s) for s in by_seed[p]] for p, label in zip(prefixes, SCVIS, strict=True)},
            "stats": {label: mean_se(v) for v, label in zip(values, SCVIS, strict=True)},
        } | difference(*values)
    return out


def mean_se(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation (n - 1) and standard error of the mean."""
    n, mean = len(values), sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "sd": sd, "se": sd / math.sqrt(n), "n": n}


def difference(a: list[float], b: list[float]) -> dict[str, float | str]:
    """mean(a) - mean(b) of two unpaired samples: its s.e., Welch's t, degrees of freedom, 95% interval, verdict,
    and the Mann-Whitney U test's two-sided p."""
    from scipy.stats import mannwhitneyu
    from scipy.stats import t as student

    sa, sb = mean_se(a), mean_se(b)
    ties = len(set(a + b)) < len(a + b)
    u = float(mannwhitneyu(a, b, alternative="two-sided", method="auto" if ties else "exact").pvalue)
    diff, se = sa["mean"] - sb["mean"], math.sqrt(sa["se"] ** 2 + sb["se"] ** 2)
    if se == 0:
        return {"diff": diff, "se": 0.0, "t": math.inf if diff else 0.0, "df": math.inf, "low": diff, "high": diff,
                "verdict": "above" if diff > 0 else "below" if diff < 0 else "equal", "mann_whitney_p": u}  # fmt: skip
    df = se**4 / (sa["se"] ** 4 / (sa["n"] - 1) + sb["se"] ** 4 / (sb["n"] - 1))
    half = float(student.ppf(0.975, df)) * se
    low, high = diff - half, diff + half
    verdict = "above" if low > 0 else "below" if high < 0 else "equal within noise"
    return {"diff": diff, "se": se, "t": diff / se, "df": df, "low": low, "high": high, "verdict": verdict,
            "mann_whitney_p": u}  # fmt: skip


def summarise(merged: dict[str, dict[str, dict[str, float]]]) -> dict:
    """Per model: its seeds, per metric the values and mean ± s.e.; the comparisons: atlasvi sysVI - scvi-tools
    SysVI on every metric, and each tool's sysVI - each tool's scVI on mixing."""
    models = {}
    for prefix, label in MODELS:
        seeds = list(merged[prefix])
        models[label] = {"seeds": [int(s) for s in seeds]} | {
            m: {"values": [merged[prefix][s][m] for s in seeds]} | mean_se([merged[prefix][s][m] for s in seeds])
            for m, _ in METRICS
        }
    pairs = [("atlasvi sysVI", "scvi-tools SysVI", m) for m, _ in METRICS]
    pairs += [(s, b, m) for s in ("atlasvi sysVI", "scvi-tools SysVI") for b in ("atlasvi scVI", "scvi-tools scVI")
              for m in MIXING]  # fmt: skip
    comparisons = [
        {"a": a, "b": b, "metric": m} | difference(models[a][m]["values"], models[b][m]["values"]) for a, b, m in pairs
    ]
    return {"models": models, "comparisons": comparisons}


def reproduction(reproduced: dict[str, dict[str, float]], merged: dict) -> dict[str, dict[str, float]]:
    """Per retrained run: its scores now, the committed ones and the largest absolute difference."""
    out = {}
    for key, now in reproduced.items():
        prefix, _, seed = key.rpartition("_s")
        if prefix in merged and seed in merged[prefix]:
            committed = merged[prefix][seed]
            out[key] = {"now": now, "committed": committed,
                        "max_abs_diff": max(abs(now[m] - committed[m]) for m, _ in METRICS)}  # fmt: skip
    return out


def markdown(report: dict) -> str:
    """The report as a markdown page."""
    names = dict(METRICS)
    models = report["summary"]["models"]
    seeds = sorted({s for m in models.values() for s in m["seeds"]})
    lines = [
        f"# sysVI on {report['dataset']}: {len(seeds)} seeds, atlasvi vs scvi-tools 1.4.2, and both against scVI",
        "",
        f"Seeds {', '.join(map(str, seeds))}, merged from "
        + "; ".join(
            f"`{i['file']}` (seeds {i['seeds']}, models {', '.join(i['models']) if i['models'] != 'all' else 'all'}, "
            f"code {i['code']}, `{i['command']}`)"
            for i in report["inputs"]
        )
        + f". Merged by `{report['command']}`.",
        "",
        "Each model trains on the same store and cells; each tool draws its own initial weights and stream (and "
        "scvi-tools its own 10% split) per seed, so the seeds are not paired across tools. Metrics as "
        "`sysvi_fidelity.py`: iLISI (scaled), batch-neighbour entropy (1 = mixed), label kNN accuracy, NMI.",
        "",
        f"Machine: {report['machine']}; one run at a time. "
        + "; ".join(
            f"seeds {i['seeds']}: {min(r['seconds'] for r in i['runs'].values()):.0f}-"
            f"{max(r['seconds'] for r in i['runs'].values()):.0f} s per run, 1-minute load at the runs' ends "
            f"{min(r['load_at_end'][0] for r in i['runs'].values()):.1f}-"
            f"{max(r['load_at_end'][0] for r in i['runs'].values()):.1f}"
            for i in report["inputs"]
            if i["runs"]
        )
        + ".",
        "",
        "## Mean ± s.e. over seeds",
        "",
        "| model | n | " + " | ".join(names.values()) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for label, m in models.items():
        lines.append(f"| {label} | {len(m['seeds'])} | "
                     + " | ".join(f"{m[k]['mean']:.3f} ± {m[k]['se']:.3f}" for k in names) + " |")  # fmt: skip
    if report.get("unintegrated"):
        lines.append("| no integration (PCA 15) | - | "
                     + " | ".join(f"{report['unintegrated'][k]:.3f}" for k in names) + " |")  # fmt: skip
    lines += ["", "## Per seed", "", "| model | metric | " + " | ".join(f"s{s}" for s in seeds) + " |",
              "|---|---|" + "---|" * len(seeds)]  # fmt: skip
    for label, m in models.items():
        for k, name in names.items():
            by_seed = dict(zip(m["seeds"], m[k]["values"], strict=True))
            cells = [f"{by_seed[s]:.3f}" if s in by_seed else "-" for s in seeds]
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Comparisons (difference of means ± s.e., Welch 95% interval)", ""]
    lines += ["| a - b | metric | a | b | a - b | 95% interval | verdict | Mann-Whitney p |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for c in report["summary"]["comparisons"]:
        a, b = models[c["a"]][c["metric"]]["mean"], models[c["b"]][c["metric"]]["mean"]
        lines.append(
            f"| {c['a']} - {c['b']} | {names[c['metric']]} | {a:.3f} | {b:.3f} | {c['diff']:+.3f} ± {c['se']:.3f} | "
            f"[{c['low']:+.3f}, {c['high']:+.3f}] | {c['verdict']} | {c['mann_whitney_p']:.3f} |"
        )
    lines += ["", *(f"- {line}" for line in report["findings"]), ""]
    if report.get("scvi"):
        lines += ["## scVI: atlasvi - scvi-tools (unpaired; difference of means ± s.e., Welch 95% interval)", "",
                  "Held-out -ELBO: each run's own tool's figure, per cell, on its own held-out cells at the last "
                  "epoch (atlasvi's 33 fixed cells, scvi-tools' 32 drawn per seed); only the runs that saved it.", "",
                  "| metric | n (atlasvi, scvi-tools) | atlasvi scVI | scvi-tools scVI | a - b | 95% interval | "
                  "verdict | Mann-Whitney p |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for m, c in report["scvi"].items():
            a, b = (c["stats"][label] for label in SCVIS)
            digits = 1 if m == ELBO else 3
            lines.append(
                f"| {names.get(m, 'held-out -ELBO')} | {a['n']}, {b['n']} | {a['mean']:.{digits}f} ± "
                f"{a['se']:.{digits}f} | {b['mean']:.{digits}f} ± {b['se']:.{digits}f} | {c['diff']:+.{digits}f} ± "
                f"{c['se']:.{digits}f} | [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}] | {c['verdict']} | "
                f"{c['mann_whitney_p']:.3f} |"
            )
        lines.append("")
    if report.get("reproduction"):
        lines += ["## Committed seeds trained again", "",
                  f"Code: {report['reproduction_code']}.", "", "| run | max abs difference from committed scores |",
                  "|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v['max_abs_diff']:.1e} |" for k, v in report["reproduction"].items()] + [""]
    return "\n".join(lines)


def findings(summary: dict) -> list[str]:
    """The issue's checks in words, from the comparisons."""
    names, out = dict(METRICS), []
    for c in summary["comparisons"]:
        if c["a"] == "atlasvi sysVI" and c["b"] == "scvi-tools SysVI":
            ge = ">=" if c["diff"] >= 0 else "<"
            out.append(f"{names[c['metric']]}: atlasvi sysVI {ge} scvi-tools SysVI in the mean ({c['diff']:+.3f}); "
                       f"{c['verdict']}")  # fmt: skip
    for sysvi in ("atlasvi sysVI", "scvi-tools SysVI"):
        against = [c for c in summary["comparisons"] if c["a"] == sysvi and c["b"].endswith("scVI")]
        verdicts = [f"{names[c['metric']]} vs {c['b']} {c['diff']:+.3f} ({c['verdict']})" for c in against]
        counts = {v: sum(c["verdict"] == v for c in against) for v in ("above", "below")}
        out.append(
            f"{sysvi} against the two scVIs on the two mixing metrics: above in {counts['above']} of "
            f"{len(against)}, below in {counts['below']}, the rest equal within noise ({'; '.join(verdicts)})"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="baron")
    parser.add_argument(
        "--inputs", nargs="+", required=True,
        help="sysvi_fidelity.py results (.json), each optionally ':prefix,prefix' (e.g. :scvi-tools_sysvi) to take "
        "only those models from it",
    )  # fmt: skip
    parser.add_argument("--reproduced", type=Path, help="scores of committed seeds trained again (--side score)")
    parser.add_argument("--reproduced-code", default="", help="the commit the reproduced runs were trained at")
    parser.add_argument("--name", required=True, help="results/<name>.json and .md")
    args = parser.parse_args()
    results, paths, models = [], [], []
    for spec in args.inputs:
        file, _, only = spec.partition(":")
        path = Path(file)
        if only and not set(only.split(",")) <= {prefix for prefix, _ in MODELS}:
            raise SystemExit(f"{spec}: models must be among {', '.join(prefix for prefix, _ in MODELS)}")
        paths.append(path)
        models.append(set(only.split(",")) if only else None)
        if not path.exists():
            raise SystemExit(f"{path}: no such file")
        report = json.loads(path.read_text())
        if args.dataset not in report.get("datasets", {}):
            raise SystemExit(f"{path}: no {args.dataset!r} results")
        results.append(report)
    merged = merge(results, args.dataset, models)
    if any(len(seeds) < 2 for seeds in merged.values()):
        raise SystemExit("every model needs at least 2 seeds")
    summary = summarise(merged)
    specs = [
        f"benchmarks/results/{p.name}" + (f":{','.join(sorted(m))}" if m else "")
        for p, m in zip(paths, models, strict=True)
    ]
    report = {
        "dataset": args.dataset,
        "machine": results[-1].get("machine", "not recorded"),
        "command": "python benchmarks/sysvi_seeds.py " + " ".join(
            ["--dataset", args.dataset, "--inputs",
             *specs,
             *(["--reproduced", "REPRO_SCORES"] if args.reproduced else []), "--name", args.name]),
        "inputs": [
            {"file": f"results/{p.name}", "command": d["command"], "seeds": d["seeds"],
             "code": d.get("code", "not recorded"), "models": sorted(m) if m else "all",
             "runs": {k: v for k, v in d.get("runs", {}).items() if m is None or k.rpartition("_s")[0] in m}}
            for p, m, d in zip(paths, models, (r["datasets"][args.dataset] for r in results), strict=True)
        ],
        "unintegrated": results[0]["datasets"][args.dataset].get("unintegrated"),
        "scores": merged,
        "summary": summary,
        "findings": findings(summary),
    }  # fmt: skip
    report["scvi"] = scvi_comparison(merged, heldout(results, args.dataset, models))
    if args.reproduced:
        reproduced = json.loads(args.reproduced.read_text())
        reproduced.pop("unintegrated", None)
        report["reproduction"] = reproduction(reproduced, merged)
        report["reproduction_code"] = args.reproduced_code or "not recorded"
    out = HERE / "results" / args.name
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
