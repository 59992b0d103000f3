"""The whole platform as real processes for the gateway tests: an inference pool (the real
SmolLM2 and MiniLM models), the auth service on SQLite, and one or more gateways over TLS."""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
from process_testing import Process, free_port
from tls_testing import make_pki

from helixflow._proto import inference_pb2 as pb
from helixflow._proto import inference_pb2_grpc as pb_grpc
from helixflow.auth.signing_keys import generate_master_key

CHAT = "SmolLM2-135M-Instruct"
EMBED = "all-MiniLM-L6-v2"
ADMIN_PASSWORD = "admin password 1"


class Stack:
    """Pool + auth + gateway(s), and keys made with the admin CLI."""

    def __init__(self, model_home: Path, directory: Path) -> None:
        self.dir = directory
        self.pki = make_pki(directory)
        self.env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        self.env.update(HELIXFLOW_HOME=str(model_home), DATABASE_TYPE="sqlite",
                        HELIXFLOW_MASTER_KEY=generate_master_key(),
                        DATABASE_PATH=str(directory / "auth.db"))  # fmt: skip
        self._clients: list[Any] = []
        self.pool_port = free_port()
        self.pool = Process(["pool", "--port", str(self.pool_port), "--max-model-len", "1024",
                             "--num-blocks", "512", "--metrics-port", "0"], self.env,
                            directory / "pool.log")  # fmt: skip
        self.auth_port, self.auth_http = free_port(), free_port()
        self.auth = Process(["auth", "--port", str(self.auth_port), "--http-port",
                             str(self.auth_http)], self.env, directory / "auth.log")  # fmt: skip
        self.gateways: list[tuple[Process, int]] = []
        self.auth.ready(lambda: httpx.get(f"http://127.0.0.1:{self.auth_http}/health",
                                          timeout=1).status_code == 200)  # fmt: skip
        made = self.admin("create-user", "root", "--role", "admin", "--password-stdin",
                          stdin=ADMIN_PASSWORD + "\n")  # fmt: skip
        assert made["username"] == "root"
        self.pool_channel = grpc.insecure_channel(f"127.0.0.1:{self.pool_port}")
        self.pool_stub = pb_grpc.InferencePoolStub(self.pool_channel)
        self.pool.ready(lambda: bool(self.pool_stub.ListModels(pb.ListModelsRequest(),
                                                               timeout=1).models))  # fmt: skip

    def admin(self, *args: str, stdin: str | None = None) -> Any:
        import subprocess
        import sys

        done = subprocess.run([sys.executable, "-m", "helixflow", "admin", *args, "--json"],
                              env=self.env, input=stdin, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def key(self, *args: str) -> str:
        """A new API key of root (`args`: --rpm, --tpm, --scope ...)."""
        return str(self.admin("create-key", "root", *args)["key"])

    def start_gateway(self, *args: str, env: dict[str, str] | None = None) -> int:
        port = free_port()
        args = ("--port", str(port), "--pool", f"127.0.0.1:{self.pool_port}",
                "--auth", f"127.0.0.1:{self.auth_port}", "--tls-cert", str(self.pki["server"]),
                "--tls-key", str(self.pki["server_key"]), *args)  # fmt: skip
        gateway = Process(["gateway", *args], {**self.env, **(env or {})},
                          self.dir / f"gateway-{port}.log")  # fmt: skip
        self.gateways.append((gateway, port))

        def ready() -> bool:
            with httpx.Client(verify=self.ssl_context(), timeout=2) as probe:
                return probe.get(f"https://127.0.0.1:{port}/ready").status_code == 200

        gateway.ready(ready, timeout=60)
        return port

    def gateway(self, port: int) -> Process:
        """The gateway process listening on `port`."""
        return next(process for process, p in self.gateways if p == port)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki["ca"]))

    def http(self, port: int, key: str | None = None) -> httpx.Client:
        """An HTTPS client of gateway `port` (closed with the stack)."""
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        client = httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=self.ssl_context(),
                              headers=headers, timeout=60)  # fmt: skip
        self._clients.append(client)
        return client

    def openai(self, port: int, key: str) -> openai.OpenAI:
        """The official SDK on gateway `port` (no retries, closed with the stack)."""
        transport = httpx.Client(verify=self.ssl_context(), timeout=60)
        self._clients.append(transport)
        return openai.OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key=key,
                             max_retries=0, http_client=transport)  # fmt: skip

    def pool_load(self) -> Any:
        return {m.model: m for m in self.pool_stub.Load(pb.LoadRequest(), timeout=5).models}

    def close(self) -> None:
        for client in self._clients:
            client.close()
        for gateway, _ in self.gateways:
            gateway.stop()
        self.pool_channel.close()
        self.auth.stop()
        self.pool.stop()
