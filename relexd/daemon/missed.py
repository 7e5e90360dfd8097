"""Checkpoints relexd did not read, said out loud and kept: nothing is lost silently.

Two ways a checkpoint escapes:

* **rotated** — relexd saw it (in a scan, or in a file event) but the trainer deleted it before or
  while relexd read it (``save_total_limit``, prime-rl's broadcast cleanup).
* **gap** — relexd never saw it, but the trainer's own records say it was saved: HF/TRL's
  ``trainer_state.json`` holds ``save_steps``, and the Trainer saves at every multiple of it
  (``DefaultFlowCallback.on_step_end``: ``global_step % save_steps == 0``). A step counts as a gap
  once a later step has been ingested (strict step order: it can never be ingested after that),
  unless ``--every`` would have skipped it anyway.

The ledger lives beside the state as ``missed.json`` (written atomically); it is what
``relexd status`` shows. Gap checking resumes from ``checked_upto`` after a restart, so a miss is
reported once, and a crash between a miss and its record at worst reports a rotated checkpoint as
a gap.
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relexd.errors import MISSED_REASONS
from relexd.io.atomic import write_json_atomic

LEDGER_FILE = "missed.json"
#: Entries kept for ``relexd status``; the counts cover everything.
RECENT_LIMIT = 100


@dataclass(frozen=True)
class Missed:
    """One run of missed steps: ``first``..``last`` every ``interval`` steps, ``count`` of them."""

    first: int
    last: int
    count: int
    reason: str
    path: str = ""

    @classmethod
    def one(cls, step: int, reason: str, path: str | Path = "") -> Missed:
        return cls(step, step, 1, reason, str(path))

    def describe(self) -> str:
        return str(self.first) if self.count == 1 else f"{self.first}…{self.last} ({self.count} steps)"


def gap_runs(steps: Sequence[int], interval: int, reason: str = "gap") -> list[Missed]:
    """Group ascending steps into runs spaced ``interval`` apart (one log line per run)."""
    runs: list[Missed] = []
    for step in steps:
        last = runs[-1] if runs else None
        if last is not None and step == last.last + interval:
            runs[-1] = Missed(last.first, step, last.count + 1, reason)
        else:
            runs.append(Missed(step, step, 1, reason))
    return runs


def find_gaps(
    after: int, before: int, interval: int, done: Sequence[int], every: int, exclude: Iterable[int]
) -> list[int]:
    """Multiples of ``interval`` in (after, before) that relexd should have ingested and did not.

    ``done`` is ascending; ``exclude`` holds steps accounted for otherwise (still present, rejected
    as bad input, already reported). A step closer than ``every`` to the ingested step before it
    would have been skipped on purpose.
    """
    skip = set(exclude) | set(done)
    first = (after // interval + 1) * interval
    gaps = []
    for step in range(first, before, interval):
        if step in skip:
            continue
        i = bisect.bisect_left(done, step)
        if i and step - done[i - 1] < every:
            continue
        gaps.append(step)
    return gaps


class MissedLedger:
    """The persisted record of missed checkpoints of one state directory (thread-safe: the scout
    reports rotations, the worker gaps)."""

    def __init__(self, state_dir: Path, *, newest_ingested: int | None) -> None:
        self.path = Path(state_dir) / LEDGER_FILE
        self._lock = threading.RLock()
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            # a fresh state checks for gaps from the start; a state made before this ledger
            # existed only from where it is now (its past was never checked)
            doc = {"checked_upto": newest_ingested or 0}
        self.counts: dict[str, int] = {r: int(doc.get("counts", {}).get(r, 0)) for r in MISSED_REASONS}
        self.recent: list[dict[str, Any]] = list(doc.get("recent", []))[-RECENT_LIMIT:]
        self.checked_upto: int = int(doc.get("checked_upto", 0))
        #: single steps reported above ``checked_upto``: not to be reported again as gaps
        self.reported: set[int] = {int(s) for s in doc.get("reported", []) if int(s) > self.checked_upto}

    def add(self, items: Sequence[Missed]) -> list[Missed]:
        """Record new misses (a step already reported is dropped); returns what was new."""
        with self._lock:
            new = [m for m in items if m.count != 1 or m.first not in self.reported]
            if not new:
                return []
            now = time.time()
            for m in new:
                self.counts[m.reason] += m.count
                if m.count == 1:
                    self.reported.add(m.first)
                self.recent.append(
                    {
                        "first": m.first,
                        "last": m.last,
                        "count": m.count,
                        "reason": m.reason,
                        "path": m.path,
                        "time": now,
                    }
                )
            self.recent = self.recent[-RECENT_LIMIT:]
            self.save()
            return new

    def check_gaps(
        self, upto: int, interval: int | None, done: Sequence[int], every: int, exclude: Iterable[int]
    ) -> list[Missed]:
        """The gaps below ``upto`` (the newest ingested step) not reported yet; advances the
        checked mark. The caller reports them with :meth:`add`, which also saves the mark (with
        nothing found it is not saved: a mark left behind by a crash is re-checked on restart and
        finds nothing new, and ingest stays one fsync cheaper).
        """
        with self._lock:
            if upto <= self.checked_upto:
                return []
            known = set(exclude) | self.reported
            steps = find_gaps(self.checked_upto, upto, interval, done, every, known) if interval else []
            self.checked_upto = upto
            self.reported = {s for s in self.reported if s > upto}
            return gap_runs(steps, interval or 1)

    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "counts": self.counts,
            "recent": self.recent,
            "checked_upto": self.checked_upto,
            "reported": sorted(self.reported),
        }

    def save(self) -> None:
        with self._lock:
            write_json_atomic(self.path, self.as_dict())


def read_ledger(state_dir: Path) -> dict[str, Any] | None:
    """The ledger as ``relexd status`` shows it; None when relexd never wrote one."""
    try:
        return json.loads((Path(state_dir) / LEDGER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
