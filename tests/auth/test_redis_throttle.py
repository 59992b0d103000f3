"""Login throttling shared through a real Redis: two throttles (two auth replicas) see one
count, the local rules hold (account delay doubling, source budget, success clears the
account), and a Redis outage falls back to per-replica throttling."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from process_testing import RedisServer, free_port

from helixflow.auth.throttle import LoginThrottle, RedisLoginThrottle


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    try:
        server = RedisServer(tmp_path)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    yield server.url
    server.close()


def replica(url: str, **rules: float) -> RedisLoginThrottle:
    throttle = RedisLoginThrottle.from_url(url)
    throttle.fallback = LoginThrottle(**rules)  # type: ignore[arg-type]
    return throttle


def test_replicas_share_the_account_count(redis_url: str) -> None:
    a = replica(redis_url, account_failures=3, base_delay=0.3, source_failures=100)
    b = replica(redis_url, account_failures=3, base_delay=0.3, source_failures=100)
    for i in range(3):  # spread over both replicas, from three addresses
        (a if i % 2 else b).failure("Alice", f"10.0.0.{i}")
    assert 0.2 < a.retry_after("alice", "10.9.9.9") <= 0.3  # the name is case-folded
    assert 0.2 < b.retry_after("ALICE", "10.9.9.9") <= 0.3
    a.failure("alice", "10.0.0.9")  # one more: the delay doubles
    assert 0.5 < b.retry_after("alice", "x") <= 0.6
    assert b.retry_after("bob", "x") == 0.0
    time.sleep(0.65)
    assert a.retry_after("alice", "x") == 0.0  # the delay has passed
    b.success("alice")  # a correct password clears the account everywhere
    a.failure("alice", "x")
    assert a.retry_after("alice", "y") == 0.0


def test_replicas_share_the_source_budget(redis_url: str) -> None:
    a = replica(redis_url, source_failures=4, window=1.0, account_failures=100)
    b = replica(redis_url, source_failures=4, window=1.0, account_failures=100)
    for i in range(4):  # four different accounts guessed from one address, on two replicas
        (a if i % 2 else b).failure(f"user{i}", "203.0.113.7")
    wait = b.retry_after("someone-else", "203.0.113.7")
    assert 0.8 < wait <= 1.0  # until the oldest failure leaves the one-second window
    assert a.retry_after("someone-else", "198.51.100.1") == 0.0
    b.success("user0")  # a success does not reset the source's budget
    assert a.retry_after("user0", "203.0.113.7") > 0.5


def test_an_unreachable_redis_falls_back_to_this_replica(caplog: pytest.LogCaptureFixture) -> None:
    throttle = replica(f"redis://127.0.0.1:{free_port()}/0", account_failures=2, base_delay=5)
    with caplog.at_level(logging.WARNING, "helixflow.auth.throttle"):
        throttle.failure("carol", "x")
        throttle.failure("carol", "x")
        assert 4 < throttle.retry_after("carol", "y") <= 5  # the local count decides
    assert len([r for r in caplog.records if "Redis unavailable" in r.message]) == 1
