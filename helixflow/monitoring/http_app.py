"""The monitor's HTTP API (ASGI), served on :8084.

    GET /                 the live status page
    GET /api/status       what the page shows (JSON)
    GET /health           aggregated health: 200 {"status": "ok"} when every service is up,
                          503 {"status": "degraded"} otherwise; per-service state either way
    GET /healthz          the monitor itself answers (200)
    GET /metrics          the monitor's own Prometheus metrics (service up, probe time)
    GET /prometheus.yml   a Prometheus scrape configuration for every service
    GET /grafana.json     a Grafana dashboard of their metrics
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from helixflow.asgi import accept_lifespan
from helixflow.monitoring.dashboards import grafana_dashboard, prometheus_config
from helixflow.monitoring.monitor import Monitor
from helixflow.monitoring.page import status_page

__all__ = ["MonitorHttpApp"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_JSON = (b"content-type", b"application/json")


def _csp(page: bytes) -> bytes:
    """A Content-Security-Policy allowing exactly the page's own inline script and style."""
    def digest(tag: str) -> str:
        match = re.search(rf"<{tag}>(.*?)</{tag}>".encode(), page, re.S)
        assert match is not None, tag
        return "'sha256-" + base64.b64encode(hashlib.sha256(match.group(1)).digest()).decode() + "'"

    return (f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
            "frame-ancestors 'none'").encode()  # fmt: skip


class _MonitorCollector(Collector):
    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("helixflow_monitor_service_up",
                               "1 while the service's health probe succeeds", labels=["service"])
        probe = GaugeMetricFamily("helixflow_monitor_probe_seconds",
                                  "Round trip of the last health probe", labels=["service"])
        for s in self.monitor.services.values():
            up.add_metric([s.name], 1.0 if s.state == "up" else 0.0)
            probe.add_metric([s.name], s.probe_ms / 1000)
        polls = CounterMetricFamily("helixflow_monitor_polls", "Polling rounds done")
        polls.add_metric([], self.monitor.polls)
        yield from (up, probe, polls)


class MonitorHttpApp:
    """ASGI application over one `Monitor`."""

    def __init__(self, monitor: Monitor, *, ca_file: str | None = None,
                 self_url: str | None = None) -> None:  # fmt: skip
        self.monitor = monitor
        self.ca_file = ca_file
        self.self_url = self_url
        self.page = status_page(monitor.interval_s)
        self.page_headers: Headers = [
            (b"content-type", b"text/html; charset=utf-8"), (b"cache-control", b"no-store"),
            (b"content-security-policy", _csp(self.page)),
            (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
        self.registry = CollectorRegistry()
        self.registry.register(_MonitorCollector(monitor))
        self.routes: dict[str, Callable[[], tuple[int, bytes, Headers]]] = {
            "/": lambda: (200, self.page, self.page_headers),
            "/api/status": lambda: self._json(200, monitor.page_data()),
            "/health": self._health,
            "/healthz": lambda: self._json(200, {"status": "ok", "polls": monitor.polls}),
            "/metrics": lambda: (200, generate_latest(self.registry),
                                 [(b"content-type", CONTENT_TYPE_LATEST.encode())]),
            "/prometheus.yml": self._prometheus_yml,
            "/grafana.json": lambda: self._json(200, grafana_dashboard()),
        }  # fmt: skip

    @staticmethod
    def _json(status: int, body: Any) -> tuple[int, bytes, Headers]:
        return status, msgspec.json.encode(body), [_JSON, (b"cache-control", b"no-store")]

    def _health(self) -> tuple[int, bytes, Headers]:
        report = self.monitor.report()
        return self._json(200 if report["status"] == "ok" else 503, report)

    def _prometheus_yml(self) -> tuple[int, bytes, Headers]:
        text = prometheus_config(self.monitor.targets, ca_file=self.ca_file,
                                 monitor=f"{self.self_url}/metrics" if self.self_url else None)
        return 200, text.encode(), [(b"content-type", b"text/yaml; charset=utf-8")]

    def _answer(self, method: str, path: str) -> tuple[int, bytes, Headers]:
        route = self.routes.get(path)
        if route is None:
            return self._json(404, {"error": {"message": f"no route {path}",
                                              "type": "not_found_error", "param": None,
                                              "code": "not_found"}})  # fmt: skip
        if method not in ("GET", "HEAD"):
            status, body, headers = self._json(405, {"error": {
                "message": f"{method} is not allowed here; use GET",
                "type": "invalid_request_error", "param": None, "code": "method_not_allowed"}})
            return status, body, [*headers, (b"allow", b"GET, HEAD")]
        return route()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await accept_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method = scope["method"]
        status, body, headers = self._answer(method, scope["path"])
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
