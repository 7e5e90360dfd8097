"""The HTTP endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` on a background thread.

A WSGI app on the standard library's ``wsgiref`` server (threaded, one thread per request): no
extra dependency, and the load is a scrape every few seconds. ``/metrics`` is delegated to
:func:`prometheus_client.make_wsgi_app`, which does the content negotiation (Prometheus text vs.
OpenMetrics via the ``Accept`` header), gzip and ``?name[]=`` filtering exactly like every other
Python exporter.

* ``GET /healthz`` → 200 ``ok`` whenever the process can answer (liveness: restart me if not).
* ``GET /readyz`` → 200 ``ready`` when the readiness callback says so (watcher running, initial
  scan done), else 503 with the reason as body (readiness: do not trust my numbers yet).
* anything else → 404; non-GET/HEAD on the health paths → 405.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from relexd._closeable import Closeable

__all__ = ["HttpServer", "ReadinessCheck", "make_app", "parse_listen", "start_http"]

log = logging.getLogger(__name__)

#: Returns True when ready, False (reason "not ready") or ``(False, "reason")`` otherwise.
ReadinessCheck = Callable[[], "bool | tuple[bool, str]"]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_TEXT = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]


def _plain(start_response: StartResponse, status: str, body: str, head: bool) -> list[bytes]:
    data = body.encode()
    start_response(status, [*_TEXT, ("Content-Length", str(len(data)))])
    return [] if head else [data]


def _readiness(check: ReadinessCheck | None) -> tuple[bool, str]:
    if check is None:
        return True, "ready"
    try:
        result = check()
    except Exception as exc:  # a broken check must answer 503, not kill the request thread
        log.exception("readiness check raised")
        return False, f"readiness check failed: {type(exc).__name__}: {exc}"
    if isinstance(result, tuple):
        ok, reason = result
        return bool(ok), reason if reason else ("ready" if ok else "not ready")
    return bool(result), "ready" if result else "not ready"


def make_app(registry: CollectorRegistry, readiness: ReadinessCheck | None = None) -> WSGIApp:
    """Build the WSGI app serving ``registry`` and the health endpoints.

    Args:
        registry: usually ``RelexdMetrics(...).registry``.
        readiness: called on every ``/readyz``; must be cheap and thread-safe (it runs on the
            request thread). None means always ready.
    """
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path in ("/healthz", "/readyz"):
            if method not in ("GET", "HEAD"):
                start_response("405 Method Not Allowed", [*_TEXT, ("Allow", "GET, HEAD")])
                return [b"method not allowed\n"]
            head = method == "HEAD"
            if path == "/healthz":
                return _plain(start_response, "200 OK", "ok\n", head)
            ok, reason = _readiness(readiness)
            status = "200 OK" if ok else "503 Service Unavailable"
            return _plain(start_response, status, reason.rstrip("\n") + "\n", head)
        return _plain(start_response, "404 Not Found", "not found\n", method == "HEAD")

    return app


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``"HOST:PORT"`` (``"[::1]:PORT"`` for IPv6) into host and port.

    An empty host (``":10397"``) means all IPv4 interfaces, like most exporters' ``--web.listen``.
    """
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"listen address must be HOST:PORT, got {listen!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"IPv6 addresses need brackets: [{host}]:{port}")
    return host or "0.0.0.0", port


class _SilentHandler(WSGIRequestHandler):
    """Request handler that logs at debug level instead of writing every scrape to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s " + format, self.address_string(), *args)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One thread per request, so a slow readiness check cannot block scrapes."""

    # Fire-and-forget request threads: nothing to join at shutdown, no list of finished threads.
    daemon_threads = True
    block_on_close = False
    # Rebind right after a restart instead of failing on the old process's TIME_WAIT sockets.
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("http request from %s failed", client_address, exc_info=True)


class HttpServer(Closeable):
    """A running endpoint; ``shutdown()`` (or ``close()``, or leaving ``with``) stops it and joins its
    thread."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        address = server.server_address
        self.host: str = str(address[0])
        self.port: int = int(address[1])

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:10397`` (for logs and tests)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop serving, close the socket and wait for the serving thread; idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout)
        self._server.server_close()

    def close(self) -> None:
        self.shutdown()


def start_http(listen: str, app: WSGIApp) -> HttpServer:
    """Serve ``app`` on ``listen`` (``"HOST:PORT"``; port 0 picks a free one) in a daemon thread.

    Raises:
        OSError: the address cannot be bound (in use, not local) — fail fast at startup.
    """
    host, port = parse_listen(listen)
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class _Server(_ThreadingServer):
        address_family = family

    server = make_server(host, port, app, server_class=_Server, handler_class=_SilentHandler)
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.5},
        name="relexd-http",
        daemon=True,
    )
    thread.start()
    handle = HttpServer(server, thread)
    log.info("metrics endpoint listening on %s", handle.url)
    return handle
