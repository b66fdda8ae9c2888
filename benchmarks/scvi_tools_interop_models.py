"""scvi-tools interoperability of LinearSCVI (ldvae), TOTALVI, PEAKVI, CondSCVI, SysVI, MULTIVI and DestVI through
the CLI, as a newcomer runs it, on
the real datasets in ../shared/data (the SCVI / SCANVI atlas-scale run is benchmarks/scvi_tools_interop.py).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/scvi_tools_interop_models.py [--epochs 10] [--models ldvae ...]

Per model: `atlasvi build`; `atlasvi train --model M`; `atlasvi export --to scvi-tools`; `scvi.model.<Class>.load`
on `anndata.read_zarr(store)` in the scvi-tools venv (benchmarks/.cache/scvi-venv): latent, and with z (totalVI: and
its log protein background) at the posterior mean the normalized expression (PEAKVI: accessibility; TOTALVI: also
protein), each against atlasvi's own; `atlasvi import` of the export: latent against scvi-tools'; scvi-tools' own
model of the class trained as many epochs on the same cells, saved, `atlasvi import`ed: latent and normalized
outputs against scvi-tools'. Data: ldvae on Kang 2018 PBMC (1556 cells x 1267 genes, batch sample, labels
cell_type); totalvi on 10x pbmc10k + pbmc5k CITE-seq (200 + 200 cells, 500 HVGs, 29 proteins of which pbmc10k
measured 14: scvi-tools' protein_batch_mask); peakvi on Granja 2019 scATAC (600 cells x 5000 peaks, batch Group);
condscvi on Kang (batch sample, labels cell_type); sysvi (scvi.external.SysVI) on Baron 2016 pancreas human + mouse
(328 cells, 1000 HVGs, system = batch species; scvi-tools reads X log1p(counts normalised to 1e4 per cell), atlasvi's
input, and its "normalized" is the decoder's mean: SysVI has no get_normalized_expression); multivi on sci-CAR A549
(2641 cells, its 1185 genes (--n-top-genes 2000 keeps all), the 5000 peaks open in most cells, batch
treatment_time_h; scvi-tools reads a MuData
of the store and its obsm["atac"]; "accessibility" its normalized accessibility); destvi on the RCTD human lymph node
Visium subset (1,000 spots) and its 330-cell reference (11 types, the 558 genes both share; destvi_fidelity.real):
`atlasvi train --model condscvi` on the reference, then `--model destvi --init-from` it on the spots, each
--epochs; scvi-tools' own CondSCVI (prior "normal") + DestVI.from_rna_model likewise; its "latent" column is the
proportions (get_proportions) and "normalized" the per-type states (get_gamma), every spot.
Output: results/scvi_tools_interop_models.{json,md}.
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
DATA = ROOT.parent / "shared" / "data"
WORK = HERE / ".cache" / "scvi_tools_interop_models"
SCVI_PYTHON = HERE / ".cache" / "scvi-venv" / "bin" / "python"
ENV = os.environ | {
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": str(ROOT),
    "MLFLOW_TRACKING_URI": f"sqlite:///{WORK}/mlflow.db",
}
MODELS = {  # atlasvi model -> (scvi-tools class, build arguments, scvi-tools setup_anndata arguments)
    "ldvae": (
        "LinearSCVI",
        [str(DATA / "kang2018_pbmc_ifnb_muscat.h5ad"), "--batch-key", "sample", "--labels-key", "cell_type"],
        {"batch_key": "sample", "labels_key": "cell_type"},
    ),
    "totalvi": (
        "TOTALVI",
        [
            str(DATA / "pbmc10k_protein_v3_subset200.h5ad"),
            str(DATA / "pbmc5k_protein_v3_subset200.h5ad"),
            "--protein-key",
            "protein_expression",
            "--n-top-genes",
            "500",
        ],
        {"protein_expression_obsm_key": "protein_expression"},
    ),  # fmt: skip
    "peakvi": (
        "PEAKVI",
        [str(DATA / "granja2019_bmmc_scatac_5kpeaks.h5ad"), "--batch-key", "Group"],
        {"batch_key": "Group"},
    ),
    "condscvi": (
        "CondSCVI",
        [str(DATA / "kang2018_pbmc_ifnb_muscat.h5ad"), "--batch-key", "sample", "--labels-key", "cell_type"],
        {"batch_key": "sample", "labels_key": "cell_type"},
    ),
    "sysvi": (
        "SysVI",
        [
            str(DATA / "baron2016_pancreas_human_mouse_subset350_cider.h5ad"),
            "--batch-key",
            "species",
            "--n-top-genes",
            "1000",
        ],
        {"batch_key": "species"},
    ),  # fmt: skip
    "multivi": (
        "MULTIVI",
        [
            str(WORK / "scicar_multiome.h5ad"),
            "--atac-key",
            "atac",
            "--batch-key",
            "treatment_time_h",
            "--n-top-genes",
            "2000",
        ],
        {"batch_key": "treatment_time_h"},
    ),  # fmt: skip
    "destvi": ("DestVI", [], {}),  # built in main: the lymph node reference's CondSCVI, then the spots
}

SCVI_SIDE = """
import json, sys, numpy as np, pandas as pd, anndata as ad, torch, scvi
from torch.distributions import Normal
torch.set_num_threads(1)
step, cls, folder, store = sys.argv[1:5]
adata = ad.read_zarr(store)
if cls == "MULTIVI":  # a MuData: the store's RNA and its peaks
    import mudata as md
    atac = ad.AnnData(adata.obsm["atac"], obs=adata.obs[[]].copy())
    atac.var_names = [str(p) for p in adata.uns["atac_names"]]
    adata = md.MuData({"rna": adata, "atac": atac})
if cls == "SysVI":  # its input: the counts log-normalised to 1e4 per cell (atlasvi's SysVI computes the same)
    counts = np.asarray(adata.X.todense(), dtype=np.float32)
    adata.X = np.log1p(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-12) * np.float32(1e4))
model_class = scvi.external.SysVI if cls == "SysVI" else getattr(scvi.model, cls)
if cls == "DestVI":
    if step == "train":  # scvi-tools' own CondSCVI on the reference, then DestVI from it on the spots
        scvi.settings.seed = 0
        reference = ad.read_h5ad(json.loads(sys.argv[6])["reference"])
        scvi.model.CondSCVI.setup_anndata(reference, labels_key="cell_type")
        sc_model = scvi.model.CondSCVI(reference, prior="normal")  # 1.4.2's from_rna_model reads "prior"
        sc_model.train(max_epochs=int(sys.argv[5]), accelerator="cpu", enable_progress_bar=False)
        vamp = type(sc_model).get_vamp_prior  # 1.4.2 returns numpy arrays; MRDeconv's buffers need tensors
        sc_model.get_vamp_prior = lambda *a, **k: {
            key: torch.as_tensor(v, dtype=torch.float32) for key, v in vamp(sc_model, *a, **k).items()}
        scvi.model.DestVI.setup_anndata(adata)
        model = scvi.model.DestVI.from_rna_model(adata, sc_model)
        model.train(max_epochs=int(sys.argv[5]), accelerator="cpu", enable_progress_bar=False)
        model.save(folder, overwrite=True)
    model = model_class.load(folder, adata, accelerator="cpu")
    np.save(folder + "/scvi_tools_proportions.npy", model.get_proportions().to_numpy())
    np.save(folder + "/scvi_tools_gamma.npy", model.get_gamma(return_numpy=True))
    sys.exit(0)
if step == "train":  # scvi-tools' own model on the store's cells, saved in its format
    scvi.settings.seed = 0
    setup = json.loads(sys.argv[6])
    if "protein_names" in setup:  # read_zarr gives a plain array: the antibodies' names as its DataFrame's columns
        names = setup.pop("protein_names")
        adata.obsm["protein_expression"] = pd.DataFrame(adata.obsm["protein_expression"], adata.obs_names, names)
    if cls == "MULTIVI":
        modalities = {"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"}
        model_class.setup_mudata(adata, modalities=modalities, **setup)
    else:
        model_class.setup_anndata(adata, **setup)
    model = model_class(adata)
    model.train(max_epochs=int(sys.argv[5]), accelerator="cpu", enable_progress_bar=False)
    model.save(folder, overwrite=True)
model = model_class.load(folder, adata, accelerator="cpu")
np.save(folder + "/scvi_tools_latent.npy", model.get_latent_representation())
Normal.sample = Normal.rsample = lambda self, shape=torch.Size(): self.loc.expand(torch.Size(shape) + self.loc.shape)
if cls == "PEAKVI":
    normalized = model.get_normalized_accessibility(adata, use_z_mean=True, return_numpy=True)
elif cls == "TOTALVI":
    normalized, protein = model.get_normalized_expression(adata, return_numpy=True)
    np.save(folder + "/scvi_tools_protein.npy", np.asarray(protein, dtype=np.float32))
elif cls == "MULTIVI":
    normalized = model.get_normalized_expression(adata, return_numpy=True)
    accessibility = model.get_normalized_accessibility(adata, return_numpy=True)
    np.save(folder + "/scvi_tools_accessibility.npy", np.asarray(accessibility, dtype=np.float32))
elif cls == "SysVI":  # the decoder's mean at the posterior mean
    module, system = model.module.eval(), torch.as_tensor(adata.obs["_scvi_batch"].to_numpy()).long().view(-1, 1)
    with torch.no_grad():
        qz = module.encoder(torch.as_tensor(adata.X), batch_index=system, cat_list=[])["q_dist"]
        normalized = module.decoder(qz.loc, batch_index=system, cat_list=[])["q_dist"].loc.numpy()
else:
    normalized = model.get_normalized_expression(adata, return_numpy=True)
np.save(folder + "/scvi_tools_normalized.npy", np.asarray(normalized, dtype=np.float32))
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


def outputs_of(model_dir: Path, store: Path) -> dict[str, np.ndarray]:
    """atlasvi's latent (store order) and, with z (and totalVI's log protein background) at the posterior mean, the
    normalized expression (px_scale; PEAKVI: accessibility; SysVI: the decoder's mean) and totalVI's protein
    expression, scvi-tools' defaults."""
    import torch
    from torch.distributions import Normal

    from atlasvi.api import saved_model_class

    torch.set_num_threads(1)
    model = saved_model_class(model_dir).load(model_dir, store, device="cpu")
    if model.method == "DestVI":  # no latent: its proportions and per-type states
        return {"proportions": model.get_proportions().to_numpy(), "gamma": model.get_gamma(return_numpy=True)}
    module, parts = model.module.eval(), {"normalized": [], "protein": [], "accessibility": []}
    rsample = Normal.rsample
    Normal.rsample = lambda self, shape=(): self.loc.expand(torch.Size(shape) + self.loc.shape)
    try:
        with torch.no_grad():
            for batch in model._batches(None, None, 1024):
                inputs = module.unpack(batch)
                inference = module.inference(inputs)
                if model.method == "SysVI":  # the decoder's mean
                    parts["normalized"].append(module.generative(inference["qz"].loc, inputs)["px"].loc.numpy())
                    continue
                out = module.generative(inference["qz"].loc, inference["library"], inputs)
                parts["normalized"].append(out["px_scale"].numpy())
                if model.method == "MULTIVI":
                    parts["accessibility"].append(out["p"].numpy())
                if "rate_fore" in out:
                    parts["protein"].append((out["rate_fore"] * torch.sigmoid(-out["mixing"])).numpy())
    finally:
        Normal.rsample = rsample
    return {"latent": model.get_latent_representation()} | {k: np.concatenate(v) for k, v in parts.items() if v}


def compare(ours: dict[str, np.ndarray], folder: Path) -> dict[str, float]:
    """Max abs difference of each output against scvi-tools' (folder/scvi_tools_<what>.npy)."""
    return {
        what: float(np.abs(values - np.load(folder / f"scvi_tools_{what}.npy")).max()) for what, values in ours.items()
    }


def _lymph_node() -> tuple[Path, Path]:
    """(reference h5ad, spots h5ad) of the RCTD human lymph node pair on the 558 genes both share (as
    benchmarks/destvi_fidelity.py builds them, every shared gene)."""
    sys.path.insert(0, str(HERE))
    from destvi_fidelity import real

    return real("lymph_node", WORK / "destvi", 100_000)


def _scicar_multiome(path: Path) -> None:
    """sci-CAR A549 in atlasvi's multiome layout: X the genes, obsm["atac"] the 5000 peaks open in most cells (CSR,
    names in uns["atac_names"]), batch treatment_time_h."""
    import anndata as ad
    import scipy.sparse as sp

    if path.exists():
        return
    full = ad.read_h5ad(DATA / "scicar_a549_multivi_concat_scai.h5ad")
    genes = (full.var["modality"] == "Gene Expression").to_numpy()
    peaks = sp.csr_matrix(full.X[:, ~genes])
    top = np.sort(np.argsort(-np.asarray((peaks > 0).sum(axis=0)).ravel(), kind="stable")[:5000])
    adata = ad.AnnData(sp.csr_matrix(full.X[:, genes]), obs=full.obs[["treatment_time_h"]].astype(str))
    adata.var_names = full.var_names[genes]
    adata.obsm["atac"] = peaks[:, top]
    adata.uns["atac_names"] = np.asarray(full.var_names[~genes][top], dtype=str)
    adata.write_h5ad(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    from atlasvi.data import open_store

    WORK.mkdir(parents=True, exist_ok=True)
    if "multivi" in args.models:
        _scicar_multiome(WORK / "scicar_multiome.h5ad")
    previous = HERE / "results" / "scvi_tools_interop_models.json"
    results: dict = {"epochs": args.epochs}
    if previous.exists():  # the models not run again keep their rows (when run with as many epochs)
        kept = json.loads(previous.read_text())
        results |= {k: v for k, v in kept.items() if k in MODELS and kept["epochs"] == args.epochs}
    for name in args.models:
        cls, build, setup = MODELS[name]
        timings: dict[str, float] = {}
        store = WORK / f"{name}.zarr"
        if name == "destvi":  # the CondSCVI on the reference first; the spots store then has its genes
            reference, spots = _lymph_node()
            setup = {"reference": str(reference)}
            ref_store = str(WORK / "destvi_reference.zarr")
            ref_build = ["build", str(reference), "--labels-key", "cell_type", "-o", ref_store, "--overwrite"]
            run("build_destvi_reference", atlasvi(*ref_build), timings)
            condscvi = ["train", "--model", "condscvi", "--store", ref_store, "--max-epochs", str(args.epochs),
                        "--overwrite", "--output", "destvi_condscvi"]  # fmt: skip
            run("train_destvi_condscvi", atlasvi(*condscvi), timings)
            build = [str(spots), "--genes", str(WORK / "destvi_condscvi" / "model")]
        run(f"build_{name}", atlasvi("build", *build, "-o", str(store), "--overwrite"), timings)
        schema = open_store(store).schema
        setup = setup | {"batch_key": schema.batch_key}
        if "protein" in schema.modalities:
            setup["protein_names"] = list(schema.modalities["protein"].features)
        train = ["train", "--model", name, "--store", str(store), "--max-epochs", str(args.epochs), "--overwrite"]
        if name == "destvi":
            train += ["--init-from", str(WORK / "destvi_condscvi" / "model")]
        run(f"train_{name}", atlasvi(*train, "--output", name), timings)
        exported = WORK / f"{name}_exported"
        export = ["export", "--model", f"{name}/model", "--to", "scvi-tools", str(exported), "--overwrite"]
        run(f"export_{name}", atlasvi(*export), timings)
        run(f"scvi_tools_load_{name}", [str(SCVI_PYTHON), "-c", SCVI_SIDE, "load", cls, str(exported), str(store)],
            timings)  # fmt: skip
        ours = outputs_of(WORK / name / "model", store)
        imported = WORK / f"{name}_imported"
        run(f"import_{name}", atlasvi("import", str(exported), "--store", str(store), "--output", str(imported),
                                      "--overwrite"), timings)  # fmt: skip
        back = outputs_of(imported, store)
        theirs = WORK / f"{name}_scvi_tools_trained"
        run(f"scvi_tools_train_{name}", [str(SCVI_PYTHON), "-c", SCVI_SIDE, "train", cls, str(theirs), str(store),
                                         str(args.epochs), json.dumps(setup)], timings)  # fmt: skip
        their_import = ["import", str(theirs), "--store", str(store), "--output", str(WORK / f"{name}_their_import")]
        run(f"import_scvi_tools_trained_{name}", atlasvi(*their_import, "--overwrite"), timings)
        results[name] = {
            "scvi_tools_class": cls,
            "cells_features": [schema.n_cells, schema.n_genes] if name == "destvi" else list(ours["normalized"].shape),
            "export_then_scvi_tools_load": compare(ours, exported),
            "export_then_import_vs_atlasvi": {k: float(np.abs(back[k] - v).max()) for k, v in ours.items()},
            "scvi_tools_trained_then_import": compare(outputs_of(WORK / f"{name}_their_import", store), theirs),
            "model_pt_bytes": (exported / "model.pt").stat().st_size,
            "seconds": timings,
        }
    results["machine"] = "shared 2-core CPU VM, 1 torch thread per process, under other engineers' load"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "scvi_tools_interop_models.json").write_text(json.dumps(results, indent=1))
    (HERE / "results" / "scvi_tools_interop_models.md").write_text(_table(results))
    print(_table(results))


def _table(r: dict) -> str:
    lines = [
        "# scvi-tools interoperability of LinearSCVI, TOTALVI, PEAKVI, CondSCVI, SysVI, MULTIVI and DestVI "
        f"({r['epochs']} epochs, real data)",
        "",
        "`PYTHONPATH=$PWD .venv/bin/python benchmarks/scvi_tools_interop_models.py`; " + r["machine"] + ".",
        "Max abs differences; normalized = expression (PEAKVI: accessibility; SysVI: the decoder's mean of the "
        "log-normalised expression) at the posterior mean, every cell; the last column is TOTALVI's normalized "
        "protein expression and MULTIVI's normalized accessibility. DestVI (spots x genes): latent = its proportions, "
        "normalized = its per-type states gamma, every spot.",
        "",
        "| model (cells x features) | direction | latent | normalized | protein / accessibility |",
        "|---|---|---:|---:|---:|",
    ]
    for name in (k for k in MODELS if k in r):
        m = r[name]
        label = f"{m['scvi_tools_class']} ({m['cells_features'][0]} x {m['cells_features'][1]})"
        for direction, key in (
            ("atlasvi train -> export -> scvi-tools load", "export_then_scvi_tools_load"),
            ("export -> atlasvi import (vs atlasvi)", "export_then_import_vs_atlasvi"),
            ("scvi-tools train -> atlasvi import", "scvi_tools_trained_then_import"),
        ):
            d = m[key]
            other = d.get("protein", d.get("accessibility"))
            protein = f"{other:.1e}" if other is not None else "-"
            first, second = d.get("latent", d.get("proportions")), d.get("normalized", d.get("gamma"))
            lines.append(f"| {label} | {direction} | {first:.1e} | {second:.1e} | {protein} |")
    lines += ["", "Wall seconds per command (start-up included):", "", "| step | s |", "|---|---:|"]
    for name in (k for k in MODELS if k in r):
        lines += [f"| {k} | {v} |" for k, v in r[name]["seconds"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
