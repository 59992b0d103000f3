"""``helixflow monitor``: poll every service, serve the aggregated health over gRPC (:8083) and
the status page, health and dashboards over HTTP (:8084), until SIGTERM/SIGINT.

Configuration: flags, else the environment (``PORT`` for gRPC, ``HTTP_PORT``, ``TLS_CERT``,
``TLS_KEY`` for the HTTP port, and the targets of `helixflow.monitoring.targets`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from helixflow._proto import monitoring_pb2 as pb
from helixflow._proto import monitoring_pb2_grpc as pb_grpc
from helixflow.errors import ConfigError
from helixflow.monitoring.monitor import Monitor
from helixflow.monitoring.probes import Prober
from helixflow.monitoring.targets import MonitorOptions, default_targets

__all__ = ["options_from_env", "serve"]

log = logging.getLogger("helixflow.monitoring")

SERVICE_NAME = "helixflow.monitoring.v1.Monitor"
_SERVING = {"up": health_pb2.HealthCheckResponse.SERVING,
            "unknown": health_pb2.HealthCheckResponse.UNKNOWN}  # fmt: skip


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if not value:
        return default
    if not value.isdigit() or not 0 <= int(value) < 65536:
        raise ConfigError(f"{name}: expected a port number, got {value!r}")
    return int(value)


def options_from_env(args: Any, env: Mapping[str, str]) -> MonitorOptions:
    """Options from parsed flags (`args`, attributes may be None), else `env`, else defaults."""
    targets = default_targets(auth=args.auth_url, pool=args.pool,
                              pool_metrics=args.pool_metrics_url, gateway=args.gateway_url,
                              env=env)  # fmt: skip
    if args.interval is not None and not 0.1 <= args.interval <= 60:
        raise ConfigError("--interval: expected 0.1 to 60 seconds")
    interval = args.interval or 1.0
    return MonitorOptions(
        targets=targets, host=args.host,
        grpc_port=args.port if args.port is not None else _port(env, "PORT", 8083),
        http_port=args.http_port if args.http_port is not None else _port(env, "HTTP_PORT", 8084),
        interval_s=interval, timeout_s=min(interval, 1.0),
        ca=args.ca or env.get("HELIXFLOW_CA") or None,
        tls_cert=args.tls_cert or env.get("TLS_CERT") or None,
        tls_key=args.tls_key or env.get("TLS_KEY") or None,
    )  # fmt: skip


def _to_pb(report: dict[str, Any]) -> pb.HealthReport:
    return pb.HealthReport(status=report["status"], generated_at_unix=report["generated_at"],
                           services=[pb.ServiceHealth(
                               name=s["name"], state=s["state"], detail=s["detail"],
                               since_unix=s["since"], last_probe_unix=s["last_probe"],
                               probe_ms=s["probe_ms"], endpoint=s["endpoint"])
                               for s in report["services"]])  # fmt: skip


class MonitorServicer(pb_grpc.MonitorServicer):
    """GetHealth and WatchHealth over one `Monitor`."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.stopping = asyncio.Event()

    async def GetHealth(self, request: pb.GetHealthRequest,
                        context: grpc.aio.ServicerContext[Any, Any],
                        ) -> pb.HealthReport:  # fmt: skip
        return _to_pb(self.monitor.report())

    async def WatchHealth(self, request: pb.GetHealthRequest,
                          context: grpc.aio.ServicerContext[Any, Any],
                          ) -> AsyncIterator[pb.HealthReport]:  # fmt: skip
        stopping = asyncio.create_task(self.stopping.wait())
        try:
            while not self.stopping.is_set():
                changed = self.monitor.changed
                yield _to_pb(self.monitor.report())
                waiting = asyncio.create_task(changed.wait())
                await asyncio.wait([waiting, stopping], return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
        finally:
            stopping.cancel()


async def _sync_health(monitor: Monitor, servicer: health.aio.HealthServicer) -> None:
    """Keep grpc.health.v1 in step: one entry per service, "" for the whole platform."""
    while True:
        changed = monitor.changed
        for service in monitor.services.values():
            await servicer.set(service.name, _SERVING.get(
                service.state, health_pb2.HealthCheckResponse.NOT_SERVING))
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING if monitor.status == "ok"
                           else health_pb2.HealthCheckResponse.NOT_SERVING)  # fmt: skip
        await changed.wait()


async def serve(opts: MonitorOptions) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code (0)."""
    from granian.constants import Interfaces
    from granian.server.embed import Server as Granian

    from helixflow.monitoring.http_app import MonitorHttpApp

    if (opts.tls_cert is None) != (opts.tls_key is None):
        raise ConfigError("TLS_CERT and TLS_KEY: give both or neither")
    if opts.ca and not Path(opts.ca).is_file():
        raise ConfigError(f"--ca: no such file {opts.ca}")
    if not opts.targets:
        raise ConfigError("nothing to monitor: every service was left out")
    prober = Prober(ca=opts.ca, timeout_s=opts.timeout_s)
    monitor = Monitor(opts.targets, prober, opts.interval_s)
    servicer = MonitorServicer(monitor)
    server = grpc.aio.server()
    pb_grpc.add_MonitorServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{opts.host}:{opts.grpc_port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"gRPC: cannot listen on {address} (in use, or not an address of this host)")
    await server.start()

    scheme = "https" if opts.tls_cert else "http"
    tls: dict[str, Any] = {}
    if opts.tls_cert and opts.tls_key:
        tls = {"ssl_cert": Path(opts.tls_cert), "ssl_key": Path(opts.tls_key)}
    app = MonitorHttpApp(monitor, ca_file=opts.ca,
                         self_url=f"{scheme}://{opts.host}:{opts.http_port}")  # fmt: skip
    http = Granian(app, address=opts.host, port=opts.http_port, interface=Interfaces.ASGI,
                   log_enabled=False, **tls)  # fmt: skip
    http_task = asyncio.create_task(http.serve())
    await asyncio.sleep(0.05)
    if http_task.done():
        await server.stop(None)
        exc = http_task.exception()
        raise OSError(f"HTTP: cannot listen on {opts.host}:{opts.http_port} ({exc})")

    tasks = [asyncio.create_task(monitor.run()),
             asyncio.create_task(_sync_health(monitor, health_servicer)), http_task]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    names = ", ".join(f"{t.name} ({t.health})" for t in opts.targets)
    log.info("monitoring %s every %.1fs", names, opts.interval_s)
    print(f"helixflow monitor: gRPC on {address}, status page on "
          f"{scheme}://{opts.host}:{opts.http_port}/", flush=True)  # fmt: skip
    await asyncio.wait([asyncio.create_task(stop.wait()), http_task],
                       return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
    log.info("stopping")
    servicer.stopping.set()
    http.stop()  # type: ignore[no-untyped-call]
    await server.stop(grace=1.0)
    with contextlib.suppress(asyncio.TimeoutError, Exception):
        await asyncio.wait_for(http_task, 5.0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await prober.close()
    log.info("stopped")
    return 0
