"""Password guessing against the real auth service's HTTP API (:8082 in production): a wrong
password, an unknown user, a disabled user and a malformed name get the very same answer; one
account is locked after 5 failures, one source address after 20 (password spraying), whatever
the client claims in X-Forwarded-For; and no password or token reaches the log.

Throttling runs per process, so this module has its own auth service (its source budget for
127.0.0.1 is spent by the last throttling test). Covered elsewhere: the throttle's arithmetic
(tests/auth/test_core.py), 5 failures then 429 for a real and an unknown account
(tests/auth/test_service.py::test_login_throttling_is_generic).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from security_testing import LOG_LINE, Process, assert_no_secret_in_logs, free_port, openai_error

from helixflow.auth.signing_keys import generate_master_key

ROOT_PASSWORD = "root password 1"
PASSWORD = "user password 1"
WRONG = "wrong password 1"


class Auth:
    """A `helixflow auth` process on SQLite with an admin (root) and four users."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env.update(HELIXFLOW_MASTER_KEY=generate_master_key(), DATABASE_TYPE="sqlite",
                   DATABASE_PATH=str(directory / "auth.db"))  # fmt: skip
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = Process(["auth", "--port", str(free_port()), "--http-port",
                             self.url.rsplit(":", 1)[1]], env, directory / "auth.log")  # fmt: skip
        self.proc.ready(lambda: httpx.get(f"{self.url}/health", timeout=1).status_code == 200)
        made = subprocess.run([sys.executable, "-m", "helixflow", "admin", "create-user", "root",
                               "--role", "admin", "--password-stdin"], env=env,
                              input=ROOT_PASSWORD + "\n", capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert made.returncode == 0, made.stderr
        self.tokens = self.login("root", ROOT_PASSWORD).json()
        self.secrets = [ROOT_PASSWORD, PASSWORD, WRONG, self.tokens["access_token"],
                        self.tokens["refresh_token"]]  # fmt: skip
        admin = {"Authorization": f"Bearer {self.tokens['access_token']}"}
        for name in ("alice", "bob", "carol", "dave"):
            reply = httpx.post(f"{self.url}/v1/users", headers=admin, timeout=30,
                               json={"username": name, "password": PASSWORD})  # fmt: skip
            assert reply.status_code == 201, reply.text
            if name == "dave":
                patched = httpx.patch(f"{self.url}/v1/users/{reply.json()['id']}", headers=admin,
                                      json={"disabled": True}, timeout=30)  # fmt: skip
                assert patched.status_code == 200, patched.text

    def login(self, username: str, password: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/auth/login", timeout=30,
                          json={"username": username, "password": password}, **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Auth]:
    made = Auth(tmp_path_factory.mktemp("security-login"))
    try:
        yield made
    finally:
        made.proc.stop()


def _seen_from_outside(reply: httpx.Response) -> tuple[int, bytes, list[tuple[str, str]]]:
    """Status, body and headers, less the two that differ on every answer."""
    headers = sorted((k, v) for k, v in reply.headers.items() if k not in ("date", "x-request-id"))
    return reply.status_code, reply.content, headers


def test_every_failed_login_gets_the_same_answer(auth: Auth) -> None:
    answers = {
        "a wrong password": auth.login("alice", WRONG),
        "an unknown user": auth.login("nobody-at-all", WRONG),
        "a disabled user, right password": auth.login("dave", PASSWORD),
        "a name no account can have": auth.login("no such\nname", WRONG),
    }
    first = _seen_from_outside(answers["a wrong password"])
    error = openai_error(answers["a wrong password"], 401)
    assert error["code"] == "invalid_credentials"
    for what, reply in answers.items():
        assert _seen_from_outside(reply) == first, what


def test_one_account_is_locked_after_5_failures_even_for_the_right_password(auth: Auth) -> None:
    statuses: dict[str, list[int]] = {}
    locked: dict[str, httpx.Response] = {}
    for name in ("nobody-else", "bob"):
        replies = [auth.login(name, WRONG) for _ in range(6)]
        statuses[name] = [r.status_code for r in replies]
        locked[name] = replies[-1]
    assert statuses["bob"] == statuses["nobody-else"] == [401] * 5 + [429]
    assert _seen_from_outside(locked["bob"]) == _seen_from_outside(locked["nobody-else"])
    assert openai_error(locked["bob"], 429)["code"] == "login_throttled"
    assert int(locked["bob"].headers["retry-after"]) >= 1
    # The first lock is 1 s; the next failure doubles it, and within it even the right
    # password is refused (the lock is checked before the password).
    time.sleep(1.2)
    assert auth.login("bob", WRONG).status_code == 401
    right = auth.login("bob", PASSWORD)
    assert right.status_code == 429 and "access_token" not in right.text
    assert int(right.headers["retry-after"]) >= 1
    assert auth.login("alice", PASSWORD).status_code == 200  # other accounts are not locked


def test_a_crlf_in_the_path_forges_no_log_line(auth: Auth) -> None:
    reply = httpx.get(f"{auth.url}/v1/users/x%0D%0A2030-01-01%2000:00:00,000%20INFO%20forged",
                      timeout=30)  # fmt: skip
    assert reply.status_code == 401
    reply = httpx.get(f"{auth.url}/nope%0D%0AFORGED%20line%0A", timeout=30)
    openai_error(reply, 404)
    deadline = time.monotonic() + 5
    while "forged" not in (log := auth.proc.log.read_text()) or "FORGED" not in log:
        assert time.monotonic() < deadline, "the requests left no log line"
        time.sleep(0.05)
    for line in log.split("\n"):
        if line and not line.startswith("helixflow "):  # the start-up banner
            assert LOG_LINE.match(line) and not line.startswith("2030-"), repr(line)


def test_password_spraying_from_one_address_is_throttled(auth: Auth) -> None:
    """One wrong guess each for many account names: the source address is locked after 20
    failures in 15 minutes (some were spent by the tests above), for every account, right
    password or not, and X-Forwarded-For does not buy a new budget."""
    statuses = [auth.login(f"spray-{i}", WRONG).status_code for i in range(25)]
    assert 429 in statuses, statuses
    first = statuses.index(429)
    assert first <= 20, statuses  # at most 20 failures from one address (fewer: spent above)
    assert statuses[:first] == [401] * first and set(statuses[first:]) == {429}, statuses
    for headers in ({}, {"X-Forwarded-For": "10.9.8.7"}, {"X-Real-IP": "10.9.8.7"}):
        reply = auth.login("carol", PASSWORD, headers=headers)
        assert reply.status_code == 429 and "access_token" not in reply.text, headers
    print(f"\nspraying: locked after {first} more failures from this address")


def test_no_password_or_token_reaches_the_log(auth: Auth) -> None:
    log = auth.proc.log.read_text()
    assert "login failed" in log and "login throttled" in log  # the log does say what happened
    assert_no_secret_in_logs([auth.dir], auth.secrets)
