"""Keep the allocator from hoarding freed tensor memory.

glibc raises its mmap threshold dynamically each time a large mmapped block is freed, up to 32 MiB;
after the first big tensor is freed, chunk-sized buffers then come from the heap, whose fragmentation
let the RSS of a long ingest creep up by ~150 MB per 200 MB checkpoint in our measurement
(tests/engine/test_memory.py). Pinning the threshold at 1 MiB makes every chunk buffer an mmap that is
returned on free, and the RSS stays at one tensor plus chunks. There is no Python API for mallopt, so
it is called through ctypes; on a libc without it (musl, macOS) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.cache
def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold (once per process); True when it was applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
