"""The ``--eval`` command: scores previews and checkpoints, off the ingest path.

The command line is split with :func:`shlex.split` and ``{path}``, ``{step}``, ``{target}``,
``{kind}`` (``preview`` or ``checkpoint``) and ``{made_from}`` are substituted inside each argv
item, so a path with spaces stays one argument and nothing is interpreted by a shell (write
``sh -c '…'`` yourself if you want one). The command prints a JSON object with a numeric
``score`` (higher is better) as its last line; anything else is a failed run, counted. Runs go
one at a time on a single-thread executor, in the order queued: an evaluation is usually heavy,
and ingestion must never wait for it. Which jobs are queued, and what their results mean, is
:mod:`relexd.daemon.evaluations`.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from relexd.daemon.evaluations import EvalJob

log = structlog.get_logger("relexd.hook")


def build_argv(
    template: str, *, path: Path, step: int, target: str, kind: str = "preview", made_from: int | None = None
) -> list[str]:
    """Split ``template`` like a shell would, then substitute the placeholders per item."""
    values = {
        "{path}": str(path),
        "{step}": str(step),
        "{target}": target,
        "{kind}": kind,
        "{made_from}": str(step if made_from is None else made_from),
    }
    argv = []
    for item in shlex.split(template):
        for key, value in values.items():
            item = item.replace(key, value)
        argv.append(item)
    if not argv:
        raise ValueError("empty --eval command")
    return argv


def parse_score(stdout: str) -> float | None:
    """The numeric ``score`` of the last non-empty stdout line if it is a JSON object, else None."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        doc = json.loads(lines[-1])
    except ValueError:
        return None
    score = doc.get("score") if isinstance(doc, dict) else None
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        return None
    return float(score)


@dataclass(frozen=True)
class HookResult:
    """``outcome``: ``ok``, or why not — ``timeout``, ``exit``, ``no_score`` (no JSON score on the
    last line), ``cannot_run``, ``gone`` (the weights were deleted before the run), ``superseded``
    (a newer preview of the target replaced it in the queue), ``shutdown``."""

    outcome: str
    score: float | None
    returncode: int | None
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


class EvalHook:
    """Runs the evaluation command for :class:`~relexd.daemon.evaluations.EvalJob` s, one at a
    time, and hands every outcome to ``on_result(job, result)`` (the ledger and the metrics)."""

    def __init__(
        self, template: str, timeout: float, *, on_result: Callable[[EvalJob, HookResult], None]
    ) -> None:
        shlex.split(template)  # fail at startup on unbalanced quotes, not at the first preview
        self.template = template
        self.timeout = timeout
        self._on_result = on_result
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relexd-hook")
        self._queued: dict[str, tuple[EvalJob, Future[HookResult]]] = {}  # preview target → newest
        self._futures: list[Future[HookResult]] = []
        self._lock = threading.Lock()
        self._running: subprocess.Popen[str] | None = None
        self._closed = False

    def submit(self, job: EvalJob) -> Future[HookResult] | None:
        """Queue a run. A preview job replaces a not-yet-started one of the same target (stale):
        that one is reported as ``superseded``."""
        with self._lock:
            if self._closed:
                return None
            if job.kind == "preview":
                old = self._queued.get(job.target)
                if old is not None and old[1].cancel():
                    self._on_result(
                        old[0], HookResult("superseded", None, None, 0.0, "a newer preview replaced it")
                    )
            future = self._executor.submit(self.run, job)
            self._futures = [f for f in self._futures if not f.done()] + [future]
            if job.kind == "preview":
                self._queued[job.target] = (job, future)
            return future

    def wait_idle(self, stop: threading.Event) -> None:
        """Block until every queued run has ended, or ``stop`` is set (``--once``)."""
        while not stop.is_set():
            with self._lock:
                futures = [f for f in self._futures if not f.done()]
            if not futures:
                return
            wait(futures, timeout=0.2)

    def run(self, job: EvalJob) -> HookResult:
        """Run the command once (synchronously) for ``job`` and report the outcome."""
        result = self._run(job)
        self._on_result(job, result)
        return result

    def _run(self, job: EvalJob) -> HookResult:
        started = time.monotonic()
        bound = log.bind(
            kind=job.kind, step=job.step, path=str(job.path), target=job.target, made_from=job.made_from
        )
        if not job.path.exists():
            bound.warning("evaluation skipped: the weights were deleted before it ran", reason="gone")
            return HookResult("gone", None, None, 0.0, f"{job.path} no longer exists")
        try:
            argv = build_argv(
                self.template,
                path=job.path,
                step=job.step,
                target=job.target,
                kind=job.kind,
                made_from=job.made_from,
            )
            with self._lock:
                if self._closed:
                    return HookResult("shutdown", None, None, 0.0, "shut down")
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
                self._running = proc
            try:
                out, err = proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                return self._fail(bound, started, "timeout", None, f"timed out after {self.timeout:g} s")
            finally:
                with self._lock:
                    self._running = None
        except (OSError, ValueError) as exc:
            return self._fail(bound, started, "cannot_run", None, f"cannot run: {exc}")
        seconds = time.monotonic() - started
        if self._closed and proc.returncode in (-15, -9):
            return HookResult("shutdown", None, proc.returncode, seconds, "stopped for shutdown")
        if proc.returncode != 0:
            tail = err.strip().splitlines()[-1:] if err else []
            return self._fail(
                bound, started, "exit", proc.returncode, f"exit status {proc.returncode} {tail}"
            )
        score = parse_score(out)
        if score is None:
            last = [line for line in out.splitlines() if line.strip()][-1:]
            why = f'last stdout line is not a JSON object with a numeric "score": {last}'
            return self._fail(bound, started, "no_score", proc.returncode, why)
        bound.info("evaluation finished", seconds=round(seconds, 3), score=score)
        return HookResult("ok", score, proc.returncode, seconds)

    def _fail(self, bound: Any, started: float, outcome: str, rc: int | None, why: str) -> HookResult:
        bound.warning("evaluation hook failed", reason=outcome, detail=why)
        return HookResult(outcome, None, rc, time.monotonic() - started, why)

    def close(self, timeout: float = 3.0) -> None:
        """Cancel queued runs, stop a running command (SIGKILL after SIGTERM), join the thread.
        Cancelled and stopped jobs stay *pending* in the ledger: the next start runs them."""
        with self._lock:
            self._closed = True
            proc = self._running
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._executor.shutdown(wait=True, cancel_futures=True)
