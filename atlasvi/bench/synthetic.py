"""Realistic synthetic raw-count ``.h5ad`` inputs for the benchmarks, written out of core.

Counts are negative binomial, drawn from per-cell-type gene mean profiles and per-gene dispersions fitted to a
real raw-count dataset (by default ``kang2018_pbmc_ifnb_muscat.h5ad`` in ``shared/data``: 1556 PBMCs x 1267
genes, 5 cell types), with

* ``obs["cell_type"]``: the reference's cell types, in its proportions (each batch perturbs them a little);
* ``obs["batch"]``: ``n_batches`` batches, each with a per-gene log-normal scaling of the means (batch effect)
  and a log-normal library-size shift;
* log-normal library sizes per cell type (location offsets and within-type spread fitted to the reference), with
  one global scale tuned so that the expected non-zero fraction is ``target_nnz`` (0.08 by default);
* more genes than the reference has: extra genes resample reference genes with log-normal jitter of their means
  and dispersions; fewer: a random subset.

``X`` is CSR (``int32`` data, ``int32`` indices, ``int64`` indptr), uncompressed, written chunk by chunk so peak
RSS stays at a few hundred MB whatever ``n_cells`` is. With ``layout="contiguous"`` (default) the chunks are
appended to raw temporary files next to the output and copied into contiguous (unchunked) HDF5 datasets at the end,
which is the layout ``anndata.write_h5ad`` gives uncompressed data; ``layout="chunked"`` appends straight into
resizable, chunked HDF5 datasets instead (no temporary files).

The sampler is exact: zeros are decided by ``E < -log P(0)`` with ``E ~ Exp(1)`` per entry, the non-zero values
by inverse CDF (small means) or by rejection from ``Generator.negative_binomial`` (large means). The output only
depends on ``seed`` (not on ``chunk_cells``): cells are generated in fixed blocks of ``GEN_BLOCK`` cells, each with
its own child generator spawned from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

REFERENCE_NAME = "kang2018_pbmc_ifnb_muscat.h5ad"  # the real dataset the defaults are fitted to
GEN_BLOCK = 2048  # cells per generation block (fixed: the output does not depend on chunk_cells)
_MIN_PROFILE = 1e-7  # floor on a gene's share of a cell type's counts (no exactly-zero means)


# ----------------------------------------------------------------------------------------------------------------
# Fitting the reference
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Reference:
    cell_types: list[str]
    type_freq: np.ndarray  # (T,)
    profiles: np.ndarray  # (T, G0) share of each gene in a cell type's library (rows sum to 1)
    phi: np.ndarray  # (G0,) NB dispersion (var = mu + phi mu^2)
    loglib_offset: np.ndarray  # (T,) mean log library size per type, relative to the overall mean
    loglib_sd: float  # pooled within-type sd of log library size
    gene_symbols: np.ndarray  # (G0,)


def fit_reference(path: str | os.PathLike, cell_type_key: str = "cell_type") -> Reference:
    """Per-cell-type mean profiles, per-gene NB dispersions and library-size distribution of a raw-count h5ad."""
    adata = ad.read_h5ad(path)
    X = sp.csr_matrix(adata.X, dtype=np.float64)
    labels = adata.obs[cell_type_key].astype("category")
    types = list(labels.cat.categories)
    lib = np.asarray(X.sum(axis=1)).ravel()
    loglib = np.log(np.maximum(lib, 1.0))
    n_t, n_g = len(types), X.shape[1]
    profiles = np.empty((n_t, n_g))
    inv_phi_w = np.zeros(n_g)
    phi_sum = np.zeros(n_g)
    offsets = np.empty(n_t)
    resid = []
    for t, name in enumerate(types):
        m = (labels == name).to_numpy()
        Xt, lt = X[m], lib[m]
        s = lt / lt.mean()  # size factors within the type
        Y = sp.diags(1.0 / s) @ Xt  # normalised counts
        mu = np.asarray(Y.mean(axis=0)).ravel()
        ey2 = np.asarray(Y.multiply(Y).mean(axis=0)).ravel()
        var = ey2 - mu**2
        # Var(y) = mu * E[1/s] + phi mu^2 for y = x / s, x ~ NB(s mu, phi)
        ok = mu > 0.05
        phi_t = np.where(ok, (var - mu * np.mean(1.0 / s)) / np.maximum(mu, 1e-12) ** 2, 0.0)
        phi_sum += np.where(ok, np.clip(phi_t, 0.01, 5.0) * m.sum(), 0.0)
        inv_phi_w += np.where(ok, m.sum(), 0.0)
        profiles[t] = np.maximum(mu / mu.sum(), _MIN_PROFILE)
        offsets[t] = loglib[m].mean()
        resid.append(loglib[m] - offsets[t])
    med = np.median(phi_sum[inv_phi_w > 0] / inv_phi_w[inv_phi_w > 0])
    phi = np.where(inv_phi_w > 0, phi_sum / np.maximum(inv_phi_w, 1), med)
    profiles /= profiles.sum(axis=1, keepdims=True)
    freq = labels.value_counts(normalize=True).reindex(types).to_numpy()
    symbols = np.asarray(adata.var_names.astype(str))
    return Reference(
        cell_types=[str(t) for t in types],
        type_freq=freq,
        profiles=profiles,
        phi=phi,
        loglib_offset=offsets - np.sum(freq * offsets),
        loglib_sd=float(np.concatenate(resid).std()),
        gene_symbols=symbols,
    )


# ----------------------------------------------------------------------------------------------------------------
# Simulation parameters
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SimParams:
    cell_types: list[str]
    type_freq_by_batch: np.ndarray  # (B, T)
    means: np.ndarray  # (B*T, G) float64: expected counts per unit library, row index b * T + t
    phi: np.ndarray  # (G,)
    loglib_offset: np.ndarray  # (T,)
    batch_loglib_shift: np.ndarray  # (B,)
    loglib_sd: float
    log_scale: float  # log of the global library size scale (tuned)
    source_gene: np.ndarray  # (G,) reference gene each synthetic gene was drawn from


def make_params(
    ref: Reference,
    n_genes: int,
    n_batches: int,
    rng: np.random.Generator,
    *,
    gene_jitter_sd: float = 0.5,
    type_jitter_sd: float = 0.2,
    phi_jitter_sd: float = 0.25,
    batch_gene_sd: float = 0.25,
    batch_lib_sd: float = 0.15,
) -> SimParams:
    n_t, g0 = ref.profiles.shape
    if n_genes <= g0:
        src = np.sort(rng.choice(g0, size=n_genes, replace=False))
        prof = ref.profiles[:, src]
        phi = ref.phi[src]
    else:
        extra = rng.integers(0, g0, size=n_genes - g0)
        src = np.concatenate([np.arange(g0), extra])
        jit = np.exp(
            rng.normal(0.0, gene_jitter_sd, size=(1, extra.size)) + rng.normal(0.0, type_jitter_sd, (n_t, extra.size))
        )
        prof = np.concatenate([ref.profiles, ref.profiles[:, extra] * jit], axis=1)
        phi = np.concatenate([ref.phi, ref.phi[extra] * np.exp(rng.normal(0.0, phi_jitter_sd, extra.size))])
        perm = rng.permutation(n_genes)  # do not keep all reference genes first
        src, prof, phi = src[perm], prof[:, perm], phi[perm]
    prof = prof / prof.sum(axis=1, keepdims=True)
    phi = np.clip(phi, 0.01, 5.0)
    batch_gene = np.exp(rng.normal(0.0, batch_gene_sd, size=(n_batches, n_genes)))
    means = (batch_gene[:, None, :] * prof[None, :, :]).reshape(n_batches * n_t, n_genes)
    freq = rng.dirichlet(100.0 * ref.type_freq, size=n_batches)
    return SimParams(
        cell_types=ref.cell_types,
        type_freq_by_batch=freq,
        means=means,
        phi=phi,
        loglib_offset=ref.loglib_offset,
        batch_loglib_shift=rng.normal(0.0, batch_lib_sd, size=n_batches),
        loglib_sd=ref.loglib_sd,
        log_scale=np.log(1000.0),
        source_gene=src,
    )


def draw_cells(params: SimParams, n_cells: int, rng: np.random.Generator):
    """Batch, cell type and log library size (without the global scale) of each cell."""
    n_b, n_t = params.type_freq_by_batch.shape
    batch = np.sort(rng.integers(0, n_b, size=n_cells)).astype(np.int16)  # cells grouped by batch, like real files
    ctype = np.empty(n_cells, dtype=np.int16)
    for b in range(n_b):
        m = batch == b
        ctype[m] = rng.choice(n_t, size=int(m.sum()), p=params.type_freq_by_batch[b])
    loglib = (
        params.loglib_offset[ctype] + params.batch_loglib_shift[batch] + rng.normal(0.0, params.loglib_sd, size=n_cells)
    )
    return batch, ctype, loglib


def expected_nnz_fraction(params: SimParams, batch, ctype, loglib, log_scale: float) -> float:
    n_t = len(params.cell_types)
    mu = np.exp(loglib + log_scale)[:, None] * params.means[batch.astype(np.int64) * n_t + ctype]
    p0 = np.exp(-np.log1p(mu * params.phi) / params.phi)
    return float(1.0 - p0.mean())


def tune_scale(params: SimParams, target_nnz: float, rng: np.random.Generator, max_entries: int = 4_000_000) -> float:
    """Global log library-size scale that gives the target expected non-zero fraction (bisection)."""
    n = int(max(200, min(5000, max_entries // params.means.shape[1])))
    b, t, ll = draw_cells(params, n, rng)
    lo, hi = np.log(1.0), np.log(1e6)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if expected_nnz_fraction(params, b, t, ll, mid) < target_nnz:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-4:
            break
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------------------------------
# Exact NB sampling, sparse-aware
# ----------------------------------------------------------------------------------------------------------------


def _nonzero_nb_values(mu, phi, u, lam, rng: np.random.Generator, k_max: int = 64) -> np.ndarray:
    """Draw X ~ NB(mean mu, dispersion phi) conditioned on X > 0, given u = exp(-E) > P(0) = exp(-lam)."""
    out = np.empty(mu.size, dtype=np.int64)
    th = 1.0 / phi
    p0 = np.exp(-lam)
    big = p0 < 0.5  # P(X > 0) > 0.5: rejection from the full NB needs < 2 draws on average
    # --- rejection for large means
    idx = np.flatnonzero(big)
    for _ in range(200):
        if idx.size == 0:
            break
        x = rng.negative_binomial(th[idx], th[idx] / (th[idx] + mu[idx]))
        ok = x > 0
        out[idx[ok]] = x[ok]
        idx = idx[~ok]
    out[idx] = 1
    # --- inverse CDF (u is uniform on (P(0), 1) given X > 0) for small means
    idx = np.flatnonzero(~big)
    q = mu[idx] / (mu[idx] + th[idx])
    thi, ui = th[idx], u[idx]
    pk = p0[idx] * thi * q  # P(X = 1)
    cdf = p0[idx] + pk
    k = np.ones(idx.size, dtype=np.int64)
    act = np.flatnonzero(ui > cdf)
    while act.size and int(k[act[0]]) < k_max:
        k[act] += 1
        ka = k[act]
        pk[act] *= (ka - 1 + thi[act]) / ka * q[act]
        cdf[act] += pk[act]
        act = act[ui[act] > cdf[act]]
    out[idx] = k
    # tail beyond k_max (rare): X | X > k_max by rejection
    tail = idx[act]
    for _ in range(1000):
        if tail.size == 0:
            break
        x = rng.negative_binomial(th[tail], th[tail] / (th[tail] + mu[tail]))
        ok = x > k_max
        out[tail[ok]] = x[ok]
        tail = tail[~ok]
    out[tail] = k_max + 1
    return out


def sample_block(params: SimParams, batch, ctype, lib, rng: np.random.Generator) -> sp.csr_matrix:
    """NB counts for one block of cells, as CSR (int32 data/indices, int64 indptr). No cell has zero counts."""
    n_t = len(params.cell_types)
    n_c, n_g = lib.size, params.means.shape[1]
    rows_means = params.means.astype(np.float32)[batch.astype(np.int64) * n_t + ctype]
    mu = rows_means * lib.astype(np.float32)[:, None]
    phi32 = params.phi.astype(np.float32)
    lam = np.log1p(mu * phi32)
    lam *= (1.0 / phi32)[None, :]  # -log P(0)
    e = rng.standard_exponential(size=(n_c, n_g), dtype=np.float32)
    r, c = np.nonzero(e < lam)
    del lam
    mu_nz = (params.means[batch[r].astype(np.int64) * n_t + ctype[r], c] * lib[r]).astype(np.float64)
    phi_nz = params.phi[c]
    lam_nz = np.log1p(mu_nz * phi_nz) / phi_nz
    u = np.exp(-e[r, c].astype(np.float64))
    del e, mu
    vals = _nonzero_nb_values(mu_nz, phi_nz, u, lam_nz, rng)
    counts = np.bincount(r, minlength=n_c)
    empty = np.flatnonzero(counts == 0)
    if empty.size:  # no empty cells: one count on a gene drawn from the cell's profile
        add_c = np.empty(empty.size, dtype=c.dtype)
        for n, i in enumerate(empty):
            p = rows_means[i].astype(np.float64)
            add_c[n] = rng.choice(n_g, p=p / p.sum())
        r = np.concatenate([r, empty.astype(r.dtype)])
        c = np.concatenate([c, add_c])
        vals = np.concatenate([vals, np.ones(empty.size, dtype=vals.dtype)])
        order = np.lexsort((c, r))
        r, c, vals = r[order], c[order], vals[order]
        counts = np.bincount(r, minlength=n_c)
    indptr = np.zeros(n_c + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return sp.csr_matrix((vals.astype(np.int32), c.astype(np.int32), indptr), shape=(n_c, n_g))


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def _peak_rss_mb() -> float | None:
    try:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / 1024.0 if sys.platform != "darwin" else r / 2**20
    except Exception:  # noqa: BLE001
        return None


def make_synthetic_h5ad(
    path: str | os.PathLike,
    n_cells: int,
    n_genes: int,
    seed: int,
    n_batches: int = 4,
    chunk_cells: int = 50_000,
    *,
    target_nnz: float = 0.08,
    layout: str = "contiguous",
    reference: str | os.PathLike,
    verbose: bool = False,
) -> dict:
    """Write a synthetic raw-count h5ad (CSR X, obs ``cell_type``/``batch``) out of core; return its stats."""
    if layout not in ("contiguous", "chunked"):
        raise ValueError(f"layout must be 'contiguous' or 'chunked', got {layout!r}")
    if n_cells < 1 or n_genes < 1 or n_batches < 1 or chunk_cells < 1:
        raise ValueError("n_cells, n_genes, n_batches and chunk_cells must be >= 1")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    ref = fit_reference(reference)
    params = make_params(ref, n_genes, n_batches, rng)
    params.log_scale = tune_scale(params, target_nnz, rng)
    batch, ctype, loglib = draw_cells(params, n_cells, rng)
    lib = np.exp(loglib + params.log_scale)
    del loglib
    n_blocks = -(-n_cells // GEN_BLOCK)
    block_rngs = rng.spawn(n_blocks)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(path.name + ".partial")
    raw_data = path.with_name(path.name + ".data.tmp")
    raw_indices = path.with_name(path.name + ".indices.tmp")
    nnz = 0
    total_counts = 0
    max_count = 0
    min_cell_total = np.iinfo(np.int64).max
    try:
        with h5py.File(tmp_path, "w") as f:
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            g = f.create_group("X")
            g.attrs["encoding-type"] = "csr_matrix"
            g.attrs["encoding-version"] = "0.1.0"
            g.attrs["shape"] = np.array([n_cells, n_genes], dtype=np.int64)
            d_indptr = g.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
            d_indptr[0] = 0
            if layout == "chunked":
                cs = 1 << 16
                d_data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(cs,))
                d_ind = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(cs,))
                fdata = findices = None
            else:
                fdata, findices = open(raw_data, "wb"), open(raw_indices, "wb")
            cached = None
            try:
                for start in range(0, n_cells, chunk_cells):
                    stop = min(start + chunk_cells, n_cells)
                    parts = []
                    # generation blocks overlapping [start, stop): chunk_cells need not be a multiple of
                    # GEN_BLOCK; a block straddling two write chunks is generated once and kept for the next
                    for blk in range(start // GEN_BLOCK, -(-stop // GEN_BLOCK)):
                        b0, b1 = blk * GEN_BLOCK, min((blk + 1) * GEN_BLOCK, n_cells)
                        if cached is not None and cached[0] == blk:
                            m = cached[1]
                        else:
                            m = sample_block(params, batch[b0:b1], ctype[b0:b1], lib[b0:b1], block_rngs[blk])
                        cached = (blk, m) if b1 > stop else None
                        parts.append(m[max(start, b0) - b0 : min(stop, b1) - b0])
                    chunk = sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
                    data = chunk.data.astype(np.int32, copy=False)
                    indices = chunk.indices.astype(np.int32, copy=False)
                    if layout == "chunked":
                        d_data.resize((nnz + data.size,))
                        d_data[nnz:] = data
                        d_ind.resize((nnz + data.size,))
                        d_ind[nnz:] = indices
                    else:
                        data.tofile(fdata)
                        indices.tofile(findices)
                    d_indptr[start + 1 : stop + 1] = chunk.indptr[1:].astype(np.int64) + nnz
                    nnz += data.size
                    tot = np.asarray(chunk.sum(axis=1)).ravel()
                    total_counts += int(tot.sum())
                    min_cell_total = min(min_cell_total, int(tot.min()))
                    max_count = max(max_count, int(data.max()) if data.size else 0)
                    if verbose:
                        el = time.perf_counter() - t0
                        print(
                            f"  {stop:>10,d}/{n_cells:,d} cells  nnz {nnz:,d}  {el:6.1f}s  rss {_peak_rss_mb():.0f}MB",
                            file=sys.stderr,
                        )
            finally:
                if fdata is not None:
                    fdata.close()
                    findices.close()
            if layout == "contiguous":
                step = 1 << 24
                for name, raw in (("data", raw_data), ("indices", raw_indices)):
                    ds = g.create_dataset(name, shape=(nnz,), dtype=np.int32)
                    with open(raw, "rb") as fh:
                        for s0 in range(0, nnz, step):
                            n = min(step, nnz - s0)
                            ds[s0 : s0 + n] = np.fromfile(fh, dtype=np.int32, count=n)
                    os.unlink(raw)
            obs = pd.DataFrame(
                {
                    "cell_type": pd.Categorical.from_codes(ctype, categories=params.cell_types),
                    "batch": pd.Categorical.from_codes(batch, categories=[f"batch_{b}" for b in range(n_batches)]),
                },
                index=pd.Index([f"cell_{i}" for i in range(n_cells)]),
            )
            var = pd.DataFrame(
                {"source_gene": ref.gene_symbols[params.source_gene].astype(str), "dispersion": params.phi},
                index=pd.Index([f"gene_{j}" for j in range(n_genes)]),
            )
            ad.io.write_elem(f, "obs", obs)
            ad.io.write_elem(f, "var", var)
            del obs
            for key in ("obsm", "varm", "obsp", "varp", "layers"):
                ad.io.write_elem(f, key, {})
            ad.io.write_elem(
                f,
                "uns",
                {"synthetic": {"seed": seed, "reference": Path(reference).name, "target_nnz": target_nnz}},
            )
        os.replace(tmp_path, path)
    finally:
        for p in (tmp_path, raw_data, raw_indices):
            if p.exists():
                p.unlink()
    seconds = time.perf_counter() - t0
    return {
        "path": str(path),
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_batches": n_batches,
        "seed": seed,
        "nnz": nnz,
        "nnz_fraction": nnz / (n_cells * n_genes),
        "target_nnz": target_nnz,
        "mean_total_counts": total_counts / n_cells,
        "min_cell_total": min_cell_total,
        "max_count": max_count,
        "median_library_scale": float(np.exp(params.log_scale)),
        "layout": layout,
        "seconds": seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "file_mb": path.stat().st_size / 2**20,
    }
