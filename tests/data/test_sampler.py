"""BlockSampler properties with mocked ranks: disjoint, covering, equal batch counts, seeded."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasvi.data import BlockSampler


def _rows(sampler: BlockSampler, epoch: int) -> np.ndarray:
    return np.concatenate([np.arange(a, z) for a, z in sampler.rank_ranges(epoch)])


def _world(n_cells, batch_size, block_size, world_size, last_batch, seed=0):
    return [
        BlockSampler(n_cells, batch_size, block_size, seed, rank, world_size, last_batch) for rank in range(world_size)
    ]


shapes = st.tuples(
    st.integers(1, 5000),  # n_cells
    st.integers(1, 300),  # batch_size
    st.integers(1, 700),  # block_size
    st.integers(1, 4),  # world_size
    st.integers(0, 3),  # epoch
)


@settings(max_examples=200, deadline=None)
@given(shapes)
def test_drop_gives_disjoint_equal_shards_missing_less_than_one_global_batch(shape):
    n_cells, batch_size, block_size, world_size, epoch = shape
    if n_cells < world_size * batch_size:
        with pytest.raises(ValueError, match="fewer than world_size x batch_size"):
            BlockSampler(n_cells, batch_size, block_size, 0, 0, world_size, "drop")
        return
    ranks = [_rows(s, epoch) for s in _world(n_cells, batch_size, block_size, world_size, "drop")]
    lengths = {len(r) for r in ranks}
    assert len(lengths) == 1 and lengths.pop() % batch_size == 0  # equal batch counts on every rank
    seen = np.concatenate(ranks)
    assert len(np.unique(seen)) == len(seen)  # disjoint, no repeats
    assert 0 <= n_cells - len(seen) < world_size * batch_size  # only the documented tail is dropped
    assert seen.min() >= 0 and seen.max() < n_cells


@settings(max_examples=200, deadline=None)
@given(shapes)
def test_pad_covers_every_cell_with_equal_batch_counts(shape):
    n_cells, batch_size, block_size, world_size, epoch = shape
    samplers = _world(n_cells, batch_size, block_size, world_size, "pad")
    ranks = [_rows(s, epoch) for s in samplers]
    assert {len(r) for r in ranks} == {samplers[0].batches_per_rank * batch_size}
    seen = np.concatenate(ranks)
    assert set(seen.tolist()) == set(range(n_cells))  # every cell at least once
    assert len(seen) - n_cells < world_size * batch_size or n_cells < world_size * batch_size
    counts = np.bincount(seen, minlength=n_cells)
    assert counts.max() - counts.min() <= 1 + (world_size * batch_size) // n_cells


@settings(max_examples=200, deadline=None)
@given(shapes)
def test_keep_ends_every_rank_on_the_same_short_batch(shape):
    n_cells, batch_size, block_size, world_size, epoch = shape
    if n_cells < world_size:
        with pytest.raises(ValueError, match="fewer than world_size"):
            BlockSampler(n_cells, batch_size, block_size, 0, 0, world_size, "keep")
        return
    samplers = _world(n_cells, batch_size, block_size, world_size, "keep")
    ranks = [_rows(s, epoch) for s in samplers]
    per_rank = samplers[0].rows_per_rank
    assert {len(r) for r in ranks} == {per_rank}
    assert samplers[0].batches_per_rank == -(-per_rank // batch_size)
    assert per_rank % batch_size != 1 or per_rank == 1  # never a one-cell last batch (batch norm)
    seen = np.concatenate(ranks)
    assert len(np.unique(seen)) == len(seen)
    # with one rank every cell is read (but a lone last cell); else fewer than one cell per rank is left
    assert n_cells - len(seen) <= world_size + (world_size if n_cells // world_size % batch_size == 1 else 0) - 1
    if world_size == 1:
        assert n_cells - len(seen) == (1 if n_cells % batch_size == 1 and n_cells > 1 else 0)


def test_epochs_are_seeded_permutations_of_blocks():
    a = BlockSampler(10_000, 64, 100, seed=3)
    assert np.array_equal(_rows(a, 0), _rows(BlockSampler(10_000, 64, 100, seed=3), 0))
    assert not np.array_equal(_rows(a, 0), _rows(a, 1))
    assert not np.array_equal(_rows(a, 0), _rows(BlockSampler(10_000, 64, 100, seed=4), 0))
    # within a block rows stay contiguous (sequential reads); blocks come in permuted order
    ranges = a.rank_ranges(0)
    assert all(z - a_ <= 100 for a_, z in ranges) and len(ranges) == 100
    assert sorted(r[0] for r in ranges) == list(range(0, 10_000, 100))
    assert [r[0] for r in ranges] != list(range(0, 10_000, 100))


def test_rank_must_be_inside_the_world():
    with pytest.raises(ValueError, match="rank 2 outside world of size 2"):
        BlockSampler(100, 10, 10, 0, rank=2, world_size=2)
