"""The poll loop: every interval, probe each service's health and scrape its metrics at once;
keep each service's state, a short history of the platform's figures, and recent events.

A service is ``down`` from the first probe that fails (refused, timed out, an error status),
``degraded`` while it answers but says it is not ready, ``up`` otherwise; with a one-second
interval and a one-second timeout a dead service is reported within about two seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from helixflow.monitoring import summary
from helixflow.monitoring.probes import Prober, ProbeResult, Samples
from helixflow.monitoring.summary import Snapshot
from helixflow.monitoring.targets import Target

__all__ = ["Event", "Monitor", "ServiceState"]

log = logging.getLogger("helixflow.monitoring")

HISTORY = 120  # points of the throughput history (two minutes at one a second)
EVENTS = 50
WINDOW_S = 10.0  # rates: over the last ten seconds
QUANTILE_WINDOW_S = 60.0  # latency quantiles: over the last minute
_API_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models")


@dataclass
class ServiceState:
    """What the monitor knows of one service."""

    name: str
    endpoint: str
    state: str = "unknown"
    detail: str = "not probed yet"
    since: float = field(default_factory=time.time)
    last_probe: float = 0.0
    probe_ms: float = 0.0
    metrics: bool = False  # the last scrape succeeded

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "detail": self.detail,
                "since": self.since, "last_probe": self.last_probe,
                "probe_ms": round(self.probe_ms, 2), "endpoint": self.endpoint,
                "metrics": self.metrics}  # fmt: skip


@dataclass(frozen=True)
class Event:
    """Something that happened: a service changed state, or errors were counted."""

    t: float
    level: str  # error | warning | info
    service: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"t": self.t, "level": self.level, "service": self.service,
                "message": self.message}  # fmt: skip


class Monitor:
    """Polls `targets` with `prober` every `interval_s`; read by the HTTP and gRPC servers."""

    def __init__(self, targets: tuple[Target, ...], prober: Prober,
                 interval_s: float = 1.0) -> None:  # fmt: skip
        self.targets = targets
        self.prober = prober
        self.interval_s = interval_s
        self.services = {t.name: ServiceState(t.name, t.health) for t in targets}
        keep = int(QUANTILE_WINDOW_S / interval_s) + 2
        self.snapshots: dict[str, deque[Snapshot]] = {t.name: deque(maxlen=keep) for t in targets}
        self.events: deque[Event] = deque(maxlen=EVENTS)
        self.history: deque[dict[str, float | None]] = deque(maxlen=HISTORY)
        self.figures: dict[str, float | None] = {}
        self.polls = 0
        self.version = 0  # bumped when any service changes state
        self.changed = asyncio.Event()
        self.listeners: list[Callable[[], None]] = []

    # -- reading -----------------------------------------------------------------------------

    @property
    def status(self) -> str:
        return "ok" if all(s.state == "up" for s in self.services.values()) else "degraded"

    def report(self) -> dict[str, Any]:
        """The aggregated health: ``ok`` when every service is up, else ``degraded``."""
        return {"status": self.status, "generated_at": time.time(),
                "services": [s.as_dict() for s in self.services.values()]}  # fmt: skip

    def page_data(self) -> dict[str, Any]:
        """Everything the status page shows."""
        return {**self.report(), "polls": self.polls, "interval_s": self.interval_s,
                "figures": self.figures, "history": list(self.history),
                "events": [e.as_dict() for e in reversed(self.events)]}  # fmt: skip

    # -- polling -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll until cancelled, one round every `interval_s` (a slow round is not repeated)."""
        while True:
            started = time.monotonic()
            try:
                await self.poll_once()
            except Exception:  # a bug in the figures must not stop the health checks
                log.exception("poll failed")
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def poll_once(self) -> None:
        async def one(target: Target) -> tuple[ProbeResult, Samples | None]:
            scrape = self.prober.scrape(target.metrics) if target.metrics else _none()
            return await asyncio.gather(self.prober.health(target), scrape)

        results = await asyncio.gather(*(one(t) for t in self.targets))
        now, mono = time.time(), time.monotonic()
        for target, (probe, samples) in zip(self.targets, results, strict=True):
            self._record_health(self.services[target.name], probe, now)
            self.services[target.name].metrics = samples is not None
            if samples is not None:
                history = self.snapshots[target.name]
                if history:
                    self._count_events(target.name, history[-1].samples, samples, now)
                history.append(Snapshot(mono, samples))
        self.figures = self._figures()
        self.history.append({"t": now, "tokens_per_s": self.figures.get("tokens_per_s"),
                             "requests_per_s": self.figures.get("requests_per_s")})  # fmt: skip
        self.polls += 1

    def _record_health(self, service: ServiceState, probe: ProbeResult, now: float) -> None:
        service.last_probe = now
        service.probe_ms = probe.seconds * 1000
        service.detail = probe.detail
        if probe.state == service.state:
            return
        first = service.state == "unknown"
        service.state, service.since = probe.state, now
        level = {"down": "error", "degraded": "warning"}.get(probe.state, "info")
        message = f"{probe.state}: {probe.detail}"
        if first and probe.state != "up":  # not up yet: starting, or never came
            level, message = "warning", f"not up yet ({probe.state}): {probe.detail}"
        if not (first and probe.state == "up"):
            self.events.append(Event(now, level, service.name, message))
            log.log(logging.WARNING if level != "info" else logging.INFO, "%s is %s: %s",
                    service.name, probe.state, probe.detail)  # fmt: skip
        self.version += 1
        self.changed.set()
        self.changed = asyncio.Event()
        for listener in self.listeners:
            listener()

    def _count_events(self, name: str, old: Samples, new: Samples, now: float) -> None:
        """Events for errors counted since the previous scrape of this service."""
        def grew(metric: str, label: str, level: str, what: str,
                 keep: Callable[[dict[str, str]], bool] = lambda _: True) -> None:  # fmt: skip
            counts: dict[str, float] = {}
            for labels, d in summary.deltas(old, new, metric, {}):
                if d > 0 and keep(labels):
                    key = labels.get(label, "?")
                    counts[key] = counts.get(key, 0.0) + d
            for key, count in sorted(counts.items()):
                self.events.append(Event(now, level, name, what.format(n=int(count), key=key)))

        if name == "gateway":
            grew("helixflow_gateway_requests_total", "status", "error",
                 "{n} response(s) with HTTP {key}",
                 lambda labels: labels.get("status", "").startswith("5"))  # fmt: skip
            grew("helixflow_gateway_auth_failures_total", "reason", "warning",
                 "{n} request(s) refused: {key}")  # fmt: skip
            grew("helixflow_gateway_rate_limited_total", "limit", "warning",
                 "{n} request(s) rate-limited ({key})")  # fmt: skip
        elif name == "pool":
            grew("helixflow_pool_requests_total", "outcome", "error", "{n} request(s) ended {key}",
                 lambda labels: labels.get("outcome") not in ("ok", "cancelled"))  # fmt: skip
        elif name == "auth":
            grew("helixflow_auth_failures_total", "reason", "warning",
                 "{n} failed authentication(s): {key}")  # fmt: skip

    def _window(self, name: str, seconds: float) -> tuple[Snapshot, Snapshot] | None:
        history = self.snapshots.get(name)
        if not history or len(history) < 2:
            return None
        newest = history[-1]
        oldest = history[0]
        for snap in history:
            if newest.t - snap.t <= seconds + self.interval_s / 2:
                oldest = snap
                break
        return (oldest, newest) if newest.t > oldest.t else None

    def _figures(self) -> dict[str, float | None]:
        figures: dict[str, float | None] = dict.fromkeys(
            ("requests_per_s", "errors_per_s", "tokens_per_s", "prompt_tokens_per_s",
             "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "running", "waiting", "kv_cache_usage",
             "prefix_cache_hit_rate", "preemptions", "rate_limited_per_s",
             "auth_failures_per_s"))  # fmt: skip
        if (w := self._window("gateway", WINDOW_S)) is not None:
            old, new = w[0].samples, w[1].samples
            dt = w[1].t - w[0].t
            requests = "helixflow_gateway_requests_total"
            figures["requests_per_s"] = summary.delta(old, new, requests, route=_API_ROUTES) / dt
            errors = sum(summary.delta(old, new, requests, status=str(code))
                         for code in range(500, 600))  # fmt: skip
            figures["errors_per_s"] = errors / dt
            figures["rate_limited_per_s"] = summary.delta(
                old, new, "helixflow_gateway_rate_limited_total") / dt
            figures["auth_failures_per_s"] = summary.delta(
                old, new, "helixflow_gateway_auth_failures_total") / dt
        if (w := self._window("pool", WINDOW_S)) is not None:
            old, new = w[0].samples, w[1].samples
            dt = w[1].t - w[0].t
            figures["tokens_per_s"] = summary.delta(
                old, new, "helixflow_pool_generation_tokens_total") / dt
            figures["prompt_tokens_per_s"] = summary.delta(
                old, new, "helixflow_pool_prompt_tokens_total") / dt
        if (w := self._window("pool", QUANTILE_WINDOW_S)) is not None:
            old, new = w[0].samples, w[1].samples
            for q, key in ((0.5, "ttft_p50_ms"), (0.95, "ttft_p95_ms")):
                value = summary.quantile(q, old, new, "helixflow_pool_time_to_first_token_seconds")
                figures[key] = None if value is None else value * 1000
            itl = summary.quantile(0.5, old, new, "helixflow_pool_inter_token_seconds")
            figures["itl_p50_ms"] = None if itl is None else itl * 1000
        if self.snapshots.get("pool"):
            latest = self.snapshots["pool"][-1].samples
            figures["running"] = summary.gauge(latest, "helixflow_pool_requests_running")
            figures["waiting"] = summary.gauge(latest, "helixflow_pool_requests_waiting")
            figures["kv_cache_usage"] = summary.gauge(latest, "helixflow_pool_kv_cache_usage",
                                                      "max")  # fmt: skip
            figures["prefix_cache_hit_rate"] = summary.gauge(
                latest, "helixflow_pool_prefix_cache_hit_rate", "mean")
            figures["preemptions"] = summary.gauge(latest, "helixflow_pool_preemptions_total")
        return figures


async def _none() -> None:
    return None
