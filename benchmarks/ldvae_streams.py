"""LDVAE on Kang: how held-out -ELBOs spread over training streams from fixed initial weights, atlasvi vs scvi-tools.

    python benchmarks/ldvae_streams.py --inits 3 2 0 --streams 100 101 --max-epochs 200 --n-epochs-kl-warmup 50

The setup is benchmarks/ldvae_fidelity.py's `none` (Kang, no batch covariate, 1400 training / 156 held-out cells,
the LDVAE defaults). An init is atlasvi's initial weights of that seed (torch seed, then `LDVAEModule`); both tools
start from them. A stream is everything random in training: atlasvi's loader and `fit` seed (minibatch order,
dropout, latent draws), scvi-tools' `scvi.settings.seed` set after the weights are loaded. Each (init, stream)
trains once in each tool. Per run: the held-out -ELBO per cell (one draw: atlasvi's last epoch record, scvi-tools'
`get_elbo`) and its mean over 10 seeded draws, and each tool's trained weights scored by the other tool's evaluation
(atlasvi's weights by scvi-tools' `get_elbo`, scvi-tools' by atlasvi's `evaluate`, as many draws), so a gap is not the
evaluation. Rows of results/ldvae_paired.json (the init's own stream: atlasvi loader and fit seed = the init's seed,
scvi-tools seeded before building its model) are added for these inits as stream "own".

Reported per tool: mean, s.e., median, the runs above TAIL nats, the spread within an init (over streams) and
between inits; Fisher's exact test of the runs above TAIL. Each run is cached under
benchmarks/.cache/ldvae_fidelity/streams/; writes results/ldvae_streams.{json,md} after every run.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.ldvae_fidelity import (
    DRAWS,
    HERE,
    SCVI_PYTHON,
    WORK,
    atlasvi_side,
    cross_evaluate,
    heldout_file,
    stores,
)

TAIL = 1275.0  # a "bad" run: held-out -ELBO above this (issue 18: atlasvi 4 of 15 seeds, scvi-tools 0 of 21)
FOLDER = WORK / "streams"
TOOLS = ("atlasvi", "scvi-tools")


def one_run(tool: str, init: int, stream: int, train: Path, heldout: Path, args: argparse.Namespace) -> dict | None:
    """One tool's run from init's weights with the stream's seed (cached; atlasvi's first: it writes the weights);
    None for a run not cached with --report-only."""
    out = FOLDER / f"stream{stream}"
    out.mkdir(parents=True, exist_ok=True)
    cached = out / f"{tool}_init{init}_e{args.max_epochs}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    if args.report_only:
        return None
    start_from = FOLDER / f"init_seed{init}.pt"
    trained = out / f"atlasvi_trained_init{init}.pt"
    load = "load average at start " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    if tool == "atlasvi":
        figures = atlasvi_side(train, heldout, init, out, args, init=start_from, stream=stream, trained=trained)
    else:
        command = [
            str(SCVI_PYTHON), str(HERE / "ldvae_fidelity.py"), "--side", "scvi", "--seed", str(init),
            "--train", str(train), "--heldout", str(heldout), "--out", str(out), "--max-epochs", str(args.max_epochs),
            "--n-epochs-kl-warmup", str(args.n_epochs_kl_warmup), "--batch-size", str(args.batch_size),
            "--batch-key", "none", "--init", str(start_from), "--stream", str(stream), "--score", str(trained),
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
        done = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        figures["neg_elbo_draws_atlasvi_eval"] = cross_evaluate(train, heldout, out / f"scvi_state_seed{init}.pt")
    row = {"tool": tool, "init": init, "stream": stream, "load": load, "command": args.command} | figures
    cached.write_text(json.dumps(row))
    return row


def own_stream_rows(inits: list[int], max_epochs: int) -> list[dict]:
    """The committed runs of results/ldvae_paired.json (no batch covariate) of these inits, as stream "own"."""
    path = HERE / "results" / "ldvae_paired.json"
    paired = json.loads(path.read_text())
    if paired["max_epochs"] != max_epochs:
        return []
    keys = ("tool", "neg_elbo", "neg_elbo_draws", "neg_elbo_draws_atlasvi_eval", "train_seconds", "load", "command")
    return [
        {k: r[k] for k in keys if k in r} | {"init": r["seed"], "stream": "own"}
        for r in paired["configs"]["none"]["runs"]
        if r["seed"] in inits
    ]


def earlier_tails(max_epochs: int) -> dict:
    """The runs above TAIL in the committed runs of as many epochs (results/ldvae_fidelity.json: each tool from its
    own weights, batch `sample` and none; results/ldvae_paired.json: both from atlasvi's weights, none), per file,
    setup and tool, and pooled per tool with Fisher's exact test; ldvae_paired's atlasvi runs repeat ldvae_fidelity's
    (the same weights and stream) and are left out."""
    from scipy.stats import fisher_exact

    groups, pooled = [], {tool: [0, 0] for tool in TOOLS}
    for name in ("ldvae_fidelity", "ldvae_paired"):
        result = json.loads((HERE / "results" / f"{name}.json").read_text())
        if result["max_epochs"] != max_epochs:
            continue
        for config, part in result["configs"].items():
            for tool in TOOLS:
                if name == "ldvae_paired" and tool == "atlasvi":
                    continue  # the same (init, stream) as ldvae_fidelity's atlasvi seeds 0-5: repeats, not new draws
                elbo = np.array([r["neg_elbo"] for r in part["runs"] if r["tool"] == tool])
                above = int((elbo > TAIL).sum())
                groups.append({"file": name, "config": config, "tool": tool, "runs": len(elbo), "above": above})
                pooled[tool][0] += above
                pooled[tool][1] += len(elbo) - above
    return {"groups": groups, "pooled": pooled, "fisher_p": float(fisher_exact(list(pooled.values())).pvalue)}


def summary(rows: list[dict]) -> dict:
    """Per tool: the -ELBO's mean, s.e., median, max, runs above TAIL, the sd within an init (pooled over inits) and
    of the init means; Fisher's exact test of above-TAIL counts; the evaluation cross-checks; per (init, stream)
    atlasvi - scvi-tools."""
    from scipy.stats import fisher_exact

    out: dict = {}
    for tool in TOOLS:
        mine = [r for r in rows if r["tool"] == tool]
        elbo = np.array([r["neg_elbo"] for r in mine])
        inits = sorted({r["init"] for r in mine})
        per_init = {i: np.array([r["neg_elbo"] for r in mine if r["init"] == i]) for i in inits}
        within = [v - v.mean() for v in per_init.values() if len(v) > 1]
        dof = sum(len(v) - 1 for v in within)
        out[tool] = {
            "runs": len(elbo),
            "mean": float(elbo.mean()),
            "se": float(elbo.std(ddof=1) / np.sqrt(len(elbo))) if len(elbo) > 1 else 0.0,
            "median": float(np.median(elbo)),
            "max": float(elbo.max()),
            "above_tail": int((elbo > TAIL).sum()),
            "sd_within_init": float(np.sqrt(sum((v**2).sum() for v in within) / dof)) if dof else 0.0,
            "sd_of_init_means": float(np.std([v.mean() for v in per_init.values()], ddof=1)) if len(inits) > 1 else 0.0,
            "per_init": {str(i): v.tolist() for i, v in per_init.items()},
        }
    a, s = out["atlasvi"], out["scvi-tools"]
    table = [[a["above_tail"], a["runs"] - a["above_tail"]], [s["above_tail"], s["runs"] - s["above_tail"]]]
    out["fisher_p_above_tail"] = float(fisher_exact(table).pvalue)
    out["mean_difference"] = a["mean"] - s["mean"]
    out["mean_difference_se"] = float(np.hypot(a["se"], s["se"]))
    by = {(r["tool"], r["init"], str(r["stream"])): r for r in rows}
    pairs = [(i, st) for t, i, st in by if t == "atlasvi" and ("scvi-tools", i, st) in by]
    diff = np.array([by["atlasvi", i, st]["neg_elbo"] - by["scvi-tools", i, st]["neg_elbo"] for i, st in pairs])
    out["paired"] = {
        "n": len(diff),
        "mean": float(diff.mean()) if len(diff) else 0.0,
        "se": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0,
    }
    out["new_streams"] = {}  # the streams drawn here: the inits were picked for atlasvi's bad "own" runs
    for tool in TOOLS:
        elbo = np.array([r["neg_elbo"] for r in rows if r["tool"] == tool and r["stream"] != "own"])
        if len(elbo):
            se = float(elbo.std(ddof=1) / np.sqrt(len(elbo))) if len(elbo) > 1 else 0.0
            out["new_streams"][tool] = {"runs": len(elbo), "mean": float(elbo.mean()), "se": se}
            out["new_streams"][tool]["above_tail"] = int((elbo > TAIL).sum())
    scored = [r for r in rows if "atlasvi_weights_scvi_eval" in r]
    matched = [(r, by.get(("atlasvi", r["init"], str(r["stream"])))) for r in scored]
    gaps = [abs(r["atlasvi_weights_scvi_eval"] - a_row["neg_elbo_draws"]) for r, a_row in matched if a_row]
    out["atlasvi_weights_in_scvi_tools_max_abs_diff"] = float(max(gaps)) if gaps else None
    crossed = [
        abs(r["neg_elbo_draws_atlasvi_eval"] - r["neg_elbo_draws"]) for r in rows if "neg_elbo_draws_atlasvi_eval" in r
    ]
    out["scvi_tools_weights_in_atlasvi_max_abs_diff"] = float(max(crossed)) if crossed else None
    return out


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [
        "# LDVAE on Kang: held-out -ELBO over training streams from fixed initial weights, atlasvi vs scvi-tools",
        "",
        "Commands (each row's is in the JSON): "
        + "; ".join(f"`{c}`" for c in dict.fromkeys(r.get("command", "") for r in result["runs"]))
        + f". Machine: {result['machine']}; each row's load average at its start is in "
        f"the JSON ({result['load_range']}). Setup: benchmarks/ldvae_fidelity.py's `none` (no batch covariate), "
        f"{result['max_epochs']} epochs, KL warm-up {result['n_epochs_kl_warmup']} epochs, batch size "
        f"{result['batch_size']}; design in benchmarks/ldvae_streams.py's docstring. Init: atlasvi's initial weights "
        "of that seed, in both tools. Stream: the seed of everything random in training (atlasvi: loader and fit "
        "seed; scvi-tools: `scvi.settings.seed` after the weights are loaded); 'own': the committed "
        "results/ldvae_paired.json run of that seed.",
        "",
        f"| init | stream | atlasvi | scvi-tools | atlasvi - scvi-tools | atlasvi's weights, scvi-tools' `get_elbo` "
        f"({DRAWS} draws) vs atlasvi's ({DRAWS} draws) | scvi-tools' weights, atlasvi's evaluation vs scvi-tools' |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {(r["tool"], r["init"], str(r["stream"])): r for r in result["runs"]}
    keys = sorted({(r["init"], str(r["stream"])) for r in result["runs"]}, key=lambda k: (k[0], k[1] != "own", k[1]))
    for init, stream in keys:
        a, t = by.get(("atlasvi", init, stream)), by.get(("scvi-tools", init, stream))
        cells = [f"{a['neg_elbo']:.2f}" if a else "-", f"{t['neg_elbo']:.2f}" if t else "-"]
        cells.append(f"{a['neg_elbo'] - t['neg_elbo']:+.2f}" if a and t else "-")
        cells.append(
            f"{t['atlasvi_weights_scvi_eval']:.2f} vs {a['neg_elbo_draws']:.2f}"
            if a and t and "atlasvi_weights_scvi_eval" in t
            else "-"
        )
        cells.append(
            f"{t['neg_elbo_draws_atlasvi_eval']:.2f} vs {t['neg_elbo_draws']:.2f}"
            if t and "neg_elbo_draws_atlasvi_eval" in t
            else "-"
        )
        lines.append(f"| {init} | {stream} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"| tool | runs | mean ± s.e. | median | max | above {TAIL:.0f} | sd within an init (over streams) | "
        "sd of the init means |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tool in TOOLS:
        t = s[tool]
        lines.append(
            f"| {tool} | {t['runs']} | {t['mean']:.2f} ± {t['se']:.2f} | {t['median']:.2f} | {t['max']:.2f} | "
            f"{t['above_tail']} | {t['sd_within_init']:.2f} | {t['sd_of_init_means']:.2f} |"
        )
    p = s["paired"]
    lines += [
        "",
        f"Means atlasvi - scvi-tools {s['mean_difference']:+.2f} ± {s['mean_difference_se']:.2f} nats per cell; "
        f"paired by init and stream label over {p['n']} pairs {p['mean']:+.2f} ± {p['se']:.2f} (one label's two "
        f"streams are independent draws, one per tool). Runs above {TAIL:.0f}: Fisher's exact test p = "
        f"{s['fisher_p_above_tail']:.2f}. The inits were picked for atlasvi's bad 'own' runs; over the streams "
        "drawn here alone: "
        + "; ".join(
            f"{tool} {n['mean']:.2f} ± {n['se']:.2f} ({n['runs']} runs, {n['above_tail']} above {TAIL:.0f})"
            for tool, n in s["new_streams"].items()
        )
        + ".",
    ]
    if s["atlasvi_weights_in_scvi_tools_max_abs_diff"] is not None:
        lines[-1] += (
            f" Evaluation: atlasvi's trained weights scored by scvi-tools' `get_elbo` are within "
            f"{s['atlasvi_weights_in_scvi_tools_max_abs_diff']:.2f} nats per cell of atlasvi's own evaluation, "
            f"scvi-tools' weights scored by atlasvi within {s['scvi_tools_weights_in_atlasvi_max_abs_diff']:.2f} of "
            f"scvi-tools' (means of {DRAWS} seeded draws each)."
        )
    e = result["earlier"]
    shown = "; ".join(f"{g['file']} `{g['config']}` {g['tool']} {g['above']} of {g['runs']}" for g in e["groups"])
    lines += [
        "",
        f"Earlier committed runs of {result['max_epochs']} epochs above {TAIL:.0f} (each its init's own stream): "
        f"{shown}. Pooled: atlasvi {e['pooled']['atlasvi'][0]} of {sum(e['pooled']['atlasvi'])}, scvi-tools "
        f"{e['pooled']['scvi-tools'][0]} of {sum(e['pooled']['scvi-tools'])} (Fisher's exact test p = "
        f"{e['fisher_p']:.2f}; ldvae_paired's atlasvi runs, repeats of ldvae_fidelity's seeds 0-5, left out).",
    ]
    return "\n".join(lines) + "\n"


def write(rows: list[dict], args: argparse.Namespace) -> str:
    loads = [float(r["load"].split()[-3]) for r in rows if r.get("load", "").startswith("load average")]
    result = {
        "command": args.command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), CPU only, 1 torch thread",
        "load_range": f"1-minute load {min(loads):.1f}-{max(loads):.1f}" if loads else "",
        "max_epochs": args.max_epochs,
        "n_epochs_kl_warmup": args.n_epochs_kl_warmup,
        "batch_size": args.batch_size,
        "tail": TAIL,
        "runs": rows,
        "summary": summary(rows) if {r["tool"] for r in rows} == set(TOOLS) else {},
        "earlier": earlier_tails(args.max_epochs),
    }
    results = HERE / "results"
    (results / "ldvae_streams.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result) if result["summary"] else ""
    (results / "ldvae_streams.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inits", type=int, nargs="+", default=[3, 2, 0])
    parser.add_argument("--streams", type=int, nargs="+", default=[100, 101])
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--n-epochs-kl-warmup", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--report-only", action="store_true", help="write the results of the cached runs, run none")
    args = parser.parse_args()
    args.command = "python benchmarks/ldvae_streams.py " + " ".join(sys.argv[1:])
    args.nb_formula = "atlasvi"  # atlasvi_side's option: atlasvi's own NB
    import torch

    torch.set_num_threads(1)
    heldout_file()
    train, heldout = stores("none", HERE / ".cache" / "fidelity" / "kang")
    rows = own_stream_rows(args.inits, args.max_epochs)
    for stream in args.streams:
        for init in args.inits:
            for tool in TOOLS:
                row = one_run(tool, init, stream, train, heldout, args)
                if row is not None:
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    write(rows, args)
    print(write(rows, args))


if __name__ == "__main__":
    main()
