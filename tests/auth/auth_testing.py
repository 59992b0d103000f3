"""Shared pieces of the auth tests: a fixed start time, a settable clock, a test database."""

from __future__ import annotations

import sqlite3
from typing import Any

from helixflow.auth.store import Store, open_store

T0 = 1_800_000_000.0


class Clock:
    """A settable clock: call it for the time, `advance` to move it."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


class Database:
    """One empty database of one backend: opens stores on it and runs raw SQL against it."""

    def __init__(self, kind: str, target: str, clock: Clock) -> None:
        self.kind = kind
        self.target = target
        self.clock = clock

    def open(self) -> Store:
        if self.kind == "sqlite":
            return open_store("sqlite", path=self.target, now=self.clock)
        return open_store("postgres", url=self.target, now=self.clock, pool_max_size=4)

    def raw(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        if self.kind == "sqlite":
            with sqlite3.connect(self.target) as conn:
                conn.execute(sql, params)
            conn.close()
        else:
            import psycopg

            with psycopg.connect(self.target) as conn:
                conn.execute(sql.replace("?", "%s"), params)
