"""Exact sums: the same totals whatever the order and grouping of the partial sums."""

import math

import numpy as np
import pytest

from atlasvi.data.exact import add_exact, exact_bin_sums, to_float


def test_integer_sums_are_exact_beyond_float64_and_int64():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 100_000, size=300_000).astype(np.float64)
    values = np.concatenate([counts**2, [2.0**70, 2.0**80 + 2.0**28]])  # squares, and counts no float sum holds
    bins = np.concatenate([rng.integers(0, 7, size=len(counts)), [3, 3]])
    sums = exact_bin_sums(values, bins, 7)
    expected = [sum(int(v) for v in values[bins == b]) for b in range(7)]
    assert [int(s) for s in sums] == expected


def test_partial_sums_in_any_order_and_grouping_give_the_same_floats():
    """Logs of library sizes (multiples of 2**-54): a different chunking, summed in another order, gives the
    same bits, and the correctly rounded sum (math.fsum)."""
    rng = np.random.default_rng(1)
    log_lib = np.log(np.maximum(rng.integers(0, 50_000, size=20_000), 1).astype(np.float64))
    bins = rng.integers(0, 3, size=len(log_lib))
    totals = []
    for cut in (1, 97, 5000):
        parts = [
            exact_bin_sums(log_lib[s : s + cut] ** 2, bins[s : s + cut], 3, 54) for s in range(0, len(log_lib), cut)
        ]
        total = None
        for part in parts[::-1] if cut == 97 else parts:
            total = add_exact(total, part)
        totals.append(to_float(total, 54))
    assert np.array_equal(totals[0], totals[1]) and np.array_equal(totals[1], totals[2])
    squares = log_lib**2
    assert totals[0].tolist() == [math.fsum(squares[bins == b]) for b in range(3)]


def test_values_that_are_not_multiples_of_the_unit_are_refused():
    with pytest.raises(ValueError, match="multiples of 2\\*\\*-0"):
        exact_bin_sums(np.array([0.5]), np.array([0]), 1)
    with pytest.raises(ValueError, match="non-negative"):
        exact_bin_sums(np.array([-1.0]), np.array([0]), 1)
