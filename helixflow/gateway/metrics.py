"""The gateway's Prometheus metrics (``GET /metrics``): requests, latency, tokens, failovers,
client disconnects, rate-limit and authentication refusals, time to first token, and each
backend's health and load.

Label values are fixed sets or configured names, never client text: ``limit`` is one of
`RATE_LIMITS`, ``reason`` one of `AUTH_FAILURE_REASONS`, ``model`` a model id of the registry.

NOTE: with several granian workers each worker counts its own requests, and a scrape reaches
one of them; run one worker per gateway process (and more processes) when exact counts matter.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from helixflow.errors import (
    AuthenticationError,
    HelixFlowError,
    OverloadedError,
    PermissionDeniedError,
    RateLimitError,
)

if TYPE_CHECKING:
    from helixflow.gateway.backends import Registry

__all__ = [
    "AUTH_FAILURE_REASONS",
    "RATE_LIMITS",
    "GatewayMetrics",
    "auth_failure_reason",
    "rate_limit_kind",
]

log = logging.getLogger("helixflow.gateway")

RATE_LIMITS: Final = ("rpm", "tpm")
AUTH_FAILURE_REASONS: Final = ("missing_credentials", "invalid_api_key", "invalid_token",
                               "expired", "revoked", "forbidden_model",
                               "auth_unavailable")  # fmt: skip

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
            60, 120)  # fmt: skip


def rate_limit_kind(exc: RateLimitError) -> str:
    """Which of `RATE_LIMITS` refused: ``tpm`` for a reservation larger than the TPM limit,
    else ``rpm`` if the request bucket was empty (``x-ratelimit-remaining-requests: 0``, which
    `RateLimiter.admit` sends exactly then), else ``tpm``.

    NOTE: a request refused by both limits counts once, as ``rpm``.
    """
    if exc.code == "tokens_exceed_limit":
        return "tpm"
    headers = getattr(exc, "headers", None) or ()
    return "rpm" if (b"x-ratelimit-remaining-requests", b"0") in headers else "tpm"


def auth_failure_reason(exc: HelixFlowError) -> str | None:
    """Which of `AUTH_FAILURE_REASONS` an authentication or authorisation error is; None for
    an error that is neither."""
    if isinstance(exc, PermissionDeniedError):
        return "forbidden_model"  # the gateway's 403: a model the credential may not use
    if isinstance(exc, OverloadedError):
        return "auth_unavailable" if exc.code == "auth_unavailable" else None
    if not isinstance(exc, AuthenticationError):
        return None
    if exc.code in ("missing_api_key", "missing_credentials"):
        return "missing_credentials"
    if exc.code == "invalid_api_key":
        return "invalid_api_key"
    reason = getattr(exc, "reason", None)  # an InvalidTokenError's (tokens.py), for logs
    return reason if reason in ("expired", "revoked") else "invalid_token"


class GatewayMetrics:
    """One registry per app instance (tests run several in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._ttft_children: dict[str, Any] = {}
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
        self.rate_limited = Counter("helixflow_gateway_rate_limited_total",
                                    "Requests refused with 429 by the rate limiter, by the limit "
                                    "that refused", ["limit"], registry=self.registry)  # fmt: skip
        self.auth_failures = Counter("helixflow_gateway_auth_failures_total",
                                     "Requests refused for their credentials (401, 403; 503 "
                                     "when auth is unreachable)", ["reason"],
                                     registry=self.registry)  # fmt: skip
        self.ttft = Histogram("helixflow_gateway_time_to_first_token_seconds",
                              "Time from a streamed completion's arrival to its first event sent",
                              ["model"], buckets=_BUCKETS, registry=self.registry)  # fmt: skip
        # Every value of a fixed label set is exported from the start (at 0), so that a rate
        # over the first refusal is not lost.
        self._rate_limited = {limit: self.rate_limited.labels(limit) for limit in RATE_LIMITS}
        self._auth_failures = {reason: self.auth_failures.labels(reason)
                               for reason in AUTH_FAILURE_REASONS}  # fmt: skip

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        children = self._children.get(key)
        if children is None:  # label lookups cost more than the increments: cache them
            children = self._children[key] = (self.requests.labels(route, str(status)),
                                              self.latency.labels(route))  # fmt: skip
        children[0].inc()
        children[1].observe(seconds)

    def first_token(self, model: str, seconds: float) -> None:
        """A streamed completion of `model` sent its first event `seconds` after it arrived."""
        try:
            child = self._ttft_children.get(model)
            if child is None:  # cached like `observe`'s
                child = self._ttft_children[model] = self.ttft.labels(model)
            child.observe(seconds)
        except Exception:  # a metric must never fail a request
            log.exception("observing a time to first token failed")

    def count_rate_limited(self, exc: RateLimitError) -> None:
        """The rate limiter refused a request with `exc`; never raises."""
        try:
            self._rate_limited[rate_limit_kind(exc)].inc()
        except Exception:  # a metric must never fail a request
            log.exception("counting a rate-limited request failed")

    def count_auth_failure(self, exc: HelixFlowError) -> None:
        """A request was refused for its credentials with `exc`; never raises."""
        try:
            reason = auth_failure_reason(exc)
            if reason is not None:
                self._auth_failures[reason].inc()
        except Exception:  # a metric must never fail a request
            log.exception("counting an authentication failure failed")

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
