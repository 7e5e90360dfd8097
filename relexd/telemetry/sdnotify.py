"""The systemd notify protocol (sd_notify(3)) by hand, plus a health-gated watchdog.

Why by hand: the protocol is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named in
``$NOTIFY_SOCKET``; a dependency (python-systemd needs libsystemd headers to build) is not worth
it. Outside systemd (``$NOTIFY_SOCKET`` unset) every call is a no-op returning False, so the daemon
calls these unconditionally.

With ``Type=notify`` the unit is "started" only after :func:`ready`; with ``WatchdogSec=`` systemd
kills and (``Restart=on-failure``) restarts the service when no ``WATCHDOG=1`` arrives in time.
:class:`Watchdog` pings only while the daemon's health callback says its worker threads are alive,
so a hung ingest thread turns into a restart instead of a silently frozen daemon.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

__all__ = [
    "Watchdog",
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog_interval",
    "watchdog_ping",
]

log = logging.getLogger(__name__)


def _socket_address(raw: str) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as a connectable address; ``@name`` is Linux's abstract namespace."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    # vsock:… addresses (VMs) and anything else are not supported here.
    return None


def notify(state: str) -> bool:
    """Send ``state`` (newline-separated ``KEY=VALUE`` assignments) to the service manager.

    Returns:
        True when the datagram was sent; False when not running under systemd (``NOTIFY_SOCKET``
        unset), the address is unsupported, or sending failed (logged — a lost ``READY=1`` means
        systemd will time the start out, which the operator must be able to trace).
    """
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return False
    address = _socket_address(raw)
    if address is None:
        log.warning("unsupported NOTIFY_SOCKET address %r; not notifying", raw)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            # never block the main loop on a receiver that does not read: a full queue drops the
            # datagram (logged below) instead of freezing the daemon and its signal handling
            sock.send(state.encode(), socket.MSG_DONTWAIT)
    except OSError as exc:
        log.warning("sd_notify(%r) to %r failed: %s", state, raw, exc)
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """Tell systemd start-up is complete (``READY=1``): endpoint bound, state loaded."""
    return notify("READY=1" if status_text is None else f"READY=1\nSTATUS={status_text}")


def reloading() -> bool:
    """Tell systemd a configuration reload started (``RELOADING=1``); send :func:`ready` after."""
    return notify("RELOADING=1")


def stopping() -> bool:
    """Tell systemd the daemon is shutting down on purpose (``STOPPING=1``)."""
    return notify("STOPPING=1")


def watchdog_ping() -> bool:
    """Reset the systemd watchdog timer (``WATCHDOG=1``)."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """Set the one-line status shown by ``systemctl status`` (e.g. ``step 1200, skill +0.21``)."""
    return notify(f"STATUS={' '.join(text.splitlines())}")


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds if systemd expects pings from *this* process, else None.

    Mirrors sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` gives the timeout; ``$WATCHDOG_PID``, when
    set, must be our pid (a child that inherited the environment must not ping).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring invalid WATCHDOG_USEC=%r", usec)
        return None
    return value / 1e6 if value > 0 else None


class Watchdog:
    """Pings the systemd watchdog at half its interval, but only while ``healthy()`` is True.

    Two ways to use it:

    * call :meth:`tick` from the daemon's main loop (proves the main loop itself is alive and
      checks the workers; the loop must wake up at least every ``interval / 2``), or
    * :meth:`start` a background thread that calls :meth:`tick` (when the main thread blocks).

    Args:
        healthy: returns True while the daemon works (e.g. all worker threads alive and not stuck);
            an exception counts as unhealthy.
        interval: watchdog timeout in seconds; default :func:`watchdog_interval`. None disables
            pinging (not under a watchdog).
        ping: sends one ping; default :func:`watchdog_ping` (injectable for tests).
        clock: monotonic clock (injectable for tests).
    """

    def __init__(
        self,
        healthy: Callable[[], bool],
        interval: float | None = None,
        *,
        ping: Callable[[], bool] = watchdog_ping,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = watchdog_interval() if interval is None else interval
        self._healthy = healthy
        self._ping = ping
        self._clock = clock
        self._last_ping: float | None = None
        self._was_healthy = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        """Whether systemd expects watchdog pings."""
        return self.interval is not None and self.interval > 0

    @property
    def period(self) -> float | None:
        """Seconds between pings: half the interval, as sd_watchdog_enabled(3) recommends."""
        return self.interval / 2 if self.enabled and self.interval is not None else None

    def _is_healthy(self) -> bool:
        try:
            ok = bool(self._healthy())
        except Exception:
            log.exception("watchdog health check raised; treating as unhealthy")
            ok = False
        if ok != self._was_healthy:
            if ok:
                log.info("daemon healthy again; resuming watchdog pings")
            else:
                log.error("daemon unhealthy; withholding watchdog pings so systemd restarts it")
            self._was_healthy = ok
        return ok

    def tick(self) -> bool:
        """Ping if healthy and half the interval has passed since the last ping.

        Returns:
            True when a ping was sent by this call.
        """
        period = self.period
        if period is None:
            return False
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < period:
            return False
        if not self._is_healthy():
            return False
        sent = self._ping()
        if sent:
            self._last_ping = now
        return sent

    def start(self) -> bool:
        """Run :meth:`tick` on a daemon thread; False (nothing started) when not enabled."""
        period = self.period
        if period is None or self._thread is not None:
            return False
        # Check a few times per period so a ping never arrives late by more than a fraction.
        wait = min(period / 4, 1.0)

        def loop() -> None:
            while not self._stop.is_set():
                self.tick()
                self._stop.wait(wait)

        self._thread = threading.Thread(target=loop, name="relexd-watchdog", daemon=True)
        self._thread.start()
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the background thread (if any)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
