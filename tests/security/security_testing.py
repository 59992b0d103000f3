"""Shared pieces of the security tests: the gateway stack of tests/gateway, the OpenAI error
shape, tokens forged with the stack's own signing key, and the log checks (no secret in any
log file, no line forged by a client).

NOTE: tests/ has no packages; the helpers of tests/gateway and tests/ are put on sys.path here,
so that the security modules do not depend on which other suites pytest collected first.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

_TESTS = Path(__file__).resolve().parents[1]
for _path in (_TESTS / "gateway", _TESTS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import httpx  # noqa: E402
import jwt  # noqa: E402
from process_testing import Process, free_port  # noqa: E402
from stack_testing import ADMIN_PASSWORD, CHAT, EMBED, Stack  # noqa: E402

from helixflow.auth.signing_keys import KeyRing, load_master_key  # noqa: E402
from helixflow.auth.store import open_store  # noqa: E402

__all__ = [
    "ADMIN_PASSWORD",
    "CHAT",
    "EMBED",
    "LOG_LINE",
    "Process",
    "Stack",
    "assert_no_secret_in_logs",
    "b64url",
    "claims_of",
    "forge",
    "free_port",
    "lines_with",
    "login",
    "openai_error",
    "raw_exchange",
    "signing_ring",
]

# The start of every line the services log (text format): "2026-01-31 12:00:00,123 LEVEL ..."
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+ ")


def openai_error(reply: httpx.Response, status: int) -> dict[str, Any]:
    """Assert `reply` is `status` with exactly OpenAI's error object; returns its "error"."""
    assert reply.status_code == status, (reply.status_code, reply.text[:500])
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    assert "Traceback" not in error["message"]
    return dict(error)


def login(stack: Stack, username: str, password: str) -> dict[str, Any]:
    """Tokens from the stack's auth HTTP API (access_token, refresh_token, ...)."""
    reply = httpx.post(f"http://127.0.0.1:{stack.auth_http}/v1/auth/login",
                       json={"username": username, "password": password}, timeout=30)  # fmt: skip
    assert reply.status_code == 200, reply.text
    tokens: dict[str, Any] = reply.json()
    return tokens


def signing_ring(stack: Stack) -> KeyRing:
    """The auth service's signing keys, read from its database with the master key."""
    store = open_store("sqlite", path=stack.env["DATABASE_PATH"])
    try:
        record = store.load_signing_keys()
    finally:
        store.close()
    assert record is not None
    return KeyRing.from_dict(record, load_master_key(stack.env["HELIXFLOW_MASTER_KEY"]))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(ring: KeyRing, claims: dict[str, Any], *, headers: dict[str, Any] | None = None,
          key: Any = None) -> str:  # fmt: skip
    """An RS256 token of `claims`, signed with the ring's current key (or `key`), with the
    current kid and ``typ: at+jwt`` unless `headers` say otherwise (None: left out)."""
    current = ring.current
    header = {"kid": current.kid, "typ": "at+jwt", **(headers or {})}
    return jwt.encode(claims, current.private_key if key is None else key, algorithm="RS256",
                      headers={k: v for k, v in header.items() if v is not None})  # fmt: skip


def claims_of(token: str) -> dict[str, Any]:
    """A token's payload, unverified."""
    payload = token.split(".")[1]
    padded = payload + "=" * (-len(payload) % 4)
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(padded))
    return claims


def raw_exchange(port: int, context: ssl.SSLContext, request: bytes, *,
                 timeout: float = 10.0) -> bytes:  # fmt: skip
    """Send raw bytes over TLS to `port` and read until the server closes (or `timeout`)."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:  # fmt: skip
        tls.sendall(request)
        received = b""
        while time.monotonic() < deadline:
            tls.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                chunk = tls.recv(65536)
            except (TimeoutError, ssl.SSLError, ConnectionError):
                break
            if not chunk:
                break
            received += chunk
        return received


def log_files(*directories: Path) -> list[Path]:
    files = sorted(p for d in directories for p in d.rglob("*.log"))
    assert files, f"no log files under {directories}"
    return files


def assert_no_secret_in_logs(directories: list[Path], secrets: list[str]) -> None:
    """No secret (nor a long part of one) in any log file under `directories`."""
    assert secrets and all(len(s) >= 8 for s in secrets), "a secret list to check"
    for path in log_files(*directories):
        text = path.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, f"{path.name} holds a secret ({secret[:6]}...)"


def lines_with(marker: str, *files: Path) -> list[str]:
    """Every log line that holds `marker`, waiting up to 5 s for the first (the gateway writes
    its access log in batches)."""
    deadline = time.monotonic() + 5
    while True:
        found = [line for f in files for line in f.read_text(errors="replace").split("\n")
                 if marker in line]  # fmt: skip
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)
