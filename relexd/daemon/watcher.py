"""File system events as hints: which watchdog observer to use, and what to do with an event.

Events never decide anything. They only wake the scanner early; completion is always judged by
:func:`relexd.io.layouts.scan_run` plus validation. inotify does not see writes made by other hosts
on network and cluster file systems, so there the polling observer is chosen automatically
(and the periodic reconcile scan catches whatever any observer misses).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from relexd.io.filesystems import fs_type, needs_polling

#: The events that can mean "a checkpoint changed state": a file or directory appears, is renamed
#: into place, finished being written (close after write) or is deleted (rotation). watchdog turns
#: this list into the inotify mask, so the kernel does not queue the rest — above all the open and
#: close of every file relexd itself reads or pins, which the observer thread would otherwise parse
#: and drop, and the trainer's IN_MODIFY stream. Anything missed is still found by the reconcile scan.
#: Only for inotify: the polling observer sees no close events (a file rewritten in place, like
#: verl's tracker, is only "modified" there) and has no kernel queue to spare.
EVENTS = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileMovedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
]


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


class HintHandler(FileSystemEventHandler):
    """Turns every event under the run directory into one call of ``hint`` (cheap, thread-safe)."""

    def __init__(self, hint: Callable[[str], None], run_dir: Path) -> None:
        self._hint = hint
        self._run_dir = str(run_dir.absolute())

    def on_any_event(self, event: FileSystemEvent) -> None:
        src = os.fsdecode(event.src_path)
        if src.startswith(self._run_dir) or self._run_dir.startswith(src):
            self._hint(src)


class RunWatcher:
    """Watches a run directory that may not exist yet.

    While it is missing, its nearest existing ancestor is watched (not recursively) so its
    creation is noticed; then the run directory itself is watched recursively.
    """

    def __init__(
        self, run_dir: Path, hint: Callable[[str], None], *, poll: bool, poll_interval: float
    ) -> None:
        self.run_dir = run_dir.absolute()
        self.kind = fs_type(self.run_dir)
        self.polling = poll or needs_polling(self.kind)
        self.observer: BaseObserver = PollingObserver(timeout=poll_interval) if self.polling else Observer()
        self._handler = HintHandler(hint, self.run_dir)
        self._events = None if self.polling else EVENTS
        self._lock = threading.Lock()
        self._recursive = False

    def start(self) -> None:
        self.ensure_watch()
        self.observer.start()

    def ensure_watch(self) -> None:
        """Watch the run directory recursively once it exists (called after every scan)."""
        with self._lock:
            if self._recursive:
                return
            if self.run_dir.is_dir():
                self.observer.unschedule_all()
                self.observer.schedule(
                    self._handler, str(self.run_dir), recursive=True, event_filter=self._events
                )
                self._recursive = True
            elif not self.observer.emitters:
                where = _existing_ancestor(self.run_dir)
                self.observer.schedule(self._handler, str(where), recursive=False, event_filter=self._events)

    def alive(self) -> bool:
        return self.observer.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        self.observer.stop()
        if self.observer.is_alive():
            self.observer.join(timeout)
