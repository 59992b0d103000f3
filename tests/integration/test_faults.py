"""Faults, against real processes: a pool killed mid-stream (and its replacement rejoining), a
gateway stopped with streams open, auth down, Redis down.

One platform for the module: two pools, auth on SQLite and a gateway routing to both pools.
(Auth restarts losing nothing, on SQLite and PostgreSQL: tests/auth/test_service.py,
``test_restart_keeps_users_keys_and_revocations``.)
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from gateway.stack_testing import ADMIN_PASSWORD, CHAT, Stack
from process_testing import Process, RedisServer, free_port

from helixflow._proto import inference_pb2 as pb
from helixflow._proto import inference_pb2_grpc as pb_grpc


class Pool:
    """A second inference pool (metrics on, to count what it served)."""

    def __init__(self, stack: Stack, port: int, name: str) -> None:
        self.port = port
        self.metrics_port = free_port()
        self.process = Process(["pool", "--port", str(port), "--max-model-len", "1024",
                                "--num-blocks", "512", "--embedding-model", "none",
                                "--metrics-port", str(self.metrics_port)], stack.env,
                               stack.dir / f"{name}.log")  # fmt: skip
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.InferencePoolStub(self.channel)
        self.process.ready(lambda: bool(self.stub.ListModels(pb.ListModelsRequest(),
                                                             timeout=1).models))  # fmt: skip

    def running(self) -> int:
        loads = self.stub.Load(pb.LoadRequest(), timeout=5).models
        return sum(m.running + m.waiting for m in loads)

    def served(self) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("helixflow_pool_requests_total{"))  # fmt: skip

    def close(self) -> None:
        self.channel.close()
        self.process.stop()


class Faults:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.second = Pool(stack, free_port(), "pool-b")
        self.gateway = stack.start_gateway("--pool", f"127.0.0.1:{self.second.port}")
        self.key = stack.key()
        self.http = stack.http(self.gateway, self.key)


@pytest.fixture(scope="module")
def faults(model_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    stack = Stack(model_home, tmp_path_factory.mktemp("faults"))
    made: Faults | None = None
    try:
        made = Faults(stack)
        yield made
    finally:
        if made is not None:
            made.second.close()
        stack.close()


def _chat(max_tokens: int, stream: bool, content: str = "Tell me a long story.") -> dict[str, Any]:
    return {"model": CHAT, "max_tokens": max_tokens, "stream": stream, "ignore_eos": True,
            "messages": [{"role": "user", "content": content}]}  # fmt: skip


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_pool_killed_mid_stream_ends_the_stream_cleanly(faults: Faults) -> None:
    stack, first = faults.stack, faults.stack.pool
    events: list[str] = []
    killed_at = 0.0
    with faults.http.stream("POST", "/v1/chat/completions", json=_chat(400, True)) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 3:  # mid-stream: kill the pool that is generating it
                victim = (first.proc if stack.pool_load()[CHAT].running
                          else faults.second.process.proc)  # fmt: skip
                killed_at = time.monotonic()
                victim.send_signal(signal.SIGKILL)
        ended_after = time.monotonic() - killed_at
    assert killed_at and ended_after < 1.0, f"the stream ended {ended_after:.2f}s after the kill"
    error = json.loads(events[-1] if events[-1] != "[DONE]" else events[-2])
    assert set(error) == {"error"} and error["error"]["type"] and error["error"]["message"]
    assert "Traceback" not in error["error"]["message"]
    print(f"stream ended {ended_after * 1000:.0f} ms after SIGKILL with {error['error']}")

    # New requests all go to the survivor.
    for _ in range(4):
        reply = faults.http.post("/v1/chat/completions", json=_chat(4, False))
        assert reply.status_code == 200, reply.text


def test_a_restarted_pool_rejoins(faults: Faults) -> None:
    stack = faults.stack
    dead = [p for p in (stack.pool.proc, faults.second.process.proc) if p.poll() is not None]
    assert len(dead) == 1, "the previous test kills one pool"
    if dead[0] is faults.second.process.proc:
        faults.second.close()
        faults.second = Pool(stack, faults.second.port, "pool-b2")
        rejoined = faults.second
    else:  # the stack's own pool: bring a pool back on its port, with metrics
        stack.pool.stop()
        rejoined = Pool(stack, stack.pool_port, "pool-a2")
        stack.pool = rejoined.process
    # The gateway sees it within its one-second load refresh...
    ready = f"https://127.0.0.1:{faults.gateway}/metrics"
    _wait(lambda: all(line.endswith(" 1.0") for line in faults.http.get(ready).text.splitlines()
                      if line.startswith("helixflow_gateway_backend_healthy{")), 15,
          "the gateway never saw the restarted pool healthy")  # fmt: skip
    # ... and sends it work again: concurrent requests spread over the least loaded pools.
    before = rejoined.served()
    results: list[int] = []

    def one() -> None:
        results.append(faults.http.post("/v1/chat/completions", json=_chat(16, False)).status_code)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == [200] * 6
    assert rejoined.served() - before >= 1, "the restarted pool got no request"
    if rejoined is not faults.second:
        rejoined.channel.close()


def test_gateway_sigterm_lets_20_open_streams_finish(faults: Faults) -> None:
    stack = faults.stack
    port = stack.start_gateway()
    gateway = next(g for g, p in stack.gateways if p == port)
    texts: dict[int, list[str]] = {i: [] for i in range(20)}
    done: dict[int, bool] = {}
    started = threading.Barrier(21, timeout=120)
    auth = {"Authorization": f"Bearer {faults.key}"}

    def stream(i: int) -> None:
        url = f"https://127.0.0.1:{port}/v1/chat/completions"
        with (httpx.Client(verify=stack.ssl_context(), timeout=120, headers=auth) as client,
              client.stream("POST", url, json=_chat(24, True)) as reply):  # fmt: skip
            first = True
            for line in reply.iter_lines():
                if first and line.startswith("data: "):
                    first = False
                    started.wait()
                if line == "data: [DONE]":
                    done[i] = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    texts[i] += [c["delta"].get("content") or "" for c in chunk["choices"]]

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    started.wait()  # every stream is open and has its first token
    gateway.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.TransportError):  # new connections are refused meanwhile
        httpx.get(f"https://127.0.0.1:{port}/health", verify=stack.ssl_context(), timeout=2)
    for thread in threads:
        thread.join(120)
    assert sorted(done) == list(range(20)), f"unfinished: {set(range(20)) - set(done)}"
    assert all("".join(t) for t in texts.values())
    assert gateway.proc.wait(30) == 0


def test_auth_down_jwts_pass_api_keys_fail_closed_then_recover(faults: Faults) -> None:
    stack = faults.stack
    auth_url = f"http://127.0.0.1:{stack.auth_http}"
    token = httpx.post(f"{auth_url}/v1/auth/login",
                       json={"username": "root", "password": ADMIN_PASSWORD}).json()  # fmt: skip
    fresh_key = stack.key()  # never seen by the gateway: not cached
    jwt = {"Authorization": f"Bearer {token['access_token']}"}
    assert faults.http.post("/v1/chat/completions", json=_chat(2, False),
                            headers=jwt).status_code == 200  # fmt: skip
    assert stack.auth.stop() == 0
    time.sleep(6)  # past the revocation stream's 5 s staleness: online checks fail too
    reply = faults.http.post("/v1/chat/completions", json=_chat(2, False), headers=jwt)
    assert reply.status_code == 200, reply.text
    for key in (faults.key, fresh_key):  # cached or not, API keys fail closed
        reply = faults.http.post("/v1/chat/completions", json=_chat(2, False),
                                 headers={"Authorization": f"Bearer {key}"})  # fmt: skip
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"]["code"] == "auth_unavailable"

    stack.auth = Process(stack.auth.args, stack.env, stack.dir / "auth-2.log")
    stack.auth.ready(lambda: httpx.get(f"{auth_url}/health", timeout=1).status_code == 200)
    _wait(lambda: faults.http.post("/v1/chat/completions", json=_chat(2, False), headers={
              "Authorization": f"Bearer {fresh_key}"}).status_code == 200, 20,
          "API keys did not recover by themselves")  # fmt: skip


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_redis_down_fails_as_configured_and_recovers(faults: Faults, mode: str,
                                                     tmp_path: Path) -> None:  # fmt: skip
    stack = faults.stack
    try:
        redis = RedisServer(tmp_path)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    try:
        port = stack.start_gateway("--redis-url", redis.url, "--rate-limit-failure", mode)
        gateway = next(g for g, p in stack.gateways if p == port)
        client = stack.http(port, stack.key("--rpm", "1000"))
        assert client.post("/v1/chat/completions", json=_chat(2, False)).status_code == 200
        redis.close()
        reply = client.post("/v1/chat/completions", json=_chat(2, False))
        if mode == "open":
            assert reply.status_code == 200, reply.text
        else:
            assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
            assert reply.json()["error"]["code"] == "rate_limiter_unavailable"
        redis = RedisServer(tmp_path, port=redis.port)  # back, on the same address
        _wait(lambda: client.post("/v1/chat/completions", json=_chat(2, False)).status_code
              == 200 and "x-ratelimit-remaining-requests" in client.post(
                  "/v1/chat/completions", json=_chat(2, False)).headers, 15,
              "limits never came back")  # fmt: skip
        log = gateway.log.read_text()
        assert "Redis unavailable" in log and "Redis is back" in log
        assert " 500 " not in log
    finally:
        redis.close()
