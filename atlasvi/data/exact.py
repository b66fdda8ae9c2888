"""Exact sums, so that a build's statistics do not depend on how its cells were cut into tasks.

Floating-point addition is not associative: summing per-chunk partial sums in another order (other chunks,
other workers, tasks finishing in another order) changes the last bits. The build's sums are therefore exact:
every value summed is a non-negative float64 that is an integer multiple of 2**-scale_bits (counts and their
squares: scale_bits 0; logs of library sizes, which are 0 or >= log 2, and their squares: 54), summed as Python
integers. Only the final conversion to float64 rounds, once, whatever the order of the partial sums.
"""

import numpy as np

_PART = 2.0**32
_SLICE = 1 << 20  # values per bincount: 2**20 values < 2**32 sum exactly in float64 (< 2**52)


def exact_bin_sums(
    values: np.ndarray, bins: np.ndarray, n_bins: int, scale_bits: int = 0, check: bool = True
) -> np.ndarray:
    """(n_bins,) exact sums of `values` by bin, as integers in units of 2**-scale_bits (int64 where they fit,
    else Python ints in an object array). values: (n,) float64 >= 0, multiples of 2**-scale_bits (checked unless
    check=False: for values known to be, e.g. validated counts and their squares); bins: (n,) int in [0, n_bins)."""
    scaled = np.ldexp(np.asarray(values, dtype=np.float64), scale_bits) if scale_bits else np.asarray(values, float)
    if check and len(scaled) and (scaled.min() < 0 or not np.array_equal(np.floor(scaled), scaled)):
        raise ValueError(f"exact_bin_sums: values must be non-negative multiples of 2**-{scale_bits}")
    total: np.ndarray | None = None
    shift, rest = 0, scaled
    while True:
        part = np.mod(rest, _PART) if len(rest) and rest.max() >= _PART else rest
        sums = np.zeros(n_bins, dtype=np.int64)
        for start in range(0, len(part), _SLICE):
            block = slice(start, start + _SLICE)
            sums += np.bincount(bins[block], weights=part[block], minlength=n_bins).astype(np.int64)
        if total is None:
            total = sums
        else:
            total = total.astype(object) + (sums.astype(object) << shift)
        if part is rest:
            return total
        rest = (rest - part) / _PART
        shift += 32


def add_exact(total: np.ndarray | None, partial: np.ndarray) -> np.ndarray:
    """total + partial without overflow (Python ints where int64 might not hold the sum)."""
    if total is None:
        return partial.astype(object)
    return total.astype(object, copy=False) + partial.astype(object, copy=False)


def to_float(total: np.ndarray, scale_bits: int = 0) -> np.ndarray:
    """Exact integer sums (in units of 2**-scale_bits) as float64, each rounded once."""
    return np.ldexp(np.array([float(v) for v in np.ravel(total)], dtype=np.float64), -scale_bits).reshape(
        np.shape(total)
    )
