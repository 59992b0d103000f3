"""Real processes for the auth service tests: `helixflow auth`, a private `redis-server`, and
a gateway-side validator (`AuthClient` on its own event loop thread, as in a gateway)."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
from auth_testing import Database
from process_testing import free_port

from helixflow.auth.client import AuthClient
from helixflow.auth.principal import Principal
from helixflow.auth.revocations import RevocationEvent

T = TypeVar("T")


def ssl_context(ca: Path) -> ssl.SSLContext:
    """A client context that trusts only `ca`."""
    return ssl.create_default_context(cafile=str(ca))


class AuthProcess:
    """A ``helixflow auth`` process on free ports over `database`."""

    def __init__(
        self,
        database: Database,
        master_key: str,
        log_dir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        tls: dict[str, Path] | None = None,
    ) -> None:
        self.database = database
        self.master_key = master_key
        self.log_dir = log_dir
        self.args = args
        self.extra_env = env or {}
        self.tls = tls
        self.verify: Any = True if tls is None else ssl_context(tls["ca"])
        if tls is not None:
            args = (*args, "--tls-cert", str(tls["server"]), "--tls-key", str(tls["server_key"]))
            self.args = args
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env.update(HELIXFLOW_MASTER_KEY=self.master_key, DATABASE_TYPE=self.database.kind,
                   **self.extra_env)  # fmt: skip
        if self.database.kind == "sqlite":
            env["DATABASE_PATH"] = self.database.target
        else:
            env["DATABASE_URL"] = self.database.target
        return env

    @property
    def url(self) -> str:
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> None:
        self.log = self.log_dir / f"auth-{self.http_port}-{time.monotonic_ns()}.log"
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "helixflow", "auth", "--port", str(self.grpc_port),
             "--http-port", str(self.http_port), *self.args],
            env=self.env, stdout=self._log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"auth exited early:\n{self.log.read_text()}")
            try:
                health = httpx.get(self.url + "/health", timeout=1, verify=self.verify)
                if health.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"auth did not come up:\n{self.log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log_file.close()
        return int(self.proc.returncode)

    def restart(self) -> None:
        assert self.stop() == 0, self.log.read_text()
        self.start()

    def admin(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``helixflow admin ...`` on the same database."""
        return subprocess.run(
            [sys.executable, "-m", "helixflow", "admin", *args],
            env=self.env, input=stdin, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    def http(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> Any:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.request(method, self.url + path, headers=headers, timeout=30,
                             verify=self.verify, **kwargs)  # fmt: skip

    def login(self, username: str, password: str) -> dict[str, Any]:
        reply = self.http("POST", "/v1/auth/login",
                          json={"username": username, "password": password})  # fmt: skip
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        return body


class Validator:
    """A gateway-side `AuthClient` running on its own event loop thread.

    `arrivals` maps (kind, value) of each revocation to the `time.perf_counter()` at which it
    was applied."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = AuthClient(target, name="test-gateway", **kwargs)
        self.arrivals: dict[tuple[str, str], float] = {}

        def arrived(event: RevocationEvent) -> None:
            self.arrivals[(event.kind, event.value)] = time.perf_counter()

        self.client.on_revocation = arrived
        self.run(self.client.start())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def authenticate(self, credential: str) -> Principal:
        return self.run(self.client.authenticate(credential))

    def close(self) -> None:
        self.run(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
