"""One health probe and one metrics scrape of a service, each bounded by a timeout.

HTTP probes use the standard library in a worker thread (a few requests a second need no
client library); gRPC probes call grpc.health.v1 over one channel per target, kept open.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Literal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from helixflow.monitoring.targets import Target

__all__ = ["ProbeResult", "Prober", "Samples"]

State = Literal["up", "degraded", "down"]
# metric sample name -> [(labels, value)]
Samples = dict[str, list[tuple[dict[str, str], float]]]

_MAX_BODY = 4 << 20
# NOTE: gRPC channels back off up to two minutes between reconnects by default: a restarted
# pool would be reported down long after it is back. Probe at most a second behind.
_GRPC_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_http_proxy", 0),
]


@dataclass(frozen=True)
class ProbeResult:
    """What one probe found: the state, a one-line detail, and the round trip."""

    state: State
    detail: str
    seconds: float


def _get(opener: urllib.request.OpenerDirector, url: str, timeout: float) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"accept": "application/json, text/plain"})
    try:
        with opener.open(request, timeout=timeout) as reply:
            return int(reply.status), reply.read(_MAX_BODY)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(_MAX_BODY)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text)[:200]


def _summary(body: bytes) -> str:
    """A short line from a JSON health body (``{"status": "ok", ...}``)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:120].decode(errors="replace")
    if not isinstance(data, dict):
        return ""
    parts = [f"{k}={v}" for k, v in data.items()
             if isinstance(v, (str, int, float, bool)) and len(str(v)) <= 24]  # no key ids
    return ", ".join(parts)[:200]


class Prober:
    """Probes targets; holds the TLS context and the open gRPC channels."""

    def __init__(self, *, ca: str | None = None, timeout_s: float = 1.0) -> None:
        self.timeout_s = timeout_s
        self.tls = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
        # NOTE: no proxy from the environment: the services are probed directly.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                   urllib.request.HTTPSHandler(context=self.tls))
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def http_get(self, url: str) -> tuple[int, bytes]:
        return await asyncio.to_thread(_get, self._opener, url, self.timeout_s)

    async def health(self, target: Target) -> ProbeResult:
        started = time.monotonic()
        try:
            if target.kind == "grpc":
                state, detail = await self._grpc_health(target.health)
            else:
                state, detail = await self._http_health(target)
        except Exception as exc:  # every failure is a finding, never a crash of the monitor
            state, detail = "down", _reason(exc)
        return ProbeResult(state, detail, time.monotonic() - started)

    async def _http_health(self, target: Target) -> tuple[State, str]:
        status, body = await self.http_get(target.health)
        if status != 200:
            return "down", f"health answered HTTP {status}: {_summary(body)}".rstrip(": ")
        if target.ready is None:
            return "up", _summary(body)
        status, body = await self.http_get(target.ready)
        return ("up" if status == 200 else "degraded"), _summary(body)

    async def _grpc_health(self, address: str) -> tuple[State, str]:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, _GRPC_OPTIONS)
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""),
                                     timeout=self.timeout_s)  # fmt: skip
        except grpc.aio.AioRpcError as exc:
            detail = exc.details() or exc.code().name
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                detail = "unreachable" if "connect" in detail.lower() else detail
            elif exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                detail = "timed out"
            return "down", f"{exc.code().name.lower()}: {detail}"[:200]
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return ("up" if name == "SERVING" else "degraded"), name.lower()

    async def scrape(self, url: str) -> Samples | None:
        """The samples of a Prometheus text exposition, or None when it cannot be read."""
        try:
            status, body = await self.http_get(url)
        except Exception:
            return None
        if status != 200:
            return None
        samples: Samples = {}
        try:
            for family in text_string_to_metric_families(body.decode(errors="replace")):
                for sample in family.samples:
                    samples.setdefault(sample.name, []).append((sample.labels, sample.value))
        except ValueError:
            return None
        return samples

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
