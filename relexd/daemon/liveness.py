"""Progress beats of the daemon's loops: what tells a *hung* thread from a busy or idle one.

A thread stuck in a read of a hung network file system (or stopped by a debugger) is still
``is_alive()``; only the absence of progress shows it. Each loop beats every time round (its waits
are capped at a quarter of the stall limit, so an idle loop beats too), and the work it does beats
on its behalf at every poll of the stop flag: per chunk of a tensor while ingesting, per tensor
while writing a preview. A loop whose last beat is older than the limit is *stalled*, and the
daemon withholds its systemd watchdog pings (:class:`relexd.telemetry.sdnotify.Watchdog`) so that
systemd restarts it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Liveness:
    """When each named loop last showed progress (monotonic seconds); thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._beats: dict[str, float] = {}
        self._lock = threading.Lock()

    def beat(self, name: str) -> None:
        """Loop ``name`` made progress now."""
        now = self._clock()
        with self._lock:
            self._beats[name] = now

    def forget(self, name: str) -> None:
        """Loop ``name`` ended on purpose; it no longer counts."""
        with self._lock:
            self._beats.pop(name, None)

    def stalled(self, limit: float) -> dict[str, float]:
        """Loops silent for longer than ``limit`` seconds → seconds since their last beat."""
        now = self._clock()
        with self._lock:
            return {name: now - t for name, t in self._beats.items() if now - t > limit}
