"""scANVI label transfer and scArches query mapping, atlasvi vs scvi-tools 1.4.2 side by side.

    .venv/bin/python benchmarks/label_transfer.py --datasets kang cellbench --seeds 0 1 2

Reference = batches with labels, query = held-out batches without labels (CellBench sc_mixology,
demuxlet singlets: the four CEL-seq2 batches -> Drop-seq; Kang: ctrl101, ctrl107 -> stim101, stim107).
Both tools get the same cells, the same HVGs (atlasvi's Seurat v3 selection, written to one h5ad that
both read), the same architecture, epochs, KL warm-up and batch size (128), 10% of the cells held
out for validation each (scvi-tools: a random 10% per seed; atlasvi: the last 10% of a store's rows, and the
stores are built per seed with that seed's row permutation, so its held-out cells change with the seed too;
`--store-seed N` builds them once with permutation N, as the results before 2026-11-25 were, with N = 0).
Two tasks per seed:
(a) semi-supervised: scVI on every cell (query labels masked), scANVI from it, predict the query;
(b) scArches: scVI then scANVI on the reference alone (scvi-tools' scArches architecture: covariates
    encoded, 2 layers, layer norm, no batch norm, dropout 0.2), query mapped by surgery (weight decay 0),
    predict the query; the reference cells' latent before and after query training must be identical.
Accuracy and macro-F1 on the query cells. The scvi-tools half runs in its venv
(`bash benchmarks/setup_scvi_venv.sh`) as a subprocess of this script (`--side scvi`), in parallel
with the atlasvi half, each on one torch thread. Output: results/label_transfer.json and .md.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
SCVI_PYTHON = HERE / ".cache" / "scvi-venv" / "bin" / "python"
UNLABELED = "Unknown"
DATASETS = {
    # file, batch key, labels key, obs filters, query batches
    "cellbench": ("cellbench_sc_mixology_3tech.h5ad", "batch", "cell_line", {"demuxlet_cls": "SNG"}, ["sc_dropseq"]),
    "kang": ("kang2018_pbmc_ifnb_muscat.h5ad", "sample", "cell_type", {}, ["stim101", "stim107"]),
}
ARCHES = {
    "encode_covariates": True,
    "n_layers": 2,
    "use_layer_norm": "both",
    "use_batch_norm": "none",
    "dropout_rate": 0.2,
}


def scores(truth: np.ndarray, predicted: np.ndarray) -> dict:
    """Accuracy and macro-F1 (over the true classes present) of predicted labels."""
    classes = np.unique(truth)
    f1 = []
    for c in classes:
        tp = np.sum((predicted == c) & (truth == c))
        precision = tp / max(np.sum(predicted == c), 1)
        recall = tp / max(np.sum(truth == c), 1)
        f1.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    return {"accuracy": float(np.mean(truth == predicted)), "macro_f1": float(np.mean(f1))}


def prepare(name: str, workdir: Path) -> Path:
    """input.h5ad: the kept cells, the HVGs atlasvi's build selects (2000, or every gene of a smaller file)."""
    import anndata as ad

    from atlasvi.data import BuildConfig, build_store

    file, batch_key, labels_key, filters, _ = DATASETS[name]
    target = workdir / "input.h5ad"
    if target.exists():
        return target
    workdir.mkdir(parents=True, exist_ok=True)
    adata = ad.read_h5ad(SHARED / file)
    for key, value in filters.items():
        adata = adata[adata.obs[key].astype(str) == value].copy()
    adata.obs = adata.obs[[batch_key, labels_key]].astype(str).astype("category")
    adata.write_h5ad(workdir / "filtered.h5ad")
    n_top = 2000 if adata.n_vars > 2000 else None
    config = BuildConfig(
        inputs=[str(workdir / "filtered.h5ad")], output=str(workdir / "hvg.zarr"), batch_key=batch_key,
        labels_key=labels_key, n_top_genes=n_top,
    )  # fmt: skip
    build_store(config)
    genes = ad.read_zarr(workdir / "hvg.zarr").var_names
    adata = adata[:, adata.var_names.isin(genes)].copy()
    adata.write_h5ad(target)
    return target


def split_stores(name: str, h5ad: Path, workdir: Path, store_seed: int) -> dict[str, Path]:
    """The atlasvi stores of the split (built once per store_seed, the seed of their row permutation, which
    decides the held-out 10%): "semi" (every cell, query labels masked), "reference" (labelled), "query" (no
    labels); reference.h5ad and query.h5ad hold the same cells for scvi-tools."""
    import anndata as ad

    from atlasvi.data import BuildConfig, build_store

    _, batch_key, labels_key, _, query_batches = DATASETS[name]
    adata = ad.read_h5ad(h5ad)
    stores = {}
    for part, config in {
        "semi": {"inputs": [str(h5ad)], "labels_key": labels_key, "unlabeled_batches": query_batches},
        "reference": {"labels_key": labels_key},
        "query": {},
    }.items():
        stores[part] = workdir / f"stores_seed{store_seed}" / f"atlasvi_{part}.zarr"
        if part != "semi" and not (workdir / f"{part}.h5ad").exists():
            is_query = adata.obs[batch_key].isin(query_batches).to_numpy()
            subset = adata[is_query if part == "query" else ~is_query].copy()
            subset.obs = subset.obs[[batch_key] if part == "query" else [batch_key, labels_key]]
            subset.write_h5ad(workdir / f"{part}.h5ad")
        if not stores[part].exists():
            inputs = config.pop("inputs", [str(workdir / f"{part}.h5ad")])
            build_store(
                BuildConfig(inputs=inputs, output=str(stores[part]), batch_key=batch_key, seed=store_seed, **config)
            )
    return stores


def atlasvi_side(
    name: str, h5ad: Path, workdir: Path, seed: int, store_seed: int, epochs: dict, tasks: list[str]
) -> dict:
    import anndata as ad
    import torch

    from atlasvi.api import SCANVI, SCVI
    from atlasvi.models.scvi import SCVIConfig
    from atlasvi.train import TrainConfig

    _, batch_key, labels_key, _, query_batches = DATASETS[name]
    adata = ad.read_h5ad(h5ad)
    truth = adata.obs[labels_key].astype(str)
    stores = split_stores(name, h5ad, workdir, store_seed)
    pretrain = TrainConfig(max_epochs=epochs["scvi"], n_epochs_kl_warmup=epochs["kl_warmup"], seed=seed)
    result = {"tool": "atlasvi", "dataset": name, "seed": seed, "store_seed": store_seed}

    def query_scores(model, store: Path) -> dict:
        names = ad.read_zarr(store).obs_names
        predicted = model.predict(store)
        keep = adata.obs.loc[names, batch_key].isin(query_batches).to_numpy()
        return scores(truth.loc[names].to_numpy()[keep], predicted[keep])

    if "semi_supervised" in tasks:
        started = time.perf_counter()
        torch.manual_seed(seed)
        scvi = SCVI(stores["semi"], device="cpu")
        scvi.fit(pretrain)
        scanvi = SCANVI.from_scvi_model(scvi, unlabeled_category=UNLABELED)
        scanvi.fit(TrainConfig(max_epochs=epochs["scanvi"], seed=seed))
        result["semi_supervised"] = query_scores(scanvi, stores["semi"]) | {"seconds": time.perf_counter() - started}
    if "surgery" not in tasks:
        return result
    started = time.perf_counter()
    torch.manual_seed(seed)
    scvi = SCVI(stores["reference"], SCVIConfig(**ARCHES), device="cpu")
    scvi.fit(pretrain)
    scanvi = SCANVI.from_scvi_model(scvi, unlabeled_category=UNLABELED)
    scanvi.fit(TrainConfig(max_epochs=epochs["scanvi"], seed=seed))
    reference_latent = scanvi.get_latent_representation()
    names = ad.read_zarr(stores["reference"]).obs_names
    reference_accuracy = float(np.mean(scanvi.predict() == truth.loc[names].to_numpy()))
    query = SCANVI.load_query_data(stores["query"], scanvi, device="cpu", seed=seed)
    before = query.get_latent_representation(stores["reference"])
    untrained = query_scores(query, stores["query"])["accuracy"]
    query.fit(TrainConfig(max_epochs=epochs["query"], seed=seed))
    after = query.get_latent_representation(stores["reference"])
    result["surgery"] = query_scores(query, stores["query"]) | {
        "reference_accuracy": reference_accuracy,
        "query_accuracy_before_training": untrained,
        "seconds": time.perf_counter() - started,
        "reference_latent_unchanged": bool(np.array_equal(before, after)),
        "reference_latent_equals_reference_model": bool(np.array_equal(after, reference_latent)),
    }
    return result


def scvi_side(name: str, h5ad: Path, seed: int, epochs: dict, tasks: list[str]) -> dict:
    import anndata as ad
    import scvi
    import torch

    torch.set_num_threads(1)
    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    _, batch_key, labels_key, _, query_batches = DATASETS[name]
    adata = ad.read_h5ad(h5ad)
    truth = adata.obs[labels_key].astype(str).to_numpy()
    is_query = adata.obs[batch_key].isin(query_batches).to_numpy()
    adata.obs["masked"] = np.where(is_query, UNLABELED, truth)
    trainer = {"batch_size": 128, "train_size": 0.9, "accelerator": "cpu", "enable_progress_bar": False}
    pretrain = trainer | {"max_epochs": epochs["scvi"], "plan_kwargs": {"n_epochs_kl_warmup": epochs["kl_warmup"]}}
    result = {"tool": "scvi-tools", "version": scvi.__version__, "dataset": name, "seed": seed}

    if "semi_supervised" in tasks:
        started = time.perf_counter()
        scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key, labels_key="masked")
        model = scvi.model.SCVI(adata)
        model.train(**pretrain)
        scanvi = scvi.model.SCANVI.from_scvi_model(model, unlabeled_category=UNLABELED)
        scanvi.train(**trainer, max_epochs=epochs["scanvi"])
        predicted = np.asarray(scanvi.predict(adata))
        result["semi_supervised"] = scores(truth[is_query], predicted[is_query]) | {
            "seconds": time.perf_counter() - started
        }
    if "surgery" not in tasks:
        return result
    started = time.perf_counter()
    reference = adata[~is_query].copy()
    query = adata[is_query].copy()
    query.obs["masked"] = UNLABELED
    scvi.model.SCVI.setup_anndata(reference, batch_key=batch_key, labels_key="masked")
    model = scvi.model.SCVI(reference, **ARCHES)
    model.train(**pretrain)
    scanvi = scvi.model.SCANVI.from_scvi_model(model, unlabeled_category=UNLABELED)
    scanvi.train(**trainer, max_epochs=epochs["scanvi"])
    reference_latent = scanvi.get_latent_representation(reference)
    reference_accuracy = float(np.mean(np.asarray(scanvi.predict(reference)) == truth[~is_query]))
    mapped = scvi.model.SCANVI.load_query_data(query, scanvi)  # scvi-tools gives no latent before training
    mapped.is_trained_ = True  # only to predict with the untrained query columns
    untrained = scores(truth[is_query], np.asarray(mapped.predict(query)))["accuracy"]
    mapped.is_trained_ = False
    mapped.train(**(trainer | {"plan_kwargs": {"weight_decay": 0.0}}), max_epochs=epochs["query"])
    after = mapped.get_latent_representation(reference)
    predicted = np.asarray(mapped.predict(query))
    result["surgery"] = scores(truth[is_query], predicted) | {
        "reference_accuracy": reference_accuracy,
        "query_accuracy_before_training": untrained,
        "seconds": time.perf_counter() - started,
        "reference_latent_unchanged": bool(np.array_equal(after, reference_latent)),
    }
    return result


def series(row: dict) -> str:
    """The row's tool, and for atlasvi how its stores were permuted: "atlasvi" per seed, or "atlasvi, store
    seed N" for one permutation N on every seed (rows without "store_seed" predate per-seed stores: N = 0)."""
    if row["tool"] != "atlasvi" or row.get("store_seed") == row["seed"]:
        return row["tool"]
    return f"atlasvi, store seed {row.get('store_seed', 0)}"


def table(rows: list[dict]) -> str:
    lines = [
        "| dataset | task | tool | accuracy (mean ± sd) | macro-F1 (mean ± sd) | per seed (acc / F1) "
        "| ref. latent unchanged |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for dataset in sorted({r["dataset"] for r in rows}):
        for task in ("semi_supervised", "surgery"):
            for tool in sorted({series(r) for r in rows}, key=lambda t: (t == "scvi-tools", t)):
                mine = sorted(
                    (r for r in rows if r["dataset"] == dataset and series(r) == tool and task in r),
                    key=lambda r: r["seed"],
                )
                if not mine:
                    continue
                acc = np.array([r[task]["accuracy"] for r in mine])
                f1 = np.array([r[task]["macro_f1"] for r in mine])
                seeds = ", ".join(f"{r['seed']}: {r[task]['accuracy']:.3f} / {r[task]['macro_f1']:.3f}" for r in mine)
                unchanged = (
                    "all seeds" if all(r[task].get("reference_latent_unchanged", True) for r in mine) else "NO"
                ) if task == "surgery" else ""  # fmt: skip
                lines.append(
                    f"| {dataset} | {task} | {tool} | {acc.mean():.3f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.3f} "
                    f"| {f1.mean():.3f} ± {f1.std(ddof=1) if len(f1) > 1 else 0:.3f} | {seeds} | {unchanged} |"
                )
    return "\n".join(lines)


def compare(rows: list[dict]) -> str:
    """Each atlasvi series against scvi-tools: means over their seeds, the difference with its standard error
    (the two means are independent: the tools' random streams differ, so seed numbers pair nothing) and 95%
    interval."""
    lines = [
        "| dataset | task | measure | atlasvi series | seeds | atlasvi | scvi-tools | difference ± s.e. "
        "| 95% interval |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    measures = {
        "accuracy": "accuracy",
        "macro_f1": "macro-F1",
        "query_accuracy_before_training": "accuracy before query training",
        "reference_accuracy": "reference scANVI accuracy (reference cells)",
    }
    for dataset in sorted({r["dataset"] for r in rows}):
        for task in ("semi_supervised", "surgery"):
            mine = [r for r in rows if r["dataset"] == dataset and task in r]
            theirs = [r[task] for r in mine if r["tool"] == "scvi-tools"]
            for tool in sorted({series(r) for r in mine} - {"scvi-tools"}):
                ours = [r[task] for r in mine if series(r) == tool]
                for key, name in measures.items():
                    if len(ours) < 2 or len(theirs) < 2 or any(key not in r for r in ours + theirs):
                        continue
                    a, b = (np.array([r[key] for r in part]) for part in (ours, theirs))
                    d = a.mean() - b.mean()
                    se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
                    lines.append(
                        f"| {dataset} | {task} | {name} | {tool} | {len(a)} / {len(b)} | {a.mean():.3f} "
                        f"| {b.mean():.3f} | {d:+.3f} ± {se:.3f} | {d - 1.96 * se:+.3f} to {d + 1.96 * se:+.3f} |"
                    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["kang", "cellbench"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    tasks = ["semi_supervised", "surgery"]
    parser.add_argument("--tasks", nargs="+", choices=tasks, default=tasks)
    parser.add_argument("--scvi-epochs", type=int, default=100)
    parser.add_argument("--kl-warmup", type=int, default=30, help="scVI pretraining's KL warm-up epochs")
    parser.add_argument("--scanvi-epochs", type=int, default=20)
    parser.add_argument("--query-epochs", type=int, default=50)
    parser.add_argument(
        "--store-seed", type=int, help="one row permutation of atlasvi's stores for every seed (default: the seed's)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "label_transfer")
    parser.add_argument("--rows-from", type=Path, help="only write the tables from the JSON rows a run printed (a log)")
    parser.add_argument("--side", choices=["both", "atlasvi", "scvi"], default="both", help="both, or one tool's rows")
    parser.add_argument("--h5ad", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    epochs = {
        "scvi": args.scvi_epochs,
        "kl_warmup": args.kl_warmup,
        "scanvi": args.scanvi_epochs,
        "query": args.query_epochs,
    }
    if args.rows_from is not None:
        rows = [json.loads(line) for line in args.rows_from.read_text().splitlines() if line.startswith('{"tool"')]
        write_results(args, epochs, rows)
        return
    if args.side == "scvi":
        warnings.simplefilter("ignore")
        print(json.dumps(scvi_side(args.datasets[0], args.h5ad, args.seeds[0], epochs, args.tasks)), flush=True)
        return
    import torch

    torch.set_num_threads(1)
    rows = []
    for name in args.datasets:
        workdir = HERE / ".cache" / "label_transfer" / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h5ad = prepare(name, workdir)
        for seed in args.seeds:
            store_seed = seed if args.store_seed is None else args.store_seed
            options = {"scvi-epochs": args.scvi_epochs, "kl-warmup": args.kl_warmup,
                       "scanvi-epochs": args.scanvi_epochs, "query-epochs": args.query_epochs}  # fmt: skip
            if args.side == "atlasvi":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rows.append(atlasvi_side(name, h5ad, workdir, seed, store_seed, epochs, args.tasks))
                print(json.dumps(rows[-1]), flush=True)
                continue
            command = [str(SCVI_PYTHON), __file__, "--side", "scvi", "--datasets", name, "--seeds", str(seed),
                       "--h5ad", str(h5ad), "--tasks", *args.tasks,
                       *(f"--{k}={v}" for k, v in options.items())]  # fmt: skip
            env = os.environ | {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mine = atlasvi_side(name, h5ad, workdir, seed, store_seed, epochs, args.tasks)
            print(json.dumps(mine), flush=True)
            out, _ = child.communicate()
            if child.returncode != 0:
                raise SystemExit(f"scvi-tools side failed ({child.returncode}): {' '.join(command)}")
            theirs = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(theirs), flush=True)
            rows += [mine, theirs]
    write_results(args, epochs, rows)


def write_results(args: argparse.Namespace, epochs: dict, rows: list[dict]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), CPU only, 1 torch thread per side",
        "epochs": epochs, "batch_size": 128, "arches_architecture": ARCHES, "command": " ".join(sys.argv),
    }  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = (
        f"# Label transfer and query mapping: atlasvi vs scvi-tools\n\n{json.dumps(meta)}\n\n{table(rows)}\n\n"
        f"atlasvi - scvi-tools (independent runs):\n\n{compare(rows)}\n"
    )
    args.out.with_suffix(".md").write_text(text)
    print(table(rows), compare(rows), sep="\n\n")


if __name__ == "__main__":
    main()
