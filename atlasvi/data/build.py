"""`atlasvi build`: many inputs -> one validated, globally shuffled atlas store, out of core.

Passes over the inputs, one chunk of cells at a time (memory scales with `chunk_size`, not cells):
  1. validate counts (integer, >= 0, finite), count each cell's total, per-batch gene moments;
  2. (with n_top_genes) Seurat v3 clipped sums -> highly variable genes;
  3. scatter: every kept cell goes, with its destination row in the global seeded permutation, to
     the temporary bucket file that covers that row range (an external shuffle);
  4. gather: each bucket is sorted by destination and appended to the store, shard by shard.
With a protein key, each cell's protein counts travel with it (the union of the inputs' panels, in order of
first appearance; a protein outside an input's panel is stored as 0 and masked as not measured) and
become the store's protein modality (see `atlasvi.data.store`). With an ATAC key, each cell's peak counts
travel as a second sparse matrix (their own shuffle buckets) and become the store's "atac" modality; inputs
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
import glob
import json
import os
import re
import shutil
import socket
import uuid
import warnings
from collections.abc import Callable
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
from atlasvi.data.hvg import ClippedSums, GeneMoments, select_hvg
from atlasvi.data.inputs import InputFile, detect_kind, file_sha256, open_input
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

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): called as work advances (the CLI draws rich bars from it)."""


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
    keep: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # (cells,) after pass 1
    rna: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # (cells,) RNA measured, pass 1


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


class _SequentialWriter:
    """Appends to a 1-D zarr array, writing whole shards at a time (no read-modify-write)."""

    def __init__(self, array: zarr.Array, shard: int):
        self.array, self.shard, self.offset = array, shard, 0
        self.pending: list[np.ndarray] = []
        self.n_pending = 0

    def append(self, values: np.ndarray) -> None:
        self.pending.append(values)
        self.n_pending += len(values)
        if self.n_pending >= self.shard:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.pending:
            return
        values = np.concatenate(self.pending)
        n_write = len(values) if final else len(values) // self.shard * self.shard
        if n_write:
            self.array[self.offset : self.offset + n_write] = values[:n_write]
            self.offset += n_write
        rest = values[n_write:]
        self.pending, self.n_pending = ([rest] if len(rest) else []), len(rest)

    def close(self) -> None:
        self._flush(final=True)
        if self.offset != self.array.shape[0]:
            raise RuntimeError(f"wrote {self.offset} of {self.array.shape[0]} values to {self.array.path}")


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
) -> zarr.Array:
    """A 1-D array of n elements, or with `width` a 2-D one of n rows (chunked and sharded by rows)."""
    n_chunk = max(1, min(chunk, n))
    n_shard = max(n_chunk, min(shard, -(-n // n_chunk) * n_chunk))
    columns = () if width is None else (width,)
    return group.create_array(
        name,
        shape=(n, *columns),
        dtype=dtype,
        chunks=(n_chunk, *columns),
        shards=(n_shard, *columns),
        compressors=compressors(level, cname),
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


class _Buckets:
    """Temporary bucket files of the external shuffle: bucket k holds destination rows [k*size, (k+1)*size)."""

    def __init__(self, root: Path, size: int, n_rows: int):
        self.root, self.size = root, size
        self.n = max(1, -(-n_rows // size))
        for k in range(self.n):
            (root / str(k)).mkdir(parents=True)

    def append(self, dest: np.ndarray, fields: dict[str, np.ndarray], entries: dict[str, np.ndarray], nnz: np.ndarray):
        """dest: (cells,) destination rows; fields: per-cell arrays; entries: per-non-zero arrays."""
        bucket = dest // self.size
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange(self.n + 1))
        entry_start = np.concatenate([[0], np.cumsum(nnz)])
        for k in range(self.n):
            cells = order[bounds[k] : bounds[k + 1]]
            if not len(cells):
                continue
            folder = self.root / str(k)
            take = _ranges(entry_start[cells], nnz[cells])
            for name, values in [("dest", dest[cells]), ("nnz", nnz[cells])] + [
                (n, v[cells]) for n, v in fields.items()
            ]:
                with open(folder / name, "ab") as handle:
                    np.ascontiguousarray(values).tofile(handle)
            for name, values in entries.items():
                with open(folder / name, "ab") as handle:
                    values[take].tofile(handle)

    def read(self, k: int, dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray]:
        folder = self.root / str(k)
        return {name: np.fromfile(folder / name, dtype=dtype) for name, dtype in dtypes.items()}


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


def build_store(config: BuildConfig, progress: Progress = _no_progress) -> Path:
    """Build one atlas store from config.inputs; returns its path. See the module docstring.

    Refused before any work: a missing input, an output that is, holds or lies inside an input, an existing
    output without `overwrite` or (with it) anything but an atlas store or an empty folder, and an output
    folder that cannot be written.
    """
    output = Path(config.output)
    paths = [Path(p) for p in config.inputs]
    for path in paths:
        if not path.exists():
            raise AtlasInputError(f"{path}: input does not exist")
        detect_kind(path)
    _remove_dead_builds(output)
    _check_output(output, paths, config.overwrite)
    token = uuid.uuid4().hex[:8]
    staging, scratch = _sibling(output, "building", token), _sibling(output, "scratch", token)
    new_folders = [p for p in [output.parent, *output.parent.parents] if not p.exists()]  # deepest first
    try:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            scratch.mkdir()
        except OSError as err:
            raise AtlasInputError(f"{output.parent}: cannot write the store there ({err.strerror})") from err
        _build(config, paths, staging, scratch, progress)
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
        raise AtlasInputError(f"{output}: exists already (pass overwrite to replace it)")
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


def _build(config: BuildConfig, paths: list[Path], staging: Path, scratch: Path, progress: Progress) -> None:
    batch_key = config.batch_key or "batch"
    cat_keys = [batch_key] + ([config.labels_key] if config.labels_key else []) + config.categorical_covariate_keys
    stored_keys = cat_keys + config.annotation_keys  # every categorical obs column of the store

    # Pass 0: metadata of every input (genes, categories, hashes of cell names); one input open at a time.
    genes, categories = [], {k: set() for k in stored_keys}
    n_cells_in, name_hashes, panels, peak_sets, spatial_dims = [], [], [], [], []
    for i, path in enumerate(paths):
        source = _open(config, path)
        try:
            genes.append((path, source.gene_ids, source.gene_names))
            panels.append(source.sides["protein"].names if "protein" in source.sides else None)
            peak_sets.append((path, source.sides["atac"].names) if "atac" in source.sides else None)
            spatial_dims.append(len(source.sides["spatial"].names) if "spatial" in source.sides else 0)
            n_cells_in.append(source.n_cells)
            if config.batch_key is None:
                categories[batch_key].add(path.name)
            for start in range(0, source.n_cells, config.chunk_size):
                obs = source.obs_rows(start, min(start + config.chunk_size, source.n_cells))
                name_hashes.append(_hashes(obs.index))
                for key in config.annotation_keys:
                    categories[key].update(obs[key].dropna().astype(str))
                for key in cat_keys:
                    if key == config.labels_key:
                        categories[key].update(_labels(config, obs, path))
                    elif key != batch_key or config.batch_key is not None:
                        categories[key].update(_categories(obs[key], path, key, None))
                for key in config.continuous_covariate_keys:
                    values = pd.to_numeric(obs[key], errors="coerce").to_numpy(np.float64)
                    if not np.isfinite(values).all():
                        cell = str(obs.index[~np.isfinite(values)][0])
                        raise AtlasInputError(
                            f"{path}: obs column {key!r} has missing, non-numeric or infinite values (cell {cell!r})"
                        )
        finally:
            source.close()
        progress("inputs", i + 1, len(paths))
    gene_ids, gene_names, gene_maps = _align_genes(config, genes)
    categories = {k: sorted(v) for k, v in categories.items()}
    absent = sorted(set(config.unlabeled_batches) - set(categories[batch_key]))
    if absent:
        raise AtlasInputError(f"unlabeled_batches {absent} are not {batch_key} categories: {categories[batch_key]}")
    proteins = config.protein_key is not None
    protein_names = list(dict.fromkeys(name for panel in panels if panel is not None for name in panel))
    protein_maps = [pd.Index(protein_names).get_indexer(panel) if proteins else None for panel in panels]
    n_proteins = len(protein_names)
    atac = config.atac_key is not None
    peak_names, peak_maps = _align_peaks(peak_sets) if atac else ([], [None] * len(paths))
    n_peaks = len(peak_names)
    n_spatial = _spatial_dims(config, paths, spatial_dims)
    spatial = n_spatial > 0
    plans = [_InputPlan(*plan) for plan in zip(paths, n_cells_in, gene_maps, protein_maps, peak_maps, strict=True)]
    n_genes_all = len(gene_ids)
    n_batch = len(categories[batch_key])
    total_cells = sum(n_cells_in)

    def batch_codes(source: InputFile, obs: pd.DataFrame) -> np.ndarray:
        if config.batch_key is None:
            return np.full(len(obs), categories[batch_key].index(source.path.name), dtype=np.int64)
        values = _categories(obs[batch_key], source.path, batch_key, None)
        return pd.Index(categories[batch_key]).get_indexer(values)

    def chunks(stage: str):
        done = 0
        for plan in plans:
            source = _open(config, plan.path)
            try:
                for start, counts, obs in source.iter_chunks(config.chunk_size):
                    rows = slice(start, start + counts.shape[0])
                    yield plan, source, rows, counts, obs
                    done += counts.shape[0]
                    progress(stage, done, total_cells)
            finally:
                source.close()

    # Pass 1: validation, empty cells, gene moments.
    moments = GeneMoments(n_batch, n_genes_all)
    max_count, dropped, max_protein, max_peak = 0, 0, 0, 0
    for plan, source, rows, counts, obs in chunks("validate"):
        _validate_chunk(plan.path, counts, obs.index, source.gene_ids)
        if proteins:
            values = source.side_rows("protein", rows.start, rows.stop)
            _validate_proteins(plan.path, values, obs.index, source.sides["protein"].names)
            max_protein = max(max_protein, int(values.max(initial=0)))
        aligned = _remap(counts, plan.gene_map, n_genes_all)
        totals = np.asarray(aligned.sum(axis=1)).ravel()
        rna = totals > 0
        empty = ~rna
        if atac:
            peaks = source.side_rows("atac", rows.start, rows.stop) if plan.peak_map is not None else None
            if peaks is not None:
                _validate_chunk(plan.path, peaks, obs.index, source.sides["atac"].names, "peak", "peak ")
                max_peak = max(max_peak, int(peaks.data.max(initial=0)))
            empty &= ~_atac_present(source, plan, rows, peaks)
        if spatial:
            coordinates = source.side_rows("spatial", rows.start, rows.stop)
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
                if atac
                else "zero counts over the aligned genes"
            )
            raise AtlasInputError(
                f"{plan.path}: cell {str(cells[0])!r} has {what} "
                f"({len(cells)} such cells among cells {rows.start}..{rows.stop - 1}); "
                "filter them or pass zero_count_cells='drop' (--drop-empty-cells)"
            )
        plan.keep = np.concatenate([plan.keep, ~empty])
        plan.rna = np.concatenate([plan.rna, rna])
        dropped += int(empty.sum())
        if aligned.nnz:
            max_count = max(max_count, int(aligned.data.max()))
        if config.n_top_genes is not None:
            moments.update(aligned[rna], batch_codes(source, obs)[rna])
    if dropped:
        warnings.warn(f"dropped {dropped} cells with zero counts", stacklevel=2)
    n_cells = sum(int(p.keep.sum()) for p in plans)
    if n_cells == 0:
        raise AtlasInputError("no cells left to store: every cell has zero counts")
    unique_names = _UniqueNames(np.concatenate(name_hashes)[np.concatenate([p.keep for p in plans])])
    del name_hashes

    # Pass 2: highly variable genes.
    hvg_table = None
    stored = np.arange(n_genes_all)
    if config.n_top_genes is not None and config.n_top_genes < n_genes_all:
        clipped = ClippedSums(moments)
        for plan, source, rows, counts, obs in chunks("hvg"):
            aligned = _remap(counts, plan.gene_map, n_genes_all)
            rna = plan.rna[rows]
            clipped.update(aligned[rna], batch_codes(source, obs)[rna])
        hvg_table = select_hvg(moments, clipped, config.n_top_genes)
        if config.hvg_subset:
            stored = np.flatnonzero(hvg_table["highly_variable"].to_numpy())
    n_genes = len(stored)
    stored_of_aligned = np.full(n_genes_all, -1, dtype=np.int64)
    stored_of_aligned[stored] = np.arange(n_genes)

    # Pass 3: scatter kept cells to destination buckets of the global permutation.
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(n_cells)
    destination = np.empty(n_cells, dtype=np.int64)
    destination[order] = np.arange(n_cells)
    count_dtype = _count_dtype(max_count)
    protein_dtype = _count_dtype(max_protein + 1)  # its largest value is the fill value, never a count
    batch_panels = np.zeros((n_batch, n_proteins), dtype=bool)
    buckets = _Buckets(scratch / "cells", max(config.chunk_size, 4096), n_cells)
    peak_buckets = _Buckets(scratch / "peaks", max(config.chunk_size, 4096), n_cells) if atac else None
    peak_dtype = _count_dtype(max_peak)
    peaks_measured = np.zeros(n_batch, dtype=bool)
    rna_measured, n_rna_measured = np.zeros(n_batch, dtype=bool), 0
    nnz_peaks = 0
    cont_keys = config.continuous_covariate_keys
    log_lib_sum, log_lib_sq, lib_n = np.zeros(n_batch), np.zeros(n_batch), np.zeros(n_batch)
    zero_library, nnz_total, kept_before = 0, 0, 0
    for plan, source, rows, counts, obs in chunks("shuffle"):
        keep = plan.keep[rows]
        cells = _remap(counts, _compose(plan.gene_map, stored_of_aligned), n_genes)
        cells = cells[keep]
        n_kept = cells.shape[0]
        dest = destination[kept_before : kept_before + n_kept]
        kept_before += n_kept
        library = np.asarray(cells.sum(axis=1)).ravel()
        codes = batch_codes(source, obs)[keep]
        rna = plan.rna[rows][keep]  # the library prior and its warning count the cells with RNA only
        zero_library += int((library[rna] == 0).sum())
        log_lib = np.log(np.maximum(library, 1))  # as scvi-tools: np.ma.log(library).filled(0)
        log_lib_sum += np.bincount(codes[rna], weights=log_lib[rna], minlength=n_batch)
        log_lib_sq += np.bincount(codes[rna], weights=log_lib[rna] ** 2, minlength=n_batch)
        lib_n += np.bincount(codes[rna], minlength=n_batch)
        fields = {"name": unique_names(np.asarray(obs.index[keep], dtype="U"))}
        for key in config.annotation_keys:
            fields[key] = _annotation_codes(obs[key], categories[key])[keep]
        for key in cat_keys:
            if key == batch_key:
                fields[key] = codes.astype(np.int32)
            else:
                if key == config.labels_key:
                    values = _labels(config, obs, source.path)[keep]
                else:
                    values = _categories(obs[key], source.path, key, None)[keep]
                fields[key] = pd.Index(categories[key]).get_indexer(values).astype(np.int32)
        for key in cont_keys:
            fields[key] = pd.to_numeric(obs[key]).to_numpy(np.float64)[keep]
        if spatial:
            fields["spatial"] = source.side_rows("spatial", rows.start, rows.stop)[keep]
        if proteins:
            panel = plan.protein_map
            values = np.zeros((n_kept, n_proteins), dtype=protein_dtype)
            values[:, panel] = source.side_rows("protein", rows.start, rows.stop)[keep]
            measured = np.zeros((n_kept, n_proteins), dtype=np.uint8)
            present = source.side_present("protein", rows.start, rows.stop)[keep]
            measured[:, panel] = present[:, None]
            batch_panels[np.unique(codes[present])[:, None], panel[None, :]] = True
            fields["protein"], fields["protein_mask"] = values, measured
        if atac:
            if plan.peak_map is not None:
                read = source.side_rows("atac", rows.start, rows.stop)
                present = _atac_present(source, plan, rows, read)[keep]
                peaks = _remap(read[keep], plan.peak_map, n_peaks)
            else:
                present, peaks = np.zeros(n_kept, dtype=bool), sp.csr_matrix((n_kept, n_peaks))
            peaks_measured[np.unique(codes[present])] = True
            rna_measured[np.unique(codes[rna])] = True
            n_rna_measured += int(rna.sum())
            fields["atac_mask"] = present.astype(np.uint8)
            fields["rna_mask"] = rna.astype(np.uint8)
            peak_nnz = np.diff(peaks.indptr).astype(np.int64)
            nnz_peaks += int(peak_nnz.sum())
            entries_peaks = {"indices": peaks.indices.astype(np.int32), "data": peaks.data.astype(peak_dtype)}
            peak_buckets.append(dest, {}, entries_peaks, peak_nnz)
        nnz = np.diff(cells.indptr).astype(np.int64)
        nnz_total += int(nnz.sum())
        name_bytes = np.char.encode(fields.pop("name"), "utf-8")
        fields["name_len"] = np.char.str_len(name_bytes).astype(np.int32)
        entries = {
            "indices": cells.indices.astype(np.int32),
            "data": cells.data.astype(count_dtype),
        }
        name_entries = np.frombuffer(b"".join(name_bytes.tolist()), dtype=np.uint8)
        buckets.append(dest, fields, entries, nnz)
        _append_names(buckets, dest, name_entries, fields["name_len"].astype(np.int64))
    if unique_names.n_renamed:
        name, renamed = unique_names.first
        warnings.warn(
            f"{unique_names.n_renamed} cells have a name an earlier cell of the inputs has (first {name!r}); "
            f"renamed as anndata's obs_names_make_unique does ({name!r} -> {renamed!r})",
            stacklevel=2,
        )
    if zero_library:
        warnings.warn(
            f"{zero_library} cells have zero counts over the stored genes (kept; log-library 0 as in scvi-tools)",
            stacklevel=2,
        )

    # Pass 4: gather buckets in destination order into the store.
    root = zarr.open_group(staging, mode="w", zarr_format=3)
    level, cname = config.compression_level, config.compressor
    x_group = root.create_group("X")
    x_group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_cells, n_genes]})
    writers = {
        "data": _SequentialWriter(
            _create(x_group, "data", nnz_total, count_dtype, 0, CHUNK_NNZ, SHARD_NNZ, level, cname), SHARD_NNZ
        ),
        "indices": _SequentialWriter(
            _create(x_group, "indices", nnz_total, np.int32, -1, CHUNK_NNZ, SHARD_NNZ, level, cname), SHARD_NNZ
        ),
        "indptr": _SequentialWriter(
            _create(x_group, "indptr", n_cells + 1, np.int64, -1, CHUNK_ROWS, SHARD_ROWS, level, cname), SHARD_ROWS
        ),
    }
    obs = root.create_group("obs")
    obs.attrs.update(
        {
            "encoding-type": "dataframe",
            "encoding-version": "0.2.0",
            "_index": "_index",
            "column-order": stored_keys + cont_keys,
        }
    )
    for key in stored_keys:
        column = obs.create_group(key)
        column.attrs.update({"encoding-type": "categorical", "encoding-version": "0.2.0", "ordered": False})
        _write_small(column, "categories", np.array(categories[key], dtype=object))
        array = _create(
            column, "codes", n_cells, _code_dtype(len(categories[key])), -1, CHUNK_ROWS, SHARD_ROWS, level, cname
        )
        writers[f"cat:{key}"] = _SequentialWriter(array, SHARD_ROWS)
    for key in cont_keys:
        writers[f"cont:{key}"] = _SequentialWriter(
            _create(obs, key, n_cells, np.float64, np.nan, CHUNK_ROWS, SHARD_ROWS, level, cname), SHARD_ROWS
        )
    names_array = obs.create_array(
        "_index",
        shape=(n_cells,),
        dtype=str,
        chunks=(min(CHUNK_ROWS, n_cells),),
        attributes={"encoding-type": "string-array", "encoding-version": "0.2.0"},
    )
    chunk_rows = 0
    if proteins or atac or spatial:
        obsm = root.create_group("obsm")
        obsm.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    if atac:
        peaks_group = obsm.create_group(ATAC_OBSM_KEY)
        peaks_group.attrs.update(
            {"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_cells, n_peaks]}
        )
        for part_name, n, dtype, fill, chunk, shard in (
            ("data", nnz_peaks, peak_dtype, 0, CHUNK_NNZ, SHARD_NNZ),
            ("indices", nnz_peaks, np.int32, -1, CHUNK_NNZ, SHARD_NNZ),
            ("indptr", n_cells + 1, np.int64, -1, CHUNK_ROWS, SHARD_ROWS),
        ):
            array = _create(peaks_group, part_name, n, dtype, fill, chunk, shard, level, cname)
            writers[f"atac:{part_name}"] = _SequentialWriter(array, shard)
        writers["atac:indptr"].append(np.zeros(1, dtype=np.int64))
        mask = _create(obsm, f"{ATAC_OBSM_KEY}_mask", n_cells, np.uint8, 255, CHUNK_ROWS, SHARD_ROWS, level, cname, 1)
        writers["atac:mask"] = _SequentialWriter(mask, SHARD_ROWS)
        mask = _create(obsm, f"{RNA_MASK_KEY}_mask", n_cells, np.uint8, 255, CHUNK_ROWS, SHARD_ROWS, level, cname, 1)
        writers["rna:mask"] = _SequentialWriter(mask, SHARD_ROWS)
        peak_offset = 0
    if spatial:
        coordinates = _create(
            obsm, SPATIAL_OBSM_KEY, n_cells, np.float64, np.nan, CHUNK_ROWS, SHARD_ROWS, level, cname, n_spatial
        )
        writers["spatial"] = _SequentialWriter(coordinates, SHARD_ROWS)
    if proteins:
        per_row = n_proteins * protein_dtype.itemsize
        chunk_rows = int(min(CHUNK_ROWS, max(1024, 2 ** int(np.log2(max(1, DENSE_CHUNK_BYTES // per_row))))))
        shard_rows = chunk_rows * DENSE_SHARD_CHUNKS
        fill = int(np.iinfo(protein_dtype).max)
        for key, dtype, fill_value in (
            (PROTEIN_OBSM_KEY, protein_dtype, fill),
            (f"{PROTEIN_OBSM_KEY}_mask", np.uint8, 255),
        ):
            array = _create(obsm, key, n_cells, dtype, fill_value, chunk_rows, shard_rows, level, cname, n_proteins)
            writers[f"obsm:{key}"] = _SequentialWriter(array, shard_rows)
        prior_cells = 100  # scvi-tools' n_cells of its protein prior: the first 100 in store order are random cells
        prior_counts = [np.zeros((0, n_proteins)) for _ in range(n_batch)]
        prior_masks = [np.zeros((0, n_proteins), dtype=bool) for _ in range(n_batch)]
    writers["indptr"].append(np.zeros(1, dtype=np.int64))
    dtypes = {
        "dest": np.int64,
        "nnz": np.int64,
        "name_len": np.int32,
        "indices": np.int32,
        "data": count_dtype,
        "name": np.uint8,
    }
    dtypes |= {key: np.int32 for key in stored_keys} | {key: np.float64 for key in cont_keys}
    if proteins:
        dtypes |= {"protein": protein_dtype, "protein_mask": np.uint8}
    if atac:
        dtypes["atac_mask"] = np.uint8
        dtypes["rna_mask"] = np.uint8
    if spatial:
        dtypes["spatial"] = np.float64
    row_offset, entry_offset = 0, 0
    for k in range(buckets.n):
        part = buckets.read(k, dtypes)
        order_k = np.argsort(part["dest"], kind="stable")
        if not np.array_equal(part["dest"][order_k], np.arange(row_offset, row_offset + len(order_k))):
            raise RuntimeError(f"shuffle bucket {k} does not hold rows {row_offset}.. as planned")
        entry_start = np.concatenate([[0], np.cumsum(part["nnz"])[:-1]])
        take = _ranges(entry_start[order_k], part["nnz"][order_k])
        writers["data"].append(part["data"][take])
        writers["indices"].append(part["indices"][take])
        writers["indptr"].append(entry_offset + np.cumsum(part["nnz"][order_k]))
        entry_offset += int(part["nnz"].sum())
        for key in stored_keys:
            writers[f"cat:{key}"].append(part[key][order_k].astype(_code_dtype(len(categories[key]))))
        for key in cont_keys:
            writers[f"cont:{key}"].append(part[key][order_k])
        if spatial:
            writers["spatial"].append(part["spatial"].reshape(-1, n_spatial)[order_k])
        if atac:
            writers["atac:mask"].append(part["atac_mask"][order_k].reshape(-1, 1))
            writers["rna:mask"].append(part["rna_mask"][order_k].reshape(-1, 1))
            peak_part = peak_buckets.read(
                k, {"dest": np.int64, "nnz": np.int64, "indices": np.int32, "data": peak_dtype}
            )
            peak_order = np.argsort(peak_part["dest"], kind="stable")
            peak_start = np.concatenate([[0], np.cumsum(peak_part["nnz"])[:-1]])
            take_peaks = _ranges(peak_start[peak_order], peak_part["nnz"][peak_order])
            writers["atac:data"].append(peak_part["data"][take_peaks])
            writers["atac:indices"].append(peak_part["indices"][take_peaks])
            writers["atac:indptr"].append(peak_offset + np.cumsum(peak_part["nnz"][peak_order]))
            peak_offset += int(peak_part["nnz"].sum())
            shutil.rmtree(peak_buckets.root / str(k))
        if proteins:
            values = part["protein"].reshape(-1, n_proteins)[order_k]
            measured = part["protein_mask"].reshape(-1, n_proteins)[order_k]
            writers[f"obsm:{PROTEIN_OBSM_KEY}"].append(values)
            writers[f"obsm:{PROTEIN_OBSM_KEY}_mask"].append(measured)
            codes_k = part[batch_key][order_k]
            for b in range(n_batch):
                need = prior_cells - len(prior_counts[b])
                if need > 0:
                    take_b = np.flatnonzero((codes_k == b) & measured.any(axis=1))[:need]
                    prior_counts[b] = np.concatenate([prior_counts[b], values[take_b]])
                    prior_masks[b] = np.concatenate([prior_masks[b], measured[take_b].astype(bool)])
        name_start = np.concatenate([[0], np.cumsum(part["name_len"])[:-1]])
        raw = part["name"].tobytes()
        names = np.array(
            [
                raw[s : s + n].decode("utf-8")
                for s, n in zip(name_start[order_k], part["name_len"][order_k], strict=True)
            ],
            dtype=object,
        )
        names_array[row_offset : row_offset + len(names)] = names
        row_offset += len(order_k)
        shutil.rmtree(buckets.root / str(k))
        progress("write", row_offset, n_cells)
    for writer in writers.values():
        writer.close()

    var = pd.DataFrame({"gene_ids": gene_ids[stored], "gene_names": gene_names[stored]}, index=gene_ids[stored])
    var.index.name = None
    if hvg_table is not None:
        for column in hvg_table.columns:
            var[column] = hvg_table[column].to_numpy()[stored]
    _write_small(root, "var", var)
    uns = {f"{PROTEIN_OBSM_KEY}_names": np.array(protein_names, dtype=object)} if proteins else {}
    uns |= {f"{ATAC_OBSM_KEY}_names": np.array(peak_names, dtype=object)} if atac else {}
    for name in ["obsm", "varm", "obsp", "varp", "layers", "uns"]:
        if name == "obsm" and (proteins or atac or spatial):
            continue
        _write_small(root, name, uns if name == "uns" else {})
    modalities = {}
    if atac:
        modalities["atac"] = {
            "obsm_key": ATAC_OBSM_KEY,
            "features": peak_names,
            "count_dtype": peak_dtype.name,
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
            "count_dtype": count_dtype.name,
            "batch_mask": [[bool(m)] for m in rna_measured],
            "background_log_means": [],
            "background_log_scales": [],
            "chunk_rows": CHUNK_ROWS,
            "kind": "mask",
            "n_measured": n_rna_measured,
        }
    if proteins:
        priors = [_protein_prior(prior_counts[b], prior_masks[b], config.seed) for b in range(n_batch)]
        modalities["protein"] = {
            "obsm_key": PROTEIN_OBSM_KEY,
            "features": protein_names,
            "count_dtype": protein_dtype.name,
            "batch_mask": batch_panels.tolist(),
            "background_log_means": [mu for mu, _ in priors],
            "background_log_scales": [scale for _, scale in priors],
            "chunk_rows": chunk_rows,
        }

    safe_n = np.maximum(lib_n, 1)
    log_means = log_lib_sum / safe_n
    log_vars = np.maximum(log_lib_sq / safe_n - log_means**2, 0.0)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "n_cells": n_cells,
        "n_genes": n_genes,
        "nnz": nnz_total,
        "count_dtype": count_dtype.name,
        "gene_ids": gene_ids[stored].tolist(),
        "gene_names": gene_names[stored].tolist(),
        "highly_variable": None if hvg_table is None else hvg_table["highly_variable"].to_numpy()[stored].tolist(),
        "batch_key": batch_key,
        "labels_key": config.labels_key,
        "unlabeled_category": config.unlabeled_category if config.labels_key else None,
        "categorical": {key: categories[key] for key in cat_keys},
        "continuous": cont_keys,
        "annotations": {key: categories[key] for key in config.annotation_keys},
        "library_log_means": log_means.tolist(),
        "library_log_vars": log_vars.tolist(),
        "modalities": modalities,
        "spatial": {"obsm_key": SPATIAL_OBSM_KEY, "n_dims": n_spatial} if spatial else None,
        "layout": {"chunk_nnz": CHUNK_NNZ, "shard_nnz": SHARD_NNZ, "chunk_rows": CHUNK_ROWS, "shard_rows": SHARD_ROWS},
        "provenance": {
            "atlasvi_version": __version__,
            "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "inputs": [
                {"path": str(p), "format": detect_kind(p), "sha256": file_sha256(p), "n_cells": n}
                for p, n in zip(paths, n_cells_in, strict=True)
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


def _append_names(buckets: _Buckets, dest: np.ndarray, name_bytes: np.ndarray, name_len: np.ndarray) -> None:
    """Cell names travel through the buckets as utf-8 bytes (lengths in `name_len`)."""
    bucket = dest // buckets.size
    starts = np.concatenate([[0], np.cumsum(name_len)[:-1]])
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(buckets.n + 1))
    for k in range(buckets.n):
        cells = order[bounds[k] : bounds[k + 1]]
        if len(cells):
            with open(buckets.root / str(k) / "name", "ab") as handle:
                name_bytes[_ranges(starts[cells], name_len[cells])].tofile(handle)
