"""The gateway's Prometheus metrics (``GET /metrics``): requests, latency, tokens, failovers,
client disconnects, and each backend's health and load.

NOTE: with several granian workers each worker counts its own requests, and a scrape reaches
one of them; run one worker per gateway process (and more processes) when exact counts matter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from helixflow.gateway.backends import Registry

__all__ = ["GatewayMetrics"]

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
            60, 120)  # fmt: skip


class GatewayMetrics:
    """One registry per app instance (tests run several in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self.requests = Counter("helixflow_gateway_requests_total", "HTTP requests answered",
                                ["route", "status"], registry=self.registry)  # fmt: skip
        self.latency = Histogram("helixflow_gateway_request_seconds",
                                 "Time to the end of the response", ["route"],
                                 buckets=_BUCKETS, registry=self.registry)  # fmt: skip
        self.token_counter = Counter("helixflow_gateway_tokens_total", "Tokens served",
                                     ["model", "kind"], registry=self.registry)  # fmt: skip
        self.failovers = Counter("helixflow_gateway_failovers_total",
                                 "Requests moved to another backend before their first token",
                                 registry=self.registry)  # fmt: skip
        self.disconnects = Counter("helixflow_gateway_client_disconnects_total",
                                   "Clients gone before the end of their response",
                                   registry=self.registry)  # fmt: skip
        self.backend_healthy = Gauge("helixflow_gateway_backend_healthy",
                                     "1 if the backend takes requests", ["backend"],
                                     registry=self.registry)  # fmt: skip
        self.backend_in_flight = Gauge("helixflow_gateway_backend_in_flight",
                                       "Requests of this gateway running on the backend",
                                       ["backend"], registry=self.registry)  # fmt: skip

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        children = self._children.get(key)
        if children is None:  # label lookups cost more than the increments: cache them
            children = self._children[key] = (self.requests.labels(route, str(status)),
                                              self.latency.labels(route))  # fmt: skip
        children[0].inc()
        children[1].observe(seconds)

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        if prompt:
            self.token_counter.labels(model, "prompt").inc(prompt)
        if completion:
            self.token_counter.labels(model, "completion").inc(completion)

    def render(self, backends: Registry) -> tuple[bytes, str]:
        for backend in backends.backends:
            self.backend_healthy.labels(backend.name).set(1.0 if backend.healthy() else 0.0)
            self.backend_in_flight.labels(backend.name).set(backend.in_flight)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
