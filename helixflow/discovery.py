"""Pools register themselves in Redis; gateways find them there.

A pool started with ``--register redis://...`` writes one key, ``helixflow:pools:<address>``,
holding a JSON record (address, models, load, draining) with a time to live of `TTL_S`, and
rewrites it every `HEARTBEAT_S`. A pool that dies stops the heartbeat and its key expires; a
pool that drains (SIGTERM) deletes its key first, so gateways stop sending it new work while
its streams finish. A gateway with ``--discover-pools`` reads every record once a second and
routes to the pools it finds, beside any it was given by address.

The heartbeat is the only writer of a key, and a key names the address a gateway dials, so a
pool that comes back on the same address simply reappears. This module needs only `redis`
(it is imported by gateways, which never import the pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from redis import asyncio as aioredis
from redis.exceptions import RedisError

__all__ = ["HEARTBEAT_S", "KEY_PREFIX", "TTL_S", "PoolAnnouncer", "PoolDirectory"]

log = logging.getLogger("helixflow.discovery")

KEY_PREFIX: Final = "helixflow:pools:"
HEARTBEAT_S: Final = 1.0
TTL_S: Final = 3.0  # a dead pool disappears within this (three missed heartbeats)
CALL_TIMEOUT_S: Final = 2.0  # every Redis call, whatever the client's own timeouts do


def _client(url: str) -> aioredis.Redis:
    # NOTE: short timeouts: a stalled Redis must not stall the heartbeat or the routing loop.
    return aioredis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)


class PoolAnnouncer:
    """The pool's side: keeps ``helixflow:pools:<address>`` alive while the pool serves."""

    def __init__(self, url: str, address: str, record: Callable[[], dict[str, Any]],
                 *, heartbeat_s: float = HEARTBEAT_S, ttl_s: float = TTL_S) -> None:  # fmt: skip
        self.address = address
        self.key = KEY_PREFIX + address
        self._redis = _client(url)
        self._record = record
        self._heartbeat_s = heartbeat_s
        self._ttl_ms = int(ttl_s * 1000)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._failing = False
        self.beats = 0

    async def beat(self) -> bool:
        """Write the record once; False (and one warning) while Redis cannot be reached."""
        body = json.dumps({**self._record(), "address": self.address, "at": time.time()})
        try:
            await asyncio.wait_for(self._redis.set(self.key, body, px=self._ttl_ms),
                                   CALL_TIMEOUT_S)  # fmt: skip
        except (RedisError, OSError, TimeoutError) as exc:
            if not self._failing:
                log.warning("pool registry: cannot register %s in Redis: %r", self.address, exc)
            self._failing = True
            return False
        if self._failing:
            log.warning("pool registry: registered %s again", self.address)
        self._failing = False
        self.beats += 1
        return True

    async def start(self) -> None:
        if await self.beat():
            log.info("pool registry: registered %s (heartbeat %.1fs)", self.address,
                     self._heartbeat_s)  # fmt: skip
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._heartbeat_s)
            if not self._stopping.is_set():
                await self.beat()

    async def stop_heartbeat(self) -> None:
        """Stop beating after the current beat (never cancelled mid-command: a Redis
        connection cut mid-reply is not safe to reuse)."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, CALL_TIMEOUT_S + self._heartbeat_s)
            self._task = None

    async def withdraw(self) -> None:
        """Stop the heartbeat and delete the key (the pool drains: no new work, please)."""
        await self.stop_heartbeat()
        try:
            await asyncio.wait_for(self._redis.delete(self.key), CALL_TIMEOUT_S)
            log.info("pool registry: withdrew %s", self.address)
        except (RedisError, OSError, TimeoutError) as exc:  # the key expires by itself
            log.warning("pool registry: could not withdraw %s: %r", self.address, exc)

    async def close(self) -> None:
        await self.withdraw()
        await self._redis.aclose()


class PoolDirectory:
    """The gateway's side: the pools registered now."""

    def __init__(self, url: str) -> None:
        self._redis = _client(url)
        self._failing = False

    async def pools(self) -> dict[str, dict[str, Any]] | None:
        """Address → record of every registered pool; None when Redis cannot be read (the
        caller keeps what it knew)."""
        try:
            values = await asyncio.wait_for(self._read(), CALL_TIMEOUT_S)
        except (RedisError, OSError, TimeoutError) as exc:
            if not self._failing:
                log.warning("pool registry: cannot read Redis, keeping the known pools: %r", exc)
            self._failing = True
            return None
        self._failing = False
        found: dict[str, dict[str, Any]] = {}
        for value in values:
            if value is None:  # expired between SCAN and MGET
                continue
            try:
                record = json.loads(value)
                address = record["address"]
            except (ValueError, KeyError, TypeError):
                log.warning("pool registry: ignored a malformed record")
                continue
            if isinstance(address, str) and ":" in address:
                found[address] = record
        return found

    async def _read(self) -> list[Any]:
        keys = [k async for k in self._redis.scan_iter(match=KEY_PREFIX + "*", count=100)]
        return list(await self._redis.mget(keys)) if keys else []

    async def close(self) -> None:
        await self._redis.aclose()
