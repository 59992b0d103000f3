"""The auth service's Prometheus metrics (``GET /metrics`` on the HTTP port, public like
``/health``): HTTP requests and latency by route template, refused credentials by operation and
reason, revocations this process recorded, and the revocation streams connected now.

Every label value comes from a fixed set: ``route`` is a route template of the HTTP API (or
``other``), ``operation`` one of `OPERATIONS`, ``reason`` one of `REASONS`, ``kind`` one of
`REVOCATION_KINDS`. Counting never raises into a request.

Operations: ``login``, ``refresh`` and ``password`` are the HTTP API's ``/v1/auth/login``,
``/v1/auth/refresh`` and ``/v1/auth/password``; ``api_key`` and ``token`` are credentials
refused by the gRPC ``ValidateApiKey`` and ``ValidateToken`` or as an HTTP request's bearer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from helixflow.auth.revocations import RevocationEvent
from helixflow.errors import AuthenticationError, RateLimitError

__all__ = ["OPERATIONS", "REASONS", "REVOCATION_KINDS", "AuthMetrics", "failure_reason"]

log = logging.getLogger("helixflow.auth.metrics")

T = TypeVar("T")

# Each operation with the reasons it can fail for (all exported from the start, at 0).
OPERATIONS: Final = {
    "login": ("bad_credentials", "throttled", "disabled", "invalid"),
    "refresh": ("reused", "expired", "revoked", "disabled", "invalid"),
    "password": ("bad_credentials", "throttled", "invalid"),
    "api_key": ("expired", "revoked", "disabled", "invalid"),
    "token": ("expired", "revoked", "disabled", "invalid"),
}
REASONS: Final = ("bad_credentials", "throttled", "disabled", "reused", "expired", "revoked",
                  "invalid")  # fmt: skip
REVOCATION_KINDS: Final = ("jti", "family", "api_key", "user")

# The machine-readable reasons of the auth code (an InvalidTokenError's `reason`, and those
# `AuthCore` logs) → `REASONS`; any other reason is "invalid".
_REASONS: Final = {
    "unknown_user": "bad_credentials", "bad_password": "bad_credentials",
    "invalid_username": "bad_credentials", "disabled": "disabled", "inactive_user": "disabled",
    "reuse": "reused", "reused": "reused", "expired": "expired", "revoked": "revoked",
}  # fmt: skip
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def failure_reason(exc: BaseException) -> str:
    """Which of `REASONS` a refused login, refresh, password change or credential is.

    NOTE: `AuthCore` tells clients as little as possible (a wrong password, an unknown user and
    a disabled user are all ``invalid_credentials``); the error's `reason` attribute, never
    sent, says which it was.
    """
    if isinstance(exc, RateLimitError):
        return "throttled"
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        return _REASONS.get(reason, "invalid")
    if isinstance(exc, AuthenticationError) and exc.code == "invalid_credentials":
        return "bad_credentials"
    return "invalid"


class AuthMetrics:
    """The auth service's metrics in their own registry; `subscribers` reads the number of
    connected revocation streams at scrape time."""

    def __init__(self, subscribers: Callable[[], int] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("helixflow_auth_requests_total", "HTTP requests answered",
                                ["route", "status"], registry=r)  # fmt: skip
        self.latency = Histogram("helixflow_auth_request_seconds", "HTTP request latency",
                                 ["route"], buckets=_BUCKETS, registry=r)  # fmt: skip
        self.failures = Counter("helixflow_auth_failures_total",
                                "Refused logins, refreshes, password changes and credentials",
                                ["operation", "reason"], registry=r)  # fmt: skip
        self.revocations = Counter("helixflow_auth_revocations_total",
                                   "Revocations recorded by this process", ["kind"],
                                   registry=r)  # fmt: skip
        self.subscribers = Gauge("helixflow_auth_revocation_subscribers",
                                 "Revocation streams (WatchRevocations) connected now",
                                 registry=r)  # fmt: skip
        if subscribers is not None:
            self.subscribers.set_function(lambda: float(subscribers()))
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._failures = {(op, reason): self.failures.labels(op, reason)
                          for op, reasons in OPERATIONS.items() for reason in reasons}  # fmt: skip
        self._revocations = {kind: self.revocations.labels(kind) for kind in REVOCATION_KINDS}
        self._local = threading.local()

    def observe(self, route: str, status: int, seconds: float) -> None:
        """One HTTP request answered; `route` is a route template or ``other``."""
        try:
            key = (route, status)
            children = self._children.get(key)
            if children is None:
                children = self._children[key] = (self.requests.labels(route, str(status)),
                                                  self.latency.labels(route))  # fmt: skip
            children[0].inc()
            children[1].observe(seconds)
        except Exception:  # a metric must never fail a request
            log.exception("counting a request failed")

    def failed(self, operation: str, exc: BaseException | None = None) -> None:
        """`operation` (one of `OPERATIONS`) was refused with `exc` (None: ``invalid``)."""
        try:
            reason = "invalid" if exc is None else failure_reason(exc)
            key = (operation, reason)
            child = self._failures.get(key)
            if child is None:  # a pairing not listed in OPERATIONS (both parts are fixed)
                child = self._failures[key] = self.failures.labels(operation, reason)
            child.inc()
        except Exception:  # a metric must never fail a request
            log.exception("counting a failure failed")

    def on_revocation(self, event: RevocationEvent | None) -> None:
        """The `AuthCore` listener: counts each revocation this process records.

        Called on the thread that recorded it; those a store poll finds (recorded by another
        process) run under `foreign` and are not counted, nor are key rotations (None).
        """
        if event is None or getattr(self._local, "foreign", False):
            return
        child = self._revocations.get(event.kind)
        if child is not None:
            child.inc()

    def foreign(self, fn: Callable[[], T]) -> T:
        """Run `fn` (a poll for revocations other processes recorded) without counting the
        revocations it hands to the listeners."""
        self._local.foreign = True
        try:
            return fn()
        finally:
            self._local.foreign = False

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
