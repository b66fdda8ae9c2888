"""The GPU check of issue 21: one table of scVI training on one GPU (run by `benchmarks/gpu_check.sh`).

    bash benchmarks/gpu_check.sh                        # on a machine with a CUDA GPU
    GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh    # tiny sizes on CPU: every step runs, no figure means anything

Rows, each its own process (`resident_speed.worker`: scVI with scvi-tools' defaults, `make_loaders` on the store's
seeded 90/10 split, `fit`), batch GPU_CHECK_BATCH (1024):
- atlasvi resident and streaming at 2,000 genes (the BASE-cell store) and at 8,000 genes (a BASE/4-cell store):
  cells/s = median over the epochs after the first; peak GPU memory (torch.cuda.max_memory_allocated);
- bf16 (TrainConfig.amp, the default on CUDA) against fp32: the held-out -ELBO after the same epochs, same seed;
- scvi-tools 1.4.2 (`scvi_tools_side.py` in the scvi-tools venv, its torch must see the GPU) on the same training
  rows, batch and epochs: the ratio atlasvi resident / scvi-tools;
- 1M cells x 20 epochs, resident: wall time of `make_loaders` + `fit` (held-out evaluation included). The 1M-cell
  store holds the BASE synthetic cells repeated (generating 1M cells would take most of the time budget).
Stores are generated (`atlasvi.bench.synthetic`, fitted to Kang, 8% non-zeros) and built once, cached in
GPU_CHECK_CACHE (benchmarks/.cache). Sizes: GPU_CHECK_BASE_CELLS (100,000), GPU_CHECK_BIG_CELLS (1,000,000),
GPU_CHECK_EPOCHS (5), GPU_CHECK_BIG_EPOCHS (20). Writes the table and the runs to GPU_CHECK_OUT
(benchmarks/results/gpu_check.{md,json}; a dry run: benchmarks/.cache/gpu_check_dry_run.{md,json}).
"""

import json
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import anndata as ad

sys.path.insert(0, str(Path(__file__).resolve().parent))
import resident_speed

from atlasvi.bench.perf import run_child
from atlasvi.bench.synthetic import make_synthetic_h5ad
from atlasvi.data import BuildConfig, build_store
from atlasvi.data.store import read_store_attrs

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCVI_PYTHON = HERE / ".cache" / "scvi-venv" / "bin" / "python"


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def settings() -> dict:
    """Sizes and paths from the environment; GPU_CHECK_DRY_RUN=1 shrinks everything and runs on CPU."""
    dry = os.environ.get("GPU_CHECK_DRY_RUN", "0") not in ("", "0")
    cache = Path(os.environ.get("GPU_CHECK_CACHE", HERE / ".cache"))
    out = HERE / ".cache" / "gpu_check_dry_run" if dry else HERE / "results" / "gpu_check"
    return {
        "dry_run": dry,
        "device": "cpu" if dry else "cuda",
        "base_cells": _env_int("GPU_CHECK_BASE_CELLS", 1500 if dry else 100_000),
        "big_cells": _env_int("GPU_CHECK_BIG_CELLS", 3000 if dry else 1_000_000),
        "genes": (1200, 2400) if dry else (2000, 8000),
        "batch_size": _env_int("GPU_CHECK_BATCH", 256 if dry else 1024),
        "epochs": _env_int("GPU_CHECK_EPOCHS", 2 if dry else 5),
        "big_epochs": _env_int("GPU_CHECK_BIG_EPOCHS", 2 if dry else 20),
        "threads": 1 if dry else max(1, (os.cpu_count() or 2) - 2),
        "cache": cache,
        "out": Path(os.environ.get("GPU_CHECK_OUT", out)),
        "reference": Path(os.environ.get("GPU_CHECK_REFERENCE", resident_speed.REFERENCE)),
    }


def _store(h5ad: Path, n_cells: int, n_genes: int) -> Path:
    """The store of `h5ad` (n_cells x n_genes), built unless a store of it is cached."""
    store = h5ad.with_suffix(".zarr")
    try:
        inputs = read_store_attrs(store)["provenance"]["inputs"]
        if inputs[0]["n_cells"] == n_cells and read_store_attrs(store)["n_genes"] == n_genes:
            return store
    except Exception:  # noqa: BLE001 - no usable cached store: build it
        pass
    config = BuildConfig(
        inputs=[str(h5ad)], output=str(store), batch_key="batch", labels_key="cell_type", overwrite=True
    )  # every gene, no HVG pass
    return build_store(config)


def stores(s: dict, log) -> dict[str, Path]:
    """Stores: "base" BASE cells x 2,000 genes, "wide" BASE/4 x 8,000, "big" BIG cells (the base ones repeated)."""
    s["cache"].mkdir(parents=True, exist_ok=True)
    small, wide = s["genes"]
    made = {}
    for name, n_cells, n_genes in (("base", s["base_cells"], small), ("wide", s["base_cells"] // 4, wide)):
        h5ad = s["cache"] / f"gpu_check_{n_cells}x{n_genes}.h5ad"
        if not h5ad.exists():
            log(f"generating {n_cells:,} synthetic cells x {n_genes} genes")
            make_synthetic_h5ad(h5ad, n_cells, n_genes, 0, reference=s["reference"])
        log(f"building the {name} store")
        made[name] = _store(h5ad, n_cells, n_genes)
    big = s["cache"] / f"gpu_check_{s['big_cells']}x{small}_repeated.h5ad"
    if not big.exists():
        log(f"writing {s['big_cells']:,} cells: the {s['base_cells']:,} base cells repeated")
        base = ad.read_h5ad(made["base"].parent / f"gpu_check_{s['base_cells']}x{small}.h5ad")
        copies = -(-s["big_cells"] // base.n_obs)
        tiled = ad.concat([base] * copies, index_unique="-", keys=[str(i) for i in range(copies)])[: s["big_cells"]]
        tiled.obs = tiled.obs[["cell_type", "batch"]]
        tiled.write_h5ad(big.with_suffix(".partial.h5ad"))
        os.replace(big.with_suffix(".partial.h5ad"), big)
    log("building the big store")
    made["big"] = _store(big, s["big_cells"], small)
    return made


def scvi_tools_row(s: dict, store: Path, train_cells: int, log) -> dict:
    """scvi-tools' SCVI on the store's training rows in its own venv, on the GPU (a reason instead, where it cannot)."""
    if not SCVI_PYTHON.exists():
        return {"skipped": "no scvi-tools venv at benchmarks/.cache/scvi-venv (bash benchmarks/setup_scvi_venv.sh)"}
    if s["device"] == "cuda":
        probe, _, _ = run_child(
            [str(SCVI_PYTHON), "-c", "import json, torch; print(json.dumps(torch.cuda.is_available()))"], os.environ
        )
        if not probe:
            return {"skipped": "the scvi-tools venv's torch is a CPU build (see gpu_check.sh for a CUDA one)"}
    spec = {"store": str(store), "n_train": train_cells, "batch_size": s["batch_size"], "epochs": s["epochs"],
            "threads": s["threads"], "seed": 0, "batch_key": "batch", "n_hidden": 128, "n_latent": 10, "n_layers": 1,
            "n_epochs_kl_warmup": 400, "use_gpu": s["device"] == "cuda"}  # fmt: skip
    log("scvi-tools on the base store")
    env = os.environ | {"OMP_NUM_THREADS": str(s["threads"])}
    result, rss, seconds = run_child([str(SCVI_PYTHON), str(HERE / "scvi_tools_side.py"), json.dumps(spec)], env)
    epochs = sorted(result["epoch_s"][1:] or result["epoch_s"])
    result["cells_per_s"] = result["train_cells"] / epochs[len(epochs) // 2]
    return result


def run(s: dict) -> dict:
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    made = stores(s, log)
    spec = {"batch_size": s["batch_size"], "device": s["device"], "threads": s["threads"], "seed": 0}
    rows = []
    plan = [
        ("resident bf16", "base", True, True, s["epochs"]),
        ("resident fp32", "base", True, False, s["epochs"]),
        ("streaming bf16", "base", False, True, s["epochs"]),
        ("resident bf16", "wide", True, True, s["epochs"]),
        ("streaming bf16", "wide", False, True, s["epochs"]),
    ]
    for label, store, resident, amp, epochs in plan:
        log(f"atlasvi {label} on the {store} store")
        result = resident_speed.run_worker(
            spec | {"store": str(made[store]), "resident": resident, "amp": amp, "epochs": epochs}
        )
        result.pop("step_losses")
        rows.append({"row": f"atlasvi {label}", "store": store} | result)
    scvi = scvi_tools_row(s, made["base"], rows[0]["train_cells"], log)
    rows.append({"row": "scvi-tools 1.4.2", "store": "base"} | scvi)
    log(f"atlasvi resident bf16, {s['big_cells']:,} cells x {s['big_epochs']} epochs")
    result = resident_speed.run_worker(
        spec | {"store": str(made["big"]), "resident": True, "amp": True, "epochs": s["big_epochs"]}
    )
    rows.append({"row": f"atlasvi resident bf16, {s['big_epochs']} epochs", "store": "big"} | result)
    rows[-1].pop("step_losses")
    log("done")
    attrs = {name: read_store_attrs(path) for name, path in made.items()}
    shapes = {name: (a["n_cells"], a["n_genes"]) for name, a in attrs.items()}
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in s.items()},
        "shapes": shapes,
        "rows": rows,
        "total_s": time.perf_counter() - started,
        "machine": {"node": platform.node(), "cpus": os.cpu_count(), "torch": version("torch")},
    }


def table(report: dict) -> str:
    """The one table (markdown)."""
    s, shapes, rows = report["settings"], report["shapes"], report["rows"]
    device = next((r["device"] for r in rows if r.get("device")), "?")
    lines = [
        f"# GPU check{' (DRY RUN on CPU: tiny sizes, the figures mean nothing)' if s['dry_run'] else ''}",
        "",
        f"device: {device}; batch {s['batch_size']}; torch {report['machine']['torch']}; "
        f"total {report['total_s']:.0f} s (stores included)",
        "",
        "| row | cells x genes | epochs | cells/s | peak GPU MiB | held-out -ELBO | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n, g = shapes[r["store"]]
        if "skipped" in r:
            lines.append(f"| {r['row']} | {n:,} x {g} | | not run: {r['skipped']} | | | |")
            continue
        epochs = len(r["epoch_s"])
        peak = f"{r['peak_gpu_mb']:.0f}" if r.get("peak_gpu_mb") is not None else "-"
        elbo = f"{r['validation_elbo']:.2f}" if "validation_elbo" in r else "-"
        speed, wall = f"{r['cells_per_s']:,.0f}", f"{r['wall_s']:.1f}"
        lines.append(f"| {r['row']} | {n:,} x {g} | {epochs} | {speed} | {peak} | {elbo} | {wall} |")
    by = {(r["row"], r["store"]): r for r in rows}
    bf16, fp32 = by[("atlasvi resident bf16", "base")], by[("atlasvi resident fp32", "base")]
    scvi = by[("scvi-tools 1.4.2", "base")]

    def ratio(store: str) -> float:
        resident, streaming = by[("atlasvi resident bf16", store)], by[("atlasvi streaming bf16", store)]
        return resident["cells_per_s"] / streaming["cells_per_s"]

    lines += [
        "",
        f"- bf16 vs fp32 held-out -ELBO: {bf16['validation_elbo']:.2f} vs {fp32['validation_elbo']:.2f} "
        f"({(bf16['validation_elbo'] / fp32['validation_elbo'] - 1) * 100:+.2f}%)",
        f"- resident / streaming cells/s: {ratio('base'):.2f} at {shapes['base'][1]} genes, "
        f"{ratio('wide'):.2f} at {shapes['wide'][1]} genes",
        "- atlasvi resident / scvi-tools cells/s: "
        + (f"{bf16['cells_per_s'] / scvi['cells_per_s']:.1f}x" if "skipped" not in scvi else "not measured"),
    ]
    big = rows[-1]
    lines.append(
        f"- {shapes['big'][0]:,} cells x {len(big['epoch_s'])} epochs: {big['wall_s']:.1f} s wall (loading the rows "
        f"{big['loaders_s']:.1f} s, training epochs {sum(big['epoch_s']):.1f} s)"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    s = settings()
    if s["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run it on a GPU machine, or GPU_CHECK_DRY_RUN=1 for the CPU dry run")
    report = run(s)
    s["out"].parent.mkdir(parents=True, exist_ok=True)
    s["out"].with_suffix(".json").write_text(json.dumps(report, indent=1))
    text = table(report)
    s["out"].with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
