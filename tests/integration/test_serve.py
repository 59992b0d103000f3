"""``helixflow serve`` as a user meets it: one command, a printed key and examples that work as
printed, monitoring that sees every service (and a crashed pool go down and come back, restarted
by the supervisor), a status page that works in a real browser, a clean stop, and a second start
that keeps what the first made.

The tests share one platform and run in file order (the last ones stop and restart it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from process_testing import free_port


@dataclass
class Platform:
    proc: subprocess.Popen[bytes]
    args: list[str]
    env: dict[str, str]
    log: Path
    data: Path
    ports: dict[str, int]
    key: str

    @property
    def url(self) -> str:
        return f"https://localhost:{self.ports['gateway']}"

    @property
    def monitor(self) -> str:
        return f"http://127.0.0.1:{self.ports['monitor_http']}"

    @property
    def ca(self) -> Path:
        return self.data / "certs" / "ca.pem"

    def https(self) -> httpx.Client:
        return httpx.Client(verify=ssl.create_default_context(cafile=str(self.ca)), timeout=60)

    def state(self) -> dict[str, dict[str, int]]:
        return dict(json.loads((self.data / "state.json").read_text()))


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text()
        if text in content:
            return content
        assert proc.poll() is None, f"serve exited early:\n{content[-4000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout}s:\n{content[-4000:]}"
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def platform(model_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("serve")
    data = tmp / "data"
    names = ("gateway", "pool", "auth", "auth_http", "monitor", "monitor_http")
    ports = {name: free_port() for name in names}
    args = [sys.executable, "-m", "helixflow", "serve", "--data-dir", str(data),
            "--port", str(ports["gateway"]), "--pool-port", str(ports["pool"]),
            "--auth-port", str(ports["auth"]), "--auth-http-port", str(ports["auth_http"]),
            "--monitor-port", str(ports["monitor"]),
            "--monitor-http-port", str(ports["monitor_http"]),
            "--max-model-len", "1024"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "REDIS_URL")}
    env["HELIXFLOW_HOME"] = str(model_home)
    out = tmp / "serve.log"
    with out.open("w") as file:
        proc = subprocess.Popen(args, env=env, stdout=file, stderr=subprocess.STDOUT)
    try:
        log = _wait_for(out, "HelixFlow is up", proc, 180)
        key = re.search(r"API key:\s+(hfx_\S+)", log)
        assert key is not None, log[-2000:]
        yield Platform(proc, args, env, out, data, ports, key.group(1))
    finally:
        _stop(proc)


def _monitor_health(platform: Platform) -> dict[str, str]:
    reply = httpx.get(f"{platform.monitor}/health", timeout=5)
    report = reply.json()
    assert reply.status_code == (200 if report["status"] == "ok" else 503)
    return {s["name"]: s["state"] for s in report["services"]}


def _wait_all_up(platform: Platform, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while set((states := _monitor_health(platform)).values()) != {"up"}:
        assert time.monotonic() < deadline, states
        time.sleep(0.2)


def test_printed_examples_work(platform: Platform) -> None:
    log = platform.log.read_text()
    assert oct((platform.data / "certs" / "server.key").stat().st_mode & 0o777) == "0o600"
    assert f"status page: {platform.monitor}/" in log
    # The printed curl and openai-SDK examples work as printed.
    curl = log[log.index("curl https://") : log.index("# with OpenAI's SDK")]
    ran = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and json.loads(ran.stdout)["choices"][0]["message"]["content"]
    example = log[log.index("python - <<'EOF'\n") + len("python - <<'EOF'\n") :]
    example = example[: example.index("\nEOF\n")]
    ran = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert ran.returncode == 0 and ran.stdout.strip(), ran.stderr
    with platform.https() as http:
        reply = http.post(f"{platform.url}/v1/chat/completions",
                          headers={"Authorization": f"Bearer {platform.key}"},
                          json={"model": "SmolLM2-135M-Instruct", "max_tokens": 8,
                                "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]


def test_readme_quick_start_works_as_written(platform: Platform) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Quick start") :]
    section = section[: section.index("\n## ", 10)].replace("https://localhost:8443",
                                                          platform.url)  # fmt: skip
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, re.S)
    assert [lang for lang, _ in blocks] == ["", "python", "python"], blocks
    env = {**platform.env, "KEY": platform.key, "CA": str(platform.ca)}
    curl = subprocess.run(["bash", "-c", blocks[0][1]], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert curl.returncode == 0 and json.loads(curl.stdout)["choices"][0]["message"]["content"]
    for _, code in blocks[1:]:
        prelude = f"KEY = {platform.key!r}\nCA = {str(platform.ca)!r}\n"
        ran = subprocess.run([sys.executable, "-c", prelude + code], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert ran.returncode == 0 and ran.stdout.strip(), (code, ran.stderr)


def test_monitoring_sees_every_service(platform: Platform) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from helixflow._proto import monitoring_pb2 as pb
    from helixflow._proto import monitoring_pb2_grpc as pb_grpc
    from helixflow.monitoring.dashboards import metric_names

    _wait_all_up(platform)
    with grpc.insecure_channel(f"127.0.0.1:{platform.ports['monitor']}") as channel:
        report = pb_grpc.MonitorStub(channel).GetHealth(pb.GetHealthRequest(), timeout=5)
        assert report.status == "ok"
        assert {s.name: s.state for s in report.services} == {
            "auth": "up", "pool": "up", "gateway": "up"}
        checks = health_pb2_grpc.HealthStub(channel)
        for name in ("", "auth", "pool", "gateway"):
            reply = checks.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name

    # A streamed chat shows up in the figures the page draws (tokens/s over the last 10 s).
    with platform.https() as http:
        body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 16, "stream": True,
                "messages": [{"role": "user", "content": "Count to five."}]}
        with http.stream("POST", f"{platform.url}/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {platform.key}"}) as reply:
            assert reply.status_code == 200
            assert sum(1 for line in reply.iter_lines() if line.startswith("data: ")) > 2
        bad = http.get(f"{platform.url}/v1/models", headers={"Authorization": "Bearer hfx_no"})
        assert bad.status_code == 401
    deadline = time.monotonic() + 10
    while True:
        status = httpx.get(f"{platform.monitor}/api/status", timeout=5).json()
        figures = status["figures"]
        if (figures["tokens_per_s"] or 0) > 0 and figures["ttft_p50_ms"] is not None and any(
                "refused" in e["message"] for e in status["events"]):  # fmt: skip
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.25)
    assert figures["requests_per_s"] > 0 and figures["kv_cache_usage"] is not None

    # Every metric the Grafana dashboard plots is exported by a real service.
    exported = set()
    for url in (f"http://127.0.0.1:{platform.ports['auth_http']}/metrics",
                f"http://127.0.0.1:{platform.ports['pool'] + 1}/metrics",
                f"{platform.monitor}/metrics"):  # fmt: skip
        exported.update(re.findall(r"^(helixflow_\w+?)(?:\{| )", httpx.get(url).text, re.M))
    with platform.https() as http:
        exported.update(re.findall(r"^(helixflow_\w+?)(?:\{| )",
                                   http.get(f"{platform.url}/metrics").text, re.M))  # fmt: skip
    missing = {name for name in metric_names()
               if name not in exported and f"{name}_bucket" not in exported}  # fmt: skip
    assert not missing, sorted(exported)
    dashboard = httpx.get(f"{platform.monitor}/grafana.json").json()
    assert len(dashboard["panels"]) >= 12
    scrape = httpx.get(f"{platform.monitor}/prometheus.yml").text
    assert f"127.0.0.1:{platform.ports['gateway']}" in scrape and str(platform.ca) in scrape
    # Monitoring's probes every second leave no log lines behind (only failures would).
    log = platform.log.read_text()
    for probe in ("GET /health 200", "GET /ready 200", "GET /metrics 200"):
        assert probe not in log, probe


def test_status_page_in_a_real_browser(platform: Platform) -> None:
    from browser_testing import browser

    artifacts = Path(os.environ.get("HELIXFLOW_TEST_ARTIFACTS", platform.data.parent))
    with browser() as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{platform.monitor}/")
        page.wait_for_selector("[data-service='gateway'][data-state='up']", timeout=10_000)
        for name in ("auth", "pool", "gateway"):
            assert page.get_attribute(f"[data-service='{name}']", "data-state") == "up"
        assert page.get_attribute("#overall", "data-status") == "ok"
        # It updates itself (polled from here: the page's CSP forbids a string predicate).
        polls = int(page.get_attribute("#updated", "data-polls") or 0)
        deadline = time.monotonic() + 10
        while int(page.get_attribute("#updated", "data-polls") or 0) < polls + 2:
            assert time.monotonic() < deadline, "the status page did not update itself"
            page.wait_for_timeout(100)
        assert page.text_content("#tokens") != "\u2013"  # the chat of the previous test
        shot = artifacts / "status-page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        print(f"status page screenshot: {shot}")
        assert not errors, errors


def test_a_killed_pool_is_seen_down_then_restarted(platform: Platform) -> None:
    _wait_all_up(platform)
    os.kill(platform.state()["pool"]["pid"], signal.SIGKILL)
    killed = time.monotonic()
    while _monitor_health(platform)["pool"] != "down":
        assert time.monotonic() - killed < 5, "monitoring did not see the pool down within 5 s"
        time.sleep(0.1)
    seen_down = time.monotonic() - killed
    deadline = time.monotonic() + 120
    while True:
        states = _monitor_health(platform)
        if platform.state()["pool"]["restarts"] == 1 and set(states.values()) == {"up"}:
            break
        assert time.monotonic() < deadline, platform.log.read_text()[-3000:]
        time.sleep(0.25)
    print(f"pool seen down {seen_down:.2f}s after SIGKILL; up again after "
          f"{time.monotonic() - killed:.1f}s")  # fmt: skip
    with platform.https() as http:
        assert http.get(f"{platform.url}/ready").status_code == 200
    events = httpx.get(f"{platform.monitor}/api/status").json()["events"]
    assert any(e["service"] == "pool" and e["message"].startswith("down") for e in events)


def test_stop_then_a_second_start_keeps_the_database(platform: Platform) -> None:
    pids = [entry["pid"] for entry in platform.state().values()]
    platform.proc.send_signal(signal.SIGTERM)
    assert platform.proc.wait(90) == 0, platform.log.read_text()[-3000:]
    assert ("stopped: {'monitor': 0, 'auth': 0, 'pool': 0, 'gateway': 0}"
            in platform.log.read_text())  # fmt: skip
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status").read_text()  # fmt: skip

    # A second start keeps the database: no new admin, the first key still works.
    second = platform.log.with_name("serve2.log")
    with second.open("w") as file:
        proc = subprocess.Popen(platform.args, env=platform.env, stdout=file,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        log = _wait_for(second, "HelixFlow is up", proc, 180)
        assert "API key:" not in log and "the one printed on the first start" in log
        with platform.https() as http:
            models = http.get(f"{platform.url}/v1/models",
                              headers={"Authorization": f"Bearer {platform.key}"})  # fmt: skip
            assert models.status_code == 200
    finally:
        _stop(proc)
