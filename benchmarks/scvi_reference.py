"""scvi-tools 1.4.x reference run for the scVI fidelity and speed comparison (issue 4).

Runs INSIDE the scvi venv (`bash benchmarks/setup_scvi_venv.sh`):

    benchmarks/.cache/scvi-venv/bin/python benchmarks/scvi_reference.py \
        --h5ad ../shared/data/cellbench_sc_mixology_3tech.h5ad --batch-key batch --labels-key cell_line \
        --filter-obs demuxlet_cls=SNG --n-top-genes 2000 \
        --heldout benchmarks/.cache/heldout_cellbench.txt --write-heldout \
        --seed 0 --max-epochs 200 --n-epochs-kl-warmup 50 --batch-size 128 \
        --out benchmarks/.cache/scvi_ref/cellbench --scib

One JSON object on stdout, progress on stderr.

What it does
- Cells: the h5ad, filtered by `--filter-obs KEY=VALUE` (repeatable). Genes: scanpy Seurat v3 HVG
  (batch-aware, on raw counts, over all kept cells), subset in original gene order (`fidelity_data.py`,
  the same selection atlasvi's store build makes).
- Split: the cells named in `--heldout` are never trained on. scVI is set up and trained on the other
  cells only (`train_size=1.0`: every one of them is a training cell, no validation set); the held-out
  cells are then scored with `model.get_elbo(adata_heldout)` (setup transferred from the training
  registry, so batch codes match).
- Schedule: fixed `max_epochs`, linear KL warm-up by epoch (`kl_weight = epoch / W` for 0-indexed epoch
  < W, then 1; only KL(z) is warmed up, KL(library) never is), no early stopping, scvi-tools' default
  optimizer (Adam, lr 1e-3, eps 0.01, weight_decay 1e-6), no gradient clipping, no LR schedule; seed via
  `scvi.settings.seed`; CPU, 2 torch threads, dataloader in the main process.
- Held-out numbers (per cell, mean over held-out cells, KL weight 1):
  `elbo` = scvi's `get_elbo` = -(reconstruction NLL + KL(z) + KL(l)) (higher is better, a negative
  number); `neg_elbo` = its negation (a loss, lower is better); `reconstruction_loss` = NLL (lower is
  better; scvi's `get_reconstruction_error` returns it with this sign despite its docstring). Each is one
  Monte-Carlo sample of z per cell as scvi computes it; `*_mc_mean` averages `--elbo-passes` passes.
- Latent (posterior mean of z) of ALL kept cells, in h5ad order: `OUT/latent_seed{S}.npy`, names in
  `OUT/cells.txt`; `--scib` adds the scib-metrics Benchmarker scores of that latent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # scib-metrics' jax: CPU, before anything imports jax
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity_data


def log(msg: str) -> None:
    print(f"[scvi_reference] {msg}", file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    import platform

    pkgs = ("scvi-tools", "torch", "lightning", "anndata", "scanpy", "numpy", "scib-metrics", "jax")
    out = {"python": platform.python_version()}
    for p in pkgs:
        try:
            out[p] = version(p)
        except Exception:  # noqa: BLE001
            out[p] = None
    return out


def _busy_cpu_s() -> float | None:
    """Seconds of CPU time all processes of the machine have used (from /proc/stat), None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(x) for x in fields]
        busy = sum(ticks) - ticks[3] - ticks[4]  # minus idle and iowait
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--h5ad", required=True)
    p.add_argument("--batch-key", required=True)
    p.add_argument("--labels-key", required=True)
    p.add_argument("--filter-obs", action="append", help="KEY=VALUE, keep cells with obs[KEY] == VALUE")
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--heldout", required=True, help="file of held-out cell names, one a line")
    p.add_argument(
        "--write-heldout",
        action="store_true",
        help="create --heldout (10%% of cells, numpy default_rng(0)) if it does not exist",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--n-epochs-kl-warmup", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-latent", type=int, default=10)
    p.add_argument("--n-hidden", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=1)
    p.add_argument("--gene-likelihood", default="zinb", choices=["zinb", "nb", "poisson"])
    p.add_argument("--dispersion", default="gene", choices=["gene", "gene-batch", "gene-label", "gene-cell"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--elbo-passes", type=int, default=10, help="MC passes averaged for *_mc_mean")
    p.add_argument("--scib", action="store_true", help="score the latent with scib-metrics Benchmarker")
    p.add_argument("--no-latent", action="store_true", help="skip writing the latent (speed runs)")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


class EpochTimer:
    """Lightning callback: wall time and this process's CPU time (every thread) of each training epoch (to
    separate start-up from steady state)."""

    def __new__(cls):
        import lightning.pytorch as pl

        class _Timer(pl.Callback):
            def __init__(self):
                self.times: list[float] = []
                self.cpu_times: list[float] = []
                self._t0 = self._cpu0 = 0.0

            def on_train_epoch_start(self, trainer, pl_module):
                self._t0, self._cpu0 = time.perf_counter(), time.process_time()

            def on_train_epoch_end(self, trainer, pl_module):
                self.times.append(time.perf_counter() - self._t0)
                self.cpu_times.append(time.process_time() - self._cpu0)

        return _Timer()


def main(argv=None) -> int:
    """Everything that scvi-tools, lightning or rich print goes to stderr; stdout gets the JSON only."""
    import contextlib

    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        result = run(parse_args(argv))
    print(json.dumps(result, indent=2), file=real_stdout)
    return 0


def run(args) -> dict:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import scvi
    import torch

    scvi.settings.verbosity = logging.WARNING  # its rich INFO handler writes to stdout
    scvi.settings.num_threads = args.threads  # torch.set_num_threads
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = args.seed  # lightning seed_everything: python, numpy, torch

    filters = fidelity_data.parse_filters(args.filter_obs)
    adata = fidelity_data.load_dataset(args.h5ad, args.batch_key, filters, args.n_top_genes)
    if args.labels_key not in adata.obs:
        raise SystemExit(f"{args.h5ad}: obs has no labels key {args.labels_key!r}")
    adata.X = adata.X.astype(np.float32)
    heldout_path = Path(args.heldout)
    if not heldout_path.exists():
        if not args.write_heldout:
            raise SystemExit(f"{heldout_path}: no such file (pass --write-heldout to create it)")
        names = fidelity_data.make_heldout(adata.obs_names, 0.1, 0)
        heldout_path.parent.mkdir(parents=True, exist_ok=True)
        heldout_path.write_text("\n".join(names) + "\n")
        log(f"wrote {heldout_path} ({len(names)} cells)")
    held = fidelity_data.read_names(heldout_path)
    unknown = set(held) - set(adata.obs_names)
    if unknown:
        raise SystemExit(f"{heldout_path}: {len(unknown)} names are not among the kept cells")
    is_held = adata.obs_names.isin(held)
    adata_train = adata[~is_held].copy()
    adata_held = adata[is_held].copy()
    log(f"{adata.n_obs} cells x {adata.n_vars} genes; train {adata_train.n_obs}, held-out {adata_held.n_obs}")

    scvi.model.SCVI.setup_anndata(adata_train, batch_key=args.batch_key)
    model = scvi.model.SCVI(
        adata_train,
        n_hidden=args.n_hidden,
        n_latent=args.n_latent,
        n_layers=args.n_layers,
        gene_likelihood=args.gene_likelihood,
        dispersion=args.dispersion,
    )
    timer = EpochTimer()
    plan_kwargs = {"n_epochs_kl_warmup": args.n_epochs_kl_warmup, "n_steps_kl_warmup": None}
    log(
        f"training seed {args.seed}: {args.max_epochs} epochs, KL warm-up {args.n_epochs_kl_warmup} epochs, "
        f"batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    load_before = os.getloadavg()
    busy0, own0 = _busy_cpu_s(), _own_cpu_s()
    t0 = time.perf_counter()
    model.train(
        max_epochs=args.max_epochs,
        accelerator="cpu",
        devices=1,
        train_size=1.0,
        batch_size=args.batch_size,
        early_stopping=False,
        plan_kwargs=plan_kwargs,
        enable_progress_bar=False,
        callbacks=[timer],
    )
    train_wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    busy1, own1 = _busy_cpu_s(), _own_cpu_s()
    # CPU cores that OTHER processes kept busy on average while we trained (contention check).
    others = None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / train_wall
    n_train = adata_train.n_obs
    assert len(model.train_indices) == n_train and len(model.validation_indices) == 0
    epochs_run = len(timer.times)
    steady = timer.times[1:] if len(timer.times) > 1 else timer.times
    log(f"trained in {train_wall:.1f} s ({n_train * epochs_run / train_wall:.0f} cells/s)")

    hist = {k: float(v.iloc[-1, 0]) for k, v in model.history.items() if len(v) and k.endswith("_train")}

    # Held-out: KL weight 1 (compute_elbo sums the unweighted reconstruction loss and kl_local terms).
    elbo_cells = model.get_elbo(adata_held, batch_size=1024, return_mean=False).numpy()
    rec_cells = model.get_reconstruction_error(adata_held, batch_size=1024, return_mean=False)
    rec_cells = rec_cells["reconstruction_loss"].numpy()
    elbo_passes = [float(elbo_cells.mean())]
    rec_passes = [float(rec_cells.mean())]
    for _ in range(args.elbo_passes - 1):
        elbo_passes.append(float(model.get_elbo(adata_held, batch_size=1024)))
        rec_passes.append(float(model.get_reconstruction_error(adata_held, batch_size=1024)["reconstruction_loss"]))
    heldout = {
        "n_cells": int(adata_held.n_obs),
        "elbo": float(elbo_cells.mean()),
        "neg_elbo": float(-elbo_cells.mean()),
        "reconstruction_loss": float(rec_cells.mean()),
        "kl_local": float(-elbo_cells.mean() - rec_cells.mean()),
        "elbo_mc_mean": float(np.mean(elbo_passes)),
        "elbo_mc_sd": float(np.std(elbo_passes, ddof=1)) if len(elbo_passes) > 1 else None,
        "reconstruction_loss_mc_mean": float(np.mean(rec_passes)),
        "mc_passes": len(elbo_passes),
        "sign": "elbo = -(reconstruction NLL + KL), per cell, higher is better; neg_elbo and "
        "reconstruction_loss are losses, lower is better",
    }
    log(
        f"held-out ELBO/cell {heldout['elbo']:.2f} (MC mean {heldout['elbo_mc_mean']:.2f}), "
        f"reconstruction NLL {heldout['reconstruction_loss']:.2f}"
    )

    result = {
        "tool": "scvi-tools",
        "versions": versions(),
        "dataset": Path(args.h5ad).name,
        "filters": filters,
        "batch_key": args.batch_key,
        "labels_key": args.labels_key,
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_train": int(n_train),
        "seed": args.seed,
        "model": {
            "n_latent": args.n_latent,
            "n_hidden": args.n_hidden,
            "n_layers": args.n_layers,
            "gene_likelihood": args.gene_likelihood,
            "dispersion": args.dispersion,
            "scvi_init_params": {k: v for k, v in model.init_params_.get("non_kwargs", {}).items()},
        },
        "schedule": {
            "max_epochs": args.max_epochs,
            "epochs_run": epochs_run,
            "n_epochs_kl_warmup": args.n_epochs_kl_warmup,
            "kl_warmup": "linear by epoch: kl_weight = epoch/W for 0-indexed epoch < W, else 1 (KL(z) only)",
            "batch_size": args.batch_size,
            "optimizer": "Adam",
            "lr": 1e-3,
            "eps": 0.01,
            "weight_decay": 1e-6,
            "early_stopping": False,
            "gradient_clip": None,
            "train_size": 1.0,
            "drop_last": False,
            "threads": torch.get_num_threads(),
        },
        "train_last_epoch": hist,
        "heldout": heldout,
        "timing": {
            "train_wall_s": train_wall,
            "cells_per_s": n_train * epochs_run / train_wall,
            "epoch_s_median": float(np.median(steady)),
            "cells_per_s_steady": float(n_train / np.median(steady)),
            "epoch_cpu_s": [round(t, 4) for t in timer.cpu_times],
            "cpu_s_per_cell_steady": float(np.median(timer.cpu_times[1:] or timer.cpu_times) / n_train),
            "first_epoch_s": float(timer.times[0]) if timer.times else None,
            "loadavg_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
            "other_processes_cpu_cores": None if others is None else round(others, 3),
            "own_cpu_cores": round((own1 - own0) / train_wall, 3),
            "cpu_count": os.cpu_count(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        },
    }

    if not args.no_latent or args.scib:
        z = model.get_latent_representation(adata, batch_size=1024).astype(np.float32)
        if not args.no_latent:
            np.save(out_dir / f"latent_seed{args.seed}.npy", z)
            (out_dir / "cells.txt").write_text("\n".join(map(str, adata.obs_names)) + "\n")
            result["latent"] = {"file": f"latent_seed{args.seed}.npy", "cells": "cells.txt", "shape": list(z.shape)}
        if args.scib:
            log("scib-metrics Benchmarker ...")
            t1 = time.perf_counter()
            scores = fidelity_data.scib_scores(adata, {"scVI": z}, args.batch_key, args.labels_key)["scVI"]
            scores["wall_s"] = time.perf_counter() - t1
            result["scib"] = scores
            log(
                f"scib total {scores['total']:.4f} (batch {scores['batch_correction']:.4f}, "
                f"bio {scores['bio_conservation']:.4f})"
            )

    (out_dir / f"result_seed{args.seed}_bs{args.batch_size}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    raise SystemExit(main())
