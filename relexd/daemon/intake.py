"""What the scans found and what waits for the ingest worker, shared by the daemon's two threads.

The *scout* thread calls :meth:`Intake.scan` whenever a file event or the reconcile job wakes it
(scans are cheap: listings, stats and small marker files). A checkpoint whose trainer marker says
it is complete (``trainer_state.json``, the verl tracker, NeMo-RL's rename) is ready at once; a
marker-less one (OpenRLHF, plain) once its files have not changed for ``debounce`` seconds — a wait
per checkpoint, so writes elsewhere in the run directory never delay it. Ready checkpoints are
pinned (:mod:`relexd.daemon.pins`) so rotation cannot take them before the *worker* thread, which
calls :meth:`next_ready` and :meth:`finish`, reads them in strict step order.

Every step the scout sees, in a scan or in an event, is remembered until it is ingested or
accounted for; one that disappears unread is reported as missed (``rotated``). Thread-safe: one
lock around everything; nothing slow happens under it except opening the files of a pin.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from relexd.daemon.missed import Missed
from relexd.daemon.pins import CheckpointPin, pinning_supported
from relexd.engine.config import EngineConfig
from relexd.io.layouts import (
    MARKERLESS,
    CheckpointRef,
    Signature,
    checkpoint_of,
    checkpoint_step,
    completion_time,
    scan_run,
    size_signature,
)

#: How long a complete checkpoint waits behind a lower, still incomplete one before going ahead
#: (ingesting it first would make the lower one out of order forever).
HOLD_BEHIND_PENDING_S = 120.0


@dataclass
class Waiting:
    """A checkpoint ready for the worker."""

    ref: CheckpointRef
    signature: Signature
    completed: float | None  # Unix time the trainer completed it
    pin: CheckpointPin | None = None
    taken: bool = False  # the worker is reading it

    @property
    def weights(self) -> Path:
        """What the engine opens: the pin's view while pinned, else the trainer's own path."""
        return self.pin.weights if self.pin is not None else self.ref.weights

    def original(self, path: str | Path) -> Path:
        return self.pin.original(path) if self.pin is not None else Path(path)


@dataclass
class ScanNews:
    """What one scan found that the daemon must say (log, count)."""

    missed: list[Missed] = field(default_factory=list)
    out_of_order: list[CheckpointRef] = field(default_factory=list)
    unsupported: list[tuple[Path, str]] = field(default_factory=list)
    thinned: list[CheckpointRef] = field(default_factory=list)  # skipped on purpose (--every)
    ready: int = 0  # checkpoints that became ready


class Intake:
    def __init__(
        self, run_dir: Path, pin_root: Path, config: EngineConfig, *, debounce: float, max_pinned: int
    ) -> None:
        self.run_dir = Path(run_dir)
        self.pin_root = Path(pin_root)
        shutil.rmtree(self.pin_root, ignore_errors=True)  # views of a previous process: dead links
        self.config = config
        self.debounce = debounce
        self.max_pinned = max_pinned if pinning_supported() else 0
        #: the trainer's save cadence, from the newest record that states it
        self.save_interval: int | None = None
        self._lock = threading.Lock()
        self._ready: dict[int, Waiting] = {}
        self._seen: dict[int, Path] = {}  # steps seen in a scan or an event, not yet accounted for
        self._events: dict[int, Path] = {}  # seen in events since the last scan
        self._present: set[int] = set()  # steps of the last scan
        self._pending_since: dict[int, float] = {}
        self._unstable: dict[Path, tuple[Signature, float]] = {}  # marker-less: first sighting
        self._failed: dict[Path, tuple[Signature, int]] = {}  # bad input, until its files change
        self._rejected: set[int] = set()  # steps above the newest ingested one: errors, --every
        self._finished: set[int] = set()  # ingested by the worker, maybe not yet in a scan's list
        self._warned_unsupported: set[Path] = set()

    # -- the observer's side --------------------------------------------------------------------

    def note_event(self, path: str | Path) -> None:
        """A file event under the run directory: remember the checkpoint it belongs to."""
        found = checkpoint_of(Path(path), self.run_dir)
        if found is not None:
            with self._lock:
                self._events.setdefault(*found)

    # -- the scout's side ------------------------------------------------------------------------

    def scan(self, ingested: Sequence[int], *, force_stable: bool = False) -> ScanNews:
        """Scan the run directory once; ``ingested`` are the steps already in the state, ascending."""
        with self._lock:
            # taken before listing: a checkpoint an event named is in this listing unless it is
            # gone (one named during the listing waits for the next scan, or it would look gone)
            events, self._events = self._events, {}
        result = scan_run(self.run_dir)
        now = time.monotonic()
        news = ScanNews()
        with self._lock:
            # ``ingested`` was read before the scan: the worker may have finished more since
            self._finished = {s for s in self._finished if not ingested or s > ingested[-1]}
            done = set(ingested) | self._finished
            newest = max(done, default=-1)
            refs = {r.step: r for r in (*result.complete, *result.pending)}
            self._present = set(refs)
            self._rejected = {s for s in self._rejected if s > newest}
            # Only steps above the newest ingested one can still be read: those are the ones
            # whose disappearance would be a miss (lower ones are rejected or already reported).
            sightings = [(s, r.path) for s, r in refs.items()] + list(events.items())
            for step, path in sightings:
                if step > newest and step not in self._rejected:
                    self._seen.setdefault(step, path)
            paths = {r.path for r in refs.values()}
            self._failed = {p: v for p, v in self._failed.items() if p in paths}
            self._unstable = {p: v for p, v in self._unstable.items() if p in paths}
            self._pending_since = {
                r.step: self._pending_since.get(r.step, now) for r in result.pending if r.step not in done
            }
            # a checkpoint below the newest ingested one is being rotated away (its weights go
            # first), not written in a format relexd cannot read
            unsupported = [(p, why) for p, why in result.unsupported if (checkpoint_step(p) or 0) > newest]
            news.unsupported = [(p, why) for p, why in unsupported if p not in self._warned_unsupported]
            self._warned_unsupported = {p for p, _ in unsupported}
            for ref in result.complete:
                if ref.save_interval is not None:
                    self.save_interval = ref.save_interval
                if ref.step in done or ref.step in self._ready:
                    continue
                failed = self._failed.get(ref.path)
                if failed is None and ref.step in self._rejected:
                    continue  # thinned on purpose
                sig = size_signature(ref)
                if failed is not None:
                    if failed[0] == sig:
                        continue  # rejected, and its files have not changed since
                    del self._failed[ref.path]
                    self._rejected.discard(ref.step)
                if ref.step <= newest:
                    self._reject(ref.step)
                    self._failed[ref.path] = (sig, ref.step)
                    news.out_of_order.append(ref)
                    continue
                if ref.layout in MARKERLESS and not force_stable and not self._stable(ref, sig, now):
                    self._pending_since.setdefault(ref.step, now)  # later steps wait behind it
                    continue
                before = max((s for s in (*self._ready, newest) if 0 <= s < ref.step), default=None)
                if not self.config.takes(ref.step, before):
                    self._reject(ref.step)
                    news.thinned.append(ref)
                    continue
                self._ready[ref.step] = Waiting(ref, sig, completion_time(ref))
                self._unstable.pop(ref.path, None)
                news.ready += 1
            news.missed = self._vanished(done)
            self._top_up_pins()
        return news

    def _reject(self, step: int) -> None:
        """Accounted for by an error or on purpose: its disappearance is no miss."""
        self._rejected.add(step)
        self._seen.pop(step, None)

    def _stable(self, ref: CheckpointRef, sig: Signature, now: float) -> bool:
        """Marker-less checkpoints: the same size signature in two scans ≥ debounce apart."""
        seen = self._unstable.get(ref.path)
        if seen is None or seen[0] != sig or not sig:
            self._unstable[ref.path] = (sig, now)
            return False
        return now - seen[1] >= self.debounce

    def _vanished(self, done: set[int]) -> list[Missed]:
        """Seen steps that are gone from the run directory without having been read."""
        missed = []
        for step, path in sorted(self._seen.items()):
            if step in self._present:
                continue
            waiting = self._ready.get(step)
            if waiting is not None and (waiting.pin is not None or waiting.taken):
                continue  # still readable through its pin, or the worker reports it
            del self._seen[step]
            if waiting is not None:
                del self._ready[step]
            if step not in done:
                missed.append(Missed.one(step, "rotated", path))
        return missed

    def _top_up_pins(self) -> None:
        pinned = sum(1 for w in self._ready.values() if w.pin is not None)
        for step in sorted(self._ready):
            if pinned >= self.max_pinned:
                return
            waiting = self._ready[step]
            if waiting.pin is not None or waiting.taken:
                continue
            try:
                waiting.pin = CheckpointPin(waiting.ref, self.pin_root, waiting.signature)
            except OSError:
                continue  # gone already: the next scan reports it
            pinned += 1

    # -- the worker's side -----------------------------------------------------------------------

    def next_ready(self) -> Waiting | None:
        """The lowest ready step, unless a lower one is still being written (then wait for it)."""
        now = time.monotonic()
        with self._lock:
            free = [s for s, w in self._ready.items() if not w.taken]
            if not free:
                return None
            step = min(free)
            if any(s < step and now - t0 < HOLD_BEHIND_PENDING_S for s, t0 in self._pending_since.items()):
                return None
            waiting = self._ready[step]
            waiting.taken = True
            return waiting

    def put_back(self, waiting: Waiting) -> None:
        """Not read this time (shutdown, state write to retry): ready again, pin kept."""
        with self._lock:
            waiting.taken = False

    def finish(self, waiting: Waiting, *, ingested: bool = False, failed: bool = False) -> None:
        """Done with it: ``ingested``, or (``failed``) rejected until its files change, or gone."""
        with self._lock:
            step = waiting.ref.step
            self._ready.pop(step, None)
            self._seen.pop(step, None)
            if ingested:
                self._finished.add(step)
            if failed:
                self._failed[waiting.ref.path] = (waiting.signature, step)
                self._reject(step)
            if waiting.pin is not None:
                waiting.pin.close()
                waiting.pin = None
            self._top_up_pins()

    # -- what the daemon reports ----------------------------------------------------------------

    def backlog(self) -> int:
        """Ready checkpoints waiting for the worker (the one being read not counted)."""
        with self._lock:
            return sum(1 for w in self._ready.values() if not w.taken)

    def oldest_waiting(self) -> float | None:
        """Completion time of the oldest waiting checkpoint."""
        with self._lock:
            times = [w.completed for w in self._ready.values() if not w.taken and w.completed is not None]
        return min(times, default=None)

    def accounted(self) -> set[int]:
        """Steps that are not missing: present, waiting, rejected or thinned on purpose."""
        with self._lock:
            return self._present | set(self._ready) | self._rejected

    def needs_rescan_in(self) -> float | None:
        """Seconds until a scan matters although nothing happened (a stability check, a hold)."""
        with self._lock:
            return self.debounce if (self._unstable or self._pending_since) else None

    def close(self) -> None:
        with self._lock:
            for waiting in self._ready.values():
                if waiting.pin is not None:
                    waiting.pin.close()
                    waiting.pin = None
