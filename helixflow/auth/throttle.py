"""Login throttling per account and per source address.

Failures are counted in a sliding window (default 15 min). After `account_failures` failures an
account name waits, before its next attempt, a delay that doubles with every further failure
(1 s, 2 s, 4 s, ... capped at `max_delay`); a source address that failed `source_failures` times
waits until its oldest failure leaves the window. A success clears the account's count (not the
source's: one attacker with one good password must not reset its budget for guessing others).

The throttle keys on the account *name* as typed, whether or not such a user exists, so its
answers reveal nothing about which accounts exist. The check runs before the password is
verified, so a throttled guess costs the attacker a round trip and the service no argon2 work.

NOTE: state is per process (bounded: the least recently failing keys are dropped past
`max_keys`). Replicas behind a load balancer each keep their own counts, so an attacker spread
over N replicas gets N times the budget; a shared (Redis) throttle belongs to the scale-out work.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

__all__ = ["LoginThrottle"]


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
