"""sd_notify over a real AF_UNIX datagram socket, and the health-gated watchdog."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relexd.telemetry import sdnotify


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_no_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    assert sdnotify.watchdog_ping() is False


def test_ready_watchdog_stopping_status(notify_socket: socket.socket) -> None:
    assert sdnotify.ready()
    assert recv(notify_socket) == "READY=1"
    assert sdnotify.watchdog_ping()
    assert recv(notify_socket) == "WATCHDOG=1"
    assert sdnotify.status("step 100\nskill +0.2")
    assert recv(notify_socket) == "STATUS=step 100 skill +0.2"
    assert sdnotify.stopping()
    assert recv(notify_socket) == "STOPPING=1"


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"relexd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready("loaded")
        assert recv(sock) == "READY=1\nSTATUS=loaded"


def test_send_failure_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "missing.sock"))
    assert sdnotify.ready() is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "180000000")
    assert sdnotify.watchdog_interval() == 180.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 180.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "garbage")
    assert sdnotify.watchdog_interval() is None


def test_watchdog_tick_pings_at_half_interval_only_while_healthy() -> None:
    now = [0.0]
    healthy = [True]
    pings: list[float] = []

    def ping() -> bool:
        pings.append(now[0])
        return True

    dog = sdnotify.Watchdog(lambda: healthy[0], interval=10.0, ping=ping, clock=lambda: now[0])
    assert dog.tick()  # first tick pings at once
    now[0] = 4.0
    assert not dog.tick()  # < half interval
    now[0] = 5.0
    assert dog.tick()
    healthy[0] = False
    now[0] = 10.0
    assert not dog.tick()
    now[0] = 20.0
    assert not dog.tick()
    healthy[0] = True
    assert dog.tick()
    assert pings == [0.0, 5.0, 20.0]


def test_watchdog_health_exception_counts_as_unhealthy() -> None:
    def boom() -> bool:
        raise RuntimeError("worker died")

    dog = sdnotify.Watchdog(boom, interval=1.0, ping=lambda: True)
    assert dog.tick() is False


def test_watchdog_disabled_without_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    dog = sdnotify.Watchdog(lambda: True)
    assert not dog.enabled
    assert dog.tick() is False
    assert dog.start() is False


def test_watchdog_thread_stops_pinging_when_unhealthy(notify_socket: socket.socket) -> None:
    healthy = [True]
    dog = sdnotify.Watchdog(lambda: healthy[0], interval=0.2)
    assert dog.start()
    try:
        assert recv(notify_socket) == "WATCHDOG=1"
        assert recv(notify_socket) == "WATCHDOG=1"  # keeps pinging while healthy
        healthy[0] = False
        time.sleep(0.3)  # let any ping already in flight arrive
        notify_socket.settimeout(0.05)
        while True:  # drain
            try:
                notify_socket.recv(4096)
            except TimeoutError:
                break
        notify_socket.settimeout(0.6)  # > 5 ping periods
        with pytest.raises(TimeoutError):
            notify_socket.recv(4096)
    finally:
        dog.stop()
