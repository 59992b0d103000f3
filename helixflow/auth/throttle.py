"""Login throttling per account and per source address.

Failures are counted in a sliding window (default 15 min). After `account_failures` failures an
account name waits, before its next attempt, a delay that doubles with every further failure
(1 s, 2 s, 4 s, ... capped at `max_delay`); a source address that failed `source_failures` times
waits until its oldest failure leaves the window. A success clears the account's count (not the
source's: one attacker with one good password must not reset its budget for guessing others).

The throttle keys on the account *name* as typed, whether or not such a user exists, so its
answers reveal nothing about which accounts exist. The check runs before the password is
verified, so a throttled guess costs the attacker a round trip and the service no argon2 work.

`LoginThrottle` keeps its state in the process (bounded: the least recently failing keys are
dropped past `max_keys`). With several auth replicas behind a load balancer, each would keep its
own counts and an attacker spread over N replicas would get N times the budget:
`RedisLoginThrottle` keeps the same counts in Redis, shared by every replica (time is Redis's,
so replicas with skewed clocks agree), and falls back to a local `LoginThrottle` while Redis
cannot be reached.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["LoginThrottle", "RedisLoginThrottle"]

log = logging.getLogger("helixflow.auth.throttle")


class LoginThrottle:
    """Decides whether a login attempt may proceed; thread-safe."""

    def __init__(
        self,
        *,
        account_failures: int = 5,
        source_failures: int = 20,
        window: float = 900.0,
        base_delay: float = 1.0,
        max_delay: float = 900.0,
        max_keys: int = 100_000,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        if account_failures < 1 or source_failures < 1:
            raise ValueError("failure thresholds must be >= 1")
        self.account_failures = account_failures
        self.source_failures = source_failures
        self.window = window
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._max_keys = max_keys
        self._now = now
        self._lock = threading.Lock()
        self._failures: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )

    def _recent(self, key: str, now: float) -> collections.deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def retry_after(self, account: str, source: str) -> float:
        """Seconds until `account` may try again from `source`; 0.0 means now."""
        now = self._now()
        wait = 0.0
        with self._lock:
            times = self._recent("a:" + account.casefold(), now)
            if times is not None and len(times) >= self.account_failures:
                excess = len(times) - self.account_failures
                delay = min(self.base_delay * 2.0 ** min(excess, 62), self.max_delay)
                wait = max(wait, times[-1] + delay - now)
            times = self._recent("s:" + source, now)
            if times is not None and len(times) >= self.source_failures:
                wait = max(wait, times[-self.source_failures] + self.window - now)
        return max(wait, 0.0)

    def failure(self, account: str, source: str) -> None:
        """Count a failed attempt against both the account name and the source."""
        now = self._now()
        with self._lock:
            for key in ("a:" + account.casefold(), "s:" + source):
                times = self._failures.get(key)
                if times is None:
                    times = self._failures[key] = collections.deque()
                else:
                    self._failures.move_to_end(key)
                times.append(now)
                # Only the newest `source_failures` times are ever read.
                while len(times) > max(self.account_failures + 64, self.source_failures):
                    times.popleft()
            while len(self._failures) > self._max_keys:
                self._failures.popitem(last=False)

    def success(self, account: str) -> None:
        """Clear the account's failures after a correct password."""
        with self._lock:
            self._failures.pop("a:" + account.casefold(), None)


_KEY = "helixflow:login:"
# KEYS: account, source. ARGV: member, window ms, keep. Counts one failure against both.
_FAILURE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], now, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - tonumber(ARGV[2]))
  redis.call('ZREMRANGEBYRANK', KEYS[i], 0, -tonumber(ARGV[3]) - 1)
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
end
return 1
"""
# KEYS: account, source. ARGV: window ms, account failures, source failures, base delay ms,
# max delay ms. Returns the wait in ms (as a string: Lua numbers lose precision as integers).
_RETRY_AFTER_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local wait = 0
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[2]) then
  local last = tonumber(redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2])
  local excess = math.min(n - tonumber(ARGV[2]), 62)
  local delay = math.min(tonumber(ARGV[4]) * 2 ^ excess, tonumber(ARGV[5]))
  wait = math.max(wait, last + delay - now)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
n = redis.call('ZCARD', KEYS[2])
local budget = tonumber(ARGV[3])
if n >= budget then
  local oldest = tonumber(redis.call('ZRANGE', KEYS[2], n - budget, n - budget,
                                     'WITHSCORES')[2])
  wait = math.max(wait, oldest + window - now)
end
return tostring(wait)
"""


class RedisLoginThrottle:
    """`LoginThrottle`'s rules on counts kept in Redis, shared by every auth replica.

    While Redis cannot be reached the local `fallback` decides (one warning when that starts,
    one when Redis is back): logins keep working and stay throttled per replica.
    """

    def __init__(self, client: Any, *, fallback: LoginThrottle | None = None) -> None:
        self._client = client
        self.fallback = fallback or LoginThrottle()
        self._failure = client.register_script(_FAILURE_LUA)
        self._retry_after = client.register_script(_RETRY_AFTER_LUA)
        self._failing = False

    @classmethod
    def from_url(cls, url: str) -> RedisLoginThrottle:
        import redis

        # NOTE: short timeouts: a stalled Redis must cost a login milliseconds, not seconds.
        return cls(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5))

    def _keys(self, account: str, source: str) -> list[str]:
        return [f"{_KEY}a:{account.casefold()}", f"{_KEY}s:{source}"]

    def _down(self, exc: Exception) -> None:
        if not self._failing:
            log.warning("login throttle: Redis unavailable, throttling per replica: %r", exc)
        self._failing = True

    def _up(self) -> None:
        if self._failing:
            log.warning("login throttle: Redis is back, throttling shared again")
        self._failing = False

    def retry_after(self, account: str, source: str) -> float:
        """Seconds until `account` may try again from `source`; 0.0 means now."""
        local = self.fallback
        args = [int(local.window * 1000), local.account_failures, local.source_failures,
                int(local.base_delay * 1000), int(local.max_delay * 1000)]  # fmt: skip
        try:
            reply = self._retry_after(keys=self._keys(account, source), args=args)
            wait = max(0.0, float(reply) / 1000.0)
        except Exception as exc:  # redis errors, and nonsense replies
            self._down(exc)
            return local.retry_after(account, source)
        self._up()
        return wait

    def failure(self, account: str, source: str) -> None:
        """Count a failed attempt against both the account name and the source."""
        self.fallback.failure(account, source)  # so that an outage starts from what was seen
        keep = max(self.fallback.account_failures + 64, self.fallback.source_failures)
        args = [secrets.token_hex(8), int(self.fallback.window * 1000), keep]
        try:
            self._failure(keys=self._keys(account, source), args=args)
        except Exception as exc:
            self._down(exc)
            return
        self._up()

    def success(self, account: str) -> None:
        """Clear the account's failures after a correct password."""
        self.fallback.success(account)
        try:
            self._client.delete(f"{_KEY}a:{account.casefold()}")
        except Exception as exc:
            self._down(exc)
