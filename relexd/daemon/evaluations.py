"""What the evaluation hook is asked to score, and what came of it: the evaluation ledger.

``--eval CMD`` scores previews and checkpoints alike. After a preview refresh that is due for an
evaluation (every ``--eval-every``-th refresh, counted from the state so a restarted daemon agrees
with one that never stopped), relexd queues

1. the **checkpoint the preview was made from** (the newest observed one) — first, because the
   trainer's rotation may delete it soon; when it is already gone that is recorded, not hidden;
2. the **preview** itself;

and after each ingest, the **checkpoint that reaches the target** of an earlier evaluated preview
(the first one at or after τ). Each checkpoint is evaluated once, whatever asked for it.

Crash safety: a job is written to the ledger as *pending* before the hook starts and replaced by
its result after the hook exits, both with an atomic write. A kill -9 in between leaves it pending,
and the next start runs it again: a result is recorded once or re-run, never lost or doubled (a
job's key names what it scores, so a repeat overwrites instead of adding). A queued preview job that
a newer preview of the same target replaces before it started is recorded as *superseded*.

The ledger keeps the newest :data:`MAX_RECORDS` records (bounded on disk and in memory); the figures
derived from a preview — its lead at evaluation time and its realized validation — are stored in
the preview's own record, so dropping old checkpoint records loses none of them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from relexd.io.atomic import write_json_atomic
from relexd.math.realized import lead_streak, nearest_horizon, realized

log = structlog.get_logger("relexd.evaluations")

LEDGER_FILE = "evaluations.json"
FORMAT = 1
#: Records kept (the newest); each is a few hundred bytes.
MAX_RECORDS = 512
#: Preview evaluations per target that the streak and the status look back over.
STREAK_WINDOW = 32
#: A preview counts for a horizon when its τ / a is within this factor of it: an ``--preview-ahead``
#: preview always is (τ = round(h·a)); a ``--preview-at`` one only while its ratio is near one
#: (a 33× preview is not evidence about 6× previews).
HORIZON_TOLERANCE = 1.25

KINDS = ("preview", "checkpoint")
#: fields every record has (a record without them is skipped on load, and said)
REQUIRED = frozenset({"key", "kind", "step", "target", "made_from", "path", "status"})
FINAL = ("done", "failed", "gone", "superseded")


@dataclass(frozen=True)
class EvalJob:
    """One hook run: score the weights at ``path``.

    ``step`` is the step the weights stand for (a preview's target τ, a checkpoint's own step);
    ``made_from`` the newest observed step the preview was made from (a checkpoint: its own step);
    ``target`` the preview's configured target label (empty for a checkpoint).
    """

    kind: str
    step: int
    path: Path
    target: str
    made_from: int

    @property
    def key(self) -> str:
        if self.kind == "checkpoint":
            return f"checkpoint:{self.step}"
        return f"preview:{self.step}@{self.made_from}"


@dataclass(frozen=True)
class EvalFigures:
    """What the metrics publish from the ledger."""

    checkpoint_score: float | None  # the newest evaluated checkpoint's
    checkpoint_step: int | None
    #: horizon label → (gain share or None, advantage) of the newest realized preview at it
    realized: dict[str, tuple[float | None, float]]
    #: target label → (lead, streak, horizon label) of its newest evaluated preview
    leads: dict[str, tuple[float, int, str]]
    #: target label → score of its newest evaluated preview
    preview_scores: dict[str, float]


def horizon_text(h: float) -> str:
    return f"{h:g}x"


class EvalLedger:
    """The ledger file of one state directory; thread-safe (worker schedules, hook thread finishes)."""

    def __init__(self, state_dir: Path, horizons: Sequence[float], *, read_only: bool = False) -> None:
        """``read_only``: for readers beside the daemon (``relexd status``, the demo) — an
        unreadable file raises ValueError instead of being moved aside, and nothing is written."""
        self.path = state_dir / LEDGER_FILE
        self.read_only = read_only
        self.horizons = tuple(horizons)
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}  # key → record, in insertion order
        self.save_failures = 0
        try:
            doc = read_ledger(state_dir)
        except ValueError as exc:
            if read_only:
                raise
            # unreadable (a foreign or damaged file): keep it for inspection, say so, start afresh
            aside = self.path.with_name(f"{LEDGER_FILE}.unreadable-{int(time.time())}")
            try:
                self.path.replace(aside)
            except OSError as move:
                aside = self.path  # stays where it is; the next save replaces it
                log.error("cannot move the unreadable evaluation ledger aside", error=str(move))
            log.error("evaluation ledger unreadable; starting a new one", error=str(exc), kept_at=str(aside))
            doc = None
        self._last_refresh: int | None = None
        if doc is not None:
            malformed = 0
            for rec in doc["records"]:
                if isinstance(rec, dict) and rec.keys() >= REQUIRED:
                    self._records[rec["key"]] = rec
                else:
                    malformed += 1
            if malformed:
                log.error(
                    "evaluation ledger records without their fields skipped",
                    path=str(self.path),
                    count=malformed,
                )
            last = doc.get("last_evaluated_refresh")
            self._last_refresh = last if isinstance(last, int) else None

    # -- scheduling (worker thread) ----------------------------------------------------------

    def after_preview(
        self, target: str, target_step: int, made_from: int, preview: Path, checkpoint: Path | None
    ) -> list[EvalJob]:
        """Jobs for a due evaluation of a freshly written preview (its checkpoint first)."""
        jobs = []
        with self._lock:
            if checkpoint is not None and f"checkpoint:{made_from}" not in self._records:
                jobs.append(EvalJob("checkpoint", made_from, checkpoint, "", made_from))
            jobs.append(EvalJob("preview", target_step, preview, target, made_from))
            for job in jobs:
                self._pending(job)
            self._save()
        return jobs

    def after_ingest(self, step: int, checkpoint: Path) -> list[EvalJob]:
        """After checkpoint ``step`` was ingested: it is what earlier previews aimed at if it is
        the first checkpoint at or past their target; then it is evaluated (once)."""
        with self._lock:
            reaching = [
                r
                for r in self._records.values()
                if r["kind"] == "preview"
                and r.get("reached_by") is None
                and r["status"] not in ("failed", "superseded")
                and r["made_from"] < step
                and step >= r["step"]
            ]
            if not reaching:
                return []
            for r in reaching:
                r["reached_by"] = step
            jobs = []
            if f"checkpoint:{step}" not in self._records:
                job = EvalJob("checkpoint", step, checkpoint, "", step)
                self._pending(job)
                jobs.append(job)
            self._score_realized()
            self._save()
            return jobs

    def due(self, refresh: int, every: int) -> bool:
        """Whether preview refresh number ``refresh`` is evaluated with ``--eval-every every``:
        the first refresh, then the first one in each later block of ``every`` (a daemon that
        ingests several checkpoints before one refresh skips refresh numbers; it still evaluates
        as soon as it enters a new block), and the one being evaluated for each of its targets.
        The last evaluated refresh is kept in the ledger, so a restart agrees with a daemon that
        never stopped (and finishes a refresh it was killed in)."""
        with self._lock:
            last = self._last_refresh
        return last is None or refresh == last or refresh // every > last // every

    def mark_evaluated(self, refresh: int) -> None:
        with self._lock:
            if self._last_refresh != refresh:
                self._last_refresh = refresh
                self._save()

    def unfinished(self) -> list[EvalJob]:
        """Jobs recorded as pending: a previous process queued them and did not record a result."""
        with self._lock:
            return [_job(r) for r in self._records.values() if r["status"] == "pending"]

    # -- results (hook thread) ----------------------------------------------------------------

    def finish(
        self,
        job: EvalJob,
        status: str,
        score: float | None = None,
        *,
        error: str | None = None,
        seconds: float | None = None,
    ) -> None:
        """Record a job's outcome (``status`` one of :data:`FINAL`), durably."""
        if status not in FINAL:
            raise ValueError(f"unknown evaluation status {status!r}")
        with self._lock:
            rec = self._records.get(job.key)
            if rec is None:  # pruned meanwhile (a very long queue): record it anew
                rec = self._pending(job)
            rec.update(status=status, score=score, error=error, seconds=seconds, finished=time.time())
            if job.kind == "preview" and score is not None:
                newest = self._newest_checkpoint()
                if newest is not None:
                    rec["lead"] = score - newest["score"]
                    rec["lead_vs"] = newest["step"]
            self._score_realized()
            self._save()

    # -- figures -----------------------------------------------------------------------------

    def figures(self) -> EvalFigures:
        with self._lock:
            newest = self._newest_checkpoint()
            realized_by_h: dict[str, tuple[int, float | None, float]] = {}
            previews: dict[str, list[dict[str, Any]]] = {}
            for r in self._records.values():
                if r["kind"] != "preview":
                    continue
                real = r.get("realized")
                if real is not None and _near(real["ratio"], real["horizon"]):
                    label = horizon_text(real["horizon"])
                    if label not in realized_by_h or r["made_from"] >= realized_by_h[label][0]:
                        realized_by_h[label] = (r["made_from"], real["gain_share"], real["advantage"])
                if r["status"] == "done" and r.get("score") is not None:
                    previews.setdefault(r["target"], []).append(r)
            leads: dict[str, tuple[float, int, str]] = {}
            scores: dict[str, float] = {}
            for target, recs in previews.items():
                recs = sorted(recs, key=lambda r: (r["made_from"], r["finished"]))[-STREAK_WINDOW:]
                last = recs[-1]
                scores[target] = last["score"]
                if newest is not None:
                    lead = last["score"] - newest["score"]
                    streak = lead_streak([r["lead"] for r in recs if r.get("lead") is not None])
                    ratio = last["step"] / max(last["made_from"], 1)
                    h = nearest_horizon(ratio, self.horizons)
                    label = horizon_text(h) if _near(ratio, h) else ""  # "": matches no horizon
                    leads[target] = (lead, streak if lead > 0 else 0, label)
            return EvalFigures(
                newest["score"] if newest else None,
                newest["step"] if newest else None,
                {h: (share, adv) for h, (_, share, adv) in realized_by_h.items()},
                leads,
                scores,
            )

    def has(self, key: str) -> bool:
        """Whether a job with this key is recorded (in any status)."""
        with self._lock:
            return key in self._records

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._records.values()]

    # -- internals (lock held) ----------------------------------------------------------------

    def _pending(self, job: EvalJob) -> dict[str, Any]:
        rec = {
            "key": job.key,
            "kind": job.kind,
            "step": job.step,
            "target": job.target,
            "made_from": job.made_from,
            "path": str(job.path),
            "status": "pending",
            "queued": time.time(),
        }
        self._records.pop(job.key, None)
        self._records[job.key] = rec
        return rec

    def _scored_checkpoints(self) -> list[dict[str, Any]]:
        return [
            r
            for r in self._records.values()
            if r["kind"] == "checkpoint" and r["status"] == "done" and r.get("score") is not None
        ]

    def _newest_checkpoint(self) -> dict[str, Any] | None:
        return max(self._scored_checkpoints(), key=lambda r: r["step"], default=None)

    def _score_realized(self) -> None:
        """Fill in the realized validation of every preview whose three scores are known."""
        scores = {r["step"]: r["score"] for r in self._scored_checkpoints()}
        for r in self._records.values():
            if r["kind"] != "preview" or r.get("realized") is not None or r.get("reached_by") is None:
                continue
            if r["status"] != "done" or r.get("score") is None or r["made_from"] <= 0:
                continue
            a, reached = scores.get(r["made_from"]), scores.get(r["reached_by"])
            if a is None or reached is None:
                continue
            real = realized(r["score"], a, reached, r["step"] / r["made_from"], self.horizons)
            r["realized"] = {
                "horizon": real.horizon,
                "ratio": real.ratio,
                "advantage": real.advantage,
                "gain_share": real.gain_share,
                "made_from_score": a,
                "reached_score": reached,
            }

    def _save(self) -> None:
        if self.read_only:
            raise RuntimeError(f"{self.path}: opened read-only")
        records = list(self._records.values())
        if len(records) > MAX_RECORDS:
            # never drop a job still to run: its result must have a place to go
            drop = len(records) - MAX_RECORDS
            kept = []
            for r in records:
                if drop and r["status"] != "pending":
                    drop -= 1
                    continue
                kept.append(r)
            self._records = {r["key"]: r for r in kept}
            records = kept
        try:
            doc = {"format": FORMAT, "last_evaluated_refresh": self._last_refresh, "records": records}
            write_json_atomic(self.path, doc)
        except OSError as exc:
            # disk full, permission: the records stay in memory and the next save writes them; a
            # kill before then loses what is not on disk — said here, never silently
            self.save_failures += 1
            log.error(
                "cannot write the evaluation ledger; kept in memory", path=str(self.path), error=str(exc)
            )


def _near(ratio: float, horizon: float) -> bool:
    return 1 / HORIZON_TOLERANCE <= ratio / horizon <= HORIZON_TOLERANCE


def _job(rec: dict[str, Any]) -> EvalJob:
    return EvalJob(rec["kind"], rec["step"], Path(rec["path"]), rec["target"], rec["made_from"])


def read_ledger(state_dir: Path) -> dict[str, Any] | None:
    """The ledger as written (None if there is none); an unknown format is an error, not ignored."""
    try:
        doc = json.loads((state_dir / LEDGER_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{state_dir / LEDGER_FILE}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("records"), list):
        raise ValueError(f"{state_dir / LEDGER_FILE}: unknown evaluation ledger format")
    return doc
