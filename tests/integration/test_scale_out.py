"""Scale-out on one machine, all real: two gateways, two auth replicas on one PostgreSQL
database, two pools serving the same model, one Redis (rate limits, revocation fan-out between
the auth replicas, and the pool registry the gateways discover the pools in).

A client alternating between the gateways sees one world: one rate limit per key, a revocation
through either auth refused by both gateways, work spread over both pools, and a draining pool
given no new work.
"""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from process_testing import Process, RedisServer, free_port
from tls_testing import make_pki

from helixflow.auth.signing_keys import generate_master_key

CHAT = "SmolLM2-135M-Instruct"
PASSWORD = "scale-out admin password"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


class Cluster:
    def __init__(self, model_home: Path, directory: Path, database_url: str) -> None:
        self.dir = directory
        self.pki = make_pki(directory)
        self.redis = RedisServer(directory)
        self.procs: list[Process] = []
        self.env = {"PATH": "/usr/bin:/bin", "HOME": str(directory),
                    "HELIXFLOW_HOME": str(model_home), "DATABASE_TYPE": "postgres",
                    "DATABASE_URL": database_url, "HELIXFLOW_MASTER_KEY": generate_master_key(),
                    "REDIS_URL": self.redis.url}  # fmt: skip
        self.ssl = ssl.create_default_context(cafile=str(self.pki["ca"]))
        try:
            self.auths = [self._auth(0)]
            self.admin("create-user", "root", "--role", "admin", "--password-stdin",
                       stdin=PASSWORD + "\n")  # fmt: skip
            self.auths.append(self._auth(1))  # after the first made the signing key
            self.pools = [self._pool(i) for i in range(2)]
            self.gateways = [self._gateway(i, self.auths[i]) for i in range(2)]
        except BaseException:
            self.close()
            raise

    def _auth(self, i: int) -> dict[str, Any]:
        grpc_port, http_port = free_port(), free_port()
        proc = Process(["auth", "--port", str(grpc_port), "--http-port", str(http_port)],
                       self.env, self.dir / f"auth-{i}.log")  # fmt: skip
        self.procs.append(proc)
        url = f"http://127.0.0.1:{http_port}"
        proc.ready(lambda: httpx.get(f"{url}/health", timeout=1).json()["redis"] is True, 60)
        return {"proc": proc, "grpc": f"127.0.0.1:{grpc_port}", "url": url}

    def _pool(self, i: int) -> dict[str, Any]:
        port, metrics = free_port(), free_port()
        proc = Process(["pool", "--port", str(port), "--metrics-port", str(metrics),
                        "--max-model-len", "1024", "--num-blocks", "512",
                        "--embedding-model", "none", "--register", self.redis.url],
                       self.env, self.dir / f"pool-{i}.log")  # fmt: skip
        self.procs.append(proc)
        proc.ready(lambda: "registered" in proc.log.read_text(), 120)
        return {"proc": proc, "address": f"127.0.0.1:{port}", "metrics": metrics}

    def _gateway(self, i: int, auth: dict[str, Any]) -> dict[str, Any]:
        port = free_port()
        proc = Process(["gateway", "--port", str(port), "--auth", auth["grpc"],
                        "--redis-url", self.redis.url, "--discover-pools",
                        "--tls-cert", str(self.pki["server"]),
                        "--tls-key", str(self.pki["server_key"])],
                       self.env, self.dir / f"gateway-{i}.log")  # fmt: skip
        self.procs.append(proc)
        url = f"https://127.0.0.1:{port}"
        context = ssl.create_default_context(cafile=str(self.pki["ca"]))
        proc.ready(lambda: httpx.get(f"{url}/ready", verify=context).status_code == 200, 60)
        return {"proc": proc, "url": url}

    def admin(self, *args: str, stdin: str | None = None) -> Any:
        done = subprocess.run([sys.executable, "-m", "helixflow", "admin", *args, "--json"],
                              env=self.env, input=stdin, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def call(self, gateway: int, credential: str, max_tokens: int = 1) -> httpx.Response:
        return httpx.post(f"{self.gateways[gateway]['url']}/v1/chat/completions", verify=self.ssl,
                          headers={"Authorization": f"Bearer {credential}"}, timeout=120,
                          json={"model": CHAT, "max_tokens": max_tokens, "ignore_eos": True,
                                "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip

    def served(self, pool: int) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.pools[pool]['metrics']}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('helixflow_pool_requests_total{model="' + CHAT))  # fmt: skip

    def running(self, pool: int) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.pools[pool]['metrics']}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("helixflow_pool_requests_running{"))  # fmt: skip

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.redis.close()


@pytest.fixture(scope="module")
def cluster(model_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=2)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is unreachable at 127.0.0.1:5432: {exc}")
    name = f"helixflow_scale_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')  # a name made here, never input
        made = None
        try:
            made = Cluster(model_home, tmp_path_factory.mktemp("scale"),
                           f"postgresql://postgres@127.0.0.1:5432/{name}")  # fmt: skip
            yield made
        finally:
            if made is not None:
                made.close()
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_both_gateways_find_both_pools_in_the_registry(cluster: Cluster) -> None:
    keys = redis.Redis.from_url(cluster.redis.url).keys("helixflow:pools:*")
    assert sorted(k.decode().removeprefix("helixflow:pools:") for k in keys) == sorted(
        p["address"] for p in cluster.pools)  # fmt: skip
    for gateway in cluster.gateways:
        metrics = httpx.get(f"{gateway['url']}/metrics", verify=cluster.ssl).text
        for pool in cluster.pools:
            assert f'helixflow_gateway_backend_healthy{{backend="pool {pool["address"]}"}} 1.0' \
                in metrics  # fmt: skip


def test_one_rate_limit_per_key_across_gateways(cluster: Cluster) -> None:
    key = cluster.admin("create-key", "root", "--rpm", "6")["key"]
    statuses = [cluster.call(i % 2, key).status_code for i in range(12)]
    assert statuses.count(200) == 6 and statuses.count(429) == 6, statuses


def _refused_after(cluster: Cluster, gateway: int, credential: str) -> float:
    """Seconds from now until `gateway` refuses `credential` (polling)."""
    started = time.perf_counter()
    while True:
        reply = httpx.get(f"{cluster.gateways[gateway]['url']}/v1/models", verify=cluster.ssl,
                          headers={"Authorization": f"Bearer {credential}"})  # fmt: skip
        if reply.status_code == 401:
            return time.perf_counter() - started
        assert time.perf_counter() - started < 5, "never refused"


def test_a_revocation_through_either_auth_is_refused_by_both_gateways(cluster: Cluster) -> None:
    delays = []
    for via in (0, 1):
        auth = cluster.auths[via]["url"]
        login = httpx.post(f"{auth}/v1/auth/login",
                           json={"username": "root", "password": PASSWORD}).json()  # fmt: skip
        admin = {"Authorization": f"Bearer {login['access_token']}"}
        made = httpx.post(f"{auth}/v1/api-keys", headers=admin, json={"name": "r"}).json()
        for gateway in (0, 1):  # both gateways know (and cache) the key and the token
            assert cluster.call(gateway, made["key"]).status_code == 200
            assert cluster.call(gateway, login["access_token"]).status_code == 200
        revoked = httpx.delete(f"{auth}/v1/api-keys/{made['id']}", headers=admin)
        assert revoked.status_code == 200, revoked.text
        delays += [_refused_after(cluster, g, made["key"]) for g in (0, 1)]
        revoked = httpx.post(f"{auth}/v1/auth/revoke", headers=admin,
                             json={"token": login["access_token"]})  # fmt: skip
        assert revoked.status_code in (200, 204), revoked.text
        delays += [_refused_after(cluster, g, login["access_token"]) for g in (0, 1)]
    print("revocation to refusal (ms):", [round(d * 1000, 1) for d in delays])
    assert max(delays) < 0.1, delays


def test_work_spreads_over_pools_and_a_draining_pool_gets_none(cluster: Cluster) -> None:
    key = cluster.admin("create-key", "root")["key"]
    before = [cluster.served(0), cluster.served(1)]
    codes: list[int] = []

    def one(i: int) -> None:
        codes.append(cluster.call(i % 2, key, max_tokens=24).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert codes == [200] * 8
    spread = [cluster.served(i) - before[i] for i in (0, 1)]
    assert min(spread) >= 1, f"one pool got all the work: {spread}"

    # A long request, then SIGTERM to the pool running it: it leaves the registry at once and
    # drains; the gateways give it no new work while its request finishes.
    finished: list[int] = []
    long_one = threading.Thread(target=lambda: finished.append(
        cluster.call(0, key, max_tokens=200).status_code))  # fmt: skip
    long_one.start()
    deadline = time.monotonic() + 30
    while not (busy := [i for i in (0, 1) if cluster.running(i)]):
        assert time.monotonic() < deadline, "the long request never started"
        time.sleep(0.05)
    victim = cluster.pools[busy[0]]
    victim["proc"].proc.send_signal(signal.SIGTERM)
    registry = redis.Redis.from_url(cluster.redis.url)
    while registry.exists(f"helixflow:pools:{victim['address']}"):
        assert time.monotonic() < deadline, "the draining pool stayed registered"
        time.sleep(0.05)
    time.sleep(1.5)  # the gateways' one-second refresh
    during = cluster.served(busy[0])
    for i in range(4):
        assert cluster.call(i % 2, key).status_code == 200
    assert cluster.served(busy[0]) == during, "a draining pool got new work"
    assert cluster.running(busy[0]) == 1  # still finishing the long request
    long_one.join(120)
    assert finished == [200], "the draining pool's request did not finish"
    assert victim["proc"].proc.wait(60) == 0


def test_login_throttling_is_shared_by_the_auth_replicas(cluster: Cluster) -> None:
    cluster.admin("create-user", "victim", "--password-stdin", stdin="the right one 123\n")
    for i in range(5):  # five wrong guesses, spread over both replicas
        reply = httpx.post(f"{cluster.auths[i % 2]['url']}/v1/auth/login",
                           json={"username": "victim", "password": f"guess {i}"})  # fmt: skip
        assert reply.status_code == 401, reply.text
    right = {"username": "victim", "password": "the right one 123"}
    for auth in cluster.auths:  # locked on both, even for the right password
        reply = httpx.post(f"{auth['url']}/v1/auth/login", json=right)
        assert reply.status_code == 429 and reply.headers["retry-after"], reply.text
