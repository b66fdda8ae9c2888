"""StreamingLoader: minibatches from an atlas store, read ahead in background threads.

The sampler decides which rows a rank reads (see `sampler.py`); the loader fetches them. A rank's
rows are cut into windows of `buffer_blocks * block_size` rows (rounded to whole batches). Background
threads read windows ahead (`prefetch` + 1 beyond the one being cut), each one's rows in contiguous ranges, and shuffle
the window with `default_rng([seed, epoch, rank, window])`; minibatches are consecutive slices of the
shuffled window (zero-copy views). Memory is bounded by a few windows (prefetch + 1 in flight, their
counts in at most prefetch + 3 reused buffers), never by the cells.

Everything random is a function of (seed, epoch, rank, window), so the position (epoch, step) is the
whole state: `load_state_dict` of a saved position yields exactly the batches that would have come next.
"""

import atexit
import queue
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numba
import numpy as np
import scipy.sparse as sp
import torch

from atlasvi.data.config import LoaderConfig
from atlasvi.data.memory import keep_freed_memory
from atlasvi.data.sampler import BlockSampler
from atlasvi.data.store import AtlasStore, Buffers, RowBlock, open_store


@dataclass(frozen=True)
class SparseCounts:
    """A minibatch's (n, n_genes) counts in CSR form on its device, never densified unless asked.

    crow_indices: (n+1,) int64; col_indices: (nnz,) int64 gene indices, ascending within a row; values: (nnz,)
    float (counts, or a function of them that maps 0 to 0, e.g. log1p).
    """

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    n_genes: int

    def __len__(self) -> int:
        return len(self.crow_indices) - 1

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.n_genes)

    @cached_property
    def rows(self) -> torch.Tensor:
        """(nnz,) int64: the row (cell) of each non-zero."""
        lengths = self.crow_indices.diff()
        return torch.repeat_interleave(torch.arange(len(self), device=lengths.device), lengths)

    @cached_property
    def flat_index(self) -> torch.Tensor:
        """(nnz,) int64: row * n_genes + column of each non-zero (its index in the flattened dense matrix)."""
        return self.rows * self.n_genes + self.col_indices

    def with_values(self, values: torch.Tensor) -> "SparseCounts":
        """The same pattern with other (nnz,) values (a map of the counts that keeps 0 at 0); the pattern's row of
        each non-zero (`rows`) is shared, not computed again."""
        out = SparseCounts(self.crow_indices, self.col_indices, values, self.n_genes)
        out.__dict__["rows"] = self.rows  # a cached_property's slot (the dataclass is frozen)
        return out

    def row_sums(self) -> torch.Tensor:
        """(n,) sum of each row's values (a cell's total counts)."""
        return torch.zeros(len(self), dtype=self.values.dtype, device=self.values.device).index_add_(
            0, self.rows, self.values
        )

    def to_dense(self) -> torch.Tensor:
        """(n, n_genes) dense values on the same device."""
        dense = torch.zeros(len(self) * self.n_genes, dtype=self.values.dtype, device=self.values.device)
        return dense.index_put_((self.flat_index,), self.values).view(len(self), self.n_genes)


@dataclass
class Minibatch:
    """One minibatch: CSR counts (cells x genes) and per-cell covariates, on the host until `to`.

    crow_indices: (n+1,) int32; col_indices, values: (nnz,) int32 gene indices, float32 counts;
    categorical: key -> (n,) int64 codes; continuous: key -> (n,) float32; rows: (n,) int64 store rows;
    obsm: modality -> (n, n_features) float32 counts, dense (proteins; 0 where not measured) or a sparse CSR tensor
    (peaks; `.to_dense()` on the device); masks: modality -> (n, n_features) bool (dense) or (n, 1) (CSR), True
    where measured (the modalities the loader was asked for, e.g. "protein", "atac").
    """

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    n_genes: int
    categorical: dict[str, torch.Tensor]
    continuous: dict[str, torch.Tensor]
    rows: torch.Tensor
    obsm: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Minibatch":
        """The same minibatch with every tensor on `device` (counts stay sparse: few bytes move)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return Minibatch(
            move(self.crow_indices),
            move(self.col_indices),
            move(self.values),
            self.n_genes,
            {k: move(v) for k, v in self.categorical.items()},
            {k: move(v) for k, v in self.continuous.items()},
            move(self.rows),
            {k: move(v) for k, v in self.obsm.items()},
            {k: move(v) for k, v in self.masks.items()},
        )

    def sparse_counts(self) -> SparseCounts:
        """The counts as `SparseCounts` on the device the minibatch is on (int64 indices; no densifying)."""
        return SparseCounts(self.crow_indices.long(), self.col_indices.long(), self.values, self.n_genes)

    def counts(self) -> torch.Tensor:
        """(n, n_genes) float32 dense counts, built on the device the minibatch is on."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = torch.sparse_csr_tensor(
                self.crow_indices, self.col_indices, self.values, (len(self), self.n_genes), check_invariants=False
            )
        return csr.to_dense()


def feature_map_key(modality: str) -> str:
    """The code_maps key of a dense modality's feature map: (n_model_features,) the store column of each of a
    model's features (e.g. its proteins, matched by name), -1 where the store lacks the feature."""
    return f"obsm/{modality}"


def _aligned(counts: np.ndarray, mask: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(counts, mask) of a dense modality in a model's feature order: a feature the store lacks is 0 and not
    measured (mask False), never a count of 0."""
    present = columns >= 0
    take = np.where(present, columns, 0)
    return np.where(present, counts[:, take], 0), mask[:, take] & present


def minibatch_from_rows(
    block: RowBlock,
    take: slice | np.ndarray,
    n_genes: int,
    code_maps: Mapping[str, np.ndarray | torch.Tensor] | None = None,
) -> Minibatch:
    """The rows `take` of `block` as one minibatch; the one place store codes become a model's codes.

    take: a slice (step 1) of consecutive rows, cut without copying the counts, or an array of positions
    (repeats allowed: one cell per draw), gathered. code_maps: key -> (n_store_categories,) model codes
    (see `StreamingLoader`); keys without one keep the store's codes; a dense modality's feature map
    (`feature_map_key`) puts its columns in the model's order. The minibatch's rows are
    `block.rows[take]` (or `block.start + take` where the block has no rows).
    """
    rows = block.rows if block.rows is not None else np.arange(block.start, block.stop)
    if isinstance(take, slice):
        a, z, _ = take.indices(len(block.indptr) - 1)
        lo, hi = int(block.indptr[a]), int(block.indptr[z])
        crow = (block.indptr[a : z + 1] - lo).astype(np.int32, copy=False)
        indices, values = block.indices[lo:hi], block.data[lo:hi]
    else:
        lengths = np.diff(block.indptr)[take]
        starts = block.indptr[:-1][take]
        crow = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        elements = np.repeat(starts - crow[:-1], lengths) + np.arange(crow[-1])
        indices, values = block.indices[elements], block.data[elements]
    categorical = _model_codes({k: v[take] for k, v in block.categorical.items()}, code_maps or {})
    obsm, masks = _model_features(
        {k: v[take] for k, v in block.obsm.items()}, {k: v[take] for k, v in block.masks.items()}, code_maps or {}
    )
    return Minibatch(
        torch.from_numpy(crow),
        torch.from_numpy(indices.astype(np.int32, copy=False)),
        torch.from_numpy(values.astype(np.float32, copy=False)),
        n_genes,
        {k: torch.from_numpy(v) for k, v in categorical.items()},
        {k: torch.from_numpy(v[take].astype(np.float32, copy=False)) for k, v in block.continuous.items()},
        torch.from_numpy(rows[take].astype(np.int64, copy=False)),
        {k: _tensor(v) for k, v in obsm.items()},
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in masks.items()},
    )


def _model_codes(
    categorical: Mapping[str, np.ndarray], code_maps: Mapping[str, np.ndarray | torch.Tensor]
) -> dict[str, np.ndarray]:
    """key -> (n,) int64 codes in a model's coding: through `code_maps[key]` where it has one, else the store's."""
    return {
        k: np.asarray(code_maps[k])[v] if k in code_maps else v.astype(np.int64, copy=False)
        for k, v in categorical.items()
    }


def _model_features(
    obsm: dict[str, np.ndarray | sp.csr_matrix],
    masks: dict[str, np.ndarray],
    code_maps: Mapping[str, np.ndarray | torch.Tensor],
) -> tuple[dict, dict]:
    """(obsm, masks) with each dense modality that has a feature map (`feature_map_key`) in a model's feature order."""
    for k in obsm:
        if feature_map_key(k) in code_maps:
            obsm[k], masks[k] = _aligned(obsm[k], masks[k], np.asarray(code_maps[feature_map_key(k)]))
    return obsm, masks


def _tensor(values: np.ndarray | sp.csr_matrix) -> torch.Tensor:
    """float32 counts as a dense tensor, or a sparse CSR tensor for a CSR matrix."""
    if not sp.issparse(values):
        return torch.from_numpy(values.astype(np.float32))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(values.indptr.astype(np.int64)),
            torch.from_numpy(values.indices.astype(np.int64)),
            torch.from_numpy(values.data.astype(np.float32)),
            values.shape,
            check_invariants=False,
        )


class _ReadAheadPool:
    """Daemon worker threads running read-ahead tasks.

    At interpreter exit (or `stop`) queued tasks are cancelled and reads in flight are given a bounded
    time to finish, so no thread is inside a backend's native code when the interpreter tears down and
    a read that never returns (a vanished server) cannot hold up exit.
    """

    def __init__(self, n_threads: int):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"atlasvi-read-{i}", daemon=True) for i in range(n_threads)
        ]
        for thread in self._threads:
            thread.start()
        _LIVE_POOLS.add(self)

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._tasks.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            future, fn, args = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as err:  # noqa: BLE001 - handed to the consumer through the future
                future.set_exception(err)

    def native_ids(self) -> list[int]:
        """The threads' native (kernel) ids."""
        return [thread.native_id for thread in self._threads if thread.native_id is not None]

    def stop(self, timeout: float = 0.0) -> None:
        """Cancel queued tasks, end the threads after their current task; wait up to `timeout` s."""
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        for _ in self._threads:
            self._tasks.put(None)
        for thread in self._threads:
            if timeout > 0 and thread is not threading.current_thread():
                thread.join(timeout)
        _LIVE_POOLS.discard(self)


_LIVE_POOLS: "weakref.WeakSet[_ReadAheadPool]" = weakref.WeakSet()


@atexit.register
def _stop_read_ahead_at_exit() -> None:
    for pool in list(_LIVE_POOLS):
        pool.stop(timeout=30.0)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _place_rows(indptr, indices, data, starts, out_indices, out_values):
    """Copy row r of the CSR block (indptr, indices, data) to out_*[starts[r]:], the counts cast to out_values'.

    Unsigned positions (no negative-index wraparound) and one loop per array let each row's copy vectorise: twice
    as fast as an element loop with signed positions."""
    for r in range(len(indptr) - 1):
        a = np.uint64(indptr[r])
        n = np.uint64(indptr[r + 1]) - a
        d = np.uint64(starts[r])
        for k in range(n):
            out_indices[d + k] = indices[a + k]
        for k in range(n):
            out_values[d + k] = data[a + k]


_INDICES, _VALUES = np.int32, np.float32  # a window's gene indices and counts


def _shuffled_counts(
    blocks: list[RowBlock], order: slice | np.ndarray, buffers: Buffers, store: AtlasStore | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(indptr int32, indices int32, values float32) of the blocks' rows, one after the other, then reordered by
    `order` (row i is row order[i]; a slice keeps them in place). Each entry is copied once, to its place in a
    buffer of `buffers` (no concatenation, gather or cast of its own), with the GIL released: from the blocks
    read, or, given `store`, from X's chunks as they are decoded (`AtlasStore.place_counts`; blocks read with
    counts=False); None where the store could not place them."""
    lengths = np.concatenate([np.diff(b.indptr) for b in blocks])[order]
    indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    starts = np.empty(len(lengths), dtype=np.int64)
    starts[order] = indptr[:-1]  # where each row read goes
    nnz = int(indptr[-1])
    buffer = buffers.take(8 * nnz)
    indices, values = buffer[: 4 * nnz].view(_INDICES), buffer[4 * nnz :].view(_VALUES)
    edges = np.cumsum([0] + [len(b.indptr) - 1 for b in blocks]).tolist()
    per_block = [starts[a:z] for a, z in zip(edges[:-1], edges[1:], strict=True)]
    if store is not None:
        pointers = [b.indptr.astype(np.int64) + b.first_entry for b in blocks]
        placed = store.place_counts(pointers, per_block, indices, values)
        return (indptr.astype(np.int32), indices, values) if placed else None
    for block, block_starts in zip(blocks, per_block, strict=True):
        _place_rows(block.indptr, block.indices, block.data, block_starts, indices, values)
    return indptr.astype(np.int32), indices, values


def _stack(parts: list) -> np.ndarray | sp.csr_matrix:
    """Rows of several blocks, dense or CSR, one after the other."""
    return sp.vstack(parts, format="csr") if sp.issparse(parts[0]) else np.concatenate(parts)


class StreamingLoader:
    """Iterates the minibatches of one rank, epoch after epoch; `len()` batches per epoch on every rank."""

    def __init__(
        self,
        store: AtlasStore | str | Path,
        config: LoaderConfig | None = None,
        rank: int = 0,
        world_size: int = 1,
        rows: tuple[int, int] | None = None,
        code_maps: dict[str, np.ndarray] | None = None,
        modalities: tuple[str, ...] = (),
    ):
        """rows: the store's rows [start, stop) to read (e.g. from `split_rows`); default every row.

        code_maps: key -> (n_store_categories,) codes in a model's coding (e.g. a query store's batches
        after the reference's); the minibatches carry the mapped codes.
        modalities: the store's modalities the minibatches carry beside the RNA counts (a model's
        `used_modalities`); none are read otherwise.
        """
        config = config or LoaderConfig()
        if not isinstance(store, AtlasStore):
            store = open_store(store, backend=config.backend)
        self.store, self.config = store, config
        store.check_modalities(modalities)
        self.modalities = tuple(modalities)
        self.code_maps = {k: np.asarray(v, dtype=np.int64) for k, v in (code_maps or {}).items()}
        start, stop = rows or (0, store.n_cells)
        if not 0 <= start < stop <= store.n_cells:
            raise ValueError(f"rows {start}:{stop} outside the store's {store.n_cells} cells")
        self.sampler = BlockSampler(
            stop - start,
            config.batch_size,
            config.block_size,
            config.seed,
            rank,
            world_size,
            config.last_batch,
            start,
            config.shuffle,
        )
        self.window_rows = max(1, config.buffer_blocks * config.block_size // config.batch_size) * config.batch_size
        self.epoch, self.step = 0, 0
        self._pool: _ReadAheadPool | None = None
        self._ahead: dict[tuple[int, int], Future] = {}  # (epoch, window) -> window being read
        # windows alive at once: the one being cut, the one whose last minibatch is in use, those read ahead
        self._buffers = Buffers(keep=config.prefetch + 3)
        # the kernel that places X's counts, loaded here rather than by the first window read (which would wait for it)
        store.load_counts_kernel(_INDICES, _VALUES)

    def __len__(self) -> int:
        return self.sampler.batches_per_rank

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of `epoch`."""
        if epoch != self.epoch or self.step != 0:
            self._drop_read_ahead()
        self.epoch, self.step = epoch, 0

    def state_dict(self) -> dict:
        """The position: epoch and batches already yielded in it, plus what must match on restore."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.config.seed,
            "batch_size": self.config.batch_size,
            "block_size": self.config.block_size,
            "buffer_blocks": self.config.buffer_blocks,
            "last_batch": self.config.last_batch,
            "shuffle": self.config.shuffle,
            "rank": self.sampler.rank,
            "world_size": self.sampler.world_size,
            "rows": [self.sampler.first_row, self.sampler.first_row + self.sampler.n_cells],
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position (of any rank of the same world); the sampling parameters must be the same."""
        mine = self.state_dict()
        # a position is the same on every rank (equal batch counts), so any rank's state resumes any rank
        differ = {
            k: (state.get(k), mine[k]) for k in mine if k not in ("epoch", "step", "rank") and state.get(k) != mine[k]
        }
        if differ:
            raise ValueError(f"loader state does not match this loader (saved, current): {differ}")
        self._drop_read_ahead()
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def _windows(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This rank's rows for `epoch`, cut into windows of `window_rows` rows (as row ranges)."""
        windows: list[list[tuple[int, int]]] = [[]]
        filled = 0
        for start, stop in self.sampler.rank_ranges(epoch):
            while start < stop:
                take = min(stop - start, self.window_rows - filled)
                windows[-1].append((start, start + take))
                start, filled = start + take, filled + take
                if filled == self.window_rows:
                    windows.append([])
                    filled = 0
        return [w for w in windows if w]

    def _read_window(self, epoch: int, index: int, ranges: list[tuple[int, int]]) -> list[Minibatch]:
        """Read, shuffle and cut one window into minibatches (in a read-ahead thread).

        The window's counts are assembled once, in the minibatches' dtypes, by one pass that copies each row read
        to its shuffled place in a reused buffer (`_shuffled_counts`); each minibatch is views of them: no
        per-batch copies or casts.
        """
        direct = self.store.direct_counts
        blocks = self.store.read_ranges(ranges, self.modalities, counts=not direct)
        rows = np.concatenate([np.arange(a, z) for a, z in ranges])
        order: slice | np.ndarray = slice(None)
        if self.config.shuffle:
            order = np.random.default_rng([self.config.seed, epoch, self.sampler.rank, index]).permutation(len(rows))
            rows = rows[order]
        counts = _shuffled_counts(blocks, order, self._buffers, self.store if direct else None)
        if counts is None:  # X's chunks could not be placed directly: read them through the backend, which names a
            # damaged chunk (StoreCorruptError) and validates the counts
            blocks = self.store.read_ranges(ranges, self.modalities)
            counts = _shuffled_counts(blocks, order, self._buffers)
        indptr, indices, values = counts
        obsm, masks = _model_features(
            {k: _stack([b.obsm[k] for b in blocks])[order] for k in self.modalities if k in blocks[0].obsm},
            {k: np.concatenate([b.masks[k] for b in blocks])[order] for k in self.modalities},
            self.code_maps,
        )
        categorical = {k: np.concatenate([b.categorical[k] for b in blocks])[order] for k in blocks[0].categorical}
        return self._batches(
            RowBlock(
                0,
                len(rows),
                indptr,
                indices,
                values,
                _model_codes(categorical, self.code_maps),
                {
                    k: np.concatenate([b.continuous[k] for b in blocks])[order].astype(np.float32)
                    for k in blocks[0].continuous
                },
                rows,
                obsm,
                masks,
            )
        )

    def _batches(self, window: RowBlock) -> list[Minibatch]:
        """Consecutive slices of a shuffled window (int32 pointers and gene indices, float32 counts, model codes,
        int64 rows, dense modalities as float32) as minibatches; only the rank's last window can end short."""
        size, n_genes, n_rows = self.config.batch_size, self.store.schema.n_genes, len(window.indptr) - 1
        edges = [*range(0, n_rows, size), n_rows]
        nnz = window.indptr[edges].tolist()
        rows = window.rows.astype(np.int64, copy=False)
        dense = {k: v.astype(np.float32) for k, v in window.obsm.items() if not sp.issparse(v)}
        masks = {k: np.ascontiguousarray(v) for k, v in window.masks.items()}
        tensor = torch.from_numpy  # numpy slices wrapped: cheaper than slicing tensors
        batches = []
        for i, (a, z) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            lo, hi = nnz[i], nnz[i + 1]
            batches.append(
                Minibatch(
                    tensor(window.indptr[a : z + 1] - np.int32(lo)),
                    tensor(window.indices[lo:hi]),
                    tensor(window.data[lo:hi]),
                    n_genes,
                    {k: tensor(v[a:z]) for k, v in window.categorical.items()},
                    {k: tensor(v[a:z]) for k, v in window.continuous.items()},
                    tensor(rows[a:z]),
                    {k: tensor(dense[k][a:z]) if k in dense else _tensor(v[a:z]) for k, v in window.obsm.items()},
                    {k: tensor(v[a:z]) for k, v in masks.items()},
                )
            )
        return batches

    def _schedule(self, epoch: int, first_window: int) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
        """(epoch, window index, row ranges) from a position on, running on into the following epochs."""
        while True:
            for index, ranges in enumerate(self._windows(epoch)[first_window:], start=first_window):
                yield epoch, index, ranges
            epoch, first_window = epoch + 1, 0

    def _drop_read_ahead(self) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()

    def __iter__(self) -> Iterator[Minibatch]:
        """The remaining minibatches of the current epoch; afterwards the position moves to the next epoch.

        Read-ahead keeps `prefetch` + 1 windows submitted beyond the one being cut, across the end of the
        epoch, so the next epoch starts on windows already read. The process keeps freed memory mapped from then
        on (`memory.keep_freed_memory`): the steps a loader feeds do not fault their temporaries in afresh.
        """
        keep_freed_memory()
        if self._pool is None:
            self._pool = _ReadAheadPool(self.config.num_threads)
        epoch = self.epoch
        batches_per_window = self.window_rows // self.config.batch_size
        first_window, skip = divmod(self.step, batches_per_window)
        n_windows = len(self._windows(epoch))
        schedule = self._schedule(epoch, first_window)
        wanted: deque[tuple[int, int]] = deque()
        for _ in range(self.config.prefetch + 1):
            key = next(schedule)
            wanted.append(key[:2])
            if key[:2] not in self._ahead:
                self._ahead[key[:2]] = self._pool.submit(self._read_window, *key)
        for _ in range(first_window, n_windows):
            batches = self._ahead.pop(wanted.popleft()).result()
            key = next(schedule)
            wanted.append(key[:2])
            if key[:2] not in self._ahead:
                self._ahead[key[:2]] = self._pool.submit(self._read_window, *key)
            for batch in batches[skip:]:
                self.step += 1
                yield batch
            skip = 0
        self.epoch, self.step = epoch + 1, 0

    def read_ahead_thread_ids(self) -> list[int]:
        """Native (kernel) ids of the read-ahead threads: none before the first iteration or after `close`."""
        return self._pool.native_ids() if self._pool is not None else []

    def close(self) -> None:
        """Stop the read-ahead threads (a later iteration starts new ones)."""
        self._drop_read_ahead()
        if self._pool is not None:
            self._pool.stop(timeout=30.0)
            self._pool = None

    def __enter__(self) -> "StreamingLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.stop()
