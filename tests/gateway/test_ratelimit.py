"""Tests of helixflow.gateway.ratelimit: the in-memory limiter on a fake clock, the same
behaviour on a private ``redis-server`` (real time, small refill rates), two replicas sharing
one limit, and failing open when Redis is gone."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from process_testing import RedisServer

from helixflow.errors import OverloadedError, RateLimitError
from helixflow.gateway.ratelimit import (
    Admission,
    MemoryRateLimiter,
    RateLimiter,
    RateLimitExceeded,
    RedisRateLimiter,
    format_reset,
    make_rate_limiter,
)

T = TypeVar("T")


class FakeClock:
    """Seconds that move only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def start_redis(directory: Path) -> RedisServer:
    try:
        return RedisServer(directory)
    except RuntimeError as exc:  # no redis-server binary
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.close()


def redis_limiter(url: str) -> RedisRateLimiter:
    return RedisRateLimiter(aioredis.Redis.from_url(url), close_client=True)


Factory = Callable[[], RateLimiter]


@pytest.fixture(params=["memory", "redis"])
def new_limiter(request: pytest.FixtureRequest) -> Factory:
    """Makes a limiter of each kind (inside the test's event loop)."""
    if request.param == "memory":
        return lambda: MemoryRateLimiter(clock=FakeClock())
    url = request.getfixturevalue("redis_server").url
    return lambda: redis_limiter(url)


def run(factory: Factory, body: Callable[[RateLimiter], Awaitable[T]]) -> T:
    """Run `body` on a fresh limiter in a fresh event loop, closing the limiter after."""

    async def main() -> T:
        limiter = factory()
        try:
            return await body(limiter)
        finally:
            await limiter.aclose()

    return asyncio.run(main())


def key() -> str:
    return f"test-{uuid.uuid4().hex}"


def header_dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in headers}


async def refused(coro: Awaitable[Any]) -> RateLimitExceeded:
    with pytest.raises(RateLimitExceeded) as info:
        await coro
    return info.value


# --- behaviour shared by both implementations (real-time drift on Redis is well under 1 unit)


def test_rpm_exhaustion(new_limiter: Factory) -> None:
    async def body(limiter: RateLimiter) -> None:
        k = key()
        for expected in (2, 1, 0):
            admission = await limiter.admit(k, 3, None, 10)
            assert admission.requests is not None
            assert admission.requests.remaining == expected
        error = await refused(limiter.admit(k, 3, None, 10))
        assert isinstance(error, RateLimitError)
        assert error.status == 429 and error.code == "rate_limit_exceeded"
        assert error.message.startswith("Rate limit reached for requests per minute (RPM): limit 3")
        assert error.retry_after == pytest.approx(20, abs=0.5)  # 1 request at 3/min
        headers = header_dict(error.headers)
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert "x-ratelimit-limit-tokens" not in headers

    run(new_limiter, body)


def test_tpm_reservation_and_settle(new_limiter: Factory) -> None:
    async def body(limiter: RateLimiter) -> None:
        k = key()
        first = await limiter.admit(k, None, 60, 36)  # 1 token/s refill
        assert first.tokens is not None and first.tokens.remaining == 24
        assert first.requests is None
        error = await refused(limiter.admit(k, None, 60, 30))
        assert error.retry_after == pytest.approx(6, abs=0.5)
        assert "tokens per minute (TPM): limit 60, remaining 24, requested 30" in error.message
        await limiter.settle(first, 10)  # 26 unused tokens come back
        await limiter.settle(first, 0)  # a second settle does nothing
        second = await limiter.admit(k, None, 60, 30)
        assert second.tokens is not None and second.tokens.remaining == 20
        await limiter.settle(second, 50)  # 20 more than reserved: taken, never raised
        third = await limiter.admit(k, None, 60, 0)
        assert third.tokens is not None and third.tokens.remaining == 0
        assert third.tokens.reset == pytest.approx(60, abs=0.5)

    run(new_limiter, body)


def test_refusal_consumes_nothing(new_limiter: Factory) -> None:
    async def body(limiter: RateLimiter) -> None:
        k = key()
        await limiter.admit(k, 2, 60, 40)
        error = await refused(limiter.admit(k, 2, 60, 30))  # TPM refuses: no RPM slot taken
        assert "(TPM)" in error.message and "(RPM)" not in error.message
        last = await limiter.admit(k, 2, 60, 20)
        assert last.requests is not None and last.requests.remaining == 0
        assert last.tokens is not None and last.tokens.remaining == 0
        error = await refused(limiter.admit(k, 2, 60, 0))  # RPM refuses: no token taken
        assert "(RPM)" in error.message and "(TPM)" not in error.message
        assert header_dict(error.headers)["x-ratelimit-remaining-tokens"] == "0"
        both = await refused(limiter.admit(k, 2, 60, 10))
        assert "(RPM)" in both.message and "(TPM)" in both.message
        assert both.retry_after == pytest.approx(30, abs=0.5)  # the longer wait: 1 request

    run(new_limiter, body)


def test_headers(new_limiter: Factory) -> None:
    async def body(limiter: RateLimiter) -> None:
        admission = await limiter.admit(key(), 60, 1000, 100)
        assert admission.reserved_tokens == 100 and len(admission.reservation_id) == 32
        names = [name for name, _ in admission.headers()]
        assert names == [
            b"x-ratelimit-limit-requests",
            b"x-ratelimit-remaining-requests",
            b"x-ratelimit-reset-requests",
            b"x-ratelimit-limit-tokens",
            b"x-ratelimit-remaining-tokens",
            b"x-ratelimit-reset-tokens",
        ]
        headers = header_dict(admission.headers())
        assert headers["x-ratelimit-limit-requests"] == "60"
        assert headers["x-ratelimit-remaining-requests"] == "59"
        assert headers["x-ratelimit-reset-requests"] in ("1s", "999ms", "998ms")
        assert headers["x-ratelimit-limit-tokens"] == "1000"
        assert headers["x-ratelimit-remaining-tokens"] == "900"
        assert headers["x-ratelimit-reset-tokens"] in ("6s", "5.999s", "5.998s")

    run(new_limiter, body)


def test_no_limits(new_limiter: Factory) -> None:
    async def body(limiter: RateLimiter) -> None:
        k = key()
        for _ in range(5):
            admission = await limiter.admit(k, None, None, 10**9)
            assert admission.headers() == []
            await limiter.settle(admission, 10**10)

    run(new_limiter, body)


def test_oversize_reservation(new_limiter: Factory) -> None:
    async def body(limiter: RateLimiter) -> None:
        k = key()
        error = await refused(limiter.admit(k, 5, 100, 101))
        assert error.code == "tokens_exceed_limit" and error.retry_after is None
        assert "tokens per minute (TPM) limit of 100" in error.message
        assert header_dict(error.headers) == {
            "x-ratelimit-limit-requests": "5",
            "x-ratelimit-limit-tokens": "100",
        }
        admission = await limiter.admit(k, 5, 100, 100)  # nothing was consumed
        assert admission.requests is not None and admission.requests.remaining == 4

    run(new_limiter, body)


def test_invalid_arguments(new_limiter: Factory) -> None:
    async def body(limiter: RateLimiter) -> None:
        for rpm, tpm, tokens in ((0, None, 1), (None, -5, 1), (None, None, -1)):
            with pytest.raises(ValueError):
                await limiter.admit(key(), rpm, tpm, tokens)

    run(new_limiter, body)


# --- in memory, on a fake clock


def test_memory_refill() -> None:
    clock = FakeClock()

    async def body(limiter: RateLimiter) -> None:
        for _ in range(3):
            await limiter.admit("k", 3, 600, 200)
        error = await refused(limiter.admit("k", 3, 600, 200))
        assert error.retry_after == pytest.approx(20)
        clock.advance(19.9)
        await refused(limiter.admit("k", 3, 600, 200))
        clock.advance(0.1)
        admission = await limiter.admit("k", 3, 600, 200)  # 200 tokens refilled meanwhile
        assert admission.requests is not None and admission.tokens is not None
        assert (admission.requests.remaining, admission.tokens.remaining) == (0, 0)
        clock.advance(3600)
        full = await limiter.admit("k", 3, 600, 0)
        assert full.requests is not None and full.requests.remaining == 2
        assert full.tokens is not None and full.tokens.remaining == 600

    run(lambda: MemoryRateLimiter(clock=clock), body)


def test_memory_eviction() -> None:
    clock = FakeClock()
    memory = MemoryRateLimiter(clock=clock, max_keys=100)

    async def body(limiter: RateLimiter) -> None:
        for i in range(1000):
            await limiter.admit(f"k{i}", 10, None, 0)
        assert len(memory) == 100  # the least recently used beyond the cap are gone
        admission = await limiter.admit("k999", 10, None, 0)
        assert admission.requests is not None and admission.requests.remaining == 8
        clock.advance(12.01)  # every bucket has refilled (k999 two requests): idle entries
        for i in range(20):
            await limiter.admit(f"fresh{i}", 10, None, 0)
        assert len(memory) == 20  # swept, at most 8 per call
        await refused(limiter.admit("x", None, 10, 11))
        assert len(memory) == 20  # a refusal stores nothing

    run(lambda: memory, body)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.02, "20ms"),
        (0.0001, "1ms"),
        (0.999, "999ms"),
        (1, "1s"),
        (2.4, "2.4s"),
        (86.4, "1m26.4s"),
        (360, "6m0s"),
        (3602.5, "1h0m2.5s"),
        (-1, "0s"),
    ],
)
def test_format_reset(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


# --- Redis only


def test_redis_refill_and_expiry(redis_server: RedisServer) -> None:
    async def body(limiter: RateLimiter) -> None:
        k = key()
        await limiter.admit(k, None, 6000, 6000)  # 100 tokens/s
        error = await refused(limiter.admit(k, None, 6000, 30))
        assert error.retry_after is not None and 0.2 < error.retry_after <= 0.3
        await asyncio.sleep(error.retry_after)
        await limiter.admit(k, None, 6000, 30)
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            ttl = await client.pttl(f"helixflow:rl:{k}")
        finally:
            await client.aclose()
        assert 60_000 < ttl <= 61_000  # expires once refilled (plus a second)

    run(lambda: redis_limiter(redis_server.url), body)


def test_redis_two_replicas_share_one_limit(redis_server: RedisServer) -> None:
    async def main() -> None:
        replicas = [redis_limiter(redis_server.url), redis_limiter(redis_server.url)]
        k = key()
        try:
            results = await asyncio.gather(
                *(replicas[i % 2].admit(k, 30, None, 1) for i in range(40)),
                return_exceptions=True,
            )
        finally:
            for replica in replicas:
                await replica.aclose()
        admitted = [r for r in results if isinstance(r, Admission)]
        refusals = [r for r in results if isinstance(r, RateLimitExceeded)]
        assert (len(admitted), len(refusals)) == (30, 10)
        assert replicas[0].redis_errors == replicas[1].redis_errors == 0

    asyncio.run(main())


def test_redis_fails_open(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = start_redis(tmp_path)
    limiter = redis_limiter(server.url)

    async def body(limiter: RateLimiter) -> None:
        assert isinstance(limiter, RedisRateLimiter)
        admission = await limiter.admit("k", 1, 100, 10)
        await refused(limiter.admit("k", 1, 100, 10))
        server.close()
        with caplog.at_level(logging.WARNING, "helixflow.gateway.ratelimit"):
            for _ in range(3):
                degraded = await limiter.admit("k", 1, 100, 10)
                assert header_dict(degraded.headers()) == {
                    "x-ratelimit-limit-requests": "1",
                    "x-ratelimit-limit-tokens": "100",
                }
            await limiter.settle(admission, 0)  # never raises
        assert limiter.redis_errors == 4
        assert len([r for r in caplog.records if "unavailable" in r.message]) == 1

    try:
        run(lambda: limiter, body)
    finally:
        server.close()


def test_redis_fails_closed_when_asked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = start_redis(tmp_path)
    url = server.url

    async def body(limiter: RateLimiter) -> None:
        assert isinstance(limiter, RedisRateLimiter) and limiter.fail_closed
        admission = await limiter.admit("k", 5, 100, 10)
        server.close()
        with caplog.at_level(logging.WARNING, "helixflow.gateway.ratelimit"):
            for _ in range(2):
                with pytest.raises(OverloadedError) as caught:
                    await limiter.admit("k", 5, 100, 10)
                assert (caught.value.status, caught.value.code) == (503,
                                                                    "rate_limiter_unavailable")
                assert caught.value.retry_after == 1.0
            await limiter.settle(admission, 0)  # never raises, even closed
        assert len([r for r in caplog.records if "requests refused" in r.message]) == 1
        assert limiter.redis_errors == 3

    try:
        run(lambda: make_rate_limiter(url, fail_closed=True), body)
    finally:
        server.close()


def test_redis_bad_reply_fails_open(redis_server: RedisServer) -> None:
    async def body(limiter: RateLimiter) -> None:
        assert isinstance(limiter, RedisRateLimiter)
        for reply in ([b"1", b"nan", b"0"], [1, 2], b"OK", [None, b"1", b"1"], [7, b"1", b"1"]):

            async def bad_script(*, keys: list[str], args: list[int], reply: Any = reply) -> Any:
                return reply

            limiter._script = bad_script  # type: ignore[assignment]
            admission = await limiter.admit(key(), 5, None, 1)
            assert admission.requests is not None and admission.requests.remaining is None
        assert limiter.redis_errors == 5

    run(lambda: redis_limiter(redis_server.url), body)


def test_make_rate_limiter(redis_server: RedisServer) -> None:
    async def main() -> None:
        memory = make_rate_limiter(None)
        assert isinstance(memory, MemoryRateLimiter)
        shared = make_rate_limiter(redis_server.url)
        assert isinstance(shared, RedisRateLimiter)
        try:
            await shared.admit(key(), 1, 1, 1)
        finally:
            await shared.aclose()

    asyncio.run(main())
