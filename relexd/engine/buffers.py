"""Task buffers kept from one tensor task, and one checkpoint, to the next.

Why: a fresh buffer page-faults on every first touch, and the kernel must find (reclaiming from the
page cache, which relexd's own state files keep full) and zero each page. For the largest tensor's
float32 delta that was the largest single item of a steady 0.5B ingest: 23 % of its py-spy samples
on the line that first writes the delta (3 Dec), where a reused buffer takes a few percent of that
(converting 136 M bf16 elements into a fresh float32 buffer: 0.27–0.86 s in a quiet process, into
a touched one 0.03 s). A process that ingests checkpoint after checkpoint (``relexd watch``,
``relexd extrapolate``, a cluster worker) therefore lends each task buffers of the exact size it
needs from what earlier tasks gave back.

What is kept is bounded: busy and idle buffers together stay under :attr:`TaskBuffers.limit`
(the memory budget, or the largest task's cost per worker: the RSS bound the engine states
anyway; a running task counts with its whole budgeted cost), the smallest idle buffers
leaving first — they are the cheapest to fault in again, and keeping the largest is the point.
Between checkpoints the process so holds about the peak it reached during one. Buffers every task
needs at the same size (a chunk's) are instead kept per worker thread
(:meth:`TaskBuffers.for_this_thread`): the fixed overhead of each worker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


class TaskBuffers:
    """A thread-safe pool of buffers by key (e.g. ``("delta", numel)``)."""

    def __init__(self) -> None:
        self._per_thread = threading.local()
        self._lock = threading.Lock()
        self._idle: dict[Hashable, list[tuple[int, object]]] = {}
        self._idle_bytes = 0
        self._busy_bytes = 0
        #: bytes kept, busy and idle together; None: no limit. A task that alone exceeds it still
        #: gets its buffers; they are freed when it gives them back.
        self.limit: int | None = None
        #: buffers made so far (not lent again): what the tests and benchmarks look at
        self.made = 0

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return self._idle_bytes + self._busy_bytes

    @contextmanager
    def lend(self, key: Hashable, nbytes: int, make: Callable[[], T], *, charge: int = 0) -> Iterator[T]:
        """A buffer for ``key`` (``nbytes`` large) for the duration of the block: an idle one of
        that key, else a new one from ``make()``. Its contents are whatever the last user left.
        ``charge``: what the borrowing task counts against the limit while it runs, if more than
        the buffer (what the task pool budgets for it, so that busy and idle buffers together stay
        within the same memory budget)."""
        charge = max(nbytes, charge)
        buffer = self._take(key, nbytes, charge)
        if buffer is None:
            buffer = make()
        try:
            yield buffer  # type: ignore[misc]
        finally:
            self._give(key, nbytes, charge, buffer)

    def for_this_thread(self, key: str, make: Callable[[], T]) -> T:
        """The calling thread's own object ``key``, made on its first call (worker threads live as
        long as their pool, so it serves every task the thread runs, checkpoint after checkpoint)."""
        made: T | None = getattr(self._per_thread, key, None)
        if made is None:
            made = make()
            setattr(self._per_thread, key, made)
        return made

    def _take(self, key: Hashable, nbytes: int, charge: int) -> object | None:
        with self._lock:
            self._busy_bytes += charge
            idle = self._idle.get(key)
            if idle:
                _, buffer = idle.pop()
                self._idle_bytes -= nbytes
                return buffer
            self.made += 1
            self._trim()  # room for the new buffer, where the limit asks for it
            return None

    def _give(self, key: Hashable, nbytes: int, charge: int, buffer: object) -> None:
        with self._lock:
            self._busy_bytes -= charge
            self._idle.setdefault(key, []).append((nbytes, buffer))
            self._idle_bytes += nbytes
            self._trim()

    def _trim(self) -> None:
        """Free idle buffers, smallest first, while busy and idle together exceed the limit."""
        if self.limit is None:
            return
        while self._idle_bytes and self._idle_bytes + self._busy_bytes > self.limit:
            key = min((k for k, v in self._idle.items() if v), key=lambda k: self._idle[k][-1][0])
            nbytes, _ = self._idle[key].pop()
            self._idle_bytes -= nbytes
            if not self._idle[key]:
                del self._idle[key]

    def clear(self) -> None:
        """Free every idle buffer (busy ones are freed when given back, as the limit is then 0)."""
        with self._lock:
            self.limit = 0
            self._trim()
