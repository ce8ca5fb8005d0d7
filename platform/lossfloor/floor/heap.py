"""Keep freed working arrays in the process heap, so the next batch reuses their pages (glibc only).

glibc serves an allocation above its mmap threshold (at most 32 MiB by default) with fresh pages from the
kernel and gives them back on free. The estimators allocate arrays of that size for every block of queries
and σ, so each block paid for zeroed fresh pages: on 2 cores the knn estimate of 10 000 photo patches took a
fifth of its CPU time as system time in page faults (11 million minor faults), and the exact estimator more.
Raising the mmap and trim thresholds keeps freed arrays in the heap for reuse (the faults went from a million
to 26 000 at 64 MiB blocks). The price: up to TRIM_BYTES of freed memory stays with the process.
"""

from __future__ import annotations

import ctypes
import functools
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_BYTES = 1 << 30  # allocations below this come from the heap
TRIM_BYTES = 1 << 31  # freed heap memory kept before it is given back


@functools.cache
def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # another C library (musl): nothing to set
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
