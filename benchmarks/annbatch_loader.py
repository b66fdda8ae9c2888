"""annbatch side of the loader benchmark. Runs INSIDE the annbatch venv (Python >= 3.12, no torch):

    bash benchmarks/setup_annbatch_venv.sh
    benchmarks/.cache/annbatch-venv/bin/python benchmarks/annbatch_loader.py \\
        --h5ad benchmarks/.cache/synth_200k.h5ad --workdir benchmarks/.cache/annbatch \\
        --batch-sizes 128 1024 4096 --zarrs on off --epochs-cells 1000000

1. Writes annbatch's own on-disk store from the input h5ad with its documented store-creation API,
   :meth:`annbatch.DatasetCollection.add_adatas` (pre-shuffled, sharded zarr v3 collection, written with the zarrs
   codec pipeline as annbatch's README does), in a child process so its wall time and peak RSS are the write's own.
   The store is cached in ``--workdir``: it is rewritten only when the input file (path, size, mtime) or the store
   settings change.
2. Warms the page cache (reads every store file once), then for each ``--zarrs`` setting and batch size iterates
   :class:`annbatch.Loader` (``use_collection``, shuffled ``RandomSampler`` via ``shuffle=True``, default
   ``chunk_size=512`` / ``preload_nchunks=32``, ``preload_to_gpu=False``, no ``to=`` conversion: batches are
   ``scipy.sparse.csr_matrix``) over at least one full pass or ``--epochs-cells`` cells (whole passes are chained),
   ``--repeats`` times; reports the median cells/s, timed from the first batch's request (and, per repeat, the
   steady state: cells/s after the first batch; the first batch's seconds; the setup's, opening the collection and
   building the Loader, which the cells/s leave out). Each zarrs setting runs in its own child process (the codec
   pipeline is bound when arrays are opened).
3. Prints ONE JSON object to stdout (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"
# annbatch's default store codec (lz4, also atlasvi's default), and zstd as atlasvi's `--compressor zstd` writes counts
COMPRESSORS = {
    "lz4": "blosc lz4 clevel 3 shuffle (annbatch default)",
    "zstd": "blosc zstd clevel 3 bitshuffle (atlasvi's zstd counts)",
}
DEFAULT_PIPELINE = "zarr.core.codec_pipeline.BatchedCodecPipeline"


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _set_pipeline(zarrs: bool) -> None:
    import zarr

    zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE if zarrs else DEFAULT_PIPELINE})


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for p in ("annbatch", "zarr", "zarrs", "anndata", "numpy", "scipy"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


# ----------------------------------------------------------------------------------------------------------------
# 1. store write (child process)
# ----------------------------------------------------------------------------------------------------------------


def _store_settings(args) -> dict:
    return {
        "api": "annbatch.DatasetCollection(...).add_adatas",
        "shuffle": True,
        "n_obs_per_chunk": args.n_obs_per_chunk,
        "shard_size": args.shard_size,
        "dataset_size": args.dataset_size,
        "shuffle_chunk_size": args.shuffle_chunk_size,
        "zarr_compressor": COMPRESSORS[args.compressor],
        "write_codec_pipeline": ZARRS_PIPELINE,
        "seed": args.seed,
    }


def _cache_key(h5ad: Path, settings: dict) -> str:
    st = h5ad.stat()
    blob = json.dumps({"input": str(h5ad.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns, **settings})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _parse_size_or_int(v: str) -> int | str:
    return int(v) if v.isdigit() else v


def write_store(h5ad: Path, store: Path, args) -> dict:
    """Runs in a child process: writes the collection, returns timing and peak RSS."""
    import numpy as np
    from annbatch import DatasetCollection
    from zarr.codecs import BloscCodec

    codec = {"lz4": ("lz4", "shuffle"), "zstd": ("zstd", "bitshuffle")}[args.compressor]
    _set_pipeline(True)
    t0 = time.perf_counter()
    DatasetCollection(store).add_adatas(
        [str(h5ad)],
        zarr_compressor=(BloscCodec(cname=codec[0], clevel=3, shuffle=codec[1]),),
        shuffle=True,
        n_obs_per_chunk=args.n_obs_per_chunk,
        shard_size=_parse_size_or_int(args.shard_size),
        dataset_size=_parse_size_or_int(args.dataset_size),
        shuffle_chunk_size=args.shuffle_chunk_size,
        rng=np.random.default_rng(args.seed),
    )
    return {"write_s": time.perf_counter() - t0, "write_peak_rss_mb": _peak_rss_mb()}


def ensure_store(h5ad: Path, workdir: Path, args) -> tuple[Path, dict]:
    settings = _store_settings(args)
    key = _cache_key(h5ad, settings)
    store = workdir / f"{h5ad.stem}.{args.compressor}.annbatch.zarr"
    meta_path = workdir / f"{h5ad.stem}.{args.compressor}.annbatch.json"
    if store.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            _log(f"annbatch store cached: {store} (written in {meta['write_s']:.1f}s)")
            meta["cached"] = True
            return store, meta
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / f"{h5ad.stem}.{args.compressor}.annbatch.partial.zarr"
    for p in (store, tmp):
        if p.exists():
            shutil.rmtree(p)
    meta_path.unlink(missing_ok=True)
    _log(f"writing annbatch store {store} ...")
    cmd = [sys.executable, __file__, "--_child", "write", "--h5ad", str(h5ad), "--_store", str(tmp), *_store_argv(args)]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, text=True)
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    tmp.rename(store)
    meta = {"key": key, "input": str(h5ad), **stats, "store_settings": settings, "cached": False}
    meta["store_mb"] = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 2**20
    meta_path.write_text(json.dumps(meta, indent=1))
    _log(f"store written in {stats['write_s']:.1f}s, peak RSS {stats['write_peak_rss_mb']:.0f} MB")
    return store, meta


def _store_argv(args) -> list[str]:
    return [
        "--n-obs-per-chunk", str(args.n_obs_per_chunk),
        "--shard-size", str(args.shard_size),
        "--dataset-size", str(args.dataset_size),
        "--shuffle-chunk-size", str(args.shuffle_chunk_size),
        "--seed", str(args.seed),
        "--compressor", args.compressor,
    ]  # fmt: skip


def warm_page_cache(store: Path) -> float:
    t0 = time.perf_counter()
    buf = bytearray(1 << 24)
    for f in store.rglob("*"):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------------
# 2. loading (child process per zarrs setting)
# ----------------------------------------------------------------------------------------------------------------


def measure(store: Path, zarrs: bool, args) -> list[dict]:
    import anndata as ad
    import numpy as np
    import zarr
    from annbatch import DatasetCollection, Loader

    _set_pipeline(zarrs)
    obs_cols = list(args.obs_columns)

    def load_x_only(g: zarr.Group) -> ad.AnnData:
        # annbatch README: a custom load function so that only the needed obs columns are loaded/yielded
        obs = ad.io.read_elem(g["obs"])
        return ad.AnnData(X=ad.io.sparse_dataset(g["X"]), obs=obs[obs_cols] if obs_cols else obs.iloc[:, :0])

    rows = []
    for bs in args.batch_sizes:
        per_rep = []
        pipeline_cls = None
        for rep in range(args.repeats):
            t_setup = time.perf_counter()
            collection = DatasetCollection(store, mode="r")
            with ad.settings.override(remove_unused_categories=False):
                loader = Loader(
                    batch_size=bs,
                    chunk_size=args.chunk_size,
                    preload_nchunks=args.preload_nchunks,
                    shuffle=True,
                    preload_to_gpu=False,
                    rng=np.random.default_rng(args.seed + rep),
                ).use_collection(collection, load_adata=load_x_only)
            if pipeline_cls is None:
                arr = next(iter(collection))["X"]["data"]
                pipeline_cls = type(arr._async_array.codec_pipeline).__name__
            target = max(args.epochs_cells or 0, loader.n_obs)
            n = 0
            nnz = 0
            t0 = time.perf_counter()
            setup = t0 - t_setup
            while n < target:
                for batch in loader:
                    x = batch["X"]
                    if n == 0:
                        first_at, first_n = time.perf_counter(), x.shape[0]
                    if args.densify:
                        x = x.toarray()
                        nnz += int(np.count_nonzero(x[:, :1]))  # touch the result
                    else:
                        nnz += x.nnz
                    n += x.shape[0]
                    if n >= target:
                        break
            end = time.perf_counter()
            dt = end - t0
            per_rep.append(
                {
                    "cells": n, "seconds": dt, "cells_per_s": n / dt, "nnz": nnz, "setup_s": setup,
                    "first_batch_s": first_at - t0, "steady_cells_per_s": (n - first_n) / (end - first_at),
                }
            )  # fmt: skip
            z = "on" if zarrs else "off"
            _log(f"  zarrs={z} batch={bs} rep={rep}: {n / dt:,.0f} cells/s ({n:,d} cells, {dt:.2f}s)")
        cps = [r["cells_per_s"] for r in per_rep]
        rows.append(
            {
                "batch_size": bs,
                "zarrs": zarrs,
                "codec_pipeline": pipeline_cls,
                "cells_per_s_median": statistics.median(cps),
                "cells_per_s_all": cps,
                "cells_per_rep": per_rep[0]["cells"],
                "seconds_all": [r["seconds"] for r in per_rep],
                "steady_cells_per_s_median": statistics.median(r["steady_cells_per_s"] for r in per_rep),
                "steady_cells_per_s_all": [r["steady_cells_per_s"] for r in per_rep],
                "first_batch_s_all": [r["first_batch_s"] for r in per_rep],
                "setup_s_all": [r["setup_s"] for r in per_rep],
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="annbatch loader throughput (run inside the annbatch venv)")
    p.add_argument("--h5ad", required=True, type=Path)
    p.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / ".cache" / "annbatch")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024, 4096])
    p.add_argument("--zarrs", nargs="+", choices=["on", "off"], default=["on"])
    p.add_argument("--epochs-cells", type=int, default=0, help="cells per measurement (at least one full pass)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=512, help="Loader chunk_size (annbatch default)")
    p.add_argument("--preload-nchunks", type=int, default=32, help="Loader preload_nchunks (annbatch default)")
    p.add_argument("--obs-columns", nargs="*", default=[], help="obs columns to yield with X (default: none)")
    p.add_argument("--densify", action="store_true", help="convert each batch to a dense numpy array")
    p.add_argument("--no-warm", action="store_true", help="do not pre-read the store into the page cache")
    # store (DatasetCollection.add_adatas) settings: annbatch defaults
    p.add_argument("--n-obs-per-chunk", type=int, default=64)
    p.add_argument("--shard-size", default="1GB")
    p.add_argument("--dataset-size", default="20GB")
    p.add_argument("--shuffle-chunk-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compressor", choices=sorted(COMPRESSORS), default="lz4", help="the store's Blosc codec")
    p.add_argument("--_child", choices=["write", "measure"], help=argparse.SUPPRESS)
    p.add_argument("--_store", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args._child == "write":
        print(json.dumps(write_store(args.h5ad, args._store, args)))
        return 0
    if args._child == "measure":
        print(json.dumps(measure(args._store, args.zarrs[0] == "on", args)))
        return 0

    if not args.h5ad.exists():
        raise SystemExit(f"input not found: {args.h5ad}")
    store, meta = ensure_store(args.h5ad, args.workdir, args)
    warm_s = None if args.no_warm else warm_page_cache(store)
    rows = []
    passthrough = [
        "--batch-sizes", *map(str, args.batch_sizes),
        "--epochs-cells", str(args.epochs_cells),
        "--repeats", str(args.repeats),
        "--chunk-size", str(args.chunk_size),
        "--preload-nchunks", str(args.preload_nchunks),
        "--seed", str(args.seed),
        "--obs-columns", *args.obs_columns,
        *(["--densify"] if args.densify else []),
    ]  # fmt: skip
    for z in args.zarrs:
        cmd = [sys.executable, __file__, "--_child", "measure", "--h5ad", str(args.h5ad), "--_store", str(store)]
        res = subprocess.run([*cmd, "--zarrs", z, *passthrough], stdout=subprocess.PIPE, check=True, text=True)
        rows.extend(json.loads(res.stdout.strip().splitlines()[-1]))
    import anndata as ad

    n_obs, n_vars = ad.read_h5ad(args.h5ad, backed="r").shape
    out = {
        "input": str(args.h5ad),
        "n_obs": n_obs,
        "n_vars": n_vars,
        "write_s": meta["write_s"],
        "write_peak_rss_mb": meta["write_peak_rss_mb"],
        "store_cached": meta["cached"],
        "store_mb": meta.get("store_mb"),
        "store_settings": meta["store_settings"],
        "compressor": args.compressor,
        "loader_settings": {
            "api": "annbatch.Loader(...).use_collection(collection, load_adata=X + selected obs columns)",
            "shuffle": True,
            "chunk_size": args.chunk_size,
            "preload_nchunks": args.preload_nchunks,
            "preload_to_gpu": False,
            "to": None,
            "yields": "dense numpy" if args.densify else "scipy.sparse.csr_matrix",
            "obs_columns": args.obs_columns,
            "epochs_cells": args.epochs_cells,
            "repeats": args.repeats,
            "page_cache": "not warmed" if args.no_warm else f"warm (store read once in {warm_s:.1f}s)",
            "zarr_threading_max_workers": None,
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": _versions(),
        "rows": rows,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
