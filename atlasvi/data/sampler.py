"""Which rows each rank reads in an epoch: a seeded permutation of row blocks, split into equal shards.

An epoch's stream is the store's row blocks in the order of `default_rng([seed, epoch]).permutation`.
Rank r of a world of size W reads stream positions [r * L, (r + 1) * L), where L is the same for
every rank, so every rank yields the same number of minibatches (DDP hangs otherwise) and ranks never
share a cell within an epoch.

last_batch="keep" (scvi-tools' behaviour): L = floor(n / W); each rank's last minibatch is short
  (L mod batch_size cells, the same on every rank). The stream's last n mod W cells (fewer than W; none
  with one rank) are not read this epoch, nor, when shuffling (training), a last cell that would make a
  one-cell minibatch (batch normalisation cannot train on one cell).

shuffle=False (inference): the blocks in row order, so one rank reads its rows first to last.

last_batch="drop": L = floor(n / (W * batch_size)) * batch_size; the stream's last n - W * L cells
  (fewer than W * batch_size, a different random set each epoch) are not read this epoch.
last_batch="pad": L = ceil(n / (W * batch_size)) * batch_size; positions past n wrap around to the
  start of the stream, so W * L - n cells are read twice and none is dropped.
"""

import math
from dataclasses import dataclass

import numpy as np

from atlasvi.errors import ConfigError


@dataclass(frozen=True)
class BlockSampler:
    """The rows of one rank per epoch, as contiguous row ranges in reading order.

    n_cells: rows sampled, the store's rows [first_row, first_row + n_cells); block_size: rows per
    shuffled block; rank in [0, world_size).
    """

    n_cells: int
    batch_size: int
    block_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    last_batch: str = "keep"
    first_row: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")
        if self.last_batch not in ("keep", "drop", "pad"):
            raise ValueError(f"last_batch must be 'keep', 'drop' or 'pad', not {self.last_batch!r}")
        if self.rows_per_rank == 0 and self.last_batch == "keep":
            raise ValueError(f"{self.n_cells} cells are fewer than world_size = {self.world_size}: a rank gets no cell")
        if self.rows_per_rank == 0:
            raise ValueError(
                f"{self.n_cells} cells are fewer than world_size x batch_size = "
                f"{self.world_size} x {self.batch_size}: no full batch per rank; use last_batch='keep' or 'pad'"
            )

    @property
    def rows_per_rank(self) -> int:
        if self.last_batch == "keep":
            rows = self.n_cells // self.world_size
            return rows - 1 if self.shuffle and rows % self.batch_size == 1 and rows > 1 else rows
        per_step = self.world_size * self.batch_size
        steps = self.n_cells // per_step if self.last_batch == "drop" else -(-self.n_cells // per_step)
        return steps * self.batch_size

    @property
    def batches_per_rank(self) -> int:
        return -(-self.rows_per_rank // self.batch_size)

    def block_order(self, epoch: int) -> np.ndarray:
        """(n_blocks,) the epoch's permutation of row blocks (the same on every rank)."""
        n_blocks = -(-self.n_cells // self.block_size)
        if not self.shuffle:
            return np.arange(n_blocks)
        return np.random.default_rng([self.seed, epoch]).permutation(n_blocks)

    def rank_ranges(self, epoch: int) -> list[tuple[int, int]]:
        """This rank's row ranges [start, stop) for `epoch`, in reading order; rows_per_rank rows in all."""
        order = self.block_order(epoch)
        starts = order * self.block_size
        stops = np.minimum(starts + self.block_size, self.n_cells)
        stream_ends = np.cumsum(stops - starts)  # stream position after each block
        begin = self.rank * self.rows_per_rank
        end = begin + self.rows_per_rank
        ranges: list[tuple[int, int]] = []
        while begin < end:
            position = begin % self.n_cells
            take = min(end - begin, self.n_cells - position)
            ranges += _stream_slice(starts, stops, stream_ends, position, position + take)
            begin += take
        return [(a + self.first_row, z + self.first_row) for a, z in ranges]


def _stream_slice(
    starts: np.ndarray, stops: np.ndarray, stream_ends: np.ndarray, lo: int, hi: int
) -> list[tuple[int, int]]:
    """Row ranges covering stream positions [lo, hi) (0 <= lo < hi <= n_cells)."""
    first = int(np.searchsorted(stream_ends, lo, side="right"))
    last = int(np.searchsorted(stream_ends, hi, side="left"))
    ranges = []
    for b in range(first, last + 1):
        block_begin = int(stream_ends[b] - (stops[b] - starts[b]))
        a = int(starts[b]) + max(0, lo - block_begin)
        z = int(starts[b]) + min(int(stops[b] - starts[b]), hi - block_begin)
        if z > a:
            ranges.append((a, z))
    return ranges


def split_rows(n_cells: int, validation_fraction: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """(train rows, validation rows) as [start, stop) ranges: the last round(n * fraction) rows validate.

    The store's rows are a seeded random permutation of its cells (the build's seed), so these are a random
    held-out set of cells, read as sequentially as the training rows. The set depends on the store and the
    fraction only, not on the training seed: every rank, every resumed run and every trial of a sweep holds
    out the same cells (validation losses compare across runs; no split state to save), and a rank's
    training rows stay one contiguous range that the block sampler shuffles in blocks. Unlike scvi-tools,
    whose validation cells change with scvi.settings.seed, seeds therefore do not redraw the split; another
    split is another build seed (`atlasvi build --seed`).
    """
    if not 0 <= validation_fraction < 1:
        raise ConfigError(f"validation_fraction must be in [0, 1), not {validation_fraction}")
    n_validation = round(n_cells * validation_fraction)
    held_out = f"validation_fraction {validation_fraction} holds out round({n_cells} x {validation_fraction}) = "
    if validation_fraction > 0 and n_validation == 0:
        raise ConfigError(
            f"{held_out}0 of the store's {n_cells} cells; the smallest fraction that holds out a cell is "
            f"{_round_up(1 / n_cells)}"
        )
    if n_validation == n_cells:
        raise ConfigError(f"{held_out}{n_cells} of the store's {n_cells} cells, leaving none to train on")
    return (0, n_cells - n_validation), (n_cells - n_validation, n_cells)


def _round_up(x: float) -> float:
    """x rounded up to two significant digits (0.003333 -> 0.0034)."""
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    return round(math.ceil(round(x / step, 9)) * step, 12)
