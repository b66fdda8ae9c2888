"""The scvi-tools side of benchmarks/perf_compare.py: scvi-tools' SCVI on an atlas store's training cells, in memory.

Run by the benchmark as a script with the Python of an environment that has scvi-tools (it imports nothing of
atlasvi, which that environment need not have)::

    SCVI_PYTHON benchmarks/scvi_tools_side.py '{"store": "atlas.zarr", "n_train": 9000, "batch_size": 128, ...}'

The store is read whole with `anndata.read_zarr` and its first `n_train` rows (atlasvi's training rows) are kept
as an in-memory AnnData with float32 counts; `SCVI.setup_anndata(batch_key=...)`, `SCVI(n_hidden, n_latent,
n_layers, gene_likelihood="zinb", dispersion="gene")`, `train(train_size=1.0, batch_size, max_epochs,
early_stopping=False)`, scvi-tools' default optimiser and KL warm-up of `n_epochs_kl_warmup` epochs. Prints one
JSON object on the last stdout line: per-epoch wall times (a Lightning callback), the training wall time, the
time to load the AnnData, and the peak GPU memory on a GPU.
"""

import contextlib
import json
import logging
import sys
import time
from importlib.metadata import version


def _epoch_timer():
    import lightning.pytorch as pl

    class EpochTimer(pl.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._start = 0.0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def run(spec: dict) -> dict:
    """Train scvi-tools' SCVI as `spec` says; the figures as a JSON-able dict."""
    import anndata as ad
    import numpy as np
    import scvi
    import torch

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.num_threads = spec["threads"]
    scvi.settings.dl_num_workers = 0
    scvi.settings.seed = spec["seed"]
    started = time.perf_counter()
    adata = ad.read_zarr(spec["store"])
    adata = adata[: spec["n_train"]].copy()
    adata.X = adata.X.astype(np.float32)
    adata.obs = adata.obs[[spec["batch_key"]]].copy()
    load_s = time.perf_counter() - started
    scvi.model.SCVI.setup_anndata(adata, batch_key=spec["batch_key"])
    model = scvi.model.SCVI(
        adata, n_hidden=spec["n_hidden"], n_latent=spec["n_latent"], n_layers=spec["n_layers"],
        gene_likelihood="zinb", dispersion="gene",
    )  # fmt: skip
    gpu = spec["use_gpu"] and torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    timer = _epoch_timer()
    started = time.perf_counter()
    model.train(
        max_epochs=spec["epochs"], accelerator="gpu" if gpu else "cpu", devices=1, train_size=1.0,
        batch_size=spec["batch_size"], early_stopping=False, enable_progress_bar=False, callbacks=[timer],
        plan_kwargs={"n_epochs_kl_warmup": spec["n_epochs_kl_warmup"], "n_steps_kl_warmup": None},
    )  # fmt: skip
    return {
        "epoch_s": timer.seconds,
        "train_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "wall_s": time.perf_counter() - started,
        "load_s": load_s,
        "threads": torch.get_num_threads(),
        "device": "cuda" if gpu else "cpu",
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if gpu else None,
        "versions": {p: version(p) for p in ("scvi-tools", "lightning", "torch", "anndata")},
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    with contextlib.redirect_stdout(sys.stderr):  # scvi-tools' rich logger and Lightning print to stdout
        result = run(spec)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
