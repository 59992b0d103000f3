"""What the monitor probes: each service's health endpoint and its metrics endpoint.

Defaults are the ports of a single-machine platform (``helixflow serve``); each is a flag or an
environment variable of the original scripts' names where one exists:

    auth      AUTH_SERVICE_URL     http://127.0.0.1:8082  (GET /health, GET /metrics)
    pool      INFERENCE_POOL_URL   127.0.0.1:50051        (grpc.health.v1; metrics on port + 1)
    gateway   GATEWAY_URL          https://127.0.0.1:8443 (GET /health, /ready, /metrics)

A CA bundle (``--ca`` / ``HELIXFLOW_CA``) verifies the self-signed certificates of
``helixflow certs``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from helixflow.errors import ConfigError

__all__ = ["MonitorOptions", "Target", "default_targets"]

ProbeKind = Literal["http", "grpc"]


@dataclass(frozen=True)
class Target:
    """One service: how to tell whether it is up and where its Prometheus metrics are."""

    name: str
    kind: ProbeKind
    health: str  # an http(s) URL for "http"; host:port for "grpc"
    metrics: str | None = None  # an http(s) URL of a Prometheus exposition
    ready: str | None = None  # an http(s) URL whose 503 means up but not ready (degraded)


@dataclass(frozen=True)
class MonitorOptions:
    """One monitor: where it listens, what it watches, how often."""

    targets: tuple[Target, ...]
    host: str = "127.0.0.1"
    grpc_port: int = 8083
    http_port: int = 8084
    interval_s: float = 1.0
    timeout_s: float = 1.0
    ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


def _base(url: str, option: str) -> str:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{option}: expected an http(s) URL, got {url!r}")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _grpc_target(value: str, option: str) -> tuple[str, int]:
    text = value.split("://", 1)[-1].rstrip("/")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option}: expected host:port, got {value!r}")
    return host, int(port)


def default_targets(*, auth: str | None = None, pool: str | None = None,
                    pool_metrics: str | None = None, gateway: str | None = None,
                    env: Mapping[str, str] | None = None) -> tuple[Target, ...]:  # fmt: skip
    """The three services of a platform, from flags, else the environment, else the defaults.

    An empty string for a service leaves it out.
    """
    env = env or {}
    auth = auth if auth is not None else env.get("AUTH_SERVICE_URL", "http://127.0.0.1:8082")
    pool = pool if pool is not None else env.get("INFERENCE_POOL_URL", "127.0.0.1:50051")
    gateway = gateway if gateway is not None else env.get("GATEWAY_URL",
                                                          "https://127.0.0.1:8443")  # fmt: skip
    targets = []
    if auth:
        base = _base(auth, "--auth-url")
        targets.append(Target("auth", "http", f"{base}/health", f"{base}/metrics"))
    if pool:
        host, port = _grpc_target(pool, "--pool")
        metrics = pool_metrics or env.get("POOL_METRICS_URL") or f"http://{host}:{port + 1}"
        metrics = _base(metrics, "--pool-metrics-url")
        if not metrics.endswith("/metrics"):
            metrics += "/metrics"
        targets.append(Target("pool", "grpc", f"{host}:{port}", metrics))
    if gateway:
        base = _base(gateway, "--gateway-url")
        targets.append(Target("gateway", "http", f"{base}/health", f"{base}/metrics",
                              ready=f"{base}/ready"))  # fmt: skip
    return tuple(targets)
