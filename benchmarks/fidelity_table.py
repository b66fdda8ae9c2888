"""The scVI fidelity table (issue 4): atlasvi vs scvi-tools per dataset, printed and logged to MLflow.

    python benchmarks/fidelity_table.py [--out benchmarks/results/fidelity_table.md]
    python benchmarks/fidelity_table.py --scvi-tools-from benchmarks/results/fidelity_table.json [--reuse cellbench]

Reads what the two sides wrote (see benchmarks/README.md for the commands):
- scvi-tools: benchmarks/.cache/scvi_ref/<dataset>_seed<S>.json (held-out -ELBO, scib-metrics total; the total from
              benchmarks/.cache/scvi_ref/<dataset>/scib_seed<S>.json when run without --scib), or with
              --scvi-tools-from its mean ± sd per dataset (those of --reuse) from a fidelity_table.json written before
              (atlasvi re-run alone; atlasvi's seeds must be that table's);
- atlasvi:    benchmarks/.cache/fidelity/<dataset>/results.jsonl (held-out -ELBO per seed, from fidelity.py)
              and benchmarks/.cache/fidelity/<dataset>/scib_seed<S>.json (`fidelity_data.py scib`).
Check 1: atlasvi's mean held-out -ELBO <= scvi-tools' mean + one scvi-tools seed sd (ELBO >= mean - sd).
Check 2: atlasvi's mean scib-metrics total >= scvi-tools' mean - 0.01.
Logs one MLflow run per dataset in the experiment `fidelity` (MLFLOW_TRACKING_URI, else ./mlruns).
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import mlflow

from atlasvi.tracking import ensure_experiment, local_tracking_uri

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def committed_scvi_tools(path: Path) -> dict[str, dict]:
    """scvi-tools' side per dataset of a fidelity_table.json: {dataset: {"seeds", "neg_elbo", "scib"}} (mean, sd)."""
    try:
        rows = json.loads(path.read_text())
        return {
            r["dataset"]: {"seeds": r["seeds"], "neg_elbo": r["scvi-tools.neg_elbo"], "scib": r["scvi-tools.scib"]}
            for r in rows
        }
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise SystemExit(f"{path}: not a fidelity_table.json ({error})") from None


def collect(dataset: str, committed: dict | None = None) -> dict | None:
    """Per-seed figures of both sides for the seeds both have; with `committed` (scvi-tools' side of this dataset
    from `committed_scvi_tools`) atlasvi's per-seed figures for exactly its seeds, and scvi-tools' summary."""
    scvi = {}
    for path in sorted((CACHE / "scvi_ref").glob(f"{dataset}_seed*.json")):
        text = path.read_text()
        start = 0 if text.startswith("{") else text.find("\n{") + 1  # scvi-tools may log to stdout first
        try:
            result = json.loads(text[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            result = None
        if result is None:
            continue  # a run still writing
        scib = result.get("scib", {}).get("total")
        scored = CACHE / "scvi_ref" / dataset / f"scib_seed{result['seed']}.json"  # latent scored apart (not --scib)
        if scib is None and scored.exists():
            scib = next(iter(json.loads(scored.read_text()).values()))["total"]
        scvi[result["seed"]] = {"neg_elbo": result["heldout"]["neg_elbo"], "scib": scib}
    results = CACHE / "fidelity" / dataset / "results.jsonl"
    if not results.exists():
        return None
    atlasvi = {}
    for line in results.read_text().splitlines():
        row = json.loads(line)
        atlasvi[row["seed"]] = {"neg_elbo": row["neg_elbo"], "scib": None}
    for seed in atlasvi:
        scib = CACHE / "fidelity" / dataset / f"scib_seed{seed}.json"
        if scib.exists():
            atlasvi[seed]["scib"] = next(iter(json.loads(scib.read_text()).values()))["total"]
    if committed is not None:
        if sorted(atlasvi) != sorted(committed["seeds"]):
            raise SystemExit(
                f"{dataset}: atlasvi has seeds {sorted(atlasvi)}, the committed scvi-tools figures {committed['seeds']}"
            )
        seeds = sorted(atlasvi)
        return {"seeds": seeds, "scvi-tools": committed, "atlasvi": [atlasvi[s] for s in seeds]}
    seeds = sorted(set(scvi) & set(atlasvi))
    if not seeds:
        return None
    return {"seeds": seeds, "scvi-tools": [scvi[s] for s in seeds], "atlasvi": [atlasvi[s] for s in seeds]}


def summarise(dataset: str, figures: dict) -> dict:
    """Mean ± sd per tool (scvi-tools' as given when `figures` carries its summary), per-seed figures, checks 1 and
    2."""
    out = {"dataset": dataset, "seeds": figures["seeds"]}
    for tool in ("scvi-tools", "atlasvi"):
        if isinstance(figures[tool], dict):
            out[f"{tool}.neg_elbo"], out[f"{tool}.scib"] = figures[tool]["neg_elbo"], figures[tool]["scib"]
            continue
        out[f"{tool}.neg_elbo"] = _mean_sd([r["neg_elbo"] for r in figures[tool]])
        scib = [r["scib"] for r in figures[tool] if r["scib"] is not None]
        out[f"{tool}.scib"] = _mean_sd(scib) if len(scib) == len(figures["seeds"]) else None
        out[f"{tool}.per_seed"] = {str(s): r for s, r in zip(figures["seeds"], figures[tool], strict=True)}
    scvi_mean, scvi_sd = out["scvi-tools.neg_elbo"]
    out["check1"] = out["atlasvi.neg_elbo"][0] <= scvi_mean + scvi_sd
    both = out["scvi-tools.scib"] and out["atlasvi.scib"]
    out["check2"] = out["atlasvi.scib"][0] >= out["scvi-tools.scib"][0] - 0.01 if both else None
    return out


def table(rows: list[dict]) -> str:
    def fmt(pair, digits):
        return "n/a" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    def verdict(value):
        return "n/a" if value is None else ("met" if value else "NOT met")

    lines = [
        "| dataset | seeds | held-out -ELBO scvi-tools | atlasvi | check 1 "
        "| scib total scvi-tools | atlasvi | check 2 |",
        "|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {len(r['seeds'])} | {fmt(r['scvi-tools.neg_elbo'], 1)}"
            f" | {fmt(r['atlasvi.neg_elbo'], 1)}"
            f" | {verdict(r['check1'])} | {fmt(r['scvi-tools.scib'], 3)} | {fmt(r['atlasvi.scib'], 3)}"
            f" | {verdict(r['check2'])} |"
        )
    return "\n".join(lines)


def log_to_mlflow(rows: list[dict], markdown: Path) -> None:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri(HERE.parent)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=ensure_experiment(uri, "fidelity"))
    for r in rows:
        with mlflow.start_run(run_name=f"scvi-fidelity-{r['dataset']}"):
            mlflow.log_params({"dataset": r["dataset"], "seeds": ",".join(map(str, r["seeds"])), "scvi_tools": "1.4.2"})
            metrics = {}
            for key in ("scvi-tools.neg_elbo", "atlasvi.neg_elbo", "scvi-tools.scib", "atlasvi.scib"):
                if r[key] is not None:
                    name = key.replace("scvi-tools", "scvi_tools")
                    metrics[f"{name}.mean"], metrics[f"{name}.sd"] = r[key]
            metrics["check1_met"] = float(r["check1"])
            if r["check2"] is not None:
                metrics["check2_met"] = float(r["check2"])
            mlflow.log_metrics(metrics)
            mlflow.log_artifact(str(markdown))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["cellbench", "kang"])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "fidelity_table.md")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument(
        "--scvi-tools-from", type=Path, help="reuse the scvi-tools mean ± sd of this fidelity_table.json"
    )
    parser.add_argument("--reuse", nargs="+", help="the datasets whose scvi-tools side to reuse (default: all)")
    args = parser.parse_args()
    if args.reuse and not args.scvi_tools_from:
        raise SystemExit("--reuse needs --scvi-tools-from (the table whose scvi-tools side to reuse)")
    committed = committed_scvi_tools(args.scvi_tools_from) if args.scvi_tools_from else {}
    reuse = (args.reuse or args.datasets) if args.scvi_tools_from else []
    if absent := [d for d in reuse if d not in committed]:
        raise SystemExit(f"{args.scvi_tools_from}: no scvi-tools figures for {absent}")
    rows = [summarise(d, f) for d in args.datasets if (f := collect(d, committed.get(d) if d in reuse else None))]
    if not rows:
        raise SystemExit("no results yet: run scvi_reference.py and fidelity.py first (benchmarks/README.md)")
    markdown = table(rows)
    print(markdown)
    args.out.write_text(markdown + "\n")
    (args.out.with_suffix(".json")).write_text(json.dumps(rows, indent=1))
    if not args.no_mlflow:
        log_to_mlflow(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
