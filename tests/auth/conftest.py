"""Fixtures of the auth tests: every store-backed test runs on SQLite and on PostgreSQL.

SQLite lives in `tmp_path`; PostgreSQL gets a fresh database per test on the local server
(127.0.0.1:5432, trust auth), dropped afterwards. The PostgreSQL runs are skipped, with the
reason, only when that server is unreachable.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from auth_testing import PG_ADMIN_URL, Clock, Database

from helixflow.auth.store import Store


@contextlib.contextmanager
def provision(kind: str, directory: Path) -> Iterator[Database]:
    """An empty database of `kind` ("sqlite": a file in `directory`; "postgres": a fresh
    database on the local server, dropped afterwards)."""
    clock = Clock()
    if kind == "sqlite":
        yield Database("sqlite", str(directory / "auth.db"), clock)
        return
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed")
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=2)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is unreachable at 127.0.0.1:5432: {exc}")
    name = f"helixflow_test_{uuid.uuid4().hex[:12]}"
    with admin:
        # NOTE: identifiers cannot be bound parameters; `name` is made here, never input.
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield Database("postgres", f"postgresql://postgres@127.0.0.1:5432/{name}", clock)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    with provision(request.param, tmp_path) as db:
        yield db


@pytest.fixture
def store(database: Database) -> Iterator[Store]:
    opened = database.open()
    yield opened
    opened.close()


@pytest.fixture
def clock(database: Database) -> Clock:
    return database.clock
