"""`atlasvi build`: many inputs -> one validated, globally shuffled atlas store, out of core.

Passes over the inputs, each a list of tasks over chunks of `chunk_size` cells (a worker's memory scales with
`chunk_size`, not with the cells):
  0. metadata: each input's genes and panels; each chunk's categories and hashes of its cell names;
  1. validate counts (integer, >= 0, finite), find empty cells, per-batch gene moments;
  2. (with n_top_genes) Seurat v3 clipped sums -> highly variable genes;
  3. scatter: each chunk writes its kept cells, with their destination rows in the global seeded permutation,
     to its own scratch file, grouped by shuffle bucket (a bucket covers a range of store rows), behind a
     table of where each bucket's segment lies (the driver keeps only each bucket's totals);
  4. gather: each bucket reads its segments of every chunk's file, sorts them by destination and writes the
     shards of the store it covers whole; the parts of shards it shares with other buckets become fragments;
  5. each shared shard is joined from its fragments and written.
The tasks run on a `BuildExecutor`: here, one after the other, on local dask workers or on a dask.distributed
cluster. No two tasks write the same file, and what the driver folds is exact (integer sums, see
`atlasvi.data.exact`; maxima; unions), so the store is the same bit for bit whatever the workers, their
number and the chunk size (`atlasvi.data.store.store_checksum`). Inputs are files, folders of them or glob
patterns (`atlasvi.data.inputs.expand_inputs`); each one's sha256 is in the provenance.
With a protein key, each cell's protein counts travel with it (the union of the inputs' panels, in order of
first appearance; a protein outside an input's panel is stored as 0 and masked as not measured) and
become the store's protein modality (see `atlasvi.data.store`). With an ATAC key, each cell's peak counts
travel as a second sparse matrix (in the same segments) and become the store's "atac" modality; inputs
with peaks must share one peak set (aligned by name), a cell without peaks is stored as not measured. With an
ATAC key the store's cells are the union of the cells with RNA and those with peaks (MultiVI's paired and
unpaired cells), and an "rna" mask modality (obsm/rna_mask) says which cells' RNA was measured: a cell of an
.h5mu's ATAC modality that its RNA modality lacks, and any cell with peaks but no RNA counts (scvi-tools'
MULTIVI reads a concatenated AnnData so), is stored with an empty X row and RNA not measured; in an .h5ad or
10x input a cell without any peak counts has ATAC not measured. A cell with neither is an empty cell
(zero_count_cells). Such cells add nothing to the HVG statistics or the per-batch library prior.
Spatial coordinates (obsm[spatial_key] of every input) travel with their cells too and become the store's
obsm["spatial"] (float64, cells x 2 or 3), as scanpy and squidpy read them.
The store is written to a hidden sibling and renamed into place at the end: an interrupted build
leaves nothing under the target name. The hidden siblings (`.NAME.building-`, `.scratch-`, `.replaced-`)
carry the host and pid of their build: an interrupted build removes its own, and one killed outright
(SIGKILL) leaves them to the next build of the same output, which removes those of dead processes.
"""

import asyncio
import contextlib
import datetime
import functools
import glob
import json
import os
import re
import shutil
import socket
import threading
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from atlasvi import __version__
from atlasvi.data.config import BuildConfig
from atlasvi.data.errors import AtlasInputError
from atlasvi.data.exact import add_exact, exact_bin_sums, to_float
from atlasvi.data.executor import BuildExecutor, Progress
from atlasvi.data.hvg import ClippedSums, GeneMoments, select_hvg
from atlasvi.data.inputs import InputFile, detect_kind, expand_inputs, file_sha256, open_input
from atlasvi.data.store import (
    ATAC_OBSM_KEY,
    ATTRS_KEY,
    CHUNK_NNZ,
    CHUNK_ROWS,
    DENSE_CHUNK_BYTES,
    DENSE_SHARD_CHUNKS,
    PROTEIN_OBSM_KEY,
    RNA_MASK_KEY,
    SCHEMA_VERSION,
    SHARD_NNZ,
    SHARD_ROWS,
    SPATIAL_OBSM_KEY,
    compressors,
)

MAX_COUNT = 2**53
"""The largest count a store holds: larger integers are not exact in float64, in which totals are summed."""


def _no_progress(stage: str, done: int, total: int) -> None:
    return None


@dataclass
class _InputPlan:
    """What pass 0 learned of one input."""

    path: Path
    n_cells: int
    gene_map: np.ndarray  # (input genes,) -> aligned gene index or -1
    protein_map: np.ndarray | None  # (input proteins,) -> index among the store's proteins
    peak_map: np.ndarray | None  # (input peaks,) -> index among the store's peaks


def _atac_present(source: InputFile, plan: _InputPlan, rows: slice, peaks: sp.csr_matrix | None) -> np.ndarray:
    """(cells,) bool: which cells of rows have ATAC measured: none of an input without peaks; an .h5mu's cells
    of its ATAC modality; elsewhere (.h5ad, 10x) the cells with any peak counts."""
    n = rows.stop - rows.start
    if plan.peak_map is None:
        return np.zeros(n, dtype=bool)
    if source.sides["atac"].present is not None:
        return source.side_present("atac", rows.start, rows.stop)
    return np.diff(peaks.indptr) > 0


def _open(config: BuildConfig, path: Path) -> InputFile:
    keys = [k for k in [config.batch_key, config.labels_key] if k is not None]
    keys += config.categorical_covariate_keys + config.continuous_covariate_keys + config.annotation_keys
    return open_input(
        path, keys, config.layer, config.gene_id_key, config.protein_key, config.atac_key, config.spatial_key
    )


def _align_genes(config: BuildConfig, genes: list[tuple[Path, np.ndarray, np.ndarray]]):
    """Aligned gene ids / names and, per input, the map from its genes to aligned indices."""
    if config.gene_join == "inner":
        common = set(genes[0][1])
        for _, ids, _ in genes[1:]:
            common &= set(ids)
        if not common:
            names = ", ".join(str(p) for p, _, _ in genes)
            raise AtlasInputError(
                f"inputs have no gene ids in common ({names}); check --gene-id-key or use --gene-join outer"
            )
        keep = np.isin(genes[0][1], list(common))
        aligned_ids, aligned_names = genes[0][1][keep], genes[0][2][keep]
    else:
        seen: dict[str, str] = {}
        for _, ids, names in genes:
            for gene_id, name in zip(ids, names, strict=True):
                seen.setdefault(gene_id, name)
        aligned_ids, aligned_names = np.array(list(seen), dtype=str), np.array(list(seen.values()), dtype=str)
    if config.genes is not None:  # exactly these genes, in this order
        found = pd.Index(aligned_ids).get_indexer(config.genes)
        missing = [g for g, i in zip(config.genes, found, strict=True) if i < 0]
        if missing and config.gene_join == "inner":
            raise AtlasInputError(
                f"{len(missing)} of the {len(config.genes)} genes asked for are not in every input "
                f"(first {missing[:5]}); check --gene-id-key, or use --gene-join outer to store them as zeros"
            )
        named = dict(zip(aligned_ids, aligned_names, strict=True))
        aligned_ids = np.array(config.genes, dtype=str)
        aligned_names = np.array([named.get(g, g) for g in config.genes], dtype=str)
    position = pd.Index(aligned_ids)
    maps = [position.get_indexer(ids) for _, ids, _ in genes]
    return aligned_ids, aligned_names, maps


def _remap(counts: sp.csr_matrix, gene_map: np.ndarray, n_genes: int) -> sp.csr_matrix:
    """Columns of an input chunk -> aligned (or stored) gene indices; genes mapped to -1 are dropped."""
    if len(gene_map) == n_genes and np.array_equal(gene_map, np.arange(n_genes)):
        return counts
    mapped = gene_map[counts.indices]
    kept = mapped >= 0
    row_of = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row_of[kept], minlength=counts.shape[0]))])
    out = sp.csr_matrix((counts.data[kept], mapped[kept], indptr), shape=(counts.shape[0], n_genes))
    out.has_sorted_indices = False
    out.sort_indices()
    return out


def _compose(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Map through `first` then `second`; -1 stays -1."""
    return np.where(first >= 0, second[np.maximum(first, 0)], -1)


def _validate_chunk(
    path: Path, counts: sp.csr_matrix, cells: pd.Index, gene_ids: np.ndarray, feature: str = "gene", what: str = ""
) -> None:
    """Raise naming file, cell and gene (or `feature`) for NaN / inf, negative, non-integer or too large counts
    (of `what`, e.g. "peak ")."""
    data = counts.data
    problems = [
        (~np.isfinite(data), f"NaN or infinite {what}counts"),
        (data < 0, f"negative {what}counts"),
        (np.isfinite(data) & (data != np.round(data)), f"non-integer {what}counts (atlasvi needs raw counts)"),
        (np.isfinite(data) & (data > MAX_COUNT), f"{what}counts above {MAX_COUNT} (2^53), the largest a store holds"),
    ]
    for mask, what in problems:
        if mask.any():
            position = int(np.flatnonzero(mask)[0])
            row = int(np.searchsorted(counts.indptr, position, side="right") - 1)
            raise AtlasInputError(
                f"{path}: {what}: {int(mask.sum())} values in cells {cells[0]}..{cells[-1]}, first {data[position]} "
                f"at cell {str(cells[row])!r}, {feature} {str(gene_ids[counts.indices[position]])!r}"
            )


def _validate_proteins(path: Path, values: np.ndarray, cells: pd.Index, names: np.ndarray) -> None:
    """Raise naming file, cell and protein for NaN / inf, negative, non-integer or too large protein counts."""
    problems = [
        (~np.isfinite(values), "NaN or infinite protein counts"),
        (values < 0, "negative protein counts"),
        (np.isfinite(values) & (values != np.round(values)), "non-integer protein counts (atlasvi needs raw counts)"),
        (np.isfinite(values) & (values >= MAX_COUNT), f"protein counts of {MAX_COUNT} (2^53) or more"),
    ]
    for mask, what in problems:
        if mask.any():
            row, column = np.argwhere(mask)[0]
            raise AtlasInputError(
                f"{path}: {what}: {int(mask.sum())} values in cells {cells[0]}..{cells[-1]}, first "
                f"{values[row, column]} at cell {str(cells[row])!r}, protein {str(names[column])!r}"
            )


def _protein_prior(counts: np.ndarray, measured: np.ndarray, seed: int) -> tuple[float, float]:
    """scvi-tools' empirical prior of one batch's protein background from the lower component's (mean, s.d.) of a
    2-component Gaussian mixture fitted to each cell's log1p counts of its measured proteins: the mean of the means,
    and sqrt(sum of the s.d.s squared) / cells. counts, measured: (cells, proteins). (0, 0.05) without cells or
    with fewer than 5 proteins, and a cell whose fit does not converge (all zero) counts as (0, 0.05), as in
    scvi-tools."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    if len(counts) == 0 or measured.any(axis=0).sum() < 5:
        return 0.0, 0.05
    mus, scales = [], []
    gmm = GaussianMixture(n_components=2, random_state=seed)
    for cell, keep in zip(counts, measured, strict=True):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", category=ConvergenceWarning)
            try:
                gmm.fit(np.log1p(cell[keep].reshape(-1, 1)))
            except ConvergenceWarning:
                mus.append(0.0)
                scales.append(0.05)
                continue
        lower = int(np.argmin(gmm.means_.ravel()))
        mus.append(float(gmm.means_.ravel()[lower]))
        scales.append(float(np.sqrt(gmm.covariances_.ravel()[lower])))
    # scvi-tools' batch_avg_scale: sqrt(sum(s^2) / n^2), the s.d. of the mean of n independent draws (not the
    # mean s.d.); n is its 100 draws with replacement, here the batch's cells up to 100
    return float(np.mean(mus)), float(np.sqrt(np.sum(np.square(scales))) / len(scales))


def _align_peaks(peak_sets: list[tuple[Path, np.ndarray] | None]) -> tuple[list[str], list[np.ndarray | None]]:
    """(the store's peaks: the first input's, in its order; per input its peaks' positions among them, or None).
    Inputs with peaks must share one peak set: peaks called per study do not line up, and a peak one study lacks
    would read as zero there."""
    given = [entry for entry in peak_sets if entry is not None]
    if not given:
        raise AtlasInputError("atac_key given, but no input has peak counts")
    first_path, first = given[0]
    maps = []
    for entry in peak_sets:
        if entry is None:
            maps.append(None)
            continue
        path, names = entry
        if set(names) != set(first):
            odd = sorted(set(names) ^ set(first))[0]
            raise AtlasInputError(
                f"{path}: its peaks differ from {first_path}'s (e.g. {odd!r}); inputs with peak counts must share "
                "one peak set (call peaks on all studies together, or quantify them on one peak set)"
            )
        maps.append(pd.Index(first).get_indexer(names))
    return list(first), maps


def _count_dtype(max_count: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every count (counts above MAX_COUNT are refused before)."""
    return next(np.dtype(t) for t in (np.uint16, np.uint32, np.uint64) if max_count <= np.iinfo(t).max)


def _labels(config: BuildConfig, obs: pd.DataFrame, path: Path) -> np.ndarray:
    """The labels of a chunk of cells: missing ones and those of `unlabeled_batches` are the unlabeled category."""
    values = np.array(_categories(obs[config.labels_key], path, config.labels_key, config.unlabeled_category))
    if config.unlabeled_batches:
        batches = np.full(len(obs), path.name) if config.batch_key is None else obs[config.batch_key].astype(str)
        values[np.isin(np.asarray(batches), config.unlabeled_batches)] = config.unlabeled_category
    return values


def _categories(values: pd.Series, path: Path, key: str, fill: str | None) -> np.ndarray:
    if values.isna().any():
        if fill is None:
            raise AtlasInputError(
                f"{path}: obs column {key!r} has {int(values.isna().sum())} missing values "
                f"(first at cell {str(values.index[values.isna().to_numpy()][0])!r})"
            )
        values = values.astype(object).where(values.notna(), fill)
    return np.asarray(values.astype(str))


def _create(
    group: zarr.Group,
    name: str,
    n: int,
    dtype,
    fill,
    chunk: int,
    shard: int,
    level: int,
    cname: str,
    width: int | None = None,
    shuffle: str = "bitshuffle",
) -> zarr.Array:
    """A 1-D array of n elements, or with `width` a 2-D one of n rows (chunked and sharded by rows).

    shuffle: Blosc's, "bitshuffle" or "shuffle" (bytes; chosen for CSR column indices, which it compresses as
    well as bitshuffle does and tensorstore decodes 1.8x as fast: benchmarks/README.md, "Loader and build").
    """
    n_chunk = max(1, min(chunk, n))
    n_shard = max(n_chunk, min(shard, -(-n // n_chunk) * n_chunk))
    columns = () if width is None else (width,)
    return group.create_array(
        name,
        shape=(n, *columns),
        dtype=dtype,
        chunks=(n_chunk, *columns),
        shards=(n_shard, *columns),
        compressors=compressors(level, cname, shuffle),
        fill_value=fill,
        attributes={"encoding-type": "array", "encoding-version": "0.2.0"},
    )


def _annotation_codes(values: pd.Series, categories: list[str]) -> np.ndarray:
    """(cells,) int32 codes of an annotation column's values among `categories`; missing values are -1."""
    present = values.notna().to_numpy()
    codes = np.full(len(values), -1, dtype=np.int32)
    codes[present] = pd.Index(categories).get_indexer(np.asarray(values[present].astype(str)))
    return codes


def _hashes(names: pd.Index | np.ndarray) -> np.ndarray:
    """(n,) uint64 hashes of cell names (8 bytes a cell, where the names themselves would take ~10x that)."""
    return pd.util.hash_array(np.asarray(names, dtype=object))


class _UniqueNames:
    """Cell names made unique as `anndata.utils.make_index_unique` (`obs_names_make_unique`) does: in input
    order, the first occurrence of a name keeps it, later ones become NAME-1, NAME-2, ..., skipping any name
    that exists already. Works chunk by chunk from the hashes of every kept name."""

    def __init__(self, hashes: np.ndarray):
        values, counts = np.unique(hashes, return_counts=True)
        self.all, self.repeated = values, set(values[counts > 1].tolist())
        self.seen: set[str] = set()
        self.added: set[str] = set()
        self.suffix: dict[str, int] = {}
        self.first: tuple[str, str] | None = None  # (name, new name) of the first rename
        self.n_renamed = 0

    def __call__(self, names: np.ndarray) -> np.ndarray:
        if not self.repeated:
            return names
        out = names.astype(object)
        for i in np.flatnonzero(np.isin(_hashes(names), list(self.repeated))):
            name = str(names[i])
            if name not in self.seen:
                self.seen.add(name)
                continue
            while True:
                self.suffix[name] = self.suffix.get(name, 0) + 1
                tentative = f"{name}-{self.suffix[name]}"
                if tentative not in self.added and not self._exists(tentative):
                    break
            self.added.add(tentative)
            out[i] = tentative
            self.first = self.first or (name, tentative)
            self.n_renamed += 1
        return out.astype(str)

    def _exists(self, name: str) -> bool:
        value = _hashes(np.array([name], dtype=object))[0]
        position = np.searchsorted(self.all, value)
        return position < len(self.all) and self.all[position] == value


def _code_dtype(n_categories: int) -> np.dtype:
    return np.dtype(np.int8 if n_categories < 127 else np.int16 if n_categories < 32767 else np.int32)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.repeat(starts - offsets, lengths) + np.arange(total)


def _write_small(group, key: str, element) -> None:
    """anndata's writer for small elements (var, categories, empty groups); its notice that zarr will shard
    arrays by default concerns arrays like these, which need no sharding, so it is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="zarr v3 autosharding")
        ad.io.write_elem(group, key, element)


def build_store(config: BuildConfig, progress: Progress = _no_progress, executor: BuildExecutor | None = None) -> Path:
    """Build one atlas store from config.inputs; returns its path. See the module docstring.

    executor: where the passes' tasks run (default: this process, one task at a time); the store is the same
    bit for bit whatever it is. Refused before any work: a missing input, an output that is, holds or lies
    inside an input, an existing output without `overwrite` or (with it) anything but an atlas store or an
    empty folder, and an output folder that cannot be written.
    """
    output = Path(config.output)
    paths = expand_inputs(config.inputs)
    for path in paths:
        if not path.exists():
            raise AtlasInputError(f"{path}: input does not exist")
        detect_kind(path)
    _remove_dead_builds(output)
    _check_output(output, paths, config.overwrite)
    token = uuid.uuid4().hex[:8]
    staging, scratch = _sibling(output, "building", token), _sibling(output, "scratch", token)
    new_folders = [p for p in [output.parent, *output.parent.parents] if not p.exists()]  # deepest first
    owned = executor is None
    executor = executor or BuildExecutor()
    try:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            scratch.mkdir()
        except OSError as err:
            raise AtlasInputError(f"{output.parent}: cannot write the store there ({err.strerror})") from err
        try:
            _build(config, paths, staging, scratch, progress, executor, token)
        finally:
            with contextlib.suppress(Exception):
                executor.run_on_workers(functools.partial(_close_inputs, token))
            _close_inputs(token)
            if owned:
                executor.close()
        if output.exists():
            retired = _sibling(output, "replaced", token)
            output.rename(retired)
            staging.rename(output)
            shutil.rmtree(retired)
        else:
            staging.rename(output)
    finally:
        _settle_zarr_writes()
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
        if not output.exists():  # a failed build leaves no folder it made either
            for folder in new_folders:
                with contextlib.suppress(OSError):
                    folder.rmdir()
    return output


_SIBLING = re.compile(r"(?P<kind>building|scratch|replaced)-(?P<host>.+)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})")


def _sibling(output: Path, kind: str, token: str) -> Path:
    """A hidden folder beside `output` of this build: kind building (the store being written), scratch
    (shuffle buckets) or replaced (the previous store, while the new one is renamed into place)."""
    return output.parent / f".{output.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{token}"


def _is_dead(host: str, pid: int) -> bool:
    """Whether process `pid` of `host` is gone; False when that cannot be told (another host)."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _remove_dead_builds(output: Path) -> None:
    """Remove the hidden siblings of `output` left by builds whose process is gone (SIGKILL, a crash); a
    previous store retired by such a build, with no store under `output` since, is renamed back instead.
    Live builds' siblings, other hosts' and those of unknown form are left alone."""
    prefix = f".{output.name}."
    for path in sorted(output.parent.glob(glob.escape(prefix) + "*")):
        match = _SIBLING.fullmatch(path.name[len(prefix) :])
        if match is None or not _is_dead(match["host"], int(match["pid"])):
            continue
        if match["kind"] == "replaced" and not output.exists():
            path.rename(output)
            warnings.warn(f"{output}: restored the store an interrupted build had set aside", stacklevel=3)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _check_output(output: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an output that is, holds or lies inside an input; an existing one without overwrite; with
    overwrite anything but an atlas store (recognised by its atlasvi attrs) or an empty folder."""
    target = output.resolve()
    for path in inputs:
        source = path.resolve()
        if source == target or target in source.parents:
            relation = "is" if source == target else "contains"
            raise AtlasInputError(f"{output}: the output {relation} the input {path}; choose another output")
        if source in target.parents:
            raise AtlasInputError(f"{output}: the output lies inside the input folder {path}; choose another output")
    if not (output.exists() or output.is_symlink()):
        return
    if not overwrite:
        raise AtlasInputError(f"{output}: exists already; --overwrite (overwrite=True) replaces it")
    if output.is_dir() and not output.is_symlink() and (_is_atlas_store(output) or not any(output.iterdir())):
        return
    raise AtlasInputError(
        f"{output}: exists and is not an atlas store; overwrite replaces only an atlas store "
        "(remove it yourself or choose another output)"
    )


def _is_atlas_store(folder: Path) -> bool:
    """Whether `folder` holds a zarr.json whose attributes carry atlasvi's attrs."""
    try:
        meta = json.loads((folder / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and ATTRS_KEY in (meta.get("attributes") or {})


def _settle_zarr_writes(timeout: float = 60.0) -> None:
    """Wait for the writes zarr still runs on its IO thread. After Ctrl-C the main thread stops waiting for
    them but they go on, and one finishing after the staging folder is removed would create it again."""
    from zarr.core.sync import loop, sync

    if loop[0] is None or loop[0].is_closed():
        return

    async def settle() -> None:
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=timeout)

    sync(settle())


# -- the build's tasks ------------------------------------------------------------------------------------
# Each pass is a list of tasks run by a BuildExecutor (here, on local worker processes or on a dask cluster).
# A task is a module-level function of (the build's _Context, its own arguments) that reads what it needs, writes
# only files no other task writes, and returns what the driver folds (exact sums, maxima, masks).


@dataclass
class _Context:
    """What every task of a build needs; sent to each worker once per pass."""

    config: BuildConfig
    token: str  # this build's: keys the inputs each worker keeps open
    paths: list[Path]
    staging: Path
    scratch: Path
    batch_key: str
    cat_keys: list[str]
    stored_keys: list[str]
    categories: dict[str, list[str]] = field(default_factory=dict)
    plans: list[_InputPlan] = field(default_factory=list)
    n_genes_all: int = 0
    n_batch: int = 0
    proteins: bool = False
    atac: bool = False
    n_proteins: int = 0
    n_peaks: int = 0
    n_spatial: int = 0  # spatial coordinates per cell (0: none stored)
    # set after pass 1 / 2
    stored_of_aligned: np.ndarray | None = None
    n_genes: int = 0
    count_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.uint16))
    protein_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.uint16))
    peak_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.uint16))
    bucket_size: int = 0
    n_buckets: int = 0
    n_cells: int = 0
    n_chunks: int = 0  # of cells of the inputs (pass 3's scratch files)

    @property
    def cont_keys(self) -> list[str]:
        return self.config.continuous_covariate_keys

    def batch_codes(self, path: Path, obs: pd.DataFrame) -> np.ndarray:
        """(cells,) int64 batch codes of a chunk's cells."""
        if self.config.batch_key is None:
            return np.full(len(obs), self.categories[self.batch_key].index(path.name), dtype=np.int64)
        values = _categories(obs[self.batch_key], path, self.batch_key, None)
        return pd.Index(self.categories[self.batch_key]).get_indexer(values)

    def row_columns(self) -> list[tuple[str, np.dtype, int]]:
        """(name, dtype, values per cell) of what travels with each cell through the shuffle, in file order."""
        columns = [("dest", np.dtype(np.int64), 1), ("nnz", np.dtype(np.int64), 1), ("name_len", np.dtype(np.int32), 1)]
        columns += [(f"cat:{key}", np.dtype(np.int32), 1) for key in self.stored_keys]
        columns += [(f"cont:{key}", np.dtype(np.float64), 1) for key in self.cont_keys]
        if self.atac:
            columns += [
                ("peak_nnz", np.dtype(np.int64), 1),
                ("atac_mask", np.dtype(np.uint8), 1),
                ("rna_mask", np.dtype(np.uint8), 1),
            ]
        if self.proteins:
            columns += [
                ("protein", self.protein_dtype, self.n_proteins),
                ("protein_mask", np.dtype(np.uint8), self.n_proteins),
            ]
        if self.n_spatial:
            columns.append(("spatial", np.dtype(np.float64), self.n_spatial))
        return columns

    def row_targets(self) -> dict[str, str]:
        """Row column -> the store array it is written to (one row per cell)."""
        targets = {f"cat:{key}": f"obs/{key}/codes" for key in self.stored_keys}
        targets |= {f"cont:{key}": f"obs/{key}" for key in self.cont_keys}
        if self.atac:
            targets["atac_mask"] = f"obsm/{ATAC_OBSM_KEY}_mask"
            targets["rna_mask"] = f"obsm/{RNA_MASK_KEY}_mask"
        if self.proteins:
            targets |= {"protein": f"obsm/{PROTEIN_OBSM_KEY}", "protein_mask": f"obsm/{PROTEIN_OBSM_KEY}_mask"}
        if self.n_spatial:
            targets["spatial"] = f"obsm/{SPATIAL_OBSM_KEY}"
        return targets

    def entry_columns(self) -> list[tuple[str, np.dtype]]:
        """(name, dtype) of the per-non-zero arrays of X, then of the peaks."""
        columns = [("indices", np.dtype(np.int32)), ("data", self.count_dtype)]
        if self.atac:
            columns += [("peak_indices", np.dtype(np.int32)), ("peak_data", self.peak_dtype)]
        return columns


_LOCAL = threading.local()  # this thread's open inputs: {(build token, input index): InputFile}
_OPENED: dict[str, list[InputFile]] = {}  # every input opened in this process, by build token
_OPENED_LOCK = threading.Lock()
_KEEP_OPEN = 2  # inputs a thread keeps open (a worker's chunks mostly come from one input at a time)


def _source(ctx: _Context, i: int) -> InputFile:
    """Input i, opened once per worker thread and build (a 10x input is read whole, once per worker)."""
    files: dict = getattr(_LOCAL, "files", None) or {}
    _LOCAL.files = files
    key = (ctx.token, i)
    if key not in files:
        while len(files) >= _KEEP_OPEN:
            _forget(files.pop(next(iter(files))))
        files[key] = _open(ctx.config, ctx.paths[i])
        with _OPENED_LOCK:
            _OPENED.setdefault(ctx.token, []).append(files[key])
    files[key] = files.pop(key)  # most recently used last
    return files[key]


def _forget(source: InputFile) -> None:
    """Close an input a thread stops keeping open, and drop it from _OPENED (which would otherwise hold every
    input this worker ever opened, and what each read whole, until the build ends)."""
    source.close()
    with _OPENED_LOCK:
        for opened in _OPENED.values():
            if any(s is source for s in opened):
                opened[:] = [s for s in opened if s is not source]


def _close_inputs(token: str) -> None:
    """Close the inputs this process opened for build `token` (run on every worker at the end of a build)."""
    with _OPENED_LOCK:
        opened = _OPENED.pop(token, [])
    for source in opened:
        source.close()
    files = getattr(_LOCAL, "files", None)
    if files:
        for key in [k for k in files if k[0] == token]:
            del files[key]


def _chunk(ctx: _Context, i: int, start: int, stop: int) -> tuple[InputFile, sp.csr_matrix, pd.DataFrame]:
    """Cells [start, stop) of input i: (the input, counts as canonical CSR, obs)."""
    source = _source(ctx, i)
    return source, source.read_rows(start, stop), source.obs_rows(start, stop)


def _describe_task(ctx: _Context, i: int) -> tuple:
    """Pass 0a, per input: (gene ids, gene names, protein names or None, peak names or None, cells, spatial
    coordinates per cell (0: none))."""
    source = _source(ctx, i)
    panel = source.sides["protein"].names if "protein" in source.sides else None
    peaks = source.sides["atac"].names if "atac" in source.sides else None
    n_spatial = len(source.sides["spatial"].names) if "spatial" in source.sides else 0
    return source.gene_ids, source.gene_names, panel, peaks, source.n_cells, n_spatial


def _obs_task(ctx: _Context, i: int, start: int, stop: int) -> tuple[np.ndarray, dict[str, set]]:
    """Pass 0b, per chunk: (hashes of the cell names, categories seen per stored key); missing or non-numeric
    covariates are refused here."""
    config, path = ctx.config, ctx.paths[i]
    obs = _source(ctx, i).obs_rows(start, stop)
    seen: dict[str, set] = {key: set() for key in ctx.stored_keys}
    for key in config.annotation_keys:
        seen[key].update(obs[key].dropna().astype(str))
    for key in ctx.cat_keys:
        if key == config.labels_key:
            seen[key].update(_labels(config, obs, path))
        elif key != ctx.batch_key or config.batch_key is not None:
            seen[key].update(_categories(obs[key], path, key, None))
    for key in config.continuous_covariate_keys:
        values = pd.to_numeric(obs[key], errors="coerce").to_numpy(np.float64)
        if not np.isfinite(values).all():
            cell = str(obs.index[~np.isfinite(values)][0])
            raise AtlasInputError(
                f"{path}: obs column {key!r} has missing, non-numeric or infinite values (cell {cell!r})"
            )
    return _hashes(obs.index), seen


@dataclass
class _Validated:
    """What pass 1 learned of one chunk."""

    keep: np.ndarray  # (cells,) bool: cells stored
    rna: np.ndarray  # (cells,) bool: cells with RNA counts (the others have peaks only, or are dropped)
    max_count: int
    max_protein: int
    max_peak: int
    moments: GeneMoments | None
    repeated: tuple[np.ndarray, np.ndarray]  # (rows, names) of the chunk's cells whose name hash is repeated
    rna_codes: np.ndarray  # (cells with RNA,) batch codes, for pass 2 (which then reads no obs); empty without HVG


def _validate_task(ctx: _Context, repeated: np.ndarray, i: int, start: int, stop: int) -> _Validated:
    """Pass 1, per chunk: validate counts (file, cell and gene named), find empty cells, gene moments."""
    config, plan = ctx.config, ctx.plans[i]
    source, counts, obs = _chunk(ctx, i, start, stop)
    _validate_chunk(plan.path, counts, obs.index, source.gene_ids)
    max_protein = max_peak = 0
    if ctx.proteins:
        values = source.side_rows("protein", start, stop)
        _validate_proteins(plan.path, values, obs.index, source.sides["protein"].names)
        max_protein = int(values.max(initial=0))
    aligned = _remap(counts, plan.gene_map, ctx.n_genes_all)
    totals = np.asarray(aligned.sum(axis=1)).ravel()
    rna = totals > 0
    empty = ~rna
    if ctx.atac:
        peaks = source.side_rows("atac", start, stop) if plan.peak_map is not None else None
        if peaks is not None:
            _validate_chunk(plan.path, peaks, obs.index, source.sides["atac"].names, "peak", "peak ")
            max_peak = int(peaks.data.max(initial=0))
        empty &= ~_atac_present(source, plan, slice(start, stop), peaks)
    if ctx.n_spatial:
        coordinates = source.side_rows("spatial", start, stop)
        if not np.isfinite(coordinates).all():
            row = int(np.flatnonzero(~np.isfinite(coordinates).all(axis=1))[0])
            raise AtlasInputError(
                f"{plan.path}: obsm[{config.spatial_key!r}] (spatial coordinates) holds NaN or infinite values "
                f"at cell {str(obs.index[row])!r}"
            )
    if empty.any() and config.zero_count_cells == "error":
        cells = obs.index[empty]
        what = (
            "neither RNA counts over the aligned genes nor peak counts"
            if ctx.atac
            else "zero counts over the aligned genes"
        )
        raise AtlasInputError(
            f"{plan.path}: cell {str(cells[0])!r} has {what} "
            f"({len(cells)} such cells among cells {start}..{stop - 1}); "
            "filter them or pass zero_count_cells='drop' (--drop-empty-cells)"
        )
    moments, rna_codes = None, np.zeros(0, dtype=np.int64)
    if config.n_top_genes is not None:
        moments = GeneMoments(ctx.n_batch, ctx.n_genes_all)
        rna_codes = ctx.batch_codes(plan.path, obs)[rna]
        moments.update(aligned[rna], rna_codes)
        rna_codes = rna_codes.astype(_code_dtype(ctx.n_batch))
    rows = np.flatnonzero(np.isin(_hashes(obs.index), repeated)) if len(repeated) else np.zeros(0, dtype=np.int64)
    return _Validated(
        keep=~empty,
        rna=rna,
        max_count=int(aligned.data.max(initial=0)),
        max_protein=max_protein,
        max_peak=max_peak,
        moments=moments,
        repeated=(rows, np.asarray(obs.index[rows], dtype=str)),
        rna_codes=rna_codes,
    )


def _hvg_task(
    ctx: _Context, clipped: ClippedSums, i: int, start: int, stop: int, rna: np.ndarray, rna_codes: np.ndarray
) -> tuple:
    """Pass 2, per chunk: the exact clipped sums (Seurat v3) of the chunk's cells with RNA counts (their batch
    codes from pass 1: no obs read)."""
    aligned = _remap(_source(ctx, i).read_rows(start, stop), ctx.plans[i].gene_map, ctx.n_genes_all)
    return clipped.partial(aligned[rna], rna_codes.astype(np.int64))


@dataclass
class _Scattered:
    """What pass 3 wrote of one chunk: per shuffle bucket (n_buckets, 4) int64 cells, non-zeros, name bytes and
    peak non-zeros of its segment of the chunk's file (the driver sums them over chunks; where each segment lies
    is in the file's own table, see `_write_segments`); and the chunk's share of the store's statistics."""

    segments: np.ndarray
    log_library: np.ndarray  # (n_batch,) exact sums of log library sizes (units of 2**-54)
    log_library_sq: np.ndarray
    n_library: np.ndarray  # (n_batch,) cells
    zero_library: int
    batch_panels: np.ndarray  # (n_batch, n_proteins) bool: proteins some cell of the batch measured
    peaks_measured: np.ndarray  # (n_batch,) bool
    rna_measured: np.ndarray  # (n_batch,) bool: batches with some cell's RNA (a store with peaks)
    n_rna_measured: int


_LOG_BITS = 54  # log library sizes are 0 or >= log(2) > 1/4: multiples of 2**-54 (see atlasvi.data.exact)


def _scatter_task(
    ctx: _Context,
    t: int,
    i: int,
    start: int,
    stop: int,
    keep: np.ndarray,
    rna: np.ndarray,
    dest: np.ndarray,
    renamed: tuple,
) -> _Scattered:
    """Pass 3, per chunk: every kept cell with its destination row in the global permutation, written to this
    chunk's scratch file, grouped by the shuffle bucket covering that row (an external shuffle)."""
    config, plan = ctx.config, ctx.plans[i]
    source, counts, obs = _chunk(ctx, i, start, stop)
    n_batch, n_proteins, n_peaks = ctx.n_batch, ctx.n_proteins, ctx.n_peaks
    cells = _remap(counts, _compose(plan.gene_map, ctx.stored_of_aligned), ctx.n_genes)[keep]
    n_kept = cells.shape[0]
    library = np.asarray(cells.sum(axis=1)).ravel()
    codes = ctx.batch_codes(plan.path, obs)[keep]
    rna = rna[keep]  # the library prior and its warning count the cells with RNA only
    log_lib = np.log(np.maximum(library[rna], 1))  # as scvi-tools: np.ma.log(library).filled(0)
    names = np.asarray(obs.index[keep], dtype=object)
    rows, new_names = renamed
    names[rows] = new_names
    name_bytes = np.char.encode(names.astype(str), "utf-8")
    columns: dict[str, np.ndarray] = {
        "dest": dest,
        "nnz": np.diff(cells.indptr).astype(np.int64),
        "name_len": np.char.str_len(name_bytes).astype(np.int32),
    }
    for key in ctx.stored_keys:
        if key in config.annotation_keys:
            columns[f"cat:{key}"] = _annotation_codes(obs[key], ctx.categories[key])[keep]
        elif key == ctx.batch_key:
            columns[f"cat:{key}"] = codes.astype(np.int32)
        else:
            if key == config.labels_key:
                values = _labels(config, obs, plan.path)[keep]
            else:
                values = _categories(obs[key], plan.path, key, None)[keep]
            columns[f"cat:{key}"] = pd.Index(ctx.categories[key]).get_indexer(values).astype(np.int32)
    for key in ctx.cont_keys:
        columns[f"cont:{key}"] = pd.to_numeric(obs[key]).to_numpy(np.float64)[keep]
    batch_panels = np.zeros((n_batch, n_proteins), dtype=bool)
    peaks_measured = np.zeros(n_batch, dtype=bool)
    rna_measured = np.zeros(n_batch, dtype=bool)
    entries = {"indices": cells.indices.astype(np.int32), "data": cells.data.astype(ctx.count_dtype)}
    if ctx.proteins:
        panel = plan.protein_map
        values = np.zeros((n_kept, n_proteins), dtype=ctx.protein_dtype)
        values[:, panel] = source.side_rows("protein", start, stop)[keep]
        measured = np.zeros((n_kept, n_proteins), dtype=np.uint8)
        present = source.side_present("protein", start, stop)[keep]
        measured[:, panel] = present[:, None]
        batch_panels[np.unique(codes[present])[:, None], panel[None, :]] = True
        columns["protein"], columns["protein_mask"] = values, measured
    peak_nnz = np.zeros(n_kept, dtype=np.int64)
    if ctx.atac:
        if plan.peak_map is not None:
            read = source.side_rows("atac", start, stop)
            present = _atac_present(source, plan, slice(start, stop), read)[keep]
            peaks = _remap(read[keep], plan.peak_map, n_peaks)
        else:
            present, peaks = np.zeros(n_kept, dtype=bool), sp.csr_matrix((n_kept, n_peaks))
        peaks_measured[np.unique(codes[present])] = True
        rna_measured[np.unique(codes[rna])] = True
        peak_nnz = np.diff(peaks.indptr).astype(np.int64)
        columns["peak_nnz"], columns["atac_mask"] = peak_nnz, present.astype(np.uint8)
        columns["rna_mask"] = rna.astype(np.uint8)
        entries |= {"peak_indices": peaks.indices.astype(np.int32), "peak_data": peaks.data.astype(ctx.peak_dtype)}
    if ctx.n_spatial:
        columns["spatial"] = source.side_rows("spatial", start, stop)[keep]
    segments = _write_segments(ctx, t, columns, entries, name_bytes, peak_nnz)
    return _Scattered(
        segments=segments,
        log_library=exact_bin_sums(log_lib, codes[rna], n_batch, _LOG_BITS),
        log_library_sq=exact_bin_sums(log_lib**2, codes[rna], n_batch, _LOG_BITS),
        n_library=np.bincount(codes[rna], minlength=n_batch).astype(np.int64),
        zero_library=int((library[rna] == 0).sum()),
        batch_panels=batch_panels,
        peaks_measured=peaks_measured,
        rna_measured=rna_measured,
        n_rna_measured=int(rna.sum()) if ctx.atac else 0,
    )


def _segment_bytes(ctx: _Context, counts: np.ndarray) -> np.ndarray:
    """Bytes of segments of (cells, non-zeros, name bytes, peak non-zeros) (..., 4)."""
    row_bytes = sum(dtype.itemsize * width for _, dtype, width in ctx.row_columns())
    entry_bytes = 4 + ctx.count_dtype.itemsize
    peak_bytes = 4 + ctx.peak_dtype.itemsize
    return counts[..., 0] * row_bytes + counts[..., 1] * entry_bytes + counts[..., 2] + counts[..., 3] * peak_bytes


_TABLE_ROW = np.dtype("<i8")  # the scratch files' tables of segments: little-endian int64


def _scatter_file(ctx: _Context, t: int) -> Path:
    return ctx.scratch / "scatter" / f"{t}.bin"


def _write_segments(
    ctx: _Context,
    t: int,
    columns: dict[str, np.ndarray],
    entries: dict[str, np.ndarray],
    name_bytes: np.ndarray,
    peak_nnz: np.ndarray,
) -> np.ndarray:
    """Write chunk t's cells grouped by shuffle bucket to its scratch file; (n_buckets, 4) segment sizes. The file
    starts with a table of (n_buckets, 5) int64: each bucket's segment's byte offset and its 4 sizes, so that a
    bucket finds its segments itself (a table of every chunk's segments in the driver, chunks x buckets, grows
    with the square of the cells: ~300 MB at 100M)."""
    bucket = columns["dest"] // ctx.bucket_size
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(ctx.n_buckets + 1))
    nnz, name_len = columns["nnz"], columns["name_len"].astype(np.int64)
    entry_start = np.concatenate([[0], np.cumsum(nnz)[:-1]])
    name_start = np.concatenate([[0], np.cumsum(name_len)[:-1]])
    peak_start = np.concatenate([[0], np.cumsum(peak_nnz)[:-1]])
    raw_names = np.frombuffer(b"".join(name_bytes.tolist()), dtype=np.uint8)
    # every array in bucket order: then each bucket's segment is one slice of each
    sorted_rows = {name: np.ascontiguousarray(columns[name][order]) for name, _, _ in ctx.row_columns()}
    take = _ranges(entry_start[order], nnz[order])
    take_peaks = _ranges(peak_start[order], peak_nnz[order])
    sorted_entries = {
        name: np.ascontiguousarray(entries[name][take_peaks if name.startswith("peak") else take])
        for name, _ in ctx.entry_columns()
    }
    sorted_names = raw_names[_ranges(name_start[order], name_len[order])]
    cum_entries = np.concatenate([[0], np.cumsum(nnz[order])])
    cum_names = np.concatenate([[0], np.cumsum(name_len[order])])
    cum_peaks = np.concatenate([[0], np.cumsum(peak_nnz[order])])
    segments = np.zeros((ctx.n_buckets, 4), dtype=np.int64)
    path = _scatter_file(ctx, t)
    with open(path, "wb") as handle:
        handle.seek(ctx.n_buckets * _TABLE_ROW.itemsize * 5)
        for k in np.flatnonzero(np.diff(bounds)):
            a, b = bounds[k], bounds[k + 1]
            for name, _, _ in ctx.row_columns():
                handle.write(sorted_rows[name][a:b].data)
            for name, _ in ctx.entry_columns():
                lo, hi = (cum_peaks if name.startswith("peak") else cum_entries)[[a, b]]
                handle.write(sorted_entries[name][lo:hi].data)
            handle.write(sorted_names[cum_names[a] : cum_names[b]].data)
            segments[k] = [
                b - a,
                cum_entries[b] - cum_entries[a],
                cum_names[b] - cum_names[a],
                cum_peaks[b] - cum_peaks[a],
            ]
        sizes = _segment_bytes(ctx, segments)
        offsets = ctx.n_buckets * _TABLE_ROW.itemsize * 5 + np.cumsum(sizes) - sizes
        handle.seek(0)
        handle.write(np.column_stack([offsets, segments]).astype(_TABLE_ROW).data)
    return segments


def _read_segment(ctx: _Context, t: int, k: int) -> dict[str, np.ndarray] | None:
    """Bucket k's segment of chunk t's scratch file: {column: values}, names as "name" (utf-8 bytes); None when
    the chunk has no cell in bucket k."""
    with open(_scatter_file(ctx, t), "rb") as handle:
        handle.seek(k * _TABLE_ROW.itemsize * 5)
        offset, *counts = np.frombuffer(handle.read(_TABLE_ROW.itemsize * 5), dtype=_TABLE_ROW).tolist()
        if counts[0] == 0:
            return None
        handle.seek(offset)
        raw = handle.read(int(_segment_bytes(ctx, np.array(counts))))
    n_rows, n_entries, n_name, n_peaks = counts
    out, position = {}, 0
    for name, dtype, width in ctx.row_columns():
        size = n_rows * width
        out[name] = np.frombuffer(raw, dtype=dtype, count=size, offset=position).reshape(-1, width)
        position += size * dtype.itemsize
    for name, dtype in ctx.entry_columns():
        size = n_peaks if name.startswith("peak") else n_entries
        out[name] = np.frombuffer(raw, dtype=dtype, count=size, offset=position)
        position += size * dtype.itemsize
    out["name"] = np.frombuffer(raw, dtype=np.uint8, count=n_name, offset=position)
    return out


PRIOR_CELLS = 100  # scvi-tools' n_cells of its protein prior: the first 100 in store order are random cells


def _bucket_task(ctx: _Context, k: int, entry_start: int, peak_start: int) -> tuple[list[tuple[str, int]], list | None]:
    """Pass 4, per shuffle bucket (store rows [k * bucket_size, ...)): gather its segments from every chunk's
    file, sort them by destination row and write them into the store. Whole shards of the store's arrays are
    written here; the parts of shards that other buckets share are left as fragments for pass 5.
    Returns (the (array, shard) fragments written, per batch the first cells with proteins or None)."""
    parts = [part for t in range(ctx.n_chunks) if (part := _read_segment(ctx, t, k)) is not None]
    part = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    dest = part["dest"].ravel()
    order = np.argsort(dest, kind="stable")
    row_start = k * ctx.bucket_size
    if not np.array_equal(dest[order], np.arange(row_start, row_start + len(order))):
        raise RuntimeError(f"shuffle bucket {k} does not hold rows {row_start}.. as planned")
    nnz = part["nnz"].ravel()[order]
    take = _ranges(np.concatenate([[0], np.cumsum(part["nnz"].ravel())[:-1]])[order], nnz)
    writer = _SpanWriter(ctx)
    indptr = entry_start + np.cumsum(nnz)
    if k == 0:
        writer.write("X/indptr", 0, np.concatenate([[0], indptr]))
    else:
        writer.write("X/indptr", row_start + 1, indptr)
    writer.write("X/indices", entry_start, part["indices"][take])
    writer.write("X/data", entry_start, part["data"][take])
    for name, target in ctx.row_targets().items():
        values = part[name][order]
        writer.write(target, row_start, values.ravel() if target.startswith("obs/") else values)
    if ctx.atac:
        peak_nnz = part["peak_nnz"].ravel()[order]
        take_peaks = _ranges(np.concatenate([[0], np.cumsum(part["peak_nnz"].ravel())[:-1]])[order], peak_nnz)
        peak_indptr = peak_start + np.cumsum(peak_nnz)
        key = f"obsm/{ATAC_OBSM_KEY}"
        if k == 0:
            writer.write(f"{key}/indptr", 0, np.concatenate([[0], peak_indptr]))
        else:
            writer.write(f"{key}/indptr", row_start + 1, peak_indptr)
        writer.write(f"{key}/indices", peak_start, part["peak_indices"][take_peaks])
        writer.write(f"{key}/data", peak_start, part["peak_data"][take_peaks])
    name_len = part["name_len"].ravel().astype(np.int64)
    name_start = np.concatenate([[0], np.cumsum(name_len)[:-1]])
    raw = part["name"].tobytes()
    names = [raw[s : s + n].decode("utf-8") for s, n in zip(name_start[order], name_len[order], strict=True)]
    writer.write("obs/_index", row_start, np.array(names, dtype=str))
    prior = None
    if ctx.proteins:
        values, measured = part["protein"][order], part["protein_mask"][order]
        codes = part[f"cat:{ctx.batch_key}"].ravel()[order]
        prior = []
        for b in range(ctx.n_batch):
            first = np.flatnonzero((codes == b) & measured.any(axis=1))[:PRIOR_CELLS]
            prior.append((values[first], measured[first].astype(bool)))
    return writer.fragments, prior


class _SpanWriter:
    """Writes a run of consecutive elements (rows, or non-zeros) of a store array: the shards (chunks, for an
    unsharded array) it covers whole are written into the store, the parts of others are saved as fragments
    for `_assemble_task`. Tasks thus never write the same shard file."""

    def __init__(self, ctx: _Context):
        self.ctx, self.fragments = ctx, []
        self._arrays: dict[str, zarr.Array] = {}

    def write(self, key: str, start: int, values: np.ndarray) -> None:
        if not len(values):
            return
        array = self._arrays.get(key)
        if array is None:
            array = self._arrays[key] = zarr.open_array(store=str(self.ctx.staging), path=key, mode="r+", zarr_format=3)
        unit = (array.shards or array.chunks)[0]
        stop = start + len(values)
        for j in range(start // unit, (stop - 1) // unit + 1):
            lo, hi = j * unit, min((j + 1) * unit, array.shape[0])
            a, b = max(lo, start), min(hi, stop)
            piece = values[a - start : b - start]
            if a == lo and b == hi:
                array[lo:hi] = _for_array(array, piece)
            else:
                folder = _fragment_folder(self.ctx, key, j)
                folder.mkdir(parents=True, exist_ok=True)
                np.save(folder / f"{a:015d}.npy", piece)
                self.fragments.append((key, j))


def _for_array(array: zarr.Array, values: np.ndarray) -> np.ndarray:
    """Values as the array stores them (cell names: Python strings)."""
    if values.dtype.kind == "U":
        return values.astype(object)
    return values.astype(array.dtype, copy=False)


def _fragment_folder(ctx: _Context, key: str, shard: int) -> Path:
    return ctx.scratch / "fragments" / key.replace("/", "__") / str(shard)


def _assemble_task(ctx: _Context, key: str, shard: int) -> int:
    """Pass 5, per shard some buckets share: join its fragments (which must cover it exactly) and write it.
    Returns the elements written."""
    array = zarr.open_array(store=str(ctx.staging), path=key, mode="r+", zarr_format=3)
    unit = (array.shards or array.chunks)[0]
    lo, hi = shard * unit, min((shard + 1) * unit, array.shape[0])
    folder = _fragment_folder(ctx, key, shard)
    files = sorted(folder.iterdir())
    starts = [int(f.stem) for f in files]
    pieces = [np.load(f) for f in files]
    ends = [s + len(p) for s, p in zip(starts, pieces, strict=True)]
    if starts[0] != lo or ends[-1] != hi or starts[1:] != ends[:-1]:
        raise RuntimeError(f"{key}: the fragments of shard {shard} do not cover elements {lo}..{hi} exactly")
    array[lo:hi] = _for_array(array, np.concatenate(pieces))
    shutil.rmtree(folder)
    return hi - lo


# -- the driver ------------------------------------------------------------------------------------------


def _fold_categories(into: dict[str, set], seen: dict[str, set]) -> None:
    for key, values in seen.items():
        into[key].update(values)


def _build(
    config: BuildConfig,
    paths: list[Path],
    staging: Path,
    scratch: Path,
    progress: Progress,
    executor: BuildExecutor,
    token: str,
) -> None:
    batch_key = config.batch_key or "batch"
    cat_keys = [batch_key] + ([config.labels_key] if config.labels_key else []) + config.categorical_covariate_keys
    stored_keys = cat_keys + config.annotation_keys  # every categorical obs column of the store
    ctx = _Context(config, token, paths, staging, scratch, batch_key, cat_keys, stored_keys)

    # Pass 0: metadata of every input (genes, panels, categories, hashes of cell names).
    described = dict(executor.map(_describe_task, [(i,) for i in range(len(paths))], "inputs", progress, shared=(ctx,)))
    genes = [(paths[i], described[i][0], described[i][1]) for i in range(len(paths))]
    panels = [described[i][2] for i in range(len(paths))]
    peak_sets = [(paths[i], described[i][3]) if described[i][3] is not None else None for i in range(len(paths))]
    n_cells_in = [int(described[i][4]) for i in range(len(paths))]
    for path, n in zip(paths, n_cells_in, strict=True):
        if n == 0:  # nothing to validate or store: most likely the wrong file, or one filtered to nothing
            raise AtlasInputError(f"{path}: holds no cells (its count matrix has 0 rows)")
    ctx.n_spatial = _spatial_dims(config, paths, [int(described[i][5]) for i in range(len(paths))])
    chunks = [
        (i, start, min(start + config.chunk_size, n))
        for i, n in enumerate(n_cells_in)
        for start in range(0, n, config.chunk_size)
    ]
    sizes = [stop - start for _, start, stop in chunks]
    categories: dict[str, set] = {k: set() for k in stored_keys}
    if config.batch_key is None:
        categories[batch_key].update(path.name for path in paths)
    name_hashes: list[np.ndarray] = [np.zeros(0, dtype=np.uint64)] * len(chunks)
    for t, (hashes, seen) in executor.map(_obs_task, chunks, "cells", progress, sizes, shared=(ctx,)):
        name_hashes[t] = hashes
        _fold_categories(categories, seen)
    gene_ids, gene_names, gene_maps = _align_genes(config, genes)
    ctx.categories = {k: sorted(v) for k, v in categories.items()}
    absent = sorted(set(config.unlabeled_batches) - set(ctx.categories[batch_key]))
    if absent:
        raise AtlasInputError(f"unlabeled_batches {absent} are not {batch_key} categories: {ctx.categories[batch_key]}")
    ctx.proteins = config.protein_key is not None
    protein_names = list(dict.fromkeys(name for panel in panels if panel is not None for name in panel))
    protein_maps = [pd.Index(protein_names).get_indexer(panel) if ctx.proteins else None for panel in panels]
    ctx.n_proteins = len(protein_names)
    ctx.atac = config.atac_key is not None
    peak_names, peak_maps = _align_peaks(peak_sets) if ctx.atac else ([], [None] * len(paths))
    ctx.n_peaks = len(peak_names)
    ctx.plans = [_InputPlan(*plan) for plan in zip(paths, n_cells_in, gene_maps, protein_maps, peak_maps, strict=True)]
    ctx.n_genes_all = len(gene_ids)
    ctx.n_batch = len(ctx.categories[batch_key])
    all_hashes = np.concatenate(name_hashes)
    del name_hashes
    ordered = np.sort(all_hashes)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])  # hashes two or more cells have
    del ordered

    # Pass 1: validation, empty cells, gene moments.
    moments = GeneMoments(ctx.n_batch, ctx.n_genes_all)
    keeps: list[np.ndarray] = [np.zeros(0, dtype=bool)] * len(chunks)
    rnas: list[np.ndarray] = [np.zeros(0, dtype=bool)] * len(chunks)
    rna_codes: list[np.ndarray] = [np.zeros(0, dtype=np.int8)] * len(chunks)
    repeated_names: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=str))] * len(
        chunks
    )
    max_count = max_protein = max_peak = 0
    for t, found in executor.map(_validate_task, chunks, "validate", progress, sizes, shared=(ctx, repeated)):
        keeps[t], rnas[t], repeated_names[t], rna_codes[t] = found.keep, found.rna, found.repeated, found.rna_codes
        max_count = max(max_count, found.max_count)
        max_protein, max_peak = max(max_protein, found.max_protein), max(max_peak, found.max_peak)
        if found.moments is not None:
            moments.merge(found.moments)
    dropped = sum(int((~keep).sum()) for keep in keeps)
    if dropped:
        warnings.warn(f"dropped {dropped} cells with zero counts", stacklevel=3)
    n_cells = sum(int(keep.sum()) for keep in keeps)
    if n_cells == 0:
        raise AtlasInputError("no cells left to store: every cell has zero counts")
    renamed, n_renamed, first_rename = _renames(all_hashes, keeps, repeated_names)
    del all_hashes

    # Pass 2: highly variable genes.
    hvg_table = None
    stored = np.arange(ctx.n_genes_all)
    if config.n_top_genes is not None and config.n_top_genes < ctx.n_genes_all:
        clipped = ClippedSums(moments)
        hvg_chunks = [(*chunk, rna, codes) for chunk, rna, codes in zip(chunks, rnas, rna_codes, strict=True)]
        for _, partial in executor.map(_hvg_task, hvg_chunks, "hvg", progress, sizes, shared=(ctx, clipped)):
            clipped.merge(partial)
        hvg_table = select_hvg(moments, clipped, config.n_top_genes)
        if config.hvg_subset:
            stored = np.flatnonzero(hvg_table["highly_variable"].to_numpy())
    del rna_codes
    ctx.n_genes = len(stored)
    ctx.stored_of_aligned = np.full(ctx.n_genes_all, -1, dtype=np.int64)
    ctx.stored_of_aligned[stored] = np.arange(ctx.n_genes)

    # Pass 3: scatter kept cells to destination buckets of the global permutation.
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(n_cells)
    destination = np.empty(n_cells, dtype=np.int64)
    destination[order] = np.arange(n_cells)
    del order
    ctx.count_dtype = _count_dtype(max_count)
    ctx.protein_dtype = _count_dtype(max_protein + 1)  # its largest value is the fill value, never a count
    ctx.peak_dtype = _count_dtype(max_peak)
    ctx.bucket_size = max(config.chunk_size, 4096)
    ctx.n_buckets = max(1, -(-n_cells // ctx.bucket_size))
    ctx.n_cells = n_cells
    (scratch / "scatter").mkdir()
    kept_before = np.concatenate([[0], np.cumsum([int(keep.sum()) for keep in keeps])])
    scatter_tasks = [
        (t, *chunk, keep, rna, destination[kept_before[t] : kept_before[t + 1]], renamed.get(t, _NO_RENAMES))
        for t, (chunk, keep, rna) in enumerate(zip(chunks, keeps, rnas, strict=True))
    ]
    del destination
    ctx.n_chunks = len(chunks)
    per_bucket = np.zeros((ctx.n_buckets, 4), dtype=np.int64)  # cells, non-zeros, name bytes, peak non-zeros
    log_lib_sum = log_lib_sq = None
    lib_n = np.zeros(ctx.n_batch, dtype=np.int64)
    zero_library = 0
    batch_panels = np.zeros((ctx.n_batch, ctx.n_proteins), dtype=bool)
    peaks_measured = np.zeros(ctx.n_batch, dtype=bool)
    rna_measured, n_rna_measured = np.zeros(ctx.n_batch, dtype=bool), 0
    for _, result in executor.map(_scatter_task, scatter_tasks, "shuffle", progress, sizes, shared=(ctx,)):
        per_bucket += result.segments
        log_lib_sum = add_exact(log_lib_sum, result.log_library)
        log_lib_sq = add_exact(log_lib_sq, result.log_library_sq)
        lib_n += result.n_library
        zero_library += result.zero_library
        batch_panels |= result.batch_panels
        peaks_measured |= result.peaks_measured
        rna_measured |= result.rna_measured
        n_rna_measured += result.n_rna_measured
    del scatter_tasks
    if n_renamed:
        name, new_name = first_rename
        warnings.warn(
            f"{n_renamed} cells have a name an earlier cell of the inputs has (first {name!r}); "
            f"renamed as anndata's obs_names_make_unique does ({name!r} -> {new_name!r})",
            stacklevel=3,
        )
    if zero_library:
        warnings.warn(
            f"{zero_library} cells have zero counts over the stored genes (kept; log-library 0 as in scvi-tools)",
            stacklevel=3,
        )
    nnz_total, nnz_peaks = int(per_bucket[:, 1].sum()), int(per_bucket[:, 3].sum())

    # Pass 4: each bucket sorted into the store (whole shards), pass 5: the shards buckets share.
    root = zarr.open_group(staging, mode="w", zarr_format=3)
    chunk_rows = _create_arrays(ctx, root, nnz_total, nnz_peaks)
    entry_starts = np.concatenate([[0], np.cumsum(per_bucket[:, 1])])
    peak_starts = np.concatenate([[0], np.cumsum(per_bucket[:, 3])])
    bucket_tasks = [(k, int(entry_starts[k]), int(peak_starts[k])) for k in range(ctx.n_buckets)]
    fragments: set[tuple[str, int]] = set()
    priors: list = [None] * ctx.n_buckets
    rows = per_bucket[:, 0].tolist()
    for k, (written, prior) in executor.map(_bucket_task, bucket_tasks, "write", progress, rows, shared=(ctx,)):
        fragments.update(written)
        priors[k] = prior
    shutil.rmtree(scratch / "scatter")
    shared_shards = sorted(fragments)
    for _ in executor.map(_assemble_task, shared_shards, "finish", progress, shared=(ctx,)):
        pass

    modalities = {}
    if ctx.atac:
        modalities["atac"] = {
            "obsm_key": ATAC_OBSM_KEY,
            "features": peak_names,
            "count_dtype": ctx.peak_dtype.name,
            "batch_mask": [[bool(m)] for m in peaks_measured],
            "background_log_means": [],
            "background_log_scales": [],
            "chunk_rows": CHUNK_ROWS,
            "kind": "csr",
            "nnz": nnz_peaks,
        }
        modalities["rna"] = {
            "obsm_key": RNA_MASK_KEY,
            "features": [],
            "count_dtype": ctx.count_dtype.name,
            "batch_mask": [[bool(m)] for m in rna_measured],
            "background_log_means": [],
            "background_log_scales": [],
            "chunk_rows": CHUNK_ROWS,
            "kind": "mask",
            "n_measured": n_rna_measured,
        }
    if ctx.proteins:
        prior_cells = []
        for b in range(ctx.n_batch):
            values = np.concatenate([p[b][0] for p in priors])[:PRIOR_CELLS]
            measured = np.concatenate([p[b][1] for p in priors])[:PRIOR_CELLS]
            prior_cells.append(_protein_prior(values.astype(np.float64), measured, config.seed))
        modalities["protein"] = {
            "obsm_key": PROTEIN_OBSM_KEY,
            "features": protein_names,
            "count_dtype": ctx.protein_dtype.name,
            "batch_mask": batch_panels.tolist(),
            "background_log_means": [mu for mu, _ in prior_cells],
            "background_log_scales": [scale for _, scale in prior_cells],
            "chunk_rows": chunk_rows,
        }
    var = pd.DataFrame({"gene_ids": gene_ids[stored], "gene_names": gene_names[stored]}, index=gene_ids[stored])
    var.index.name = None
    if hvg_table is not None:
        for column in hvg_table.columns:
            var[column] = hvg_table[column].to_numpy()[stored]
    _write_small(root, "var", var)
    uns = {f"{PROTEIN_OBSM_KEY}_names": np.array(protein_names, dtype=object)} if ctx.proteins else {}
    uns |= {f"{ATAC_OBSM_KEY}_names": np.array(peak_names, dtype=object)} if ctx.atac else {}
    for name in ["obsm", "varm", "obsp", "varp", "layers", "uns"]:
        if name == "obsm" and (ctx.proteins or ctx.atac or ctx.n_spatial):
            continue
        _write_small(root, name, uns if name == "uns" else {})

    safe_n = np.maximum(lib_n, 1)
    log_means = to_float(log_lib_sum, _LOG_BITS) / safe_n
    log_vars = np.maximum(to_float(log_lib_sq, _LOG_BITS) / safe_n - log_means**2, 0.0)
    checksums = dict(
        executor.map(_checksum_task, [(i,) for i in range(len(paths))], "checksum", progress, shared=(ctx,))
    )
    meta = {
        "schema_version": SCHEMA_VERSION,
        "n_cells": n_cells,
        "n_genes": ctx.n_genes,
        "nnz": nnz_total,
        "count_dtype": ctx.count_dtype.name,
        "gene_ids": gene_ids[stored].tolist(),
        "gene_names": gene_names[stored].tolist(),
        "highly_variable": None if hvg_table is None else hvg_table["highly_variable"].to_numpy()[stored].tolist(),
        "batch_key": batch_key,
        "labels_key": config.labels_key,
        "unlabeled_category": config.unlabeled_category if config.labels_key else None,
        "categorical": {key: ctx.categories[key] for key in cat_keys},
        "continuous": ctx.cont_keys,
        "annotations": {key: ctx.categories[key] for key in config.annotation_keys},
        "library_log_means": log_means.tolist(),
        "library_log_vars": log_vars.tolist(),
        "modalities": modalities,
        "spatial": {"obsm_key": SPATIAL_OBSM_KEY, "n_dims": ctx.n_spatial} if ctx.n_spatial else None,
        "layout": {"chunk_nnz": CHUNK_NNZ, "shard_nnz": SHARD_NNZ, "chunk_rows": CHUNK_ROWS, "shard_rows": SHARD_ROWS},
        "provenance": {
            "atlasvi_version": __version__,
            "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "inputs": [
                {"path": str(p), "format": detect_kind(p), "sha256": checksums[i], "n_cells": n}
                for i, (p, n) in enumerate(zip(paths, n_cells_in, strict=True))
            ],
            "parameters": config.model_dump(mode="json"),
            "dropped_zero_count_cells": dropped,
            "zero_library_cells": zero_library,
            "permutation": f"numpy default_rng({config.seed}).permutation(n_cells)",
        },
    }
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0", ATTRS_KEY: meta})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(staging)


def _checksum_task(ctx: _Context, i: int) -> str:
    """sha256 of input i (its provenance in the store's attrs)."""
    return file_sha256(ctx.paths[i])


_NO_RENAMES = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object))


def _renames(
    kept_hashes_all: np.ndarray, keeps: list[np.ndarray], repeated_names: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], int, tuple[str, str] | None]:
    """Cell names made unique as anndata's obs_names_make_unique does, over the kept cells in input order:
    ({chunk: (positions among its kept cells, new names)}, cells renamed, the first (name, new name))."""
    unique = _UniqueNames(kept_hashes_all[np.concatenate(keeps)])
    renamed = {}
    for t, ((rows, names), keep) in enumerate(zip(repeated_names, keeps, strict=True)):
        if not len(rows) or not unique.repeated:
            continue
        kept = keep[rows]
        rows, names = rows[kept], names[kept]
        new = unique(names)
        changed = np.flatnonzero(new != names)
        if len(changed):
            position = (np.cumsum(keep) - 1)[rows[changed]]
            renamed[t] = (position, new[changed].astype(object))
    return renamed, unique.n_renamed, unique.first


def _create_arrays(ctx: _Context, root: zarr.Group, nnz_total: int, nnz_peaks: int) -> int:
    """The store's groups and (empty) arrays, for the tasks to fill; returns the protein chunk rows (0: none)."""
    config, n_cells = ctx.config, ctx.n_cells
    level, cname = config.compression_level, config.compressor
    x_group = root.create_group("X")
    x_group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_cells, ctx.n_genes]})
    _create(x_group, "data", nnz_total, ctx.count_dtype, 0, CHUNK_NNZ, SHARD_NNZ, level, cname)
    _create(x_group, "indices", nnz_total, np.int32, -1, CHUNK_NNZ, SHARD_NNZ, level, cname, shuffle="shuffle")
    _create(x_group, "indptr", n_cells + 1, np.int64, -1, CHUNK_ROWS, SHARD_ROWS, level, cname)
    obs = root.create_group("obs")
    obs.attrs.update(
        {
            "encoding-type": "dataframe",
            "encoding-version": "0.2.0",
            "_index": "_index",
            "column-order": ctx.stored_keys + ctx.cont_keys,
        }
    )
    for key in ctx.stored_keys:
        column = obs.create_group(key)
        column.attrs.update({"encoding-type": "categorical", "encoding-version": "0.2.0", "ordered": False})
        _write_small(column, "categories", np.array(ctx.categories[key], dtype=object))
        dtype = _code_dtype(len(ctx.categories[key]))
        _create(column, "codes", n_cells, dtype, -1, CHUNK_ROWS, SHARD_ROWS, level, cname)
    for key in ctx.cont_keys:
        _create(obs, key, n_cells, np.float64, np.nan, CHUNK_ROWS, SHARD_ROWS, level, cname)
    obs.create_array(
        "_index",
        shape=(n_cells,),
        dtype=str,
        chunks=(min(CHUNK_ROWS, n_cells),),
        attributes={"encoding-type": "string-array", "encoding-version": "0.2.0"},
    )
    chunk_rows = 0
    if ctx.proteins or ctx.atac or ctx.n_spatial:
        obsm = root.create_group("obsm")
        obsm.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    if ctx.atac:
        peaks = obsm.create_group(ATAC_OBSM_KEY)
        peaks.attrs.update(
            {"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_cells, ctx.n_peaks]}
        )
        _create(peaks, "data", nnz_peaks, ctx.peak_dtype, 0, CHUNK_NNZ, SHARD_NNZ, level, cname)
        _create(peaks, "indices", nnz_peaks, np.int32, -1, CHUNK_NNZ, SHARD_NNZ, level, cname, shuffle="shuffle")
        _create(peaks, "indptr", n_cells + 1, np.int64, -1, CHUNK_ROWS, SHARD_ROWS, level, cname)
        for key in (ATAC_OBSM_KEY, RNA_MASK_KEY):
            _create(obsm, f"{key}_mask", n_cells, np.uint8, 255, CHUNK_ROWS, SHARD_ROWS, level, cname, 1)
    if ctx.n_spatial:
        _create(
            obsm, SPATIAL_OBSM_KEY, n_cells, np.float64, np.nan, CHUNK_ROWS, SHARD_ROWS, level, cname, ctx.n_spatial
        )
    if ctx.proteins:
        per_row = ctx.n_proteins * ctx.protein_dtype.itemsize
        chunk_rows = int(min(CHUNK_ROWS, max(1024, 2 ** int(np.log2(max(1, DENSE_CHUNK_BYTES // per_row))))))
        shard_rows = chunk_rows * DENSE_SHARD_CHUNKS
        fill = int(np.iinfo(ctx.protein_dtype).max)
        for key, dtype, fill_value in (
            (PROTEIN_OBSM_KEY, ctx.protein_dtype, fill),
            (f"{PROTEIN_OBSM_KEY}_mask", np.uint8, 255),
        ):
            _create(obsm, key, n_cells, dtype, fill_value, chunk_rows, shard_rows, level, cname, ctx.n_proteins)
    return chunk_rows


def _spatial_dims(config: BuildConfig, paths: list[Path], dims: list[int]) -> int:
    """How many spatial coordinates the store keeps per cell: those of every input (0: none, with a warning when
    only some inputs have them); inputs whose coordinates differ in number are refused."""
    if config.spatial_key is None or not any(dims):
        return 0
    if not all(dims):
        without = paths[dims.index(0)]
        warnings.warn(
            f"{without}: no obsm[{config.spatial_key!r}] (spatial coordinates) while other inputs have them: the "
            "store keeps none",
            stacklevel=3,
        )
        return 0
    if len(set(dims)) > 1:
        odd = next(p for p, d in zip(paths, dims, strict=True) if d != dims[0])
        raise AtlasInputError(
            f"{odd}: obsm[{config.spatial_key!r}] holds {dims[paths.index(odd)]} coordinates per cell, "
            f"{paths[0]} {dims[0]}: inputs must share one coordinate system"
        )
    return dims[0]
