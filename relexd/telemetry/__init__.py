"""Telemetry of relexd: Prometheus metrics, the HTTP endpoint and the systemd notify protocol.

The daemon wires it up like this::

    metrics = RelexdMetrics(per_tensor=opts.per_tensor_metrics)
    server = start_http(opts.listen, make_app(metrics.registry, readiness=watcher.readiness))
    sdnotify.ready()
    watchdog = sdnotify.Watchdog(healthy=workers_alive)
    ...
    sdnotify.stopping(); server.shutdown()
"""

from __future__ import annotations

from relexd.telemetry import sdnotify
from relexd.telemetry.http import HttpServer, make_app, parse_listen, start_http
from relexd.telemetry.metrics import ForecastFigures, ForecastLike, RelexdMetrics

#: Default address of the metrics/health endpoint.
#:
#: Loopback by default: the endpoint has no authentication, and most setups scrape through a
#: node-local agent or an explicit ``--listen 0.0.0.0:PORT``.
#:
#: Port 10397: the Prometheus "default port allocations" wiki range 9100–9999 is fully allocated
#: (every port there belongs to some registered exporter; 9464 e.g. is the OpenTelemetry
#: Prometheus exporter's), so any pick inside it collides with something. 10397 lies outside it,
#: below the Linux ephemeral range (32768–60999), and clear of the usual ML tooling ports
#: (TensorBoard 6006, Jupyter 8888, Ray 8265/10001, MLflow 5000, vLLM/TGI 8000/8080).
DEFAULT_LISTEN = "127.0.0.1:10397"

__all__ = [
    "DEFAULT_LISTEN",
    "ForecastFigures",
    "ForecastLike",
    "HttpServer",
    "RelexdMetrics",
    "make_app",
    "parse_listen",
    "sdnotify",
    "start_http",
]
