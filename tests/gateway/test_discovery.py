"""The pool registry in a real Redis: a heartbeat keeps a pool's record, a stopped heartbeat
lets it expire, a withdrawal removes it at once, and an unreachable Redis is survived."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from process_testing import RedisServer, free_port

from helixflow.discovery import KEY_PREFIX, PoolAnnouncer, PoolDirectory


def test_register_expire_withdraw(tmp_path: Path) -> None:
    try:
        redis = RedisServer(tmp_path)
    except RuntimeError as exc:
        pytest.skip(str(exc))

    async def scenario() -> None:
        directory = PoolDirectory(redis.url)
        load = {"running": 0}
        a = PoolAnnouncer(redis.url, "10.0.0.1:50051",
                          lambda: {"models": ["m"], "load": dict(load)},
                          heartbeat_s=0.1, ttl_s=0.5)  # fmt: skip
        b = PoolAnnouncer(redis.url, "10.0.0.2:50051", lambda: {"models": ["m"]},
                          heartbeat_s=0.1, ttl_s=0.5)  # fmt: skip
        await a.start()
        await b.start()
        found = await directory.pools()
        assert found is not None and set(found) == {"10.0.0.1:50051", "10.0.0.2:50051"}
        assert found["10.0.0.1:50051"]["models"] == ["m"]
        load["running"] = 3  # the heartbeat carries the current record
        await asyncio.sleep(0.3)
        found = await directory.pools()
        assert found is not None and found["10.0.0.1:50051"]["load"] == {"running": 3}
        assert a.beats >= 3

        await b.withdraw()  # draining: gone at once
        found = await directory.pools()
        assert found is not None and set(found) == {"10.0.0.1:50051"}

        await a.stop_heartbeat()  # the pool died: no more heartbeats, the record expires
        started = time.monotonic()
        while (found := await directory.pools()) and "10.0.0.1:50051" in found:
            assert time.monotonic() - started < 2, "a dead pool's record did not expire"
            await asyncio.sleep(0.05)
        assert time.monotonic() - started <= 0.9

        # Malformed records are ignored, not fatal.
        raw = directory._redis
        await raw.set(KEY_PREFIX + "junk", b"{not json")
        await raw.set(KEY_PREFIX + "x", b'{"address": 7}')
        assert await directory.pools() == {}
        await a.close()
        await b.close()
        await directory.close()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))  # a hang fails, it does not block CI
    finally:
        redis.close()


def test_an_unreachable_redis_is_survived() -> None:
    async def scenario() -> None:
        url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
        directory = PoolDirectory(url)
        assert await directory.pools() is None  # "keep what you knew"
        announcer = PoolAnnouncer(url, "10.0.0.3:1", dict)
        assert await announcer.beat() is False
        await announcer.close()  # withdrawing from a dead Redis does not raise
        await directory.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
