"""The ``--on-preview`` command: run after each published preview, off the ingest path.

The command line is split with :func:`shlex.split` and ``{path}``, ``{step}``, ``{target}`` are
substituted inside each argv item, so a path with spaces stays one argument and nothing is
interpreted by a shell (write ``sh -c '…'`` yourself if you want one). Hooks run one at a time on
a single-thread executor: an evaluation is usually heavy, and ingestion must never wait for it.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("relexd.hook")


def build_argv(template: str, *, path: Path, step: int, target: str) -> list[str]:
    """Split ``template`` like a shell would, then substitute the placeholders per item."""
    values = {"{path}": str(path), "{step}": str(step), "{target}": target}
    argv = []
    for item in shlex.split(template):
        for key, value in values.items():
            item = item.replace(key, value)
        argv.append(item)
    if not argv:
        raise ValueError("empty --on-preview command")
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
    ok: bool
    score: float | None
    returncode: int | None
    seconds: float
    error: str | None = None


class PreviewHook:
    """Runs the hook command; reports scores and failures through callbacks (the metrics)."""

    def __init__(
        self,
        template: str,
        timeout: float,
        *,
        on_score: Callable[[str, float], None],
        on_failure: Callable[[], None],
    ) -> None:
        shlex.split(template)  # fail at startup on unbalanced quotes, not at the first preview
        self.template = template
        self.timeout = timeout
        self._on_score = on_score
        self._on_failure = on_failure
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relexd-hook")
        self._pending: dict[str, Future[HookResult]] = {}
        self._lock = threading.Lock()
        self._running: subprocess.Popen[str] | None = None
        self._closed = False

    def submit(self, path: Path, step: int, target: str) -> Future[HookResult] | None:
        """Queue a run; a not-yet-started run for the same target is replaced (it is stale)."""
        with self._lock:
            if self._closed:
                return None
            self._pending = {t: f for t, f in self._pending.items() if not f.done()}
            old = self._pending.get(target)
            if old is not None:
                old.cancel()
            future = self._executor.submit(self.run, path, step, target)
            self._pending[target] = future
            return future

    def run(self, path: Path, step: int, target: str) -> HookResult:
        """Run the command once (synchronously) and report the outcome."""
        started = time.monotonic()
        bound = log.bind(step=step, path=str(path), target=target)
        try:
            argv = build_argv(self.template, path=path, step=step, target=target)
            with self._lock:
                if self._closed:
                    return HookResult(False, None, None, 0.0, "shut down")
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
                self._running = proc
            try:
                out, err = proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                return self._fail(bound, started, None, f"timed out after {self.timeout:g} s")
            finally:
                with self._lock:
                    self._running = None
        except (OSError, ValueError) as exc:
            return self._fail(bound, started, None, f"cannot run: {exc}")
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            tail = err.strip().splitlines()[-1:] if err else []
            return self._fail(bound, started, proc.returncode, f"exit status {proc.returncode} {tail}")
        score = parse_score(out)
        if score is not None:
            self._on_score(target, score)
        bound.info("preview hook finished", seconds=round(seconds, 3), score=score)
        return HookResult(True, score, proc.returncode, seconds)

    def _fail(self, bound: Any, started: float, rc: int | None, why: str) -> HookResult:
        self._on_failure()
        bound.warning("preview hook failed", reason=why)
        return HookResult(False, None, rc, time.monotonic() - started, why)

    def close(self, timeout: float = 3.0) -> None:
        """Cancel queued runs, stop a running command (SIGKILL after SIGTERM), join the thread."""
        with self._lock:
            self._closed = True
            for future in self._pending.values():
                future.cancel()
            proc = self._running
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._executor.shutdown(wait=True, cancel_futures=True)
