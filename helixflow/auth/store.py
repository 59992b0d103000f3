"""The auth service's SQL store: users, API keys, refresh tokens, revocations, signing keys.

`open_store` returns a `Store` on SQLite (default: one WAL file at DATABASE_PATH) or on
PostgreSQL (DATABASE_TYPE=postgres: psycopg 3 behind a connection pool). Both run the same
schema, migrations and queries, and every method is synchronous and thread-safe (the service
calls them from worker threads). Rows come back as frozen dataclasses; times are Unix seconds.

A duplicate username, API key prefix, refresh token id or signing key id raises
`StoreConflict`; a row that points at a missing user raises `NotFoundError`.

NOTE: the SQL is written once, portably (TEXT, BIGINT, DOUBLE PRECISION, BOOLEAN, and
``INSERT ... ON CONFLICT``, which SQLite >= 3.24 also speaks), with ``?`` placeholders that
the PostgreSQL backend rewrites to ``%s``. No statement holds a literal ``?`` or ``%``, and
no value is ever formatted into SQL: every value travels as a bound parameter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from helixflow.errors import ConfigError, HelixFlowError, NotFoundError

__all__ = [
    "ROLES",
    "SCHEMA_VERSION",
    "ApiKey",
    "RefreshToken",
    "Revocation",
    "Store",
    "StoreConflict",
    "User",
    "open_store",
]

ROLES = ("admin", "user")
REVOCATION_KINDS = ("jti", "family", "api_key", "user")
_SQLITE_BUSY_TIMEOUT_S = 5.0
_MIGRATION_LOCK_ID = 0x6865_6C69  # any constant shared by every HelixFlow process ("heli")

# Each step moves the schema from version i to i + 1; append, never edit a released step.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE users (
            id TEXT PRIMARY KEY,
            username TEXT NOT NULL UNIQUE,
            password_hash TEXT NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('admin', 'user')),
            disabled BOOLEAN NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            prefix TEXT NOT NULL UNIQUE,
            secret_hash TEXT NOT NULL,
            name TEXT NOT NULL,
            scopes TEXT NOT NULL,
            rpm_limit BIGINT,
            tpm_limit BIGINT,
            expires_at DOUBLE PRECISION,
            revoked_at DOUBLE PRECISION,
            created_at DOUBLE PRECISION NOT NULL,
            last_used_at DOUBLE PRECISION
        )""",
        "CREATE INDEX api_keys_user_id ON api_keys (user_id)",
        """CREATE TABLE refresh_tokens (
            jti TEXT PRIMARY KEY,
            family_id TEXT NOT NULL,
            user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            token_hash TEXT NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            used_at DOUBLE PRECISION,
            revoked_at DOUBLE PRECISION
        )""",
        "CREATE INDEX refresh_tokens_family_id ON refresh_tokens (family_id)",
        """CREATE TABLE revocations (
            kind TEXT NOT NULL CHECK (kind IN ('jti', 'family', 'api_key', 'user')),
            value TEXT NOT NULL,
            expires_at DOUBLE PRECISION,
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (kind, value)
        )""",
        """CREATE TABLE signing_keys (
            kid TEXT PRIMARY KEY,
            private_key TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            retired_at DOUBLE PRECISION
        )""",
    ),
    (
        # The revocation poll reads by time; every process runs it each second.
        "CREATE INDEX revocations_created_at ON revocations (created_at)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)


class StoreConflict(HelixFlowError):
    """A row with the same unique key (username, API key prefix, jti, kid) already exists."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


@dataclasses.dataclass(frozen=True, slots=True)
class User:
    """A user account; `password_hash` is the argon2id PHC string, never the password."""

    id: str
    username: str
    password_hash: str
    role: str
    disabled: bool
    created_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key record; the secret itself is never stored, only `secret_hash`."""

    id: str
    user_id: str
    prefix: str
    secret_hash: str
    name: str
    scopes: tuple[str, ...]
    rpm_limit: int | None
    tpm_limit: int | None
    expires_at: float | None
    revoked_at: float | None
    created_at: float
    last_used_at: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class RefreshToken:
    """One refresh token of a rotation family; `used_at` is set when it is exchanged."""

    jti: str
    family_id: str
    user_id: str
    token_hash: str
    expires_at: float
    created_at: float
    used_at: float | None
    revoked_at: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class Revocation:
    """A revoked jti, refresh family, API key or user; `expires_at` None means forever."""

    kind: str
    value: str
    expires_at: float | None
    created_at: float


class _Tx:
    """One open transaction: runs ``?``-style statements and fetches tuples."""

    def __init__(self, cursor: Any, *, pyformat: bool) -> None:
        self._cursor = cursor
        self._pyformat = pyformat

    def execute(self, sql: str, params: Sequence[object] = ()) -> _Tx:
        self._cursor.execute(sql.replace("?", "%s") if self._pyformat else sql, tuple(params))
        return self

    def one(self) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._cursor.fetchone()
        return row

    def all(self) -> list[tuple[Any, ...]]:
        return list(self._cursor.fetchall())

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)


class _Backend(Protocol):
    """A database dialect: opens transactions, maps constraint errors, closes."""

    def transaction(
        self, conflict: str, *, migrate: bool = False
    ) -> contextlib.AbstractContextManager[_Tx]: ...

    def close(self) -> None: ...


class _SqliteBackend:
    """One connection shared under a lock (SQLite serializes writers anyway)."""

    def __init__(self, path: Path) -> None:
        # NOTE: isolation_level=None leaves transactions to us (explicit BEGIN IMMEDIATE), so
        # a read-then-write method cannot be upgraded to a writer halfway and hit SQLITE_BUSY.
        self._conn = sqlite3.connect(
            path, timeout=_SQLITE_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.Lock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute(f"PRAGMA busy_timeout={int(_SQLITE_BUSY_TIMEOUT_S * 1000)}")

    @contextlib.contextmanager
    def transaction(self, conflict: str, *, migrate: bool = False) -> Iterator[_Tx]:
        with self._lock:
            cursor = self._conn.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                yield _Tx(cursor, pyformat=False)
                self._conn.commit()
            except sqlite3.IntegrityError as exc:
                self._conn.rollback()
                raise _translate(str(exc), conflict) from None
            except BaseException:
                self._conn.rollback()
                raise
            finally:
                cursor.close()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _PostgresBackend:
    """A psycopg 3 connection pool; each transaction borrows one connection."""

    def __init__(self, url: str, *, max_size: int) -> None:
        import psycopg_pool  # NOTE: imported here, so SQLite deployments need no psycopg.

        self._pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=max_size, open=False, name="helixflow-auth"
        )
        self._pool.open(wait=True, timeout=10.0)

    @contextlib.contextmanager
    def transaction(self, conflict: str, *, migrate: bool = False) -> Iterator[_Tx]:
        import psycopg

        try:
            # The pool's context manager commits on a clean exit and rolls back on an error.
            with self._pool.connection() as conn, conn.cursor() as cursor:
                tx = _Tx(cursor, pyformat=True)
                if migrate:  # serialize concurrent first starts of several processes
                    tx.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK_ID,))
                yield tx
        except psycopg.IntegrityError as exc:
            raise _translate(str(exc), conflict) from None

    def close(self) -> None:
        self._pool.close()


def _translate(message: str, conflict: str) -> HelixFlowError:
    lowered = message.lower()
    if "foreign key" in lowered:
        return NotFoundError("the user does not exist")
    if "unique" in lowered or "duplicate key" in lowered:
        return StoreConflict(conflict)
    return HelixFlowError("the auth store rejected a write")


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


_USER_COLUMNS = "id, username, password_hash, role, disabled, created_at"
_API_KEY_COLUMNS = (
    "id, user_id, prefix, secret_hash, name, scopes, rpm_limit, tpm_limit, expires_at,"
    " revoked_at, created_at, last_used_at"
)
_REFRESH_COLUMNS = (
    "jti, family_id, user_id, token_hash, expires_at, created_at, used_at, revoked_at"
)


def _user(row: tuple[Any, ...]) -> User:
    return User(str(row[0]), str(row[1]), str(row[2]), str(row[3]), bool(row[4]), float(row[5]))


def _api_key(row: tuple[Any, ...]) -> ApiKey:
    return ApiKey(
        id=str(row[0]),
        user_id=str(row[1]),
        prefix=str(row[2]),
        secret_hash=str(row[3]),
        name=str(row[4]),
        scopes=tuple(json.loads(row[5])),
        rpm_limit=_opt_int(row[6]),
        tpm_limit=_opt_int(row[7]),
        expires_at=_opt_float(row[8]),
        revoked_at=_opt_float(row[9]),
        created_at=float(row[10]),
        last_used_at=_opt_float(row[11]),
    )


def _refresh(row: tuple[Any, ...]) -> RefreshToken:
    return RefreshToken(
        jti=str(row[0]),
        family_id=str(row[1]),
        user_id=str(row[2]),
        token_hash=str(row[3]),
        expires_at=float(row[4]),
        created_at=float(row[5]),
        used_at=_opt_float(row[6]),
        revoked_at=_opt_float(row[7]),
    )


def _new_id() -> str:
    return uuid.uuid4().hex


class Store:
    """The auth store over one backend; build it with `open_store`.

    Every method is one transaction. `now` (Unix seconds) stamps created/used/revoked times.
    """

    def __init__(self, backend: _Backend, *, now: Callable[[], float] = time.time) -> None:
        self._backend = backend
        self._now = now
        try:
            self._migrate()
        except BaseException:
            backend.close()
            raise

    def _tx(
        self, conflict: str = "the row already exists"
    ) -> contextlib.AbstractContextManager[_Tx]:
        return self._backend.transaction(conflict)

    def _migrate(self) -> None:
        with self._backend.transaction("schema_version conflict", migrate=True) as tx:
            tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = tx.execute("SELECT MAX(version) FROM schema_version").one()
            current = 0 if row is None or row[0] is None else int(row[0])
            if current > SCHEMA_VERSION:
                raise ConfigError(
                    f"the auth database has schema version {current}, newer than the "
                    f"{SCHEMA_VERSION} this HelixFlow supports; upgrade HelixFlow"
                )
            for step in _MIGRATIONS[current:]:
                for statement in step:
                    tx.execute(statement)
            if current < SCHEMA_VERSION:
                tx.execute("DELETE FROM schema_version")
                tx.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    def schema_version(self) -> int:
        """The schema version of the open database (always `SCHEMA_VERSION` once open)."""
        with self._tx() as tx:
            row = tx.execute("SELECT MAX(version) FROM schema_version").one()
        return 0 if row is None or row[0] is None else int(row[0])

    # -- users -------------------------------------------------------------------------------

    def create_user(self, username: str, password_hash: str, *, role: str = "user") -> User:
        """Add a user; raises `StoreConflict` if `username` is taken."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        user = User(_new_id(), username, password_hash, role, False, self._now())
        with self._tx(f"username {username!r} is already taken") as tx:
            tx.execute(
                f"INSERT INTO users ({_USER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                dataclasses.astuple(user),
            )
        return user

    def get_user(self, user_id: str) -> User | None:
        """The user with id `user_id`, or None."""
        with self._tx() as tx:
            row = tx.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE id = ?", (user_id,)).one()
        return None if row is None else _user(row)

    def get_user_by_name(self, username: str) -> User | None:
        """The user named exactly `username`, or None."""
        with self._tx() as tx:
            sql = f"SELECT {_USER_COLUMNS} FROM users WHERE username = ?"
            row = tx.execute(sql, (username,)).one()
        return None if row is None else _user(row)

    def list_users(self) -> list[User]:
        """Every user, oldest first."""
        with self._tx() as tx:
            rows = tx.execute(f"SELECT {_USER_COLUMNS} FROM users ORDER BY created_at, id").all()
        return [_user(row) for row in rows]

    def set_user_disabled(self, user_id: str, disabled: bool) -> bool:
        """Disable or re-enable a user; False if there is no such user."""
        with self._tx() as tx:
            sql = "UPDATE users SET disabled = ? WHERE id = ?"
            return tx.execute(sql, (disabled, user_id)).rowcount == 1

    def set_user_password(self, user_id: str, password_hash: str) -> bool:
        """Replace a user's password hash; False if there is no such user."""
        with self._tx() as tx:
            sql = "UPDATE users SET password_hash = ? WHERE id = ?"
            return tx.execute(sql, (password_hash, user_id)).rowcount == 1

    # -- API keys ----------------------------------------------------------------------------

    def create_api_key(
        self,
        user_id: str,
        *,
        prefix: str,
        secret_hash: str,
        name: str = "",
        scopes: Sequence[str] = (),
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        expires_at: float | None = None,
    ) -> ApiKey:
        """Add an API key of `user_id`; `StoreConflict` on a duplicate prefix."""
        key = ApiKey(
            _new_id(), user_id, prefix, secret_hash, name, tuple(scopes), rpm_limit, tpm_limit,
            expires_at, None, self._now(), None,
        )  # fmt: skip
        row = dataclasses.astuple(key)
        with self._tx("API key prefix already exists") as tx:
            tx.execute(
                f"INSERT INTO api_keys ({_API_KEY_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*row[:5], json.dumps(list(key.scopes)), *row[6:]),
            )
        return key

    def get_api_key(self, key_id: str) -> ApiKey | None:
        """The API key with id `key_id`, or None."""
        with self._tx() as tx:
            sql = f"SELECT {_API_KEY_COLUMNS} FROM api_keys WHERE id = ?"
            row = tx.execute(sql, (key_id,)).one()
        return None if row is None else _api_key(row)

    def find_api_key_by_prefix(self, prefix: str) -> ApiKey | None:
        """The API key whose public prefix is `prefix` (revoked or not), or None."""
        with self._tx() as tx:
            sql = f"SELECT {_API_KEY_COLUMNS} FROM api_keys WHERE prefix = ?"
            row = tx.execute(sql, (prefix,)).one()
        return None if row is None else _api_key(row)

    def list_api_keys(self, user_id: str) -> list[ApiKey]:
        """Every API key of `user_id`, revoked ones included, oldest first."""
        with self._tx() as tx:
            sql = (
                f"SELECT {_API_KEY_COLUMNS} FROM api_keys WHERE user_id = ? ORDER BY created_at, id"
            )
            rows = tx.execute(sql, (user_id,)).all()
        return [_api_key(row) for row in rows]

    def revoke_api_key(self, key_id: str) -> bool:
        """Revoke a key now; False if there is no such key or it was already revoked."""
        with self._tx() as tx:
            sql = "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"
            return tx.execute(sql, (self._now(), key_id)).rowcount == 1

    def touch_api_key(self, key_id: str) -> None:
        """Record that the key was used now."""
        with self._tx() as tx:
            tx.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (self._now(), key_id))

    # -- refresh tokens ----------------------------------------------------------------------

    def add_refresh_token(
        self, jti: str, *, family_id: str, user_id: str, token_hash: str, expires_at: float
    ) -> RefreshToken:
        """Record an issued refresh token; `StoreConflict` on a duplicate `jti`."""
        token = RefreshToken(
            jti, family_id, user_id, token_hash, expires_at, self._now(), None, None
        )
        with self._tx(f"refresh token {jti!r} already exists") as tx:
            tx.execute(
                f"INSERT INTO refresh_tokens ({_REFRESH_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                dataclasses.astuple(token),
            )
        return token

    def get_refresh_token(self, jti: str) -> RefreshToken | None:
        """The refresh token `jti`, or None."""
        with self._tx() as tx:
            sql = f"SELECT {_REFRESH_COLUMNS} FROM refresh_tokens WHERE jti = ?"
            row = tx.execute(sql, (jti,)).one()
        return None if row is None else _refresh(row)

    def mark_refresh_used(self, jti: str) -> bool:
        """Mark `jti` exchanged now. True only for the first caller: False means reuse.

        NOTE: one conditional UPDATE, so two racing exchanges of one token cannot both win.
        """
        with self._tx() as tx:
            sql = "UPDATE refresh_tokens SET used_at = ? WHERE jti = ? AND used_at IS NULL"
            return tx.execute(sql, (self._now(), jti)).rowcount == 1

    def rotate_refresh_token(
        self, old_jti: str, new_jti: str, *, token_hash: str
    ) -> RefreshToken | None:
        """Spend `old_jti` and record its successor in one transaction; None if `old_jti` was
        already used or revoked (reuse) — then nothing is written.

        The successor inherits the family, the user and the family's end (`expires_at`).
        """
        now = self._now()
        with self._tx(f"refresh token {new_jti!r} already exists") as tx:
            spent = tx.execute(
                "UPDATE refresh_tokens SET used_at = ?"
                " WHERE jti = ? AND used_at IS NULL AND revoked_at IS NULL",
                (now, old_jti),
            ).rowcount
            if spent != 1:
                return None
            row = tx.execute(
                "SELECT family_id, user_id, expires_at FROM refresh_tokens WHERE jti = ?",
                (old_jti,),
            ).one()
            assert row is not None
            token = RefreshToken(new_jti, str(row[0]), str(row[1]), token_hash, float(row[2]),
                                 now, None, None)  # fmt: skip
            tx.execute(
                f"INSERT INTO refresh_tokens ({_REFRESH_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                dataclasses.astuple(token),
            )
        return token

    def family_bounds(self, family_id: str) -> tuple[float, float] | None:
        """When a refresh family (a login session) began and when it ends; None if unknown."""
        with self._tx() as tx:
            row = tx.execute(
                "SELECT MIN(created_at), MAX(expires_at) FROM refresh_tokens WHERE family_id = ?",
                (family_id,),
            ).one()
        if row is None or row[0] is None:
            return None
        return float(row[0]), float(row[1])

    def revoke_refresh_family(self, family_id: str) -> int:
        """Revoke every not yet revoked token of a family now; returns how many."""
        with self._tx() as tx:
            sql = (
                "UPDATE refresh_tokens SET revoked_at = ?"
                " WHERE family_id = ? AND revoked_at IS NULL"
            )
            return tx.execute(sql, (self._now(), family_id)).rowcount

    def revoke_user_refresh_tokens(self, user_id: str) -> list[str]:
        """Revoke every live refresh token of `user_id` now; returns the families touched."""
        with self._tx() as tx:
            rows = tx.execute(
                "SELECT DISTINCT family_id FROM refresh_tokens"
                " WHERE user_id = ? AND revoked_at IS NULL",
                (user_id,),
            ).all()
            tx.execute(
                "UPDATE refresh_tokens SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL",
                (self._now(), user_id),
            )
        return sorted(str(r[0]) for r in rows)

    def revoke_user_api_keys(self, user_id: str) -> list[str]:
        """Revoke every live API key of `user_id` now; returns their ids."""
        with self._tx() as tx:
            rows = tx.execute(
                "SELECT id FROM api_keys WHERE user_id = ? AND revoked_at IS NULL", (user_id,)
            ).all()
            tx.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL",
                (self._now(), user_id),
            )
        return sorted(str(r[0]) for r in rows)

    # -- revocations -------------------------------------------------------------------------

    def add_revocation(
        self, kind: str, value: str, *, expires_at: float | None = None
    ) -> Revocation:
        """Revoke `value` of `kind` now until `expires_at` (None: forever) and return the row.

        Re-adding replaces the row: its time becomes now (for kind ``user`` that time is the
        cut-off before which every token of the user is refused).
        """
        if kind not in REVOCATION_KINDS:
            raise ValueError(f"revocation kind must be one of {REVOCATION_KINDS}, got {kind!r}")
        revocation = Revocation(kind, value, expires_at, self._now())
        with self._tx() as tx:
            tx.execute(
                "INSERT INTO revocations (kind, value, expires_at, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (kind, value) DO UPDATE"
                " SET expires_at = excluded.expires_at, created_at = excluded.created_at",
                (kind, value, expires_at, revocation.created_at),
            )
        return revocation

    def get_revocation(self, kind: str, value: str) -> Revocation | None:
        """The revocation of `value` of `kind`, if one was ever made (expired or not)."""
        with self._tx() as tx:
            row = tx.execute(
                "SELECT kind, value, expires_at, created_at FROM revocations"
                " WHERE kind = ? AND value = ?",
                (kind, value),
            ).one()
        return None if row is None else Revocation(str(row[0]), str(row[1]), _opt_float(row[2]),
                                                   float(row[3]))  # fmt: skip

    def list_revocations(
        self, now: float | None = None, *, since: float | None = None
    ) -> list[Revocation]:
        """The revocations still in force at `now` (default: the store's clock), oldest first;
        with `since`, only those made at or after it (what a poller has not seen yet)."""
        at = self._now() if now is None else now
        sql = (
            "SELECT kind, value, expires_at, created_at FROM revocations"
            " WHERE (expires_at IS NULL OR expires_at > ?)"
        )
        params: list[object] = [at]
        if since is not None:
            sql += " AND created_at >= ?"
            params.append(since)
        with self._tx() as tx:
            rows = tx.execute(sql + " ORDER BY created_at, kind, value", params).all()
        return [Revocation(str(r[0]), str(r[1]), _opt_float(r[2]), float(r[3])) for r in rows]

    def prune_revocations(self, now: float | None = None) -> int:
        """Delete revocations that expired by `now`; returns how many."""
        at = self._now() if now is None else now
        with self._tx() as tx:
            sql = "DELETE FROM revocations WHERE expires_at IS NOT NULL AND expires_at <= ?"
            return tx.execute(sql, (at,)).rowcount

    # -- signing keys ------------------------------------------------------------------------

    def save_signing_keys(self, ring: Mapping[str, Any]) -> None:
        """Replace the stored key ring with `ring`, as made by `KeyRing.to_dict(master_key)`.

        Keys missing from `ring` (pruned) are deleted, in the same transaction.
        """
        records = ring["keys"]
        rows = [
            (str(r["kid"]), str(r["private_key"]), float(r["created_at"]), r["retired_at"])
            for r in records
        ]
        with self._tx("the key ring repeats a kid") as tx:
            tx.execute("DELETE FROM signing_keys")
            for row in rows:
                tx.execute(
                    "INSERT INTO signing_keys (kid, private_key, created_at, retired_at)"
                    " VALUES (?, ?, ?, ?)",
                    (*row[:3], _opt_float(row[3])),
                )

    def load_signing_keys(self) -> dict[str, Any] | None:
        """The stored ring in `KeyRing.from_dict` form, or None if none was saved."""
        with self._tx() as tx:
            rows = tx.execute(
                "SELECT kid, private_key, created_at, retired_at FROM signing_keys"
                " ORDER BY created_at DESC, kid"
            ).all()
        if not rows:
            return None
        keys = [
            {
                "kid": r[0],
                "private_key": r[1],
                "created_at": float(r[2]),
                "retired_at": _opt_float(r[3]),
            }
            for r in rows
        ]
        return {"keys": keys}

    def close(self) -> None:
        """Close the connection (SQLite) or the pool (PostgreSQL)."""
        self._backend.close()


def open_store(
    database_type: str = "sqlite",
    *,
    path: str | Path | None = None,
    url: str | None = None,
    pool_max_size: int = 8,
    now: Callable[[], float] = time.time,
) -> Store:
    """Open (creating and migrating as needed) the auth store.

    ``database_type`` is DATABASE_TYPE: "sqlite" needs `path` (DATABASE_PATH), "postgres"
    needs `url` (DATABASE_URL, a libpq URL). Raises `ConfigError` naming the missing key, or
    if the database's schema is newer than this HelixFlow.
    """
    backend: _Backend
    if database_type == "sqlite":
        if path is None:
            raise ConfigError("DATABASE_PATH is required when DATABASE_TYPE is sqlite")
        backend = _SqliteBackend(Path(path))
    elif database_type == "postgres":
        if not url:
            raise ConfigError("DATABASE_URL is required when DATABASE_TYPE is postgres")
        backend = _PostgresBackend(url, max_size=pool_max_size)
    else:
        raise ConfigError(f"DATABASE_TYPE must be 'sqlite' or 'postgres', got {database_type!r}")
    return Store(backend, now=now)
