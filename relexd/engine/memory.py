"""The engine's memory: keep the allocator from hoarding freed tensor memory, and give the workers'
large buffers huge pages.

glibc raises its mmap threshold dynamically each time a large mmapped block is freed, up to 32 MiB;
after the first big tensor is freed, chunk-sized buffers then come from the heap, whose fragmentation
let the RSS of a long ingest creep up by ~150 MB per 200 MB checkpoint in our measurement
(tests/engine/test_memory.py). Pinning the threshold at 1 MiB makes every chunk buffer an mmap that is
returned on free, and the RSS stays at one tensor plus chunks. There is no Python API for mallopt, so
it is called through ctypes; on a libc without it (musl, macOS) this is a no-op.

Every such mmap starts with no pages, so each ingest's first touch of a worker's buffers page-faults
once per 4 KiB page: 4.8 % of a cached 0.5B rank-1 ingest's CPU (perf:
bench/results/full/profile-0.5b-r1-6dec-night.md), most of it the delta buffer, as large as the
largest tensor. :func:`huge_empty` asks for transparent huge pages (``MADV_HUGEPAGE``: most
distributions enable them only where asked), one fault per 2 MiB, for the delta and the kept basis.
The chunk buffers stay on small pages: parts of them go untouched, and on huge pages a worker's
peak grew by 4-5 MB in tests/engine/test_memory.py's kept-basis run.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import mmap

import torch

from relexd.io.safetensors_file import aligned_empty

M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
#: a transparent huge page on x86-64 and arm64 with 4 KiB pages
HUGE_PAGE = 2 << 20


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


def huge_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous tensor on transparent huge pages where it spans at least one:
    a private anonymous mapping advised ``MADV_HUGEPAGE``, its data starting at a multiple of
    :data:`HUGE_PAGE` (the kernel backs only aligned 2 MiB ranges with a huge page), the part after
    its last whole huge page left on small pages, so that as much of it is resident as before, to the
    4 KiB page (a huge page there would make up to 2 MiB more resident). Freed, like a tensor of
    :func:`torch.empty` above the mmap threshold, when the tensor and its views are.

    Smaller tensors, and platforms without the advice, get :func:`aligned_empty`'s. Either way the
    data starts at a multiple of ``DIRECT_ALIGN``, so rows can go to ``O_DIRECT``.

    Why by hand: torch's allocator asks for huge pages only under an environment variable read once
    per process (``THP_MEM_ALLOC_ENABLE``), which would change every tensor of an embedding program.
    Measured on a VM whose THP setting is ``madvise``: a cached 0.5B rank-1 ingest 1.03× faster,
    paired (bench/results/full/paired-huge-pages.md)."""
    nbytes = math.prod(shape) * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < HUGE_PAGE or advice is None:
        return aligned_empty(shape, dtype)
    size = nbytes + HUGE_PAGE
    try:
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # e.g. ENOMEM under strict overcommit: torch's allocator then fails as before
        return aligned_empty(shape, dtype)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping alive
    skip = -whole.data_ptr() % HUGE_PAGE
    # huge pages for the whole ones only: the last, partial one would be resident in full
    tail = skip + nbytes - nbytes % HUGE_PAGE
    with contextlib.suppress(OSError):  # a kernel without transparent huge pages: small pages
        mapping.madvise(advice, 0, tail)
        if tail < size:
            mapping.madvise(mmap.MADV_NOHUGEPAGE, tail, size - tail)
    return whole[skip : skip + nbytes].view(dtype).reshape(shape)
