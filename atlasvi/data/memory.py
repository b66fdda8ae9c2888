"""Freed memory kept mapped: glibc's malloc thresholds for a process that iterates a loader and trains.

glibc hands allocations above its mmap threshold (128 KiB at start) to mmap and returns the heap's free top to the
kernel above its trim threshold; both rise only when the process frees a large mmapped block (its "dynamic"
threshold). A training step allocates and frees tens of 1-8 MB tensors, so unless something raised the thresholds
every step maps them afresh and takes a page fault per 4 KiB: measured on scVI, 10K x 2,000 store, batch 128, ~650
faults and ~16 us of kernel CPU per cell streaming (12% of the step), where the resident loader's per-epoch gather
had raised them by chance; at batch 1024 ~9,700 faults and ~24 us per cell resident (benchmarks/README.md,
"scVI training throughput"). `keep_freed_memory` sets both once per process: the mmap threshold where glibc's
dynamic adjustment tops out (32 MiB), so allocations up to 32 MiB come from the heap, and a trim threshold of 1 GiB,
so up to 1 GiB of freed heap stays mapped: the process keeps its peak instead of faulting it in again every step.
"""

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit (HEAP_MAX_SIZE / 2), its dynamic maximum
TRIM_THRESHOLD = 2**30

_kept: bool | None = None


def glibc() -> bool:
    """Whether this process runs on GNU libc (whose malloc `keep_freed_memory` configures)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr, or no such name on this platform
        return False


def _user_set() -> bool:
    """Whether the environment configures glibc's malloc itself (GLIBC_TUNABLES or the MALLOC_*_ variables)."""
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
        k.startswith("MALLOC_") and k.endswith("_") for k in os.environ
    )


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process, once (see the module docstring); True where set.

    Nothing is changed on another C library, or where the environment configures glibc's malloc itself."""
    global _kept
    if _kept is None:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if glibc() else None
        _kept = (
            mallopt is not None
            and not _user_set()
            and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        )
    return _kept
