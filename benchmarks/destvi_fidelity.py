"""DestVI side by side with scvi-tools 1.4.2's CondSCVI + DestVI: cell-type proportions of spatial spots.

    .venv/bin/python benchmarks/destvi_fidelity.py --seeds 0 1 2 --condscvi-epochs 300 --destvi-epochs 2000

(1) Simulation with known answers (the DestVI paper's protocol): the CBMC CITE-seq cells (8,617 cells x 2,000 genes,
15 scDCC clusters as cell types) are split in halves per type by the seed; the CondSCVI reference trains on one
half, and N spots (default 1,000, on a 32 x 32 grid) are sums of 10 cells of the other half, each type's share of a
spot drawn from a smooth spatial field (a Gaussian bump per type at a random centre) through a softmax and a
multinomial of 10 cells: the true proportions are the cells' types. Metrics of each tool's proportions against the
truth: Spearman over every (spot, type) entry, the mean over types of the per-type Spearman across spots, and the
RMSE over every entry.
(2) Real data (../shared/data; each tool's proportions against the other's on the same spots, per type Pearson
across spots): the RCTD human lymph node Visium subset (1,000 spots) with its 330-cell reference (11 types, the 558
genes both files share, or the reference's --n-genes HVGs among them) and the Moncada 2020 PDAC-A ST section (428
spots) with its inDrop reference (1,926 cells, 20 types; the reference's --n-genes Seurat v3 HVGs). Figures: each
tool's proportions on the spots' coordinates (results/destvi_lymph_node.png, results/destvi_pdac.png).

Both tools read the same h5ad files (the atlasvi side through atlas stores built from them) with their defaults:
CondSCVI (n_latent 5, n_hidden 128, 2 layers, lr 1e-3, KL warm-up 400 epochs), DestVI from it (vamp prior of 15
prototypes per type, amortization "both", the mixture prior with 3 states per type, augmentation, lr 3e-3, KL
warm-up 200 epochs, batch size 128), the same epochs (--condscvi-epochs, --destvi-epochs; scvi-tools' defaults
300 and 2000). scvi-tools trains on every cell and spot (its train_size 1); atlasvi holds out one cell of the
reference and one spot (the smallest validation_fraction it takes; --validation-fraction sets another, the
pipeline's default is 10 %); the held-out spot's proportions come from the same amortization networks. The
scvi-tools half runs in its venv as a subprocess of this script (`--side scvi`),
after the atlasvi half, one torch thread each. Output: results/NAME.json and .md (--name, default destvi_fidelity;
a run replaces the entries of its datasets, seeds and tools; --merge combines results files into NAME).

The tool "scvi-tools-atlasvi-init" is scvi-tools started from atlasvi's initial weights of the same seed (the
paired design without the initial draw): the untrained CondSCVI's weights, and the DestVI's own (its amortization
networks, batch embedding, eta, beta; the rest it takes from the trained CondSCVI, as in each tool). Loading them
draws nothing, so its training draws (minibatch order, dropout, augmentation, k-means) are those of "scvi-tools"
of the seed: the two differ in the initial weights alone, and atlasvi and "scvi-tools-atlasvi-init" in the
training loop alone. The .md lists the paired differences of the tools over the seeds they share.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
RESULTS = HERE / "results"
CBMC = "cbmc_citeseq_stoeckius2017_top2000genes.h5ad"
REAL = {
    # name: (spots file, reference file, reference labels key)
    "lymph_node": ("human_lymph_node_visium_rctd.h5ad", "human_lymph_node_sc_reference_rctd.h5ad", "cell_type"),
    "pdac": ("pdac_a_st1_moncada2020.h5ad", "pdac_a_indrop_sc_moncada2020.h5ad", "cell_type"),
}
CELLS_PER_SPOT = 10
GRID = 32


def _top_genes(reference, n_genes: int) -> list[str]:
    """The reference's n_genes Seurat v3 highly variable genes (all of them with fewer)."""
    import scanpy as sc

    if reference.n_vars <= n_genes:
        return list(reference.var_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hvg = sc.pp.highly_variable_genes(reference, n_top_genes=n_genes, flavor="seurat_v3", inplace=False)
    return list(reference.var_names[hvg["highly_variable"].to_numpy()])


def simulate(seed: int, workdir: Path, n_spots: int, n_genes: int) -> tuple[Path, Path, Path]:
    """(reference h5ad, spots h5ad, truth csv) of the simulation of `seed` (see the module docstring)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    folder = workdir / f"sim{seed}_{n_spots}_{n_genes}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "reference.h5ad", folder / "spots.h5ad", folder / "truth.csv"
    if all(p.exists() for p in paths):
        return paths
    rng = np.random.default_rng(seed)
    cells = ad.read_h5ad(SHARED / CBMC)
    labels = cells.obs["scdcc_label"].astype(str).to_numpy()
    types = sorted(set(labels), key=lambda t: (len(t), t))
    reference, held_out = [], {}
    for t in types:
        members = rng.permutation(np.flatnonzero(labels == t))
        half = len(members) // 2
        reference.append(members[:half])
        held_out[t] = members[half:]
    reference = np.sort(np.concatenate(reference))
    ref = ad.AnnData(
        cells.X[reference], obs=pd.DataFrame({"cell_type": labels[reference]}, index=cells.obs_names[reference])
    )
    ref.var_names = cells.var_names
    genes = _top_genes(ref, n_genes)
    ref = ref[:, genes].copy()
    cells = cells[:, genes].copy()
    ref.write_h5ad(paths[0])
    # spots on a grid, each type's share from a Gaussian bump at a random centre
    coordinates = np.stack(
        np.unravel_index(rng.choice(GRID * GRID, n_spots, replace=n_spots > GRID * GRID), (GRID, GRID)), 1
    )
    coordinates = coordinates.astype(float) + rng.uniform(-0.3, 0.3, size=(n_spots, 2))
    centres = rng.uniform(0, GRID, size=(len(types), 2))
    width = rng.uniform(4, 10, size=len(types))
    distance = ((coordinates[:, None, :] - centres[None]) ** 2).sum(-1)
    logits = 4.0 * np.exp(-distance / (2 * width**2)) + rng.normal(0, 0.5, size=distance.shape)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    counts = np.stack([rng.multinomial(CELLS_PER_SPOT, row) for row in p])
    x = cells.X.tocsr() if sp.issparse(cells.X) else sp.csr_matrix(cells.X)
    rows = []
    for spot in range(n_spots):
        chosen = np.concatenate([rng.choice(held_out[t], counts[spot, i]) for i, t in enumerate(types)])
        rows.append(sp.csr_matrix(x[chosen].sum(axis=0)))
    spots = ad.AnnData(
        sp.vstack(rows).tocsr().astype(np.int32), obs=pd.DataFrame(index=[f"spot{i}" for i in range(n_spots)])
    )
    spots.var_names = cells.var_names
    spots.obsm["spatial"] = coordinates
    spots.write_h5ad(paths[1])
    pd.DataFrame(counts / CELLS_PER_SPOT, index=spots.obs_names, columns=types).to_csv(paths[2])
    return paths


def real(name: str, workdir: Path, n_genes: int) -> tuple[Path, Path]:
    """(reference h5ad, spots h5ad) of a real pair on shared genes (see the module docstring)."""
    import anndata as ad
    import pandas as pd

    folder = workdir / f"{name}_{n_genes}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "reference.h5ad", folder / "spots.h5ad"
    if all(p.exists() for p in paths):
        return paths
    spots_file, reference_file, labels_key = REAL[name]
    spots, reference = ad.read_h5ad(SHARED / spots_file), ad.read_h5ad(SHARED / reference_file)
    genes = [g for g in reference.var_names if g in set(spots.var_names)]
    reference, spots = reference[:, genes].copy(), spots[:, genes].copy()
    keep = _top_genes(reference, n_genes)
    reference, spots = reference[:, keep].copy(), spots[:, keep].copy()
    spots = spots[np.asarray(spots.X.sum(1)).ravel() > 0].copy()
    reference = reference[np.asarray(reference.X.sum(1)).ravel() > 0].copy()
    reference.obs = pd.DataFrame({"cell_type": reference.obs[labels_key].astype(str)}, index=reference.obs_names)
    spots.obs = pd.DataFrame(index=spots.obs_names)
    reference.write_h5ad(paths[0])
    spots.write_h5ad(paths[1])
    return paths


def warmups(epochs: tuple[int, int]) -> tuple[int, int]:
    """The KL warm-ups (CondSCVI, DestVI) scaled with the epochs from scvi-tools' defaults (400 of 300 epochs,
    200 of 2000): the default run's schedule, shortened."""
    return max(1, round(400 / 300 * epochs[0])), max(1, round(200 / 2000 * epochs[1]))


def held_out_fraction(given: float | None, n_cells: int) -> float:
    """The validation_fraction of an atlasvi run on n_cells: `given`, or (None) the smallest that holds out one
    cell, the closest the pipeline comes to scvi-tools' train_size 1."""
    return given if given is not None else math.ceil(1e6 / n_cells) / 1e6


def _rename(name: str) -> str:
    """A scvi-tools FCLayers / embedding weight name -> atlasvi's."""
    name = name.replace("fc_layers.Layer ", "layers.")
    if "embeddings_dict" in name or name.startswith("embedding"):
        return "batch_embedding.weight"
    return name


def atlasvi_init(ref_store: str, spot_store: str, seed: int) -> dict:
    """atlasvi's initial weights of `seed` (drawn from the seed alone, in a scope of their own: the weights the run
    of `run_atlasvi` starts from): {"condscvi": the CondSCVI's state, "destvi": the DestVI's own parameters, not
    those it takes from the trained CondSCVI}."""
    from atlasvi.api.condscvi import CondSCVI
    from atlasvi.api.destvi import DestVI

    sc_model = CondSCVI(ref_store, device="cpu", seed=seed)
    condscvi = {k: v.clone() for k, v in sc_model.module.state_dict().items() if not k.endswith("_vprior")}
    sc_model.module.mp_vprior.fill_(1.0)  # placeholder prototypes (buffers, not drawn): no k-means untrained
    model = DestVI.from_rna_model(spot_store, sc_model, device="cpu", seed=seed)
    taken = model.module.init_prefixes
    destvi = {k: v.clone() for k, v in model.module.state_dict().items() if not k.startswith(taken)}
    return {"condscvi": condscvi, "destvi": destvi}


def _load_init(module, state: dict) -> float:
    """Copy atlasvi-named weights `state` into a scvi-tools module (names mapped; the module's weights `state` has no
    counterpart of keep theirs); returns the largest absolute difference from the module's own initial values (0:
    the same draw)."""
    import torch

    own = module.state_dict()
    mapped = {k: state[_rename(k)] for k in own if _rename(k) in state}
    diff = max((float((own[k] - v).abs().max()) for k, v in mapped.items() if v.numel()), default=0.0)
    missing = [k for k in state if k not in {_rename(m) for m in mapped}]
    if missing:
        raise RuntimeError(f"atlasvi weights with no scvi-tools counterpart: {missing}")
    with torch.no_grad():
        for k, v in mapped.items():
            own[k].copy_(v)
    return diff


def run_atlasvi(
    reference: Path,
    spots: Path,
    out: Path,
    seed: int,
    epochs: tuple[int, int],
    validation: float | None = None,
    models: Path | None = None,
) -> dict:
    """Train CondSCVI then DestVI in atlasvi; the proportions (spots x types, in the spots' file order) to `out`.
    validation: the validation_fraction of both stages (see `held_out_fraction`); models: a folder to save the
    trained models in (condscvi/, destvi/)."""
    import anndata as ad
    import torch

    from atlasvi.api.condscvi import CondSCVI
    from atlasvi.api.destvi import DestVI
    from atlasvi.data import LoaderConfig
    from atlasvi.train import TrainConfig

    torch.set_num_threads(1)
    ref_store, spot_store = build_stores(reference, spots, out.parent / f"{out.stem}_stores")
    torch.save(atlasvi_init(ref_store, spot_store, seed), out.with_suffix(".init.pt"))
    started = time.perf_counter()
    sc_model = CondSCVI(ref_store, device="cpu", seed=seed)
    warmup = warmups(epochs)
    fraction = held_out_fraction(validation, sc_model.store.n_cells)
    held_out = [round(fraction * sc_model.store.n_cells)]
    train = TrainConfig(max_epochs=epochs[0], n_epochs_kl_warmup=warmup[0], seed=seed, validation_fraction=fraction)
    sc_model.fit(train, LoaderConfig(seed=seed))
    middle = time.perf_counter()
    model = DestVI.from_rna_model(spot_store, sc_model, device="cpu", seed=seed)
    exported = torch.load(out.with_suffix(".init.pt"))["destvi"]
    init_diff = max(float((model.module.state_dict()[k] - v).abs().max()) for k, v in exported.items() if v.numel())
    if init_diff != 0:
        raise RuntimeError(f"atlasvi_init differs from the run's initial DestVI weights by {init_diff}")
    fraction = held_out_fraction(validation, model.store.n_cells)
    held_out.append(round(fraction * model.store.n_cells))
    train = TrainConfig(max_epochs=epochs[1], n_epochs_kl_warmup=warmup[1], seed=seed, validation_fraction=fraction)
    model.fit(train, LoaderConfig(seed=seed))
    ended = time.perf_counter()
    if models is not None:
        sc_model.save(models / "condscvi")
        model.save(models / "destvi")
    proportions = model.get_proportions()
    order = ad.read_h5ad(spots, backed="r").obs_names
    proportions.loc[order].to_csv(out)
    timings = {"condscvi_seconds": middle - started, "destvi_seconds": ended - middle}
    return timings | {"held_out_cells_spots": held_out}


def export_atlasvi_init(reference: Path, spots: Path, path: Path, seed: int) -> Path:
    """atlasvi's initial weights of `seed` (`atlasvi_init`) into `path` (for scvi-tools-atlasvi-init) without
    training: stores built from the files as `run_atlasvi` builds them."""
    import torch

    ref_store, spot_store = build_stores(reference, spots, path.parent / f"{path.name}_stores")
    torch.save(atlasvi_init(ref_store, spot_store, seed), path)
    return path


def build_stores(reference: Path, spots: Path, stores: Path) -> tuple[Path, Path]:
    """The reference (labels "cell_type") and spot files built into `stores`/ref.zarr and spots.zarr: (ref, spots)."""
    from atlasvi.data import BuildConfig, build_store

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_store = build_store(
            BuildConfig(
                inputs=[str(reference)], output=str(stores / "ref.zarr"), labels_key="cell_type", overwrite=True
            )
        )
        spot_store = build_store(BuildConfig(inputs=[str(spots)], output=str(stores / "spots.zarr"), overwrite=True))
    return ref_store, spot_store


def run_scvi(
    reference: Path,
    spots: Path,
    out: Path,
    seed: int,
    epochs: tuple[int, int],
    init: Path | None = None,
    models: Path | None = None,
) -> dict:
    """The same in scvi-tools (run in its venv: `--side scvi`); with `init`, started from atlasvi's initial
    weights saved there (`atlasvi_init`); models: a folder to save the trained models in (condscvi/, destvi/)."""
    import anndata as ad
    import scvi
    import torch

    torch.set_num_threads(1)
    scvi.settings.seed = seed
    sc_adata, st_adata = ad.read_h5ad(reference), ad.read_h5ad(spots)
    started = time.perf_counter()
    scvi.model.CondSCVI.setup_anndata(sc_adata, labels_key="cell_type")
    sc_model = scvi.model.CondSCVI(sc_adata, prior="normal")  # 1.4.2's from_rna_model reads module_kwargs["prior"]
    weights = torch.load(init) if init is not None else None
    init_diff = {}
    if weights is not None:
        init_diff["condscvi"] = _load_init(sc_model.module, weights["condscvi"])
    warmup = warmups(epochs)
    plan = {"n_epochs_kl_warmup": warmup[0]}
    sc_model.train(max_epochs=epochs[0], accelerator="cpu", enable_progress_bar=False, plan_kwargs=plan)
    middle = time.perf_counter()
    scvi.model.DestVI.setup_anndata(st_adata)
    # scvi-tools 1.4.2: get_vamp_prior of the default (normal) prior returns numpy arrays, which MRDeconv's
    # register_buffer refuses (TypeError); the same values as float32 tensors
    vamp = type(sc_model).get_vamp_prior
    sc_model.get_vamp_prior = lambda *a, **k: {
        key: torch.as_tensor(value, dtype=torch.float32) for key, value in vamp(sc_model, *a, **k).items()
    }
    model = scvi.model.DestVI.from_rna_model(st_adata, sc_model)
    if weights is not None:
        # V and gamma, the free per-spot parameters (unused with amortization "both"; atlasvi builds none), keep theirs
        init_diff["destvi"] = _load_init(model.module, weights["destvi"])
    model.train(max_epochs=epochs[1], n_epochs_kl_warmup=warmup[1], accelerator="cpu", enable_progress_bar=False)
    ended = time.perf_counter()
    if models is not None:
        sc_model.save(str(models / "condscvi"), overwrite=True)
        model.save(str(models / "destvi"), overwrite=True)
    model.get_proportions().to_csv(out)
    timings = {"condscvi_seconds": middle - started, "destvi_seconds": ended - middle}
    return timings | ({"init_max_abs_diff_from_own": init_diff} if init_diff else {})


def _n_genes(spots: Path) -> int:
    import anndata as ad

    return ad.read_h5ad(spots, backed="r").n_vars


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def sim_metrics(estimate, truth) -> dict:
    """Spearman over every entry, mean per-type Spearman across spots, RMSE over every entry."""
    estimate = estimate.loc[truth.index, truth.columns].to_numpy()
    truth = truth.to_numpy()
    per_type = [_spearman(estimate[:, i], truth[:, i]) for i in range(truth.shape[1]) if truth[:, i].std() > 0]
    return {
        "spearman": _spearman(estimate.ravel(), truth.ravel()),
        "spearman_per_type": float(np.mean(per_type)),
        "rmse": float(np.sqrt(np.mean((estimate - truth) ** 2))),
    }


def scvi_python(given: str | None) -> str:
    return given or str(HERE / ".cache" / "scvi-venv" / "bin" / "python")


def side(
    tool: str,
    reference: Path,
    spots: Path,
    out: Path,
    seed: int,
    epochs: tuple[int, int],
    python: str,
    validation: float | None = None,
    models: Path | None = None,
) -> dict:
    """Run one tool (scvi-tools in its venv, as a subprocess) and return its timings; models: a folder to save the
    trained models in (condscvi/, destvi/)."""
    if tool == "atlasvi":
        return run_atlasvi(reference, spots, out, seed, epochs, validation, models)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    command = [python, __file__, "--side", "scvi", "--reference", str(reference), "--spots", str(spots)]
    command += ["--out", str(out), "--seeds", str(seed), "--condscvi-epochs", str(epochs[0])]
    command += ["--destvi-epochs", str(epochs[1])] + (["--models", str(models)] if models is not None else [])
    if tool == "scvi-tools-atlasvi-init":
        init = export_atlasvi_init(reference, spots, out.with_suffix(".init.pt"), seed)
        command += ["--init", str(init)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"scvi-tools side failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def figure(name: str, spots: Path, tables: dict, path: Path) -> Path:
    """Each tool's proportions on the spots' coordinates, one row per tool."""
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coordinates = ad.read_h5ad(spots).obsm["spatial"]
    types = list(next(iter(tables.values())).columns)
    fig, axes = plt.subplots(len(tables), len(types), figsize=(2.2 * len(types), 2.3 * len(tables)), squeeze=False)
    for r, (tool, table) in enumerate(tables.items()):
        for c, t in enumerate(types):
            ax = axes[r, c]
            ax.scatter(coordinates[:, 0], coordinates[:, 1], c=table[t].to_numpy(), s=4, cmap="viridis", vmin=0,
                       vmax=max(float(table[t].max()), 1e-6), linewidths=0)  # fmt: skip
            ax.set_aspect("equal")
            ax.invert_yaxis()
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(t[:22], fontsize=7)
            if c == 0:
                ax.set_ylabel(tool, fontsize=8)
    fig.suptitle(f"DestVI proportions, {name} (rows: tool; colour: proportion, 0 to each panel's max)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=["simulation", "lymph_node", "pdac"])
    parser.add_argument("--tools", nargs="+", default=["atlasvi", "scvi-tools"],
                        choices=["atlasvi", "scvi-tools", "scvi-tools-atlasvi-init"])  # fmt: skip
    parser.add_argument("--condscvi-epochs", type=int, default=300)
    parser.add_argument("--destvi-epochs", type=int, default=2000)
    parser.add_argument("--n-spots", type=int, default=1000)
    parser.add_argument("--n-genes", type=int, default=2000, help="the reference's top HVGs kept (CBMC, PDAC)")
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "destvi")
    parser.add_argument("--scvi-python", default=None)
    parser.add_argument("--name", default="destvi_fidelity", help="results/NAME.json and .md (a run merges into them)")
    parser.add_argument(
        "--merge", type=Path, nargs="+", default=None,
        help="write results/NAME.{json,md} from these results files' runs (later files win on a repeated run)",
    )  # fmt: skip
    parser.add_argument(
        "--validation-fraction", type=float, default=None,
        help="atlasvi's held-out share of cells / spots (default: one cell, as scvi-tools' train_size 1)",
    )  # fmt: skip
    parser.add_argument("--side", choices=["scvi"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--spots", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--init", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--models", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    epochs = (args.condscvi_epochs, args.destvi_epochs)
    if args.side == "scvi":
        print(json.dumps(run_scvi(args.reference, args.spots, args.out, args.seeds[0], epochs, args.init, args.models)))
        return
    import pandas as pd

    results_path = RESULTS / f"{args.name}.json"
    if args.merge:
        write(merged([json.loads(path.read_text()) for path in args.merge]), results_path)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": []}
    for dataset in args.datasets:
        for seed in args.seeds:
            if dataset == "simulation":
                reference, spots, truth_path = simulate(seed, args.workdir, args.n_spots, args.n_genes)
            else:
                reference, spots = real(dataset, args.workdir, args.n_genes)
            tables = {}
            for tool in args.tools:
                out = args.workdir / f"{dataset}_{seed}_{tool}.csv"
                timing = side(tool, reference, spots, out, seed, epochs, scvi_python(args.scvi_python),
                              args.validation_fraction)  # fmt: skip
                tables[tool] = pd.read_csv(out, index_col=0)
                row = {"dataset": dataset, "seed": seed, "tool": tool, "epochs": list(epochs),
                       "kl_warmup": list(warmups(epochs)), "n_genes": int(tables[tool].shape[0] and _n_genes(spots)),
                       "n_spots": len(tables[tool])} | timing  # fmt: skip
                if dataset == "simulation":
                    row |= sim_metrics(tables[tool], pd.read_csv(truth_path, index_col=0))
                results["runs"] = [
                    r for r in results["runs"] if (r["dataset"], r["seed"], r["tool"]) != (dataset, seed, tool)
                ] + [row]
                print(json.dumps(row), flush=True)
            if dataset != "simulation" and len(tables) == 2:
                a, b = (tables[t] for t in args.tools)
                b = b.loc[a.index, a.columns]
                per_type = {
                    t: float(np.corrcoef(a[t], b[t])[0, 1]) for t in a.columns if a[t].std() > 0 and b[t].std() > 0
                }
                results.setdefault("agreement", {})[f"{dataset}_{seed}"] = {"pearson_per_type": per_type,
                                                                          "epochs": list(epochs)}  # fmt: skip
                if seed == args.seeds[0]:
                    figure(dataset, spots, tables, RESULTS / f"destvi_{dataset}.png")
            results["machine"] = f"{platform.node()}: {os.cpu_count()} CPUs (shared, under load)"
            write(results, results_path)


def merged(parts: list[dict]) -> dict:
    """One results dict from several: runs keyed by (dataset, seed, tool) and agreements by key, later parts
    replacing earlier ones; notes concatenated; the last part's machine."""
    runs: dict[tuple, dict] = {}
    out: dict = {"runs": [], "agreement": {}, "notes": []}
    for part in parts:
        runs |= {(r["dataset"], r["seed"], r["tool"]): r for r in part["runs"]}
        out["agreement"] |= part.get("agreement", {})
        out["notes"] += [n for n in part.get("notes", []) if n not in out["notes"]]
        out["machine"] = part.get("machine", "")
    out["runs"] = list(runs.values())
    return out


def write(results: dict, path: Path) -> None:
    """results as path (.json) and its markdown tables beside it (.md)."""
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    path.with_suffix(".md").write_text(table(results))


def paired_gaps(sims: list[dict], key: str = "spearman") -> list[dict]:
    """Per pair of tools (atlasvi first, then scvi-tools before its variants), over the seeds both ran: the mean,
    sd (ddof 1) and standard error of the per-seed differences of `key`, t = mean / se, the 95% confidence interval
    of the mean (Student's t, n - 1 degrees of freedom) and how many seeds A is above B."""
    from scipy.stats import t as student_t

    order = ["atlasvi", "scvi-tools", "scvi-tools-atlasvi-init"]
    tools = sorted({r["tool"] for r in sims}, key=lambda t: (order.index(t) if t in order else len(order), t))
    by = {(r["tool"], r["seed"]): r[key] for r in sims}
    gaps = []
    for i, a in enumerate(tools):
        for b in tools[i + 1 :]:
            seeds = sorted({s for t, s in by if t == a} & {s for t, s in by if t == b})
            if len(seeds) < 2:
                continue
            d = np.array([by[(a, s)] - by[(b, s)] for s in seeds])
            sd = float(d.std(ddof=1))
            se = sd / np.sqrt(len(d))
            half = float(student_t.ppf(0.975, len(d) - 1)) * se
            gaps.append({"a": a, "b": b, "n": len(d), "mean": float(d.mean()), "sd": sd, "se": se,
                         "t": float(d.mean() / se) if se > 0 else 0.0, "above": int((d > 0).sum()),
                         "ci95": [float(d.mean() - half), float(d.mean() + half)]})  # fmt: skip
    return gaps


def table(results: dict) -> str:
    """The markdown tables of the results: simulation metrics (mean +- sd over seeds), per-seed rows and real-data
    agreement; results["notes"] (strings) are printed under them."""
    lines = ["# DestVI fidelity: atlasvi vs scvi-tools 1.4.2", "", "Command: see benchmarks/destvi_fidelity.py.", ""]
    sims = [r for r in results["runs"] if r["dataset"] == "simulation"]
    if sims:
        lines += ["## Simulation (CBMC cells summed into spots, known proportions)", "",
                  "| tool | seeds | epochs (CondSCVI, DestVI) | Spearman (all entries) | Spearman (mean per type) "
                  "| RMSE |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for tool in sorted({r["tool"] for r in sims}):
            rows = [r for r in sims if r["tool"] == tool]
            cells = [f"{np.mean([r[k] for r in rows]):.3f} ± {np.std([r[k] for r in rows]):.3f}"
                     for k in ("spearman", "spearman_per_type", "rmse")]  # fmt: skip
            seeds = ", ".join(str(r["seed"]) for r in sorted(rows, key=lambda r: r["seed"]))
            lines.append(f"| {tool} | {seeds} | {rows[0]['epochs']} | " + " | ".join(cells) + " |")
        tools = sorted({r["tool"] for r in sims})
        lines += ["", "Per seed (Spearman all entries / RMSE):", "", "| seed | " + " | ".join(tools) + " |",
                  "|---|" + "---|" * len(tools)]  # fmt: skip
        for seed in sorted({r["seed"] for r in sims}):
            by_tool = {r["tool"]: r for r in sims if r["seed"] == seed}
            cells = [f"{by_tool[t]['spearman']:.3f} / {by_tool[t]['rmse']:.3f}" if t in by_tool else "-"
                     for t in tools]  # fmt: skip
            lines.append(f"| {seed} | " + " | ".join(cells) + " |")
        gaps = paired_gaps(sims)
        if gaps:
            lines += [
                "",
                "Paired differences over the seeds both tools ran (Spearman all entries; mean ± sd of the "
                "per-seed differences, standard error sd / sqrt(n), t = mean / se, the mean's 95% confidence "
                "interval from Student's t with n - 1 degrees of freedom):",
                "",
                "| tool A - tool B | seeds | mean | sd | se | t | 95% CI | A above B |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for g in gaps:
                ci = f"[{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]"
                lines.append(f"| {g['a']} - {g['b']} | {g['n']} | {g['mean']:+.4f} | {g['sd']:.4f} | {g['se']:.4f} "
                             f"| {g['t']:+.2f} | {ci} | {g['above']} of {g['n']} |")  # fmt: skip
        lines.append("")
    for key, value in sorted(results.get("agreement", {}).items()):
        per_type = value["pearson_per_type"]
        title = f"## {key}: per-type Pearson r of atlasvi's vs scvi-tools' proportions (epochs {value['epochs']})"
        lines += [title, "",
                  f"mean {np.mean(list(per_type.values())):.3f}, median {np.median(list(per_type.values())):.3f}", "",
                  "| cell type | r |", "|---|---|"]  # fmt: skip
        lines += [f"| {t} | {r:.3f} |" for t, r in per_type.items()] + [""]
    if results.get("notes"):
        lines += ["Notes:", "", *(f"- {note}" for note in results["notes"]), ""]
    lines.append(f"Machine: {results.get('machine', '')}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
