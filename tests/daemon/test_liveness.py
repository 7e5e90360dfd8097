"""A hung loop (alive, but making no progress) stops the systemd watchdog pings; a busy or idle
one does not (issue 14). The real-systemd restart is in tests/deploy/test_systemd_nspawn.py."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from relexd.daemon.config import WatchSettings
from relexd.daemon.liveness import Liveness
from relexd.daemon.service import WatchService
from relexd.state.store import read_snapshot
from tests.daemon.trainer_sim import hf_save, make_base

STALL_S = 1.0  # WATCHDOG_USEC below: the stall limit is the watchdog's timeout


def test_liveness_reports_loops_silent_for_longer_than_the_limit() -> None:
    now = [0.0]
    beats = Liveness(clock=lambda: now[0])
    beats.beat("scout")
    beats.beat("worker")
    now[0] = 5.0
    beats.beat("worker")
    assert beats.stalled(4.0) == {"scout": 5.0}
    now[0] = 9.5
    assert beats.stalled(4.0) == {"scout": 9.5, "worker": 4.5}
    beats.forget("scout")
    assert beats.stalled(4.0) == {"worker": 4.5}
    assert beats.stalled(10.0) == {}


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", str(int(STALL_S * 1e6)))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield sock
    finally:
        sock.close()


def _pings(sock: socket.socket, seconds: float) -> list[float]:
    """Monotonic arrival times of the WATCHDOG=1 datagrams during the next ``seconds``."""
    times: list[float] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            break
        if "WATCHDOG=1" in data.splitlines():
            times.append(time.monotonic())
    return times


def _until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class _Service:
    def __init__(self, tmp_path: Path) -> None:
        self.planted, base = make_base(tmp_path)
        self.run, self.state = tmp_path / "run", tmp_path / "state"
        self.run.mkdir()
        # reconcile far beyond the stall limit: an idle loop must beat on its own, not because
        # the reconcile job happens to wake it
        settings = WatchSettings(
            run_dir=self.run, base=base, state_dir=self.state, debounce=0.0, reconcile_interval=600
        )
        self.svc = WatchService(settings)
        self.svc.open()
        self.thread = threading.Thread(target=self.svc.run, daemon=True)

    def patch_ingest(self, replacement: Callable[..., Any]) -> None:
        assert self.svc.engine is not None
        real = self.svc.engine.ingest
        self.svc.engine.ingest = lambda *a, **kw: replacement(real, *a, **kw)  # type: ignore[method-assign]

    def steps(self) -> list[int]:
        return read_snapshot(self.state, load_small=False).meta.get("steps", [])

    def stop(self) -> None:
        self.svc.stop_event.set()
        self.thread.join(15)


def test_a_hung_worker_stops_the_watchdog_pings_and_idle_or_busy_ones_do_not(
    tmp_path: Path, notify: socket.socket
) -> None:
    service = _Service(tmp_path)
    entered, release = threading.Event(), threading.Event()

    def slow_but_progressing(real: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        # three stall limits of work that polls the stop flag the way the tensor pool does
        deadline = time.monotonic() + 3 * STALL_S
        while time.monotonic() < deadline:
            assert not kw["should_stop"]()
            time.sleep(0.05)
        return real(*args, **kw)

    def hung(real: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        entered.set()  # like a read of a hung file system: no poll until it returns
        release.wait(30)
        return real(*args, **kw)

    with structlog.testing.capture_logs() as logs:
        service.thread.start()
        try:
            _until(service.svc._first_scan.is_set)
            idle = _pings(notify, 4 * STALL_S)
            assert len(idle) >= 6, f"an idle daemon must keep pinging: {len(idle)} pings in 4 s"

            service.patch_ingest(slow_but_progressing)
            hf_save(service.run, 10, service.planted.at(10))
            busy = _pings(notify, 3 * STALL_S)
            _until(lambda: service.steps() == [10])
            assert len(busy) >= 4, f"a busy, progressing worker must keep pinging: {len(busy)}"

            service.patch_ingest(hung)
            hf_save(service.run, 20, service.planted.at(20))
            _until(entered.is_set)
            hang_started = time.monotonic()
            during = _pings(notify, 3 * STALL_S)
            assert during, "pings stopped before the stall limit"
            assert max(during) - hang_started < STALL_S + 0.6, "pings went on after the stall limit"
            release.set()
            after = _pings(notify, 2 * STALL_S)
            _until(lambda: service.steps() == [10, 20])
            assert after, "pings did not resume once the worker progressed again"
        finally:
            release.set()
            service.stop()
    stalls = [e for e in logs if e["event"].startswith("thread made no progress")]
    assert [e["thread"] for e in stalls] == ["relexd-worker"]
    assert any(e["event"] == "thread progressing again" and e["thread"] == "relexd-worker" for e in logs)
