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

Cheaper still is no first touch at all: :class:`TaskBuffers` hands a finished task's delta and kept
basis to the next task, of this ingest or the next one, that fits them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import mmap
import threading
import time
from collections.abc import Callable

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


def huge_f32(numel: int) -> torch.Tensor:
    """A flat float32 buffer of ``numel`` elements on huge pages (:func:`huge_empty`)."""
    return huge_empty((numel,), torch.float32)


class TaskBuffers:
    """The large float32 buffers of tensor tasks (a delta, a kept basis): given back when a task
    ends, and handed to the next task, of this ingest or a later one, that fits them.

    Why: a fresh buffer's first touch faults and zeroes every page of it. A 0.5B ingest makes
    ~560 MB of them, 519 MB for the embedding alone, and a worker dropped its buffer whenever a
    task needed less than half of it, so every ingest made the embedding's again. On a VM whose
    balloon reports free memory back to the host (virtio-balloon free page reporting, as on the
    AMD VM of 7 Dec), every huge page freed between ingests comes back through the host:
    ``clear_page_erms`` under huge-page faults was 24-36 % of a cached 0.5B rank-1 ingest's samples
    (bench/results/full/profile-0.5b-r1-7dec-amd.md), and first touches after a pause ran at
    0.7-1.1 GB/s against 12-17 GB/s for huge pages reused at once. Kept, steady 0.5B rank-1
    ingests ran 1.07× faster with 14 % less CPU there back to back, and 1.16× faster with 26 % less
    CPU with a 10 s pause before each, as beside a trainer (bench/results/full/task-buffers-7dec-amd.md).

    What it holds: a task gets the smallest kept buffer of ``numel`` to ``2 × numel`` elements (a
    task never holds more than twice what it budgets, as before), else a new one. Kept and taken
    buffers together stay within :attr:`limit` bytes: before a new buffer is made, kept ones are
    freed, smallest first (the cheapest to make again), until it fits; a new limit frees what
    exceeds it at once. The engine sets the limit per ingest to what its tasks in flight may hold at
    most (:meth:`~relexd.engine.ingest.CheckpointPass.buffer_limit`), so keeping buffers never
    raises an ingest's peak, and between ingests relexd holds at most that. ``limit=None`` (the
    default) keeps nothing. :meth:`release` frees what is kept (the daemon, once no checkpoint has
    come for a while; closing the pool).
    """

    def __init__(self, make: Callable[[int], torch.Tensor] | None = None) -> None:
        self._make = make if make is not None else huge_f32
        self._kept: list[torch.Tensor] = []
        self._taken = 0  # bytes of buffers handed out and not given back
        self._limit: int | None = None
        self._lock = threading.Lock()
        #: when a buffer was last given back (:func:`time.monotonic`): the end of the last task
        self.last_used = time.monotonic()

    @property
    def limit(self) -> int | None:
        return self._limit

    @limit.setter
    def limit(self, nbytes: int | None) -> None:
        with self._lock:
            self._limit = nbytes
            freed = self._free_down_to(0 if nbytes is None else nbytes - self._taken)
        del freed  # unmapped here, outside the lock

    @property
    def kept_bytes(self) -> int:
        return sum(_nbytes(b) for b in self._kept)

    @property
    def taken_bytes(self) -> int:
        return self._taken

    def take(self, numel: int) -> torch.Tensor:
        """A flat float32 buffer of ``numel`` to ``2 × numel`` elements (uninitialised, or what
        an earlier task left in it); :meth:`give` it back when done."""
        with self._lock:
            fits = [n for n, b in enumerate(self._kept) if numel <= b.numel() <= 2 * numel]
            if fits:
                buffer = self._kept.pop(min(fits, key=lambda n: self._kept[n].numel()))
                self._taken += _nbytes(buffer)
                return buffer
            room = None if self._limit is None else self._limit - self._taken - 4 * numel
            freed = self._free_down_to(room if room is not None else 0)
            self._taken += 4 * numel
        del freed  # before making the new one, so that the peak holds both only within the limit
        try:
            return self._make(numel)
        except BaseException:
            with self._lock:
                self._taken -= 4 * numel
            raise

    def give(self, buffer: torch.Tensor) -> None:
        """A buffer :meth:`take` handed out, back: kept for the next task if the limit allows."""
        with self._lock:
            self._taken -= _nbytes(buffer)
            self.last_used = time.monotonic()
            if self._limit is not None and self._taken + self.kept_bytes + _nbytes(buffer) <= self._limit:
                self._kept.append(buffer)

    def release(self, idle_for: float = 0.0) -> int:
        """Free the kept buffers if none was given back in the last ``idle_for`` seconds; the
        bytes freed."""
        with self._lock:
            if time.monotonic() - self.last_used < idle_for:
                return 0
            freed, self._kept = self._kept, []
        return sum(_nbytes(b) for b in freed)

    def _free_down_to(self, room: int) -> list[torch.Tensor]:
        """Take kept buffers out, smallest first, until they hold at most ``room`` bytes; the
        caller drops them (outside the lock)."""
        self._kept.sort(key=torch.Tensor.numel, reverse=True)
        freed = []
        while self._kept and self.kept_bytes > max(0, room):
            freed.append(self._kept.pop())
        return freed


def _nbytes(buffer: torch.Tensor) -> int:
    return buffer.numel() * buffer.element_size()
