"""The monitor against real servers on loopback: an HTTP service whose health and metrics a
test controls, a real grpc.health.v1 server, and `helixflow monitor` as a process."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from process_testing import free_port

from helixflow.errors import ConfigError
from helixflow.monitoring.dashboards import PANELS, grafana_dashboard, metric_names
from helixflow.monitoring.http_app import MonitorHttpApp
from helixflow.monitoring.monitor import Monitor
from helixflow.monitoring.probes import Prober
from helixflow.monitoring.targets import Target, default_targets


class FakeService:
    """A real HTTP server: ``/health`` answers `status`, ``/metrics`` answers `metrics`."""

    def __init__(self) -> None:
        self.status = 200
        self.metrics = ""
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    code, body = 200, service.metrics.encode()
                else:
                    code, body = service.status, b'{"status": "ok", "workers": 2}'
                self.send_response(code)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def service() -> Iterator[FakeService]:
    fake = FakeService()
    yield fake
    fake.stop()


def _requests(ok: int, errors: int) -> str:
    return ("# TYPE helixflow_gateway_requests_total counter\n"
            f'helixflow_gateway_requests_total{{route="/v1/chat/completions",status="200"}} {ok}\n'
            f'helixflow_gateway_requests_total{{route="/v1/chat/completions",status="502"}} '
            f"{errors}\n")  # fmt: skip


def test_http_service_states_and_error_events(service: FakeService) -> None:
    async def scenario() -> None:
        target = Target("gateway", "http", f"{service.url}/health", f"{service.url}/metrics")
        prober = Prober(timeout_s=1.0)
        monitor = Monitor((target,), prober, interval_s=0.1)
        service.metrics = _requests(10, 0)
        await monitor.poll_once()
        state = monitor.services["gateway"]
        assert (state.state, monitor.status, state.metrics) == ("up", "ok", True)
        assert "status=ok" in state.detail and not monitor.events  # first up: no event

        service.metrics = _requests(14, 3)  # three 502s since the last scrape
        await monitor.poll_once()
        assert [e.message for e in monitor.events] == ["3 response(s) with HTTP 502"]
        assert monitor.figures["requests_per_s"] is not None
        assert monitor.figures["errors_per_s"] is not None and monitor.figures["errors_per_s"] > 0

        service.status = 503
        await monitor.poll_once()
        assert (state.state, monitor.status) == ("down", "degraded")
        assert state.detail.startswith("health answered HTTP 503")
        service.status = 200
        await monitor.poll_once()
        assert state.state == "up" and monitor.events[-1].message.startswith("up")

        service.stop()
        await monitor.poll_once()
        assert (state.state, state.detail, state.metrics) == ("down", "connection refused", False)
        assert monitor.report()["status"] == "degraded"
        await prober.close()

    asyncio.run(scenario())


def test_grpc_service_serving_not_serving_and_gone() -> None:
    async def scenario() -> None:
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        prober = Prober(timeout_s=1.0)
        monitor = Monitor((Target("pool", "grpc", f"127.0.0.1:{port}"),), prober)
        state = monitor.services["pool"]
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await monitor.poll_once()
        assert (state.state, state.detail) == ("up", "serving")
        await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await monitor.poll_once()
        assert (state.state, state.detail) == ("degraded", "not_serving")
        await server.stop(None)
        await monitor.poll_once()
        assert state.state == "down" and state.detail.startswith("unavailable")
        await prober.close()

    asyncio.run(scenario())


def test_default_targets_from_flags_and_environment() -> None:
    targets = default_targets(env={})
    assert [(t.name, t.kind, t.health, t.metrics) for t in targets] == [
        ("auth", "http", "http://127.0.0.1:8082/health", "http://127.0.0.1:8082/metrics"),
        ("pool", "grpc", "127.0.0.1:50051", "http://127.0.0.1:50052/metrics"),
        ("gateway", "http", "https://127.0.0.1:8443/health", "https://127.0.0.1:8443/metrics"),
    ]
    env = {"INFERENCE_POOL_URL": "pool.internal:6000", "AUTH_SERVICE_URL": "",
           "GATEWAY_URL": "https://gw.example:443/"}  # fmt: skip
    named = {t.name: t for t in default_targets(env=env)}
    assert set(named) == {"pool", "gateway"}  # an empty value leaves the service out
    assert named["pool"].metrics == "http://pool.internal:6001/metrics"
    assert named["gateway"].ready == "https://gw.example:443/ready"
    with pytest.raises(ConfigError, match="--pool"):
        default_targets(pool="no-port", env={})
    with pytest.raises(ConfigError, match="--gateway-url"):
        default_targets(gateway="ftp://x", env={})


def _call(app: MonitorHttpApp, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": []}
    asyncio.run(app(scope, receive, send))
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], headers, sent[1]["body"]


def test_http_api_health_page_and_dashboards(service: FakeService) -> None:
    target = Target("auth", "http", f"{service.url}/health", f"{service.url}/metrics")
    monitor = Monitor((target,), Prober(), interval_s=1.0)
    app = MonitorHttpApp(monitor, self_url="http://127.0.0.1:8084")
    status, _, body = _call(app, "GET", "/health")
    assert status == 503 and b'"unknown"' in body  # not probed yet: not healthy
    asyncio.run(monitor.poll_once())
    status, _, body = _call(app, "GET", "/health")
    assert status == 200 and b'"status":"ok"' in body

    status, headers, page = _call(app, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    script = re.search(rb"<script>(.*?)</script>", page, re.S)
    assert script is not None
    digest = base64.b64encode(hashlib.sha256(script.group(1)).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in headers["content-security-policy"]
    assert b"const INTERVAL_MS = 1000;" in page

    assert _call(app, "GET", "/nope")[0] == 404
    status, headers, _ = _call(app, "POST", "/health")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    status, _, body = _call(app, "GET", "/metrics")
    assert b'helixflow_monitor_service_up{service="auth"} 1.0' in body
    status, _, body = _call(app, "GET", "/prometheus.yml")
    assert b"job_name: helixflow-auth" in body and b"job_name: helixflow-monitor" in body


def test_dashboard_covers_the_required_metrics() -> None:
    names = metric_names()
    required = ["helixflow_gateway_requests_total", "helixflow_gateway_request_seconds_bucket",
                "helixflow_pool_time_to_first_token_seconds_bucket",
                "helixflow_pool_inter_token_seconds_bucket", "helixflow_pool_prompt_tokens_total",
                "helixflow_pool_generation_tokens_total", "helixflow_pool_requests_running",
                "helixflow_pool_requests_waiting", "helixflow_pool_kv_cache_usage",
                "helixflow_pool_prefix_cache_hit_rate", "helixflow_pool_preemptions_total",
                "helixflow_gateway_rate_limited_total", "helixflow_gateway_auth_failures_total",
                "helixflow_auth_failures_total", "helixflow_gateway_backend_healthy"]  # fmt: skip
    assert not set(required) - names
    dashboard = grafana_dashboard()
    assert len(dashboard["panels"]) == len(PANELS)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert all(e.count("(") == e.count(")") for e in exprs)


def test_monitor_command_line() -> None:
    run = [sys.executable, "-m", "helixflow", "monitor"]
    shown = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "--gateway-url" in shown.stdout
    bad = subprocess.run([*run, "--interval", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "--interval" in bad.stderr and "Traceback" not in bad.stderr
    # The port is taken: one clear line, exit 1.
    blocker = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = blocker.server_address[1]
    try:
        taken = subprocess.run([*run, "--port", str(free_port()), "--http-port", str(port)],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        blocker.server_close()
    assert taken.returncode == 1 and "cannot listen" in taken.stderr, taken.stderr
    assert "Traceback" not in taken.stderr


def test_monitor_process_reports_a_service_going_down(service: FakeService) -> None:
    ports = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "helixflow", "monitor", "--port",
                             str(ports[0]), "--http-port", str(ports[1]), "--auth-url",
                             service.url, "--pool", "", "--gateway-url", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{ports[1]}/health"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        service.status = 500
        went_down = time.monotonic()
        while httpx.get(url).status_code != 503:
            assert time.monotonic() - went_down < 5
            time.sleep(0.1)
        report = httpx.get(url).json()
        assert report["services"][0]["state"] == "down"
        assert "HTTP 500" in report["services"][0]["detail"]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_grpc_get_and_watch_health(service: FakeService) -> None:
    from helixflow._proto import monitoring_pb2 as pb
    from helixflow._proto import monitoring_pb2_grpc as pb_grpc
    from helixflow.monitoring.service import MonitorServicer

    async def scenario() -> None:
        target = Target("auth", "http", f"{service.url}/health")
        monitor = Monitor((target,), Prober(), interval_s=0.1)
        server = grpc.aio.server()
        servicer = MonitorServicer(monitor)
        pb_grpc.add_MonitorServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.MonitorStub(channel)
            report = await stub.GetHealth(pb.GetHealthRequest(), timeout=5)
            assert (report.status, report.services[0].state) == ("degraded", "unknown")
            watch = stub.WatchHealth(pb.GetHealthRequest(), timeout=10)
            first = await watch.read()
            assert first.services[0].state == "unknown"
            await monitor.poll_once()  # unknown -> up: a new report
            second = await watch.read()
            assert (second.status, second.services[0].state) == ("ok", "up")
            service.status = 500
            await monitor.poll_once()
            third = await watch.read()
            assert third.status == "degraded" and "HTTP 500" in third.services[0].detail
            servicer.stopping.set()  # the service stops: the stream ends
            assert await watch.read() == grpc.aio.EOF
        await server.stop(None)
        await monitor.prober.close()

    asyncio.run(scenario())
