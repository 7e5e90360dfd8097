"""The daemon's main loop: notice checkpoints, ingest them in step order, keep previews fresh.

Threads and who does what:

* the **scout** (one thread) scans the run directory whenever something happens there: file
  events and the reconcile job wake it, and a scan is cheap (listings, stats, marker files). It
  decides which checkpoints are complete, pins them so the trainer's rotation cannot take them
  unread, and notices the ones that vanished unread (:mod:`relexd.daemon.intake`).
* the **worker** (one thread) owns the engine: it ingests the ready checkpoints in step order,
  then refreshes previews. One thread means strict order and no locking around the state.
* the **observer** (watchdog) and the **reconcile job** (apscheduler) only wake the scout up:
  events are hints (and name checkpoints that may be gone before a scan), the job is the safety
  net for anything the observer missed.
* the **hook executor** runs ``--eval`` commands so an evaluation never delays ingestion; what it
  is asked to score and what the scores mean is kept in the evaluation ledger
  (:mod:`relexd.daemon.evaluations`).
* the **main thread** handles signals, systemd notifications and the watchdog ping, pinging only
  while the other threads are alive and none of them has stalled (:mod:`relexd.daemon.liveness`:
  a thread stuck in a read of a hung file system is alive but makes no progress).

A checkpoint with a trainer marker is read as soon as the marker appears (no global debounce:
a trainer that writes every second would never let the run directory go quiet). What relexd did
not read is said: logged with step and path, counted in ``relexd_checkpoints_missed_total``, and
kept in the state directory's ``missed.json`` (:mod:`relexd.daemon.missed`).

Crash safety comes from the engine (atomic generations) and from being idempotent here: on start
every checkpoint whose step is already in the state is skipped and missing or stale previews are
written again.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from relexd import __version__
from relexd.cluster.coordinator import PartitionedTensors, WorkerStatus
from relexd.daemon import previews as pv
from relexd.daemon.config import WatchSettings
from relexd.daemon.evaluations import EvalJob, EvalLedger
from relexd.daemon.hook import EvalHook, HookResult
from relexd.daemon.intake import Intake, ScanNews, Waiting
from relexd.daemon.liveness import Liveness
from relexd.daemon.missed import Missed, MissedLedger
from relexd.daemon.watcher import RunWatcher
from relexd.engine.backend import TensorBackend
from relexd.engine.engine import Engine
from relexd.engine.ingest import IngestReport, Interrupted
from relexd.engine.preview import MANIFEST, preview_name
from relexd.errors import CheckpointError, RelexdError, WorkerLost
from relexd.io.atomic import write_json_atomic
from relexd.io.layouts import CheckpointRef, being_removed
from relexd.state.store import StateWriteError
from relexd.telemetry import ForecastFigures, RelexdMetrics, sdnotify, start_http
from relexd.telemetry.http import HttpServer, make_app

log = structlog.get_logger("relexd.daemon")

#: Backoff after a failed state write (disk full): doubles up to the maximum.
RETRY_MIN_S, RETRY_MAX_S = 1.0, 300.0
#: Least time between the starts of two scans: a burst of file events costs a few scans, not one
#: each. Short, because it is added to the time a checkpoint waits for its pin: a trainer that
#: saves every ~25 ms and keeps two deletes each checkpoint ~50 ms after completing it (a 50 ms
#: gap lost checkpoints of a real TRL run that way).
SCAN_GAP_MIN_S = 0.005
#: The most of one core the scout spends scanning during a burst of events: a scan of a run
#: directory with hundreds of checkpoints takes ~10 ms, so the gap grows with the last scan's time.
SCAN_SHARE = 0.2
#: File in the state directory telling ``relexd status`` where the daemon writes previews.
DAEMON_FILE = "daemon.json"
#: With --ray: the workers as the coordinator last saw them (``relexd status``)
CLUSTER_FILE = "cluster.json"
#: Where pinned checkpoints' views live (emptied on start: views never outlive the process).
PIN_DIR = "pins"
#: Checkpoint directories remembered by step, for evaluating the one a preview was made from.
REMEMBERED_CHECKPOINTS = 16
#: Ledger status of each hook outcome ("shutdown" is none: the job stays pending, re-run on start).
EVAL_STATUS = {"ok": "done", "gone": "gone", "superseded": "superseded"}


def scan_gap(last_scan_cpu_s: float) -> float:
    """Seconds from the start of one scan to the earliest start of the next, given the CPU time the
    last one took (CPU, not wall: waiting for the GIL behind the worker costs no core)."""
    return max(SCAN_GAP_MIN_S, last_scan_cpu_s / SCAN_SHARE)


class Outcome(Enum):
    INGESTED = "ingested"
    SKIPPED = "skipped"  # bad input: go on with the next checkpoint, retry it if its files change
    MISSED = "missed"  # the trainer deleted it first: counted as missed, go on
    RETRY = "retry"  # try this one again later (state write failed); stop this pass
    STOP = "stop"


class WatchService:
    """One running ``relexd watch``; :meth:`run` blocks until stopped and returns the exit code."""

    def __init__(self, settings: WatchSettings, metrics: RelexdMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or RelexdMetrics(
            version=__version__,
            per_tensor=settings.per_tensor_metrics,
            per_worker=settings.per_worker_metrics,
        )
        self.stop_event = threading.Event()
        self._scan_wake = threading.Event()  # something changed in the run directory
        self._work_wake = threading.Event()  # a checkpoint became ready
        self._first_scan = threading.Event()
        self._retry_at = 0.0
        self._retry_delay = RETRY_MIN_S
        self._previews_dirty = True  # check previews once at start (re-do after a crash)
        self._behind = False  # said that relexd is falling behind, not yet that it caught up
        self._threads: list[threading.Thread] = []
        self.liveness = Liveness()
        #: seconds without progress after which a loop counts as hung: the watchdog's timeout
        #: (a hang then costs at most two timeouts before systemd restarts the daemon); None
        #: outside a watchdog, where nothing would act on it
        self.stall_limit: float | None = sdnotify.watchdog_interval()
        self._stalled_said: set[str] = set()
        self._thread_error: BaseException | None = None
        self.intake: Intake | None = None
        self.ledger: MissedLedger | None = None
        self.engine: Engine | None = None
        self.watcher: RunWatcher | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.hook: EvalHook | None = None
        self.evaluations: EvalLedger | None = None
        self._checkpoint_paths: dict[int, Path] = {}  # step → the trainer's checkpoint directory
        self._preview_lock = threading.Lock()  # preview writes (worker) vs manifest stamps (hook)
        self.http: HttpServer | None = None
        self.cluster: PartitionedTensors | None = None  # with --ray
        self._known_labels: set[str] = set()

    # -- lifecycle -----------------------------------------------------------------------------

    def _cluster_backend(self) -> TensorBackend | None:
        """With ``--ray``: the engine's tensors computed by Ray workers (imported only then)."""
        s = self.settings
        if s.ray is None:
            return None
        from relexd.cluster.ray_backend import ClusterSettings, ray_tensors

        cores = max(1, int(s.ray_cpus_per_worker))
        cluster = ClusterSettings(
            address=s.ray,
            workers=s.ray_workers,
            cpus_per_worker=s.ray_cpus_per_worker,
            threads_per_worker=s.threads or cores,
            memory_budget=s.memory_budget,
            timeout_s=s.ray_timeout,
        )
        backend = ray_tensors(cluster, s.base, s.engine, s.state_dir, on_part=self._worker_reported)
        self.cluster = backend
        self.metrics.set_workers(backend.status)
        log.info(
            "ray workers placed",
            address=s.ray,
            workers=[f"{w.host}:{w.pid}" for w in backend.status],
            cpus_per_worker=s.ray_cpus_per_worker,
        )
        return backend

    def _worker_reported(self, status: WorkerStatus) -> None:
        if status.last_seconds is not None:
            self.metrics.observe_worker_part(status.last_seconds)
        if self.cluster is not None:
            self.metrics.set_workers(self.cluster.status)
            write_json_atomic(self.settings.state_dir / CLUSTER_FILE, self.cluster.describe())

    def open(self) -> None:
        """Open the state (StateError propagates: changed base, unknown format, locked)."""
        s = self.settings
        self.engine = Engine(
            s.state_dir,
            s.base,
            s.engine,
            threads=s.threads,
            memory_budget=s.memory_budget,
            backend=self._cluster_backend(),
            spare_sketch=s.spare_sketch,
        )
        steps = self.engine.steps
        self.metrics.restore_progress(
            step=steps[-1] if steps else None,
            observed=len(steps),
            timestamp=self.engine.snapshot.meta.get("last_time"),
        )
        self._publish_confidence(self.engine.snapshot.meta)
        # pins hold files open in this process only; cluster workers read the shared file system
        pinned = 0 if s.ray else s.max_pinned
        self.intake = Intake(
            s.run_dir, s.state_dir / PIN_DIR, s.engine, debounce=s.debounce, max_pinned=pinned
        )
        self.ledger = MissedLedger(s.state_dir, newest_ingested=steps[-1] if steps else None)
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
        self.evaluations = EvalLedger(s.state_dir, s.engine.horizons)
        self._publish_evaluations()
        if s.eval_command:
            self.hook = EvalHook(s.eval_command, s.hook_timeout, on_result=self._eval_result)
            unfinished = self.evaluations.unfinished()
            if unfinished:
                log.info("re-running evaluations a previous run did not finish", count=len(unfinished))
            for job in unfinished:
                self.hook.submit(job)

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
            loops = [("relexd-scout", self._scout_loop), ("relexd-worker", self._worker_loop)]
            for name, loop in [("relexd-once", self._once_loop)] if s.once else loops:
                thread = threading.Thread(target=self._guarded, args=(loop,), name=name, daemon=True)
                self.liveness.beat(name)
                thread.start()
                self._threads.append(thread)
            # the kernel's thread ids, for py-spy/gdb/top -H when a thread hangs
            log.info("threads started", threads={t.name: t.native_id for t in self._threads})
            watchdog = sdnotify.Watchdog(healthy=self.healthy)
            ready_sent = False
            while not self.stop_event.is_set():
                if not ready_sent and self._first_scan.is_set():
                    sdnotify.ready("watching " + str(s.run_dir))
                    ready_sent = True
                watchdog.tick()
                if not all(t.is_alive() for t in self._threads):
                    break
                self.stop_event.wait(0.2 if not ready_sent else 0.5)
        finally:
            self.shutdown()
        if self._thread_error is not None:
            log.error("worker failed", error=repr(self._thread_error))
            return 1
        return 0

    def shutdown(self) -> None:
        """Stop in reverse order; safe to call twice. The worker abandons an uncommitted ingest."""
        self._request_stop()
        sdnotify.stopping()
        self.metrics.set_watcher_up(False)
        if self.watcher is not None and self.watcher.observer.is_alive():
            self.watcher.stop()
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        for thread in self._threads:
            thread.join(10.0)
        if self.intake is not None:
            self.intake.close()
        if self.ledger is not None:
            self.ledger.save()
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
            self._request_stop()

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
        """Scout, worker, observer and scheduler all alive, and no loop stalled for longer than
        :attr:`stall_limit`: what the systemd watchdog ping vouches for."""
        if not self._threads or not all(t.is_alive() for t in self._threads):
            return False
        if self._stalled():
            return False
        if self.settings.once:
            return True
        return bool(self.watcher and self.watcher.alive() and self.scheduler and self.scheduler.running)

    def _stalled(self) -> bool:
        """Whether a loop made no progress within the stall limit; says so once per stall."""
        if self.stall_limit is None:
            return False
        stalled = self.liveness.stalled(self.stall_limit)
        for name in stalled.keys() - self._stalled_said:
            log.error(
                "thread made no progress; withholding watchdog pings so systemd restarts relexd",
                thread=name,
                silent_s=round(stalled[name], 1),
                limit_s=self.stall_limit,
            )
        for name in self._stalled_said - stalled.keys():
            log.info("thread progressing again", thread=name)
        self._stalled_said = set(stalled)
        return bool(stalled)

    def _wait(self, event: threading.Event, seconds: float) -> bool:
        """``event.wait(seconds)`` for a loop thread, beating for it at least four times per stall
        limit so that an idle loop is not taken for a hung one."""
        name = threading.current_thread().name
        deadline = time.monotonic() + seconds
        while True:
            self.liveness.beat(name)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return event.is_set()
            if event.wait(remaining if self.stall_limit is None else min(remaining, self.stall_limit / 4)):
                return True

    def _progress(self) -> Callable[[], bool]:
        """A stop poll for long work the calling loop hands out (to the tensor pool, the preview
        writer): each poll is a beat of that loop, whichever thread polls."""
        loop = threading.current_thread().name

        def poll() -> bool:
            self.liveness.beat(loop)
            return self.stop_event.is_set()

        return poll

    # -- waking the scout ----------------------------------------------------------------------

    def hint(self, path: str = "") -> None:
        """An observer event: remember the checkpoint it names, scan now."""
        if path and self.intake is not None:
            self.intake.note_event(path)
        self._scan_wake.set()

    def reconcile(self) -> None:
        """The periodic job: rescan regardless of events (catches what the observer missed)."""
        self._scan_wake.set()

    # -- the threads -------------------------------------------------------------------------

    def _request_stop(self) -> None:
        """Stop every loop: set the flag and wake both threads so they see it now."""
        self.stop_event.set()
        self._scan_wake.set()
        self._work_wake.set()

    def _guarded(self, loop: Callable[[], None]) -> None:
        """A thread's body: any exception is a bug, not bad input — stop, and let systemd restart us."""
        try:
            loop()
            self.liveness.forget(threading.current_thread().name)
        except BaseException as exc:
            self._thread_error = exc
            log.exception("daemon thread crashed", thread=threading.current_thread().name)
            self._request_stop()

    def _once_loop(self) -> None:
        self.pass_once(force_stable=True)
        if self.hook is not None:
            self.hook.wait_idle(self.stop_event)  # --once evaluates what it queued before exiting
        self.stop_event.set()

    def _scout_loop(self) -> None:
        last, cpu = 0.0, 0.0
        while not self.stop_event.is_set():
            wait = self.settings.reconcile_interval
            rescan = self.intake.needs_rescan_in() if self.intake else None
            if rescan is not None:
                wait = min(wait, max(rescan, 0.2))
            if last:
                self._wait(self._scan_wake, wait)
            self._scan_wake.clear()
            gap = scan_gap(cpu) - (time.monotonic() - last)
            if gap > 0:
                self.stop_event.wait(gap)
            if self.stop_event.is_set():
                break
            last, started = time.monotonic(), time.thread_time()
            self.scan_once()
            cpu = time.thread_time() - started

    def _worker_loop(self) -> None:
        while not self.stop_event.is_set():
            wait = self.settings.reconcile_interval
            if self._retry_at:
                wait = max(0.05, self._retry_at - time.monotonic())
            self._wait(self._work_wake, wait)
            self._work_wake.clear()
            if self.stop_event.is_set():
                break
            self.work_once()

    # -- one round of each -------------------------------------------------------------------

    def pass_once(self, *, force_stable: bool = False) -> None:
        """One scan, then ingest what it made ready and refresh previews (``--once``, tests)."""
        self.scan_once(force_stable=force_stable)
        self.work_once()

    def scan_once(self, *, force_stable: bool = False) -> None:
        """The scout's round: scan, say what the scan found, wake the worker."""
        assert self.intake is not None and self.engine is not None
        if self.watcher is not None:
            self.watcher.ensure_watch()
        news = self.intake.scan(self.engine.steps, force_stable=force_stable or self.settings.once)
        self._say(news)
        if not self._first_scan.is_set():
            # READY=1 follows this line (main loop): a service manager's "started" means scanned
            log.info("first scan done", ready=news.ready, observed=len(self.engine.steps))
        self._first_scan.set()
        self._keeping_up()
        self._work_wake.set()

    def work_once(self) -> None:
        """The worker's round: ingest every ready checkpoint in order, then refresh previews."""
        ingested = self._drain()
        if ingested or self._previews_dirty:
            self.refresh_previews()
        if not ingested and self.engine is not None:
            freed = self.engine.release_buffers(self.settings.buffer_idle_s)
            if freed:
                log.info("freed the buffers kept for the next ingest", mb=round(freed / 2**20))

    def _say(self, news: ScanNews) -> None:
        for path, why in news.unsupported:
            log.warning("checkpoint not readable", path=str(path), reason="unsupported", detail=why)
            self.metrics.count_error("unsupported")
        newest = self.engine.steps[-1] if self.engine and self.engine.steps else None
        for ref in news.out_of_order:
            log.warning(
                "checkpoint older than the newest ingested one; skipped",
                step=ref.step,
                path=str(ref.path),
                reason="out_of_order",
                newest=newest,
            )
            self.metrics.count_error("out_of_order")
        for ref in news.thinned:
            log.info(
                "checkpoint skipped on purpose (--every)",
                step=ref.step,
                path=str(ref.path),
                every=self.settings.engine.every,
            )
        self._missed(news.missed)

    def _missed(self, items: list[Missed]) -> None:
        """Log, count and record checkpoints relexd did not read (each step once)."""
        if not items or self.ledger is None:
            return
        for m in self.ledger.add(items):
            self.metrics.count_missed(m.reason, m.count)
            if m.reason == "rotated":
                log.warning(
                    "checkpoint missed: the trainer deleted it before relexd could read it",
                    step=m.first,
                    path=m.path,
                    reason=m.reason,
                )
            else:
                log.warning(
                    "checkpoints missed: the trainer's records say it saved them, relexd never saw them",
                    steps=m.describe(),
                    first=m.first,
                    last=m.last,
                    count=m.count,
                    save_steps=self.intake.save_interval if self.intake else None,
                    reason=m.reason,
                )

    def _keeping_up(self) -> None:
        """Backlog metric, and a warning (once) when checkpoints pile up faster than relexd reads."""
        assert self.intake is not None
        backlog = self.intake.backlog()
        self.metrics.set_backlog(backlog, self.settings.backlog_alert)
        if backlog > self.settings.backlog_alert and not self._behind:
            self._behind = True
            oldest = self.intake.oldest_waiting()
            log.warning(
                "falling behind the trainer: checkpoints are completed faster than relexd ingests them",
                waiting=backlog,
                oldest_waiting_s=round(time.time() - oldest, 1) if oldest else None,
                hint="see README 'Keeping up': --every N, --sketch-rank 1, --threads, --max-pinned",
            )
        elif backlog == 0 and self._behind:
            self._behind = False
            log.info("caught up with the trainer")

    def _drain(self) -> int:
        assert self.intake is not None
        count = 0
        while not self.stop_event.is_set():
            if self._retry_at and time.monotonic() < self._retry_at:
                break
            waiting = self.intake.next_ready()
            if waiting is None:
                break
            outcome = self.ingest_ref(waiting)
            if outcome in (Outcome.RETRY, Outcome.STOP):
                self.intake.put_back(waiting)
                break
            self.intake.finish(
                waiting, ingested=outcome is Outcome.INGESTED, failed=outcome is Outcome.SKIPPED
            )
            if outcome is Outcome.INGESTED:
                count += 1
                self._check_gaps()
            self._keeping_up()
        return count

    def _check_gaps(self) -> None:
        """After an ingest: report the steps below it that the trainer saved and relexd never saw."""
        assert self.engine is not None and self.intake is not None and self.ledger is not None
        steps = self.engine.steps
        gaps = self.ledger.check_gaps(
            steps[-1], self.intake.save_interval, steps, self.settings.engine.every, self.intake.accounted()
        )
        self._missed(gaps)

    def ingest_ref(self, waiting: Waiting) -> Outcome:
        """Ingest one checkpoint, turning every kind of failure into a logged, counted outcome."""
        engine = self.engine
        assert engine is not None
        ref = waiting.ref
        bound = log.bind(step=ref.step, path=str(ref.path), layout=ref.layout)
        try:
            report = engine.ingest(waiting.weights, ref.step, source=ref.path, should_stop=self._progress())
        except Interrupted:
            bound.info("ingestion abandoned for shutdown; the state is unchanged")
            return Outcome.STOP
        except (StateWriteError, WorkerLost) as exc:
            self._retry_at = time.monotonic() + self._retry_delay
            lost = isinstance(exc, WorkerLost)
            if lost:
                self.metrics.count_worker_lost()
            bound.error(
                "a cluster worker was lost; the generation was abandoned, previous state kept, will retry"
                if lost
                else "cannot write state; previous state kept, will retry",
                error=str(exc),
                retry_in=self._retry_delay,
            )
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX_S)
            return Outcome.RETRY
        except CheckpointError as exc:
            reason = exc.reason
            if reason != "rotated" and waiting.pin is None and being_removed(ref, waiting.signature):
                # a pin holds the checkpoint as it was complete; without one, what broke was the
                # trainer deleting it (a rotation half done leaves the directory, not the weights)
                reason = "rotated"
            return self._bad_input(bound, ref, reason, str(waiting.original(exc.path)), exc.message)
        except FileNotFoundError as exc:
            file = str(waiting.original(exc.filename)) if exc.filename else str(ref.path)
            return self._bad_input(bound, ref, "rotated", file, str(exc))
        except PermissionError as exc:
            file = str(waiting.original(exc.filename)) if exc.filename else str(ref.path)
            return self._bad_input(bound, ref, "permission", file, str(exc))
        except OSError as exc:
            file = str(waiting.original(exc.filename)) if exc.filename else str(ref.path)
            return self._bad_input(bound, ref, "io", file, str(exc))
        except Exception as exc:
            bound.exception("unexpected error while ingesting; skipped")
            return self._bad_input(bound, ref, "io", str(ref.path), repr(exc))
        self._retry_at, self._retry_delay = 0.0, RETRY_MIN_S
        lag = self._record(waiting, report)
        self._remember_checkpoint(ref.step, ref.path)
        bound.info(
            "checkpoint ingested",
            seconds=round(report.seconds, 4),
            lag_s=None if lag is None else round(lag, 3),
            bytes=report.bytes_read,
            observed=len(engine.steps),
            pinned=waiting.pin is not None,
            **({"replaced_sketch": report.replaced_sketch} if report.replaced_sketch else {}),
            **({"new_sketch": report.new_sketch} if report.new_sketch else {}),
            **({"tensors_in_flight": report.tensors_in_flight} if report.tensors_in_flight else {}),
            **(
                {"others_busy_cores": round(report.others_busy_cores, 2)}
                if report.others_busy_cores is not None
                else {}
            ),
            **{k: v for k, v in report.figures.items() if v is not None},
        )
        return Outcome.INGESTED

    def _bad_input(self, bound: Any, ref: CheckpointRef, reason: str, file: str, why: str) -> Outcome:
        if reason == "rotated":
            # not bad input: the trainer deleted it first. A miss, said like every other one.
            self._missed([Missed.one(ref.step, "rotated", ref.path)])
            return Outcome.MISSED
        self.metrics.count_error(reason)
        bound.warning("checkpoint unusable; skipped", reason=reason, file=file, detail=why)
        return Outcome.SKIPPED  # retried only if its files change

    def _record(self, waiting: Waiting, report: IngestReport) -> float | None:
        """Publish an ingest's progress figures; returns its lag (trainer completion → commit)."""
        assert self.engine is not None
        stamp = waiting.completed if waiting.completed is not None else time.time()
        lag = time.time() - waiting.completed if waiting.completed is not None else None
        self.metrics.observe_ingest(
            report.step, report.seconds, report.bytes_read, stamp, observed=len(self.engine.steps)
        )
        if lag is not None:
            self.metrics.set_lag(max(lag, 0.0))
        self.metrics.set_ingest_cores(report.tensors_in_flight, report.others_busy_cores)
        self._publish_confidence(report.snapshot.meta)
        return lag

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
                with self._preview_lock:
                    path = engine.write_preview(target.step, s.previews, should_stop=self._progress())
            except Interrupted:
                bound.info("preview abandoned for shutdown; the previous one is kept")
                return
            except (OSError, RelexdError) as exc:  # disk full; with --ray also a lost worker
                ok = False
                if isinstance(exc, WorkerLost):
                    self.metrics.count_worker_lost()
                bound.error("cannot write preview; previous one kept, will retry", error=str(exc))
                continue
            seconds = time.monotonic() - started
            self.metrics.observe_preview_written(target.label, target.step, seconds)
            bound.info("preview written", seconds=round(seconds, 4))
            self._evaluate_preview(target, path)
        if not ok:
            # keep the superseded previews until their replacements exist (disk full: the old
            # preview is still the best one there is)
            self._previews_dirty = True
            return
        with self._preview_lock:
            pruned = pv.prune(s.previews, wanted, s.preview_keep)
        for path in pruned:
            log.info("preview removed (target no longer wanted)", path=str(path), step=pv.preview_step(path))
        for label in self._known_labels - {t.label for t in wanted}:
            self.metrics.forget_target(label)
        self._known_labels = {t.label for t in wanted}
        self._previews_dirty = False

    # -- evaluations -------------------------------------------------------------------------

    def _remember_checkpoint(self, step: int, path: Path) -> None:
        """Note where checkpoint ``step`` lives; ask for the evaluations it completes."""
        self._checkpoint_paths[step] = path
        for old in sorted(self._checkpoint_paths)[:-REMEMBERED_CHECKPOINTS]:
            del self._checkpoint_paths[old]
        if self.hook is not None and self.evaluations is not None:
            for job in self.evaluations.after_ingest(step, path):
                self.hook.submit(job)

    def _refresh_number(self) -> int:
        assert self.engine is not None
        return (len(self.engine.steps) - 1) // self.settings.preview_every

    def _evaluate_preview(self, target: pv.Target, path: Path) -> None:
        engine = self.engine
        if self.hook is None or self.evaluations is None or engine is None or not engine.steps:
            return
        made_from = engine.steps[-1]
        key = EvalJob("preview", target.step, path, target.label, made_from).key
        refresh = self._refresh_number()
        if not self.evaluations.due(refresh, self.settings.eval_every):
            return
        self.evaluations.mark_evaluated(refresh)  # every target written in this refresh is evaluated
        if self.evaluations.has(key):
            return  # this very preview (rewritten after a crash) is already scored
        checkpoint = self._checkpoint_paths.get(made_from)
        last_source = engine.snapshot.meta.get("last_source")
        if checkpoint is None and last_source:
            checkpoint = Path(last_source)  # after a restart: the newest ingested checkpoint
        for job in self.evaluations.after_preview(target.label, target.step, made_from, path, checkpoint):
            self.hook.submit(job)

    def _eval_result(self, job: EvalJob, result: HookResult) -> None:
        """A hook run ended (hook thread): record it durably, count it, republish the figures."""
        if result.outcome == "shutdown" or self.evaluations is None:
            return  # stays pending: the next start runs it
        status = EVAL_STATUS.get(result.outcome, "failed")
        self.evaluations.finish(job, status, result.score, error=result.error, seconds=result.seconds)
        self.metrics.count_evaluation(job.kind, result.outcome)
        if job.kind == "preview" and result.score is not None:
            self._stamp_manifest(job, result.score)
        self._publish_evaluations()

    def _stamp_manifest(self, job: EvalJob, score: float) -> None:
        """Write the score into the preview's manifest, if that directory still holds the preview
        that was evaluated (a newer one may have replaced it meanwhile)."""
        manifest = job.path / MANIFEST
        with self._preview_lock:
            try:
                doc = json.loads(manifest.read_text(encoding="utf-8"))
                if doc.get("newest_observed_step") != job.made_from:
                    return
                doc["evaluation"] = {"score": score, "made_from": job.made_from, "evaluated": time.time()}
                write_json_atomic(manifest, doc)
            except (OSError, ValueError) as exc:
                log.info("preview manifest not stamped with its score", path=str(manifest), reason=str(exc))

    def _publish_evaluations(self) -> None:
        if self.evaluations is None:
            return
        fig = self.evaluations.figures()
        checkpoint = None
        if fig.checkpoint_step is not None and fig.checkpoint_score is not None:
            checkpoint = (fig.checkpoint_step, fig.checkpoint_score)
        self.metrics.set_eval_figures(checkpoint=checkpoint, realized=fig.realized, leads=fig.leads)
        for target, score in fig.preview_scores.items():
            self.metrics.set_eval_score(target, score)
