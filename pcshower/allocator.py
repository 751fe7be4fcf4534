"""glibc malloc settings for large-batch CPU inference.

Every op of a point network allocates its output afresh. glibc serves allocations above its
mmap threshold (dynamic, at most 32 MB) with fresh ``mmap`` pages and returns the top of the heap
to the system once more than its trim threshold is free: either way the next op's output is
faulted in page by page, and on a large batch most of a network call's CPU time becomes system
time (docs/benchmarks.md, "memory traffic"). :func:`tune_allocator` fixes the mmap threshold at
its 32 MB maximum and raises the trim threshold, so that chunk-sized temporaries
(:attr:`pcshower.models.model.ShowerModel.chunk_points`) are reused from the heap instead. The
cost: the process keeps up to its peak heap instead of returning it between passes.

``pcshower generate`` and ``pcshower bench`` call it; API users may (``pcshower.tune_allocator()``).
``PCSHOWER_MALLOC=default`` leaves glibc as it is. Without glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["tune_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30

_done: bool | None = None


def tune_allocator() -> bool:
    """Apply the settings once per process; returns whether glibc took them."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("PCSHOWER_MALLOC", "").lower() == "default":
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return _done
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
