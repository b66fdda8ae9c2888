"""scVI fidelity, atlasvi side: held-out ELBO, training speed and latent on the cells scvi-tools sees.

    python benchmarks/fidelity.py --dataset cellbench --seeds 0 1 2 --max-epochs 200 --n-epochs-kl-warmup 50

Same cells (filters), same 2000 Seurat v3 HVGs (over all kept cells), same held-out cells (the file
`fidelity_data.py heldout` wrote, which `scvi_reference.py` reads), same architecture (n_latent 10,
n_hidden 128, 1 layer, ZINB, gene dispersion), same epochs, KL warm-up and batch size. The held-out
-ELBO is per cell at KL weight 1. Prints one JSON line per seed; writes the latent of every cell
(train, then held-out) with its cell names for `fidelity_data.py scib`.
"""

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from atlasvi.data import BuildConfig, LoaderConfig, StreamingLoader, build_store, open_store
from atlasvi.models.scvi import SCVIModule
from atlasvi.train import TrainConfig, fit

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
DATASETS = {
    "cellbench": ("cellbench_sc_mixology_3tech.h5ad", "batch", "cell_line", {"demuxlet_cls": "SNG"}),
    "kang": ("kang2018_pbmc_ifnb_muscat.h5ad", "sample", "cell_type", {}),
}


def prepare(name: str, workdir: Path) -> tuple[Path, Path]:
    """(train store, held-out store) with identical genes and categories."""
    file, batch_key, labels_key, filters = DATASETS[name]
    heldout_names = set((HERE / ".cache" / f"heldout_{Path(file).stem}.txt").read_text().split())
    workdir.mkdir(parents=True, exist_ok=True)
    full = workdir / "full.zarr"
    if not full.exists():
        adata = ad.read_h5ad(SHARED / file)
        for key, value in filters.items():
            adata = adata[adata.obs[key].astype(str) == value].copy()
        adata.obs = adata.obs[[batch_key, labels_key]]
        adata.write_h5ad(workdir / "input.h5ad")
        config = BuildConfig(
            inputs=[str(workdir / "input.h5ad")], output=str(full), batch_key=batch_key, labels_key=labels_key,
            n_top_genes=2000,
        )  # fmt: skip
        build_store(config)
    stores = []
    for part in ("train", "heldout"):
        store = workdir / f"{part}.zarr"
        if not store.exists():
            adata = ad.read_zarr(full)
            held = adata.obs_names.isin(list(heldout_names))
            subset = adata[held if part == "heldout" else ~held].copy()
            subset.var = subset.var[["gene_ids"]]
            subset.write_h5ad(workdir / f"{part}.h5ad")
            build_store(
                BuildConfig(
                    inputs=[str(workdir / f"{part}.h5ad")], output=str(store), batch_key=batch_key,
                    labels_key=labels_key, gene_id_key="gene_ids",
                )
            )  # fmt: skip
        stores.append(store)
    train_schema, held_schema = (open_store(s).schema for s in stores)
    if train_schema.categorical != held_schema.categorical or train_schema.gene_ids != held_schema.gene_ids:
        raise SystemExit(f"{name}: the held-out store's genes or categories differ from the training store's")
    return stores[0], stores[1]


def latent(module: SCVIModule, store: Path) -> tuple[np.ndarray, list[str]]:
    """Posterior means (n_cells, n_latent) in store row order, with the cell names."""
    opened = open_store(store)
    loader = StreamingLoader(opened, LoaderConfig(batch_size=256, last_batch="pad"))
    means = np.zeros((opened.n_cells, module.config.n_latent), dtype=np.float32)
    module.eval()
    with torch.no_grad():
        for batch in loader:
            means[batch.rows.numpy()] = module.inference(module.unpack(batch))["qz"].loc.numpy()
    names = ad.read_zarr(store).obs_names.tolist()
    return means, names


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    workdir = HERE / ".cache" / "fidelity" / args.dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_store, heldout_store = prepare(args.dataset, workdir)
    for seed in args.seeds:
        torch.manual_seed(seed)
        loader_config = LoaderConfig(batch_size=args.batch_size, last_batch=args.last_batch, seed=seed)
        train = StreamingLoader(train_store, loader_config)
        heldout = StreamingLoader(heldout_store, LoaderConfig(batch_size=args.batch_size))
        module = SCVIModule(train.store.schema)
        config = TrainConfig(max_epochs=args.max_epochs, n_epochs_kl_warmup=args.n_epochs_kl_warmup, seed=seed)
        started = time.perf_counter()
        history = fit(module, train, heldout, config)
        seconds = time.perf_counter() - started
        last = history[-1]
        train_latent, train_names = latent(module, train_store)
        held_latent, held_names = latent(module, heldout_store)
        np.save(workdir / f"latent_seed{seed}.npy", np.concatenate([train_latent, held_latent]))
        (workdir / "cells.txt").write_text("\n".join(train_names + held_names) + "\n")
        row = json.dumps(
            {
                "tool": "atlasvi",
                "dataset": args.dataset,
                "seed": seed,
                "n_train": train.sampler.n_cells,
                "n_heldout": heldout.sampler.n_cells,
                "neg_elbo": last.validation_elbo,
                "reconstruction_loss": last.validation_reconstruction,
                "kl_local": last.validation_kl,
                "train_seconds": seconds,
                "train_cells_per_s": sum(r.cells_per_second * r.seconds for r in history) / seconds,
                "epochs": len(history),
                "threads": torch.get_num_threads(),
                "last_batch": args.last_batch,
            }
        )
        print(row, flush=True)
        with (workdir / "results.jsonl").open("a") as results:
            results.write(row + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--n-epochs-kl-warmup", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--last-batch", choices=["keep", "pad", "drop"], default="keep", help="the training loader's tail"
    )
    run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
