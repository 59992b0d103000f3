"""Per-principal request and token rate limits (RPM / TPM), OpenAI-style: `RateLimiter`.

A principal (an API key id, or a user id for JWT callers) may have a requests-per-minute and a
tokens-per-minute limit. `RateLimiter.admit` checks both at once and, only if both allow,
takes one request and the token reservation (prompt estimate + ``max_tokens``); `settle` gives
back what the response did not use. Refusals raise `RateLimitExceeded` (a `RateLimitError`,
HTTP 429) carrying ``retry_after`` and the ``x-ratelimit-*`` headers.

NOTE: each limit is a continuous-refill token bucket: capacity = limit, refill = limit / 60 per
second. A principal may burst its whole minute at once, then proceeds at the steady rate, and a
refusal knows exactly when it would succeed (``Retry-After``). A bucket that has refilled is
indistinguishable from a missing one, so idle state is simply dropped.

Two implementations: `MemoryRateLimiter` (one process) and `RedisRateLimiter` (shared by every
gateway replica: one atomic Lua script per call, on Redis server time).
"""

from __future__ import annotations

import abc
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from helixflow.errors import OverloadedError, RateLimitError

__all__ = [
    "Admission",
    "LimitStatus",
    "MemoryRateLimiter",
    "RateLimitExceeded",
    "RateLimiter",
    "RedisRateLimiter",
    "format_reset",
    "make_rate_limiter",
]

log = logging.getLogger("helixflow.gateway.ratelimit")

KEY_PREFIX = "helixflow:rl:"
Headers = list[tuple[bytes, bytes]]


def format_reset(seconds: float) -> str:
    """Format a duration as OpenAI's reset headers do: ``20ms``, ``1s``, ``6m0s``, ``1h0m2.5s``.

    Rounded up to the millisecond, so a client that waits this long is never early.
    """
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    text = f"{hours}h" if hours else ""
    text += f"{minutes}m" if hours or minutes else ""
    return f"{text}{secs}s"


@dataclass(frozen=True, slots=True)
class LimitStatus:
    """One limit as the headers show it: `remaining` whole units, `reset` seconds until full."""

    limit: int
    remaining: int | None = None
    reset: float | None = None

    @classmethod
    def from_level(cls, limit: int, level: float) -> LimitStatus:
        """The status of a bucket of capacity `limit` that holds `level` units now."""
        return cls(limit, max(0, math.floor(level)), max(0.0, (limit - level) * 60.0 / limit))


def rate_limit_headers(requests: LimitStatus | None, tokens: LimitStatus | None) -> Headers:
    """The ``x-ratelimit-*`` headers for the limits that exist (and values that are known)."""
    headers: Headers = []
    for name, status in (("requests", requests), ("tokens", tokens)):
        if status is not None:
            reset = None if status.reset is None else format_reset(status.reset)
            for part, value in (
                ("limit", status.limit),
                ("remaining", status.remaining),
                ("reset", reset),
            ):
                if value is not None:
                    headers.append((f"x-ratelimit-{part}-{name}".encode(), str(value).encode()))
    return headers


@dataclass(slots=True)
class Admission:
    """An admitted request: its token reservation, to be `RateLimiter.settle`d once, and the
    state of each limit right after admission (None where the principal has no such limit)."""

    key: str
    reserved_tokens: int
    requests: LimitStatus | None
    tokens: LimitStatus | None
    reservation_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    settled: bool = False

    def headers(self) -> Headers:
        """The ``x-ratelimit-*`` response headers, only for limits that exist."""
        return rate_limit_headers(self.requests, self.tokens)


class RateLimitExceeded(RateLimitError):
    """A `RateLimitError` raised by `RateLimiter.admit`, with the headers a 429 should carry."""

    def __init__(
        self, message: str, *, retry_after: float | None, headers: Headers, code: str | None = None
    ) -> None:
        super().__init__(message, retry_after=retry_after, code=code)
        self.headers = headers


def _bare(limit: int | None) -> LimitStatus | None:
    """The status of a limit whose state is unknown."""
    return None if limit is None else LimitStatus(limit)


def _check_limit(name: str, limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"{name} must be a positive integer or None, not {limit}")


class RateLimiter(abc.ABC):
    """Admits requests against a principal's RPM and TPM limits; see the module docstring.

    Subclasses store the buckets and implement `_apply`, for both admission and settlement.
    """

    async def admit(self, key: str, rpm: int | None, tpm: int | None, tokens: int) -> Admission:
        """Take 1 request and `tokens` tokens from `key`'s limits, or raise `RateLimitExceeded`.

        Nothing is consumed unless both limits allow. A reservation larger than the whole TPM
        limit can never succeed and is refused with code ``tokens_exceed_limit``.
        """
        _check_limit("rpm", rpm)
        _check_limit("tpm", tpm)
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, not {tokens}")
        if tpm is not None and tokens > tpm:
            raise RateLimitExceeded(
                f"Request too large: {tokens} tokens requested (prompt + max_tokens) exceeds the "
                f"tokens per minute (TPM) limit of {tpm}. Reduce the prompt or max_tokens.",
                retry_after=None,
                headers=rate_limit_headers(_bare(rpm), LimitStatus(tpm)),
                code="tokens_exceed_limit",
            )
        levels = None if rpm is None and tpm is None else await self._apply(key, rpm, tpm, tokens)
        if levels is None:  # no limits, or the shared store is down: fail open
            return Admission(key, tokens, _bare(rpm), _bare(tpm))
        allowed, request_level, token_level = levels
        req = None if rpm is None else LimitStatus.from_level(rpm, request_level)
        tok = None if tpm is None else LimitStatus.from_level(tpm, token_level)
        if allowed:
            return Admission(key, tokens, req, tok)
        reasons: list[str] = []
        waits: list[float] = []
        if rpm is not None and request_level < 1:
            reasons.append(f"requests per minute (RPM): limit {rpm}, requested 1")
            waits.append((1 - request_level) * 60.0 / rpm)
        if tpm is not None and token_level < tokens:
            reasons.append(
                f"tokens per minute (TPM): limit {tpm}, remaining {max(0, math.floor(token_level))}"
                f", requested {tokens}"
            )
            waits.append((tokens - token_level) * 60.0 / tpm)
        retry_after = max(waits, default=0.0)
        raise RateLimitExceeded(
            f"Rate limit reached for {'; and for '.join(reasons)}. "
            f"Please try again in {format_reset(retry_after)}.",
            retry_after=retry_after,
            headers=rate_limit_headers(req, tok),
        )

    async def settle(self, admission: Admission, used_tokens: int) -> None:
        """Return the unused part of `admission`'s reservation, or take the excess if the
        response used more; never raises. Settling an admission again does nothing."""
        if admission.settled:
            return
        admission.settled = True
        excess = max(0, used_tokens) - admission.reserved_tokens
        if admission.tokens is not None and excess != 0:
            await self._apply(admission.key, None, admission.tokens.limit, excess, force=True)

    async def aclose(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release the limiter's resources."""

    @abc.abstractmethod
    async def _apply(
        self, key: str, rpm: int | None, tpm: int | None, tokens: int, force: bool = False
    ) -> tuple[bool, float, float] | None:
        """Atomically refill `key`'s buckets, then, if both limits allow or `force`, take one
        request (if `rpm`) and `tokens` tokens (if `tpm`; negative: give back, up to the limit).

        Return (applied, request level, token level) after the call, the level of an absent
        limit being meaningless, or None if the store is unavailable.
        """


@dataclass(slots=True)
class _Entry:
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # name: (level, time)
    full_at: float = 0.0  # when every bucket will have refilled: the entry can then be dropped

    def level(self, name: str, limit: int, now: float) -> float:
        """The bucket's level at `now` (full if never used)."""
        level, stamp = self.buckets.get(name, (limit, now))
        return min(float(limit), level + max(0.0, now - stamp) * limit / 60.0)

    def put(self, name: str, limit: int, level: float, now: float) -> None:
        self.buckets[name] = (level, now)
        self.full_at = max(self.full_at, now + (limit - level) * 60.0 / limit)


class MemoryRateLimiter(RateLimiter):
    """Buckets in this process's memory, on the injectable `clock` (seconds, monotonic).

    Memory is bounded: entries whose buckets have refilled are dropped from the least recently
    used end, and at most `max_keys` entries are kept (NOTE: evicting a live entry beyond that
    only forgives that principal's recent use).
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000
    ) -> None:
        self._clock = clock
        self.max_keys = max_keys
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # NOTE: a lock, not just the event loop, so that several loops (threads) may share one.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    async def _apply(
        self, key: str, rpm: int | None, tpm: int | None, tokens: int, force: bool = False
    ) -> tuple[bool, float, float]:
        with self._lock:
            now = self._clock()
            entry = self._entries.get(key) or _Entry()
            req = 0.0 if rpm is None else entry.level("r", rpm, now)
            tok = 0.0 if tpm is None else entry.level("t", tpm, now)
            applied = force or ((rpm is None or req >= 1) and (tpm is None or tok >= tokens))
            if applied:
                if rpm is not None:
                    req -= 1
                    entry.put("r", rpm, req, now)
                if tpm is not None:
                    tok = min(float(tpm), tok - tokens)
                    entry.put("t", tpm, tok, now)
                self._store(key, entry, now)
            return applied, req, tok

    def _store(self, key: str, entry: _Entry, now: float) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        for _ in range(8):  # amortised sweep of refilled entries, O(1) per call
            oldest = next(iter(self._entries.values()), None)
            if oldest is None or oldest.full_at > now:
                break
            self._entries.popitem(last=False)
        while len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)


# KEYS[1] is the principal's hash: fields rl/rt and tl/tt hold the request and the token
# bucket's level and time (Redis's). ARGV: rpm, tpm (0: no limit), tokens, force ('1' or '0').
# Returns {applied, request level, token level}: levels as strings, as Redis would truncate
# Lua numbers to integers.
_APPLY_LUA = """
local key, ttl = KEYS[1], 0
local rpm, tpm, cost, force = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function fmt(x) return string.format('%.17g', x) end
local function level(f, limit)
  local s = redis.call('HMGET', key, f .. 'l', f .. 't')
  if not s[1] then return limit end
  return math.min(limit, tonumber(s[1]) + math.max(0, now - tonumber(s[2])) * limit / 60)
end
local function put(f, limit, v)
  redis.call('HSET', key, f .. 'l', fmt(v), f .. 't', fmt(now))
  ttl = math.max(ttl, (limit - v) * 60 / limit)
end
local req, tok = 0, 0
if rpm > 0 then req = level('r', rpm) end
if tpm > 0 then tok = level('t', tpm) end
local ok = force == '1' or ((rpm == 0 or req >= 1) and (tpm == 0 or tok >= cost))
if ok then
  if rpm > 0 then req = req - 1; put('r', rpm, req) end
  if tpm > 0 then tok = math.min(tpm, tok - cost); put('t', tpm, tok) end
  redis.call('PEXPIRE', key, math.max(redis.call('PTTL', key), math.ceil(ttl * 1000) + 1000))
end
return {ok and 1 or 0, fmt(req), fmt(tok)}
"""


def _parse_reply(reply: Any) -> tuple[bool, float, float]:
    """Decode `_APPLY_LUA`'s reply; ValueError on anything unexpected."""
    try:
        if not isinstance(reply, list):
            raise TypeError
        allowed, req, tok = reply
        result = int(allowed), float(req), float(tok)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"unexpected rate limit script reply: {reply!r:.100}") from exc
    if result[0] not in (0, 1) or not (math.isfinite(result[1]) and math.isfinite(result[2])):
        raise ValueError(f"unexpected rate limit script reply: {reply!r:.100}")
    return result[0] == 1, result[1], result[2]


class RedisRateLimiter(RateLimiter):
    """Buckets in Redis, shared by every gateway replica; one hash per principal
    (``helixflow:rl:<key>``), which expires once both of its buckets have refilled.

    Each admit and each settle is one call of one Lua script (EVALSHA, loaded again if Redis
    lost it): the check and both consumptions are atomic across replicas, and time is Redis's
    (``TIME``), so replicas with skewed clocks agree.

    NOTE: fails open by default. If Redis cannot be reached (or answers nonsense), `admit`
    admits without limits and `settle` does nothing: a gateway keeps serving while its shared
    limiter is down. With `fail_closed`, `admit` refuses with 503 (``rate_limiter_unavailable``,
    Retry-After 1) instead, for deployments where an unmetered request costs more than a
    refused one. Either way `redis_errors` counts the failures and one warning is logged when
    they start (another when Redis is back).
    """

    def __init__(self, client: aioredis.Redis, *, close_client: bool = False,
                 fail_closed: bool = False) -> None:  # fmt: skip
        self._client = client
        self._close_client = close_client
        self.fail_closed = fail_closed
        self._script = client.register_script(_APPLY_LUA)
        self.redis_errors = 0
        self._failing = False

    async def _apply(
        self, key: str, rpm: int | None, tpm: int | None, tokens: int, force: bool = False
    ) -> tuple[bool, float, float] | None:
        args = [rpm or 0, tpm or 0, tokens, int(force)]
        try:
            levels = _parse_reply(await self._script(keys=[KEY_PREFIX + key], args=args))
        except (RedisError, OSError, ValueError) as exc:
            self.redis_errors += 1
            if not self._failing:
                self._failing = True
                log.warning("rate limiter: Redis unavailable, %s: %r", "requests refused (503)"
                            if self.fail_closed else "limits not enforced", exc)  # fmt: skip
            if self.fail_closed and not force:
                raise OverloadedError("The rate limiter is unavailable; try again shortly.",
                                      code="rate_limiter_unavailable",
                                      retry_after=1.0) from None  # fmt: skip
            return None
        if self._failing:
            self._failing = False
            log.warning("rate limiter: Redis is back, limits enforced again")
        return levels

    async def aclose(self) -> None:
        """Close the Redis client if this limiter owns it."""
        if self._close_client:
            await self._client.aclose()


def make_rate_limiter(redis_url: str | None, *, fail_closed: bool = False) -> RateLimiter:
    """A `RedisRateLimiter` on `redis_url` (shared by replicas), else a `MemoryRateLimiter`."""
    if not redis_url:
        return MemoryRateLimiter()
    # NOTE: short timeouts: a stalled Redis must cost a request milliseconds, not seconds.
    client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=0.5, socket_timeout=0.5)
    return RedisRateLimiter(client, close_client=True, fail_closed=fail_closed)
