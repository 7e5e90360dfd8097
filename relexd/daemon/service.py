"""The daemon's main loop: notice checkpoints, ingest them in step order, keep previews fresh.

Threads and who does what:

* the **worker** (one thread) owns the engine: it scans the run directory, ingests every newly
  complete checkpoint in step order, then refreshes previews. One thread means strict order
  and no locking around the state.
* the **observer** (watchdog) and the **reconcile job** (apscheduler) only wake the worker up:
  events are hints (debounced), the job is the safety net for anything the observer missed.
* the **hook executor** runs ``--on-preview`` commands so an evaluation never delays ingestion.
* the **main thread** handles signals, systemd notifications and the watchdog ping, pinging only
  while the other threads are alive.

Crash safety comes from the engine (atomic generations) and from being idempotent here: on start
every checkpoint whose step is already in the state is skipped and missing or stale previews are
written again.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from relexd import __version__
from relexd.daemon import previews as pv
from relexd.daemon.config import WatchSettings
from relexd.daemon.hook import PreviewHook
from relexd.daemon.watcher import RunWatcher
from relexd.engine.engine import Engine
from relexd.engine.ingest import IngestReport, Interrupted
from relexd.engine.preview import preview_name
from relexd.errors import CheckpointError
from relexd.io.atomic import write_json_atomic
from relexd.io.layouts import HF_MARKER, VERL_TRACKER, CheckpointRef, scan_run, size_signature
from relexd.state.store import StateWriteError
from relexd.telemetry import ForecastFigures, RelexdMetrics, sdnotify, start_http
from relexd.telemetry.http import HttpServer, make_app

log = structlog.get_logger("relexd.daemon")

#: Layouts without a completion marker: complete only once their files stop changing.
MARKERLESS = frozenset({"openrlhf", "plain", "file"})
#: How long a complete checkpoint waits behind a lower, still incomplete one before going ahead
#: (ingesting it first would make the lower one out of order forever).
HOLD_BEHIND_PENDING_S = 120.0
#: Backoff after a failed state write (disk full): doubles up to the maximum.
RETRY_MIN_S, RETRY_MAX_S = 1.0, 300.0
#: File in the state directory telling ``relexd status`` where the daemon writes previews.
DAEMON_FILE = "daemon.json"

Signature = tuple[tuple[str, int, int], ...]


class Outcome(Enum):
    INGESTED = "ingested"
    SKIPPED = "skipped"  # bad input or rotated: go on with the next checkpoint
    RETRY = "retry"  # try this one again later (state write failed); stop this pass
    STOP = "stop"


@dataclass
class _Tracking:
    """What the worker remembers between scans (bounded: pruned to what the last scan saw)."""

    failed: dict[Path, Signature] = field(default_factory=dict)  # bad input, by unchanged files
    seen_sig: dict[Path, tuple[Signature, float]] = field(default_factory=dict)  # markerless
    pending_since: dict[int, float] = field(default_factory=dict)
    warned_unsupported: set[Path] = field(default_factory=set)

    def prune(self, present: set[Path], pending_steps: set[int]) -> None:
        self.failed = {p: s for p, s in self.failed.items() if p in present}
        self.seen_sig = {p: s for p, s in self.seen_sig.items() if p in present}
        self.pending_since = {s: t for s, t in self.pending_since.items() if s in pending_steps}
        self.warned_unsupported &= present


class WatchService:
    """One running ``relexd watch``; :meth:`run` blocks until stopped and returns the exit code."""

    def __init__(self, settings: WatchSettings, metrics: RelexdMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or RelexdMetrics(version=__version__, per_tensor=settings.per_tensor_metrics)
        self.stop_event = threading.Event()
        self._wake = threading.Event()
        self._last_hint = 0.0
        self._first_scan = threading.Event()
        self._retry_at = 0.0
        self._retry_delay = RETRY_MIN_S
        self._previews_dirty = True  # check previews once at start (re-do after a crash)
        self._track = _Tracking()
        self._worker: threading.Thread | None = None
        self._worker_error: BaseException | None = None
        self.engine: Engine | None = None
        self.watcher: RunWatcher | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.hook: PreviewHook | None = None
        self.http: HttpServer | None = None
        self._known_labels: set[str] = set()

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self) -> None:
        """Open the state (StateError propagates: changed base, unknown format, locked)."""
        s = self.settings
        self.engine = Engine(s.state_dir, s.base, s.engine, threads=s.threads)
        steps = self.engine.steps
        self.metrics.restore_progress(
            step=steps[-1] if steps else None,
            observed=len(steps),
            timestamp=self.engine.snapshot.meta.get("last_time"),
        )
        self._publish_confidence(self.engine.snapshot.meta)
        removed = pv.remove_orphans(s.previews)
        if removed:
            log.info("removed unpublished preview leftovers", paths=[str(p) for p in removed])
        write_json_atomic(
            s.state_dir / DAEMON_FILE,
            {
                "pid": os.getpid(),
                "run_dir": str(s.run_dir.absolute()),
                "preview_dir": str(s.previews.absolute()),
                "base": str(s.base),
                "started": time.time(),
                "version": __version__,
            },
        )
        if s.on_preview:
            self.hook = PreviewHook(
                s.on_preview,
                s.hook_timeout,
                on_score=self.metrics.set_eval_score,
                on_failure=self.metrics.count_hook_failure,
            )

    def run(self) -> int:
        """Start everything, serve until a signal (or, with ``once``, until caught up)."""
        s = self.settings
        self._install_signals()
        if self.engine is None:
            self.open()
        try:
            if s.listen:
                self.http = start_http(s.listen, make_app(self.metrics.registry, readiness=self.readiness))
            self.watcher = RunWatcher(s.run_dir, self.hint, poll=s.poll, poll_interval=s.poll_interval)
            if not s.once:
                self.watcher.start()
                self.scheduler = BackgroundScheduler(timezone="UTC")
                self.scheduler.add_job(
                    self.reconcile,
                    "interval",
                    seconds=s.reconcile_interval,
                    id="reconcile",
                    # a late run (busy machine) still runs once; runs never pile up or overlap
                    misfire_grace_time=max(1, int(s.reconcile_interval * 2)),
                    coalesce=True,
                    max_instances=1,
                )
                self.scheduler.start()
                self.metrics.set_watcher_up(True)
            log.info(
                "watching",
                run_dir=str(s.run_dir),
                state_dir=str(s.state_dir),
                preview_dir=str(s.previews),
                observer="polling" if self.watcher.polling else "inotify",
                fs_type=self.watcher.kind,
                observed=len(self.engine.steps) if self.engine else 0,
                listen=self.http.url if self.http else None,
            )
            self._worker = threading.Thread(target=self._worker_main, name="relexd-worker", daemon=True)
            self._worker.start()
            watchdog = sdnotify.Watchdog(healthy=self.healthy)
            ready_sent = False
            while not self.stop_event.is_set():
                if not ready_sent and self._first_scan.is_set():
                    sdnotify.ready("watching " + str(s.run_dir))
                    ready_sent = True
                watchdog.tick()
                if not self._worker.is_alive():
                    break
                self.stop_event.wait(0.2 if not ready_sent else 0.5)
        finally:
            self.shutdown()
        if self._worker_error is not None:
            log.error("worker failed", error=repr(self._worker_error))
            return 1
        return 0

    def shutdown(self) -> None:
        """Stop in reverse order; safe to call twice. The worker abandons an uncommitted ingest."""
        self.stop_event.set()
        self._wake.set()
        sdnotify.stopping()
        self.metrics.set_watcher_up(False)
        if self.watcher is not None and self.watcher.observer.is_alive():
            self.watcher.stop()
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        if self._worker is not None:
            self._worker.join(10.0)
        if self.hook is not None:
            self.hook.close()
        if self.http is not None:
            self.http.shutdown()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        log.info("stopped")

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("stop requested", signal=signal.Signals(signum).name)
            self.stop_event.set()
            self._wake.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # -- health ------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if not self._first_scan.is_set():
            return False, "initial scan not done"
        if not self.settings.once and not (self.watcher and self.watcher.alive()):
            return False, "observer not running"
        return True, "ready"

    def healthy(self) -> bool:
        """Worker, observer and scheduler all alive: what the systemd watchdog ping vouches for."""
        if self._worker is None or not self._worker.is_alive():
            return False
        if self.settings.once:
            return True
        return bool(self.watcher and self.watcher.alive() and self.scheduler and self.scheduler.running)

    # -- waking the worker -------------------------------------------------------------------

    def hint(self, path: str = "") -> None:
        """An observer event: something changed; scan after the debounce interval."""
        self._last_hint = time.monotonic()
        self._wake.set()

    def reconcile(self) -> None:
        """The periodic job: rescan regardless of events (catches what the observer missed)."""
        self._wake.set()

    # -- the worker --------------------------------------------------------------------------

    def _worker_main(self) -> None:
        try:
            first = True
            while not self.stop_event.is_set():
                if not first:
                    self._wake.wait(self._idle_wait())
                    self._wake.clear()
                    self._debounce()
                if self.stop_event.is_set():
                    break
                self.pass_once(force_stable=self.settings.once)
                first = False
                if self.settings.once:
                    self.stop_event.set()
        except BaseException as exc:  # a bug, not bad input: let systemd restart us
            self._worker_error = exc
            log.exception("worker thread crashed")
            self.stop_event.set()

    def _idle_wait(self) -> float:
        """Sleep until the reconcile job, or sooner when a retry or a stability check is due."""
        wait = self.settings.reconcile_interval
        if self._track.seen_sig or self._track.pending_since:
            wait = min(wait, max(self.settings.debounce, 0.2))
        if self._retry_at:
            wait = min(wait, max(0.05, self._retry_at - time.monotonic()))
        return wait

    def _debounce(self) -> None:
        """Let a burst of events settle (up to 5 debounce intervals) before scanning."""
        deb = self.settings.debounce
        deadline = time.monotonic() + 5 * deb
        while not self.stop_event.is_set():
            quiet = time.monotonic() - self._last_hint
            if quiet >= deb or time.monotonic() >= deadline:
                return
            self.stop_event.wait(min(deb - quiet, 0.5))

    def pass_once(self, *, force_stable: bool = False) -> None:
        """One scan: ingest what became complete, in order; then refresh previews if due."""
        ingested = self._ingest_pass(force_stable)
        self._first_scan.set()
        if ingested or self._previews_dirty:
            self.refresh_previews()

    def _ingest_pass(self, force_stable: bool) -> int:
        s = self.settings
        engine = self.engine
        assert engine is not None
        if self._retry_at and time.monotonic() < self._retry_at:
            return 0
        if not s.run_dir.is_dir():
            return 0
        if self.watcher is not None:
            self.watcher.ensure_watch()
        result = scan_run(s.run_dir)
        now = time.monotonic()
        self._track.prune(
            {r.path for r in result.complete} | {p for p, _ in result.unsupported},
            {r.step for r in result.pending},
        )
        for path, why in result.unsupported:
            if path not in self._track.warned_unsupported:
                self._track.warned_unsupported.add(path)
                log.warning("checkpoint not readable", path=str(path), reason="unsupported", detail=why)
                self.metrics.count_error("unsupported")
        for ref in result.pending:
            self._track.pending_since.setdefault(ref.step, now)
        done = set(engine.steps)
        count = 0
        for ref in result.complete:
            if self.stop_event.is_set():
                break
            if ref.step in done:
                continue  # already in the state (e.g. after a restart)
            blocking = [
                st
                for st, t0 in self._track.pending_since.items()
                if st < ref.step and now - t0 < HOLD_BEHIND_PENDING_S
            ]
            if blocking:
                break  # a lower step is still being written: keep strict order
            sig = size_signature(ref)
            if self._track.failed.get(ref.path) == sig:
                continue
            steps = engine.steps
            if steps and ref.step <= steps[-1]:
                log.warning(
                    "checkpoint older than the newest ingested one; skipped",
                    step=ref.step,
                    path=str(ref.path),
                    reason="out_of_order",
                    newest=steps[-1],
                )
                self.metrics.count_error("out_of_order")
                self._track.failed[ref.path] = sig
                continue
            if ref.layout in MARKERLESS and not force_stable and not self._stable(ref, sig, now):
                break  # wait for it to stop changing; later steps wait behind it
            outcome = self.ingest_ref(ref, sig)
            if outcome is Outcome.INGESTED:
                count += 1
            elif outcome in (Outcome.RETRY, Outcome.STOP):
                break
        return count

    def _stable(self, ref: CheckpointRef, sig: Signature, now: float) -> bool:
        """Marker-less checkpoints: same size signature in two scans ≥ debounce apart."""
        seen = self._track.seen_sig.get(ref.path)
        if seen is None or seen[0] != sig or not sig:
            self._track.seen_sig[ref.path] = (sig, now)
            return False
        return now - seen[1] >= self.settings.debounce

    def ingest_ref(self, ref: CheckpointRef, sig: Signature) -> Outcome:
        """Ingest one checkpoint, turning every kind of failure into a logged, counted outcome."""
        engine = self.engine
        assert engine is not None
        bound = log.bind(step=ref.step, path=str(ref.path), layout=ref.layout)
        try:
            report = engine.ingest(ref.weights, ref.step, source=ref.path, should_stop=self.stop_event.is_set)
        except Interrupted:
            bound.info("ingestion abandoned for shutdown; the state is unchanged")
            return Outcome.STOP
        except StateWriteError as exc:
            self._retry_at = time.monotonic() + self._retry_delay
            bound.error(
                "cannot write state; previous state kept, will retry",
                error=str(exc),
                retry_in=self._retry_delay,
            )
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX_S)
            return Outcome.RETRY
        except CheckpointError as exc:
            reason = exc.reason
            if reason != "rotated" and not os.path.lexists(ref.path):
                reason = "rotated"  # it vanished: whatever broke was the trainer deleting it
            return self._bad_input(bound, ref, sig, reason, str(exc.path), exc.message)
        except FileNotFoundError as exc:
            return self._bad_input(bound, ref, sig, "rotated", exc.filename or str(ref.path), str(exc))
        except PermissionError as exc:
            return self._bad_input(bound, ref, sig, "permission", exc.filename or str(ref.path), str(exc))
        except OSError as exc:
            return self._bad_input(bound, ref, sig, "io", exc.filename or str(ref.path), str(exc))
        except Exception as exc:
            bound.exception("unexpected error while ingesting; skipped")
            return self._bad_input(bound, ref, sig, "io", str(ref.path), repr(exc))
        self._retry_at, self._retry_delay = 0.0, RETRY_MIN_S
        self._track.seen_sig.pop(ref.path, None)
        self._record(ref, report)
        bound.info(
            "checkpoint ingested",
            seconds=round(report.seconds, 4),
            bytes=report.bytes_read,
            observed=len(engine.steps),
            **{k: v for k, v in report.figures.items() if v is not None},
        )
        return Outcome.INGESTED

    def _bad_input(
        self, bound: Any, ref: CheckpointRef, sig: Signature, reason: str, file: str, why: str
    ) -> Outcome:
        self.metrics.count_error(reason)
        if reason == "rotated":
            bound.warning("checkpoint deleted while being read (rotated); skipped", reason=reason, file=file)
            return Outcome.SKIPPED  # it is gone; nothing to remember
        bound.warning("checkpoint unusable; skipped", reason=reason, file=file, detail=why)
        self._track.failed[ref.path] = sig  # retried only if its files change
        return Outcome.SKIPPED

    def _record(self, ref: CheckpointRef, report: IngestReport) -> None:
        assert self.engine is not None
        marker = {"hf": ref.path / HF_MARKER, "verl": ref.path.parent / VERL_TRACKER}.get(
            ref.layout, ref.path
        )
        try:
            stamp = marker.stat().st_mtime
        except OSError:
            stamp = time.time()
        self.metrics.observe_ingest(
            report.step, report.seconds, report.bytes_read, stamp, observed=len(self.engine.steps)
        )
        self._publish_confidence(report.snapshot.meta)

    def _publish_confidence(self, meta: dict[str, Any]) -> None:
        forecasts = [
            ForecastFigures(f["horizon"], f.get("error_ratio"), f.get("skill"), f.get("ratio"))
            for f in meta.get("forecasts", [])
        ]
        figures = {k: v for k, v in meta.get("figures", {}).items()}
        self.metrics.set_confidence(figures, forecasts)
        if self.settings.per_tensor_metrics:
            ratios = {
                name: (rec["sigma1_sq"] / rec["energy"] if rec.get("energy") else None)
                for name, rec in meta.get("per_tensor", {}).items()
            }
            self.metrics.set_tensor_figures(ratios)

    # -- previews ----------------------------------------------------------------------------

    def preview_reference_step(self) -> int | None:
        """The newest step as of the last due refresh: refreshes fall on observed counts
        1, 1+N, 1+2N, … so which previews exist follows from the state alone (and a restarted
        daemon agrees with one that never stopped)."""
        assert self.engine is not None
        steps = self.engine.steps
        if not steps:
            return None
        n = self.settings.preview_every
        return steps[((len(steps) - 1) // n) * n]

    def refresh_previews(self) -> None:
        """Write due previews (stale or missing), prune the rest; failures retried next pass."""
        s = self.settings
        engine = self.engine
        assert engine is not None
        if not s.preview_ahead and not s.preview_at:
            self._previews_dirty = False
            return
        ref_step = self.preview_reference_step()
        wanted = pv.wanted_targets(ref_step, s.preview_ahead, s.preview_at)
        generation = engine.snapshot.name
        due = len(engine.steps) % s.preview_every == 1 % s.preview_every
        ok = True
        for target in wanted:
            if self.stop_event.is_set():
                return
            final = s.previews / preview_name(target.step)
            current = pv.is_current(s.previews, target.step, generation)
            if current or (final.is_dir() and not due):
                continue
            bound = log.bind(
                step=target.step, path=str(final), target=target.label, observed_step=engine.steps[-1]
            )
            started = time.monotonic()
            try:
                path = engine.write_preview(target.step, s.previews)
            except OSError as exc:
                ok = False
                bound.error("cannot write preview; previous one kept, will retry", error=str(exc))
                continue
            seconds = time.monotonic() - started
            self.metrics.observe_preview_written(target.label, target.step, seconds)
            bound.info("preview written", seconds=round(seconds, 4))
            if self.hook is not None:
                self.hook.submit(path, target.step, target.label)
        if not ok:
            # keep the superseded previews until their replacements exist (disk full: the old
            # preview is still the best one there is)
            self._previews_dirty = True
            return
        for path in pv.prune(s.previews, wanted, s.preview_keep):
            log.info("preview removed (target no longer wanted)", path=str(path), step=pv.preview_step(path))
        for label in self._known_labels - {t.label for t in wanted}:
            self.metrics.forget_target(label)
        self._known_labels = {t.label for t in wanted}
        self._previews_dirty = False
