"""The HTTP endpoint, exercised on a real server bound to a free port."""

from __future__ import annotations

import gzip
import http.client
from collections.abc import Iterator

import pytest

from relexd.telemetry import DEFAULT_LISTEN, RelexdMetrics, make_app, parse_listen, start_http


class Ready:
    """A readiness callback the test can flip."""

    def __init__(self) -> None:
        self.state: bool | tuple[bool, str] = (False, "initial scan running")

    def __call__(self) -> bool | tuple[bool, str]:
        return self.state


@pytest.fixture
def served() -> Iterator[tuple[int, RelexdMetrics, Ready]]:
    metrics = RelexdMetrics()
    metrics.observe_ingest(42, 1.0, 10, 1.0)
    ready = Ready()
    server = start_http("127.0.0.1:0", make_app(metrics.registry, readiness=ready))
    try:
        assert server.port != 0
        yield server.port, metrics, ready
    finally:
        server.shutdown()


def get(
    port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_metrics_prometheus_text(served: tuple[int, RelexdMetrics, Ready]) -> None:
    port, _, _ = served
    status, headers, body = get(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert b"relexd_last_checkpoint_step 42.0" in body
    assert b"# HELP relexd_forecast_skill" in body


def test_metrics_openmetrics_negotiation_and_gzip(served: tuple[int, RelexdMetrics, Ready]) -> None:
    port, _, _ = served
    status, headers, body = get(
        port,
        "/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "gzip"},
    )
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert headers.get("content-encoding") == "gzip"
    text = gzip.decompress(body)
    assert text.rstrip().endswith(b"# EOF")


def test_healthz(served: tuple[int, RelexdMetrics, Ready]) -> None:
    port, _, _ = served
    assert get(port, "/healthz")[::2] == (200, b"ok\n")
    status, _, body = get(port, "/healthz", method="HEAD")
    assert (status, body) == (200, b"")
    assert get(port, "/healthz", method="POST")[0] == 405


def test_readyz_follows_the_callback(served: tuple[int, RelexdMetrics, Ready]) -> None:
    port, _, ready = served
    status, _, body = get(port, "/readyz")
    assert status == 503
    assert b"initial scan running" in body
    ready.state = True
    assert get(port, "/readyz")[::2] == (200, b"ready\n")
    ready.state = False
    assert get(port, "/readyz")[::2] == (503, b"not ready\n")


def test_readyz_callback_raising_is_503_not_a_crash() -> None:
    def broken() -> bool:
        raise RuntimeError("watcher gone")

    with start_http("127.0.0.1:0", make_app(RelexdMetrics().registry, broken)) as server:
        status, _, body = get(server.port, "/readyz")
        assert status == 503
        assert b"watcher gone" in body
        assert get(server.port, "/healthz")[0] == 200


@pytest.mark.parametrize("path", ["/", "/metricsx", "/readyz/", "/favicon.ico"])
def test_unknown_paths_are_404(served: tuple[int, RelexdMetrics, Ready], path: str) -> None:
    assert get(served[0], path)[0] == 404


def test_shutdown_frees_the_port() -> None:
    server = start_http("127.0.0.1:0", make_app(RelexdMetrics().registry))
    port = server.port
    server.shutdown()
    server.shutdown()  # idempotent
    with pytest.raises(OSError):
        get(port, "/healthz")


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:10397") == ("127.0.0.1", 10397)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":8000") == ("0.0.0.0", 8000)
    assert parse_listen(DEFAULT_LISTEN)[0] == "127.0.0.1"
    for bad in ("10397", "host:", "host:99999", "::1:80"):
        with pytest.raises(ValueError):
            parse_listen(bad)
