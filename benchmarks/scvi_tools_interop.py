"""scvi-tools interoperability at atlas scale, through the CLI: a 20,000-cell synthetic store, trained, exported,
loaded by scvi-tools 1.4.2, imported back, a scvi-tools trained model imported, and a query mapped onto an import.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/scvi_tools_interop.py [--cells 20000] [--genes 2000] [--epochs 10]

Synthetic counts (`atlasvi.bench.make_synthetic_h5ad`, Kang-shaped, 4 batches, seed 0): batches 0-2 are the reference
store, batch 3 the query store (no labels, built with `--genes` of the reference model). Steps, each a command timed
on its own (wall seconds, start-up included): build; `atlasvi train` scVI and scANVI (from the scVI); `atlasvi export
--to scvi-tools`; `scvi.model.SCVI.load` / `SCANVI.load` on `anndata.read_zarr(store)` in the scvi-tools venv
(benchmarks/.cache/scvi-venv): latent and normalized expression (z at the posterior mean) against atlasvi's;
`atlasvi import` of each export: latent against the original; scvi-tools' own SCVI trained on the reference cells
(a few epochs), saved, `atlasvi import`ed: latent against scvi-tools'; `atlasvi map-query --reference` the imported
scANVI. Output: results/scvi_tools_interop.{json,md}.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".cache" / "scvi_tools_interop"
SCVI_PYTHON = HERE / ".cache" / "scvi-venv" / "bin" / "python"
KANG = ROOT.parent / "shared" / "data" / "kang2018_pbmc_ifnb_muscat.h5ad"
ENV = os.environ | {
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": str(ROOT),
    "MLFLOW_TRACKING_URI": f"sqlite:///{WORK}/mlflow.db",
}

SCVI_SIDE = """
import sys, time, numpy as np, anndata as ad, torch, scvi
from torch.distributions import Normal
torch.set_num_threads(1)
step, folder, store = sys.argv[1], sys.argv[2], sys.argv[3]
adata = ad.read_zarr(store)
if step == "train":  # scvi-tools' own SCVI on the store's cells, saved in its format
    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    model = scvi.model.SCVI(adata)
    model.train(max_epochs=int(sys.argv[4]), accelerator="cpu", enable_progress_bar=False)
    model.save(folder, overwrite=True)
else:
    start = time.perf_counter()
    model = getattr(scvi.model, step).load(folder, adata, accelerator="cpu")
    loaded = time.perf_counter() - start
    np.save(folder + "/scvi_tools_latent.npy", model.get_latent_representation())
    mean = lambda self, sample_shape=torch.Size(): self.loc.expand(torch.Size(sample_shape) + self.loc.shape)
    Normal.sample = Normal.rsample = mean
    rows = np.arange(2000)
    normalized = model.get_normalized_expression(adata, indices=rows, return_numpy=True)
    np.save(folder + "/scvi_tools_normalized.npy", np.asarray(normalized, dtype=np.float32))
    print(f"load_seconds={loaded:.2f}")
"""


def run(name: str, command: list[str], timings: dict) -> str:
    """Run a command, timing it (wall seconds); its output is kept in WORK/NAME.log."""
    start = time.perf_counter()
    result = subprocess.run(command, env=ENV, cwd=WORK, capture_output=True, text=True)
    timings[name] = round(time.perf_counter() - start, 1)
    (WORK / f"{name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed ({result.returncode}): see {WORK / f'{name}.log'}")
    print(f"{name}: {timings[name]} s", file=sys.stderr)
    return result.stdout + result.stderr


def atlasvi(*args: str) -> list[str]:
    return [str(ROOT / ".venv" / "bin" / "atlasvi"), *args]


def latent_of(model_dir: Path, store: Path, rows: int | None = None):
    """atlasvi's latent (store order) and normalized expression of the first `rows` cells at the posterior mean."""
    import torch

    from atlasvi.analysis.protocols import expression_scale
    from atlasvi.api import saved_model_class

    torch.set_num_threads(1)
    model = saved_model_class(model_dir).load(model_dir, store, device="cpu")
    latent = model.get_latent_representation()
    if rows is None:
        return latent, None
    module = model.module.eval()
    with torch.no_grad():
        (batch,) = list(model._batches(None, (0, rows), rows))
        inputs = module.unpack(batch)
        inference = module.inference(inputs)
        normalized = expression_scale(module, inputs, inference["qz"].loc, inference["library"], None).numpy()
    return latent, normalized


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=20000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    import anndata as ad

    from atlasvi.bench import make_synthetic_h5ad

    WORK.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    full = WORK / "synthetic.h5ad"
    make_synthetic_h5ad(full, args.cells, args.genes, seed=0, reference=KANG)
    adata = ad.read_h5ad(full)
    batches = sorted(adata.obs["batch"].astype(str).unique())
    adata[adata.obs["batch"].astype(str) != batches[-1]].copy().write_h5ad(WORK / "reference.h5ad")
    query = adata[adata.obs["batch"].astype(str) == batches[-1]].copy()
    query.obs = query.obs[["batch"]].assign(batch=lambda obs: "query_" + obs["batch"].astype(str))
    query.write_h5ad(WORK / "query.h5ad")
    n_reference = int((adata.obs["batch"].astype(str) != batches[-1]).sum())
    del adata
    build = ["build", "reference.h5ad", "-o", "reference.zarr", "--batch-key", "batch", "--labels-key", "cell_type"]
    run("build_reference", atlasvi(*build, "--overwrite"), timings)
    train = ["train", "--store", "reference.zarr", "--max-epochs", str(args.epochs), "--overwrite"]
    run("train_scvi", atlasvi(*train, "--output", "scvi"), timings)
    scanvi = ["--model", "scanvi", "--init-from", "scvi/model", "--max-epochs", "3", "--output", "scanvi"]
    run("train_scanvi", atlasvi(*train, *scanvi, "--latent-key", "X_scanvi"), timings)
    results: dict = {"cells": args.cells, "reference_cells": n_reference, "genes": args.genes, "epochs": args.epochs}
    for name, cls in (("scvi", "SCVI"), ("scanvi", "SCANVI")):
        exported = WORK / f"{name}_exported"
        run(f"export_{name}", atlasvi("export", "--model", f"{name}/model", "--to", "scvi-tools", str(exported),
                                      "--overwrite"), timings)  # fmt: skip
        out = run(f"scvi_tools_load_{name}", [str(SCVI_PYTHON), "-c", SCVI_SIDE, cls, str(exported),
                                              str(WORK / "reference.zarr")], timings)  # fmt: skip
        ours, normalized = latent_of(WORK / name / "model", WORK / "reference.zarr", rows=2000)
        theirs = np.load(exported / "scvi_tools_latent.npy")
        their_normalized = np.load(exported / "scvi_tools_normalized.npy")
        imported = WORK / f"{name}_imported"
        run(f"import_{name}", atlasvi("import", str(exported), "--store", "reference.zarr", "--output", str(imported),
                                      "--overwrite"), timings)  # fmt: skip
        back, _ = latent_of(imported, WORK / "reference.zarr")
        normalized_diff = float(np.abs(normalized - their_normalized).max())
        results[name] = {
            "export_then_scvi_tools_latent_max_abs_diff": float(np.abs(ours - theirs).max()),
            "export_then_scvi_tools_normalized_max_abs_diff_2000_cells": normalized_diff,
            "export_then_import_latent_max_abs_diff": float(np.abs(ours - back).max()),
            "scvi_tools_load_seconds": float(out.split("load_seconds=")[-1].split()[0]),
            "model_pt_bytes": (exported / "model.pt").stat().st_size,
        }  # fmt: skip
    theirs_dir = WORK / "scvi_tools_trained"
    run("scvi_tools_train", [str(SCVI_PYTHON), "-c", SCVI_SIDE, "train", str(theirs_dir), str(WORK / "reference.zarr"),
                             str(args.epochs)], timings)  # fmt: skip
    run("scvi_tools_latent", [str(SCVI_PYTHON), "-c", SCVI_SIDE, "SCVI", str(theirs_dir), str(WORK / "reference.zarr")],
        timings)  # fmt: skip
    run("import_scvi_tools_trained", atlasvi("import", str(theirs_dir), "--store", "reference.zarr", "--output",
                                             "scvi_tools_imported", "--overwrite"), timings)  # fmt: skip
    ours, _ = latent_of(WORK / "scvi_tools_imported", WORK / "reference.zarr")
    results["scvi_tools_trained_import_latent_max_abs_diff"] = float(
        np.abs(ours - np.load(theirs_dir / "scvi_tools_latent.npy")).max()
    )
    run("build_query", atlasvi("build", "query.h5ad", "-o", "query.zarr", "--batch-key", "batch", "--genes",
                               "scanvi_imported", "--overwrite"), timings)  # fmt: skip
    run("map_query_imported_scanvi", atlasvi("map-query", "--reference", "scanvi_imported", "--query", "query.zarr",
                                             "--max-epochs", "5", "--output", "query_model"), timings)  # fmt: skip
    query_latent = ad.read_zarr(WORK / "query.zarr").obsm["X_scanvi"]
    results["map_query"] = {"query_cells": int(query_latent.shape[0]), "finite": bool(np.isfinite(query_latent).all())}
    results["seconds"] = timings
    results["machine"] = "shared 2-core CPU VM, 1 torch thread per process, under other engineers' load"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "scvi_tools_interop.json").write_text(json.dumps(results, indent=1))
    (HERE / "results" / "scvi_tools_interop.md").write_text(_table(results))
    print(_table(results))


def _table(r: dict) -> str:
    lines = [
        f"# scvi-tools interoperability at atlas scale ({r['cells']} synthetic cells x {r['genes']} genes; "
        f"reference {r['reference_cells']} cells, {r['epochs']} scVI epochs)",
        "",
        "`PYTHONPATH=$PWD .venv/bin/python benchmarks/scvi_tools_interop.py`; " + r["machine"] + ".",
        "",
        "| model | atlasvi export -> scvi-tools load: latent max abs diff | normalized expr. (2000 cells) | "
        "export -> atlasvi import: latent | scvi-tools load (s) | model.pt (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("scvi", "scanvi"):
        m = r[name]
        lines.append(
            f"| {name.upper()} | {m['export_then_scvi_tools_latent_max_abs_diff']:.2e} | "
            f"{m['export_then_scvi_tools_normalized_max_abs_diff_2000_cells']:.2e} | "
            f"{m['export_then_import_latent_max_abs_diff']:.2e} | {m['scvi_tools_load_seconds']:.1f} | "
            f"{m['model_pt_bytes'] / 1e6:.1f} |"
        )
    lines += [
        "",
        f"scvi-tools' own SCVI ({r['epochs']} epochs on the reference cells) -> `atlasvi import`: latent max abs diff "
        f"{r['scvi_tools_trained_import_latent_max_abs_diff']:.2e}. `atlasvi map-query --reference` the imported "
        f"scANVI: {r['map_query']['query_cells']} query cells mapped (finite latent: {r['map_query']['finite']}).",
        "",
        "Wall seconds per command (start-up included):",
        "",
        "| step | s |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in r["seconds"].items()],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
