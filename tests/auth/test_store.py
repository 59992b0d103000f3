"""The auth store on SQLite and on PostgreSQL: every method, conflicts, migrations, restarts.

Each test runs once per backend. SQLite lives in `tmp_path`; PostgreSQL gets a fresh database
per test on the local server (127.0.0.1:5432, trust auth), dropped afterwards. The PostgreSQL
runs are skipped, with the reason, only when that server is unreachable.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from auth_testing import T0, Clock, Database

from helixflow.auth.signing_keys import KeyRing, generate_master_key, load_master_key
from helixflow.auth.store import (
    SCHEMA_VERSION,
    ApiKey,
    Revocation,
    Store,
    StoreConflict,
    open_store,
)
from helixflow.errors import ConfigError, NotFoundError


def test_users_round_trip(store: Store, clock: Clock) -> None:
    alice = store.create_user("alice", "$argon2id$v=19$hash-a", role="admin")
    clock.advance(1)
    bob = store.create_user("bob", "$argon2id$v=19$hash-b")
    assert alice.role == "admin" and bob.role == "user"
    assert alice.created_at == T0 and not alice.disabled
    assert store.get_user(alice.id) == alice
    assert store.get_user_by_name("bob") == bob
    assert store.get_user("nope") is None and store.get_user_by_name("carol") is None
    assert store.list_users() == [alice, bob]

    assert store.set_user_disabled(bob.id, True)
    assert store.get_user(bob.id) == dataclasses.replace(bob, disabled=True)
    assert store.set_user_disabled(bob.id, False)
    assert store.get_user(bob.id) == bob
    assert not store.set_user_disabled("nope", True)

    assert store.set_user_password(bob.id, "$argon2id$v=19$new")
    got = store.get_user(bob.id)
    assert got is not None and got.password_hash == "$argon2id$v=19$new"

    with pytest.raises(ValueError, match="role"):
        store.create_user("eve", "h", role="root")


def test_duplicate_username_conflicts(store: Store) -> None:
    store.create_user("alice", "h1")
    with pytest.raises(StoreConflict, match="alice") as info:
        store.create_user("alice", "h2")
    assert info.value.status == 409
    # The failed insert rolled back cleanly: the store keeps working.
    assert [u.username for u in store.list_users()] == ["alice"]
    store.create_user("Alice", "h3")  # NOTE: exact-match uniqueness; normalizing is the caller's


def test_api_keys_round_trip(store: Store, clock: Clock) -> None:
    user = store.create_user("alice", "h")
    other = store.create_user("bob", "h")
    key = store.create_api_key(
        user.id,
        prefix="hf_abc123",
        secret_hash="sha256:deadbeef",
        name="ci",
        scopes=["chat", "embeddings"],
        rpm_limit=60,
        tpm_limit=None,
        expires_at=T0 + 3600,
    )
    assert key == ApiKey(
        key.id, user.id, "hf_abc123", "sha256:deadbeef", "ci", ("chat", "embeddings"),
        60, None, T0 + 3600, None, T0, None,
    )  # fmt: skip
    assert store.get_api_key(key.id) == key
    assert store.find_api_key_by_prefix("hf_abc123") == key
    assert store.find_api_key_by_prefix("hf_zzz") is None
    clock.advance(1)
    second = store.create_api_key(user.id, prefix="hf_def456", secret_hash="x")
    assert second.scopes == () and second.expires_at is None
    store.create_api_key(other.id, prefix="hf_bob", secret_hash="y")
    assert store.list_api_keys(user.id) == [key, second]

    clock.advance(5)
    store.touch_api_key(key.id)
    touched = store.get_api_key(key.id)
    assert touched is not None and touched.last_used_at == T0 + 6

    assert store.revoke_api_key(key.id)
    assert not store.revoke_api_key(key.id)  # already revoked: the first time stands
    assert not store.revoke_api_key("nope")
    revoked = store.find_api_key_by_prefix("hf_abc123")
    assert revoked is not None and revoked.revoked_at == T0 + 6


def test_api_key_conflicts_and_missing_user(store: Store) -> None:
    user = store.create_user("alice", "h")
    store.create_api_key(user.id, prefix="hf_same", secret_hash="a")
    with pytest.raises(StoreConflict, match="prefix"):
        store.create_api_key(user.id, prefix="hf_same", secret_hash="b")
    with pytest.raises(NotFoundError):
        store.create_api_key("no-such-user", prefix="hf_other", secret_hash="c")
    assert len(store.list_api_keys(user.id)) == 1


def test_refresh_tokens(store: Store, clock: Clock) -> None:
    user = store.create_user("alice", "h")
    first = store.add_refresh_token(
        "jti-1", family_id="fam-1", user_id=user.id, token_hash="h1", expires_at=T0 + 86400
    )
    second = store.add_refresh_token(
        "jti-2", family_id="fam-1", user_id=user.id, token_hash="h2", expires_at=T0 + 86400
    )
    store.add_refresh_token(
        "jti-3", family_id="fam-2", user_id=user.id, token_hash="h3", expires_at=T0 + 86400
    )
    assert store.get_refresh_token("jti-1") == first
    assert first.used_at is None and first.revoked_at is None and first.created_at == T0
    assert store.get_refresh_token("nope") is None
    with pytest.raises(StoreConflict, match="jti-1"):
        store.add_refresh_token(
            "jti-1", family_id="fam-9", user_id=user.id, token_hash="x", expires_at=T0
        )

    clock.advance(10)
    assert store.mark_refresh_used("jti-1")
    assert not store.mark_refresh_used("jti-1")  # reuse is detected
    assert not store.mark_refresh_used("nope")
    used = store.get_refresh_token("jti-1")
    assert used is not None and used.used_at == T0 + 10

    assert store.revoke_refresh_family("fam-1") == 2
    assert store.revoke_refresh_family("fam-1") == 0
    revoked = store.get_refresh_token(second.jti)
    assert revoked is not None and revoked.revoked_at == T0 + 10
    untouched = store.get_refresh_token("jti-3")
    assert untouched is not None and untouched.revoked_at is None


def test_revocations_by_time(store: Store, clock: Clock) -> None:
    store.add_revocation("jti", "a", expires_at=T0 + 10)
    store.add_revocation("family", "f", expires_at=T0 + 100)
    store.add_revocation("user", "u")  # forever
    store.add_revocation("api_key", "k", expires_at=T0 - 1)  # already expired
    assert {(r.kind, r.value) for r in store.list_revocations()} == {
        ("jti", "a"),
        ("family", "f"),
        ("user", "u"),
    }
    assert {r.value for r in store.list_revocations(T0 + 10)} == {"f", "u"}  # expiry exclusive
    assert {r.value for r in store.list_revocations(T0 + 1e9)} == {"u"}
    assert Revocation("user", "u", None, T0) in store.list_revocations()

    store.add_revocation("jti", "a", expires_at=T0 + 1000)  # re-adding extends, no conflict
    assert {r.value for r in store.list_revocations(T0 + 500)} == {"a", "u"}

    assert store.prune_revocations(T0 + 100) == 2  # "k" and "f"
    assert {r.value for r in store.list_revocations(0.0)} == {"a", "u"}
    with pytest.raises(ValueError, match="kind"):
        store.add_revocation("session", "x")


def test_signing_keys_round_trip(store: Store, clock: Clock) -> None:
    master = load_master_key(generate_master_key())
    assert store.load_signing_keys() is None
    ring = KeyRing.generate(now=clock, key_size=1024)
    store.save_signing_keys(ring.to_dict(master))
    clock.advance(60)
    ring.rotate(None)
    store.save_signing_keys(ring.to_dict(master))

    loaded_record = store.load_signing_keys()
    assert loaded_record is not None
    loaded = KeyRing.from_dict(loaded_record, master, now=clock)
    assert loaded.current.kid == ring.current.kid
    assert {k.kid for k in loaded.keys} == {k.kid for k in ring.keys}
    assert loaded.jwks() == ring.jwks()

    clock.advance(10_000)  # past the TTL: rotation prunes the old key, saving deletes its row
    ring.rotate(None)
    store.save_signing_keys(ring.to_dict(master))
    record = store.load_signing_keys()
    assert record is not None and len(record["keys"]) == len(ring.keys) == 2

    bad = ring.to_dict(master)
    bad["keys"].append(dict(bad["keys"][0]))
    with pytest.raises(StoreConflict):
        store.save_signing_keys(bad)
    assert store.load_signing_keys() == record  # the failed save changed nothing


def test_sql_injection_is_stored_verbatim(store: Store) -> None:
    nasty = "x'); DROP TABLE users;--"
    user = store.create_user(nasty, "h?%s%%")
    assert store.get_user_by_name(nasty) == user
    assert store.get_user_by_name("x") is None
    key = store.create_api_key(user.id, prefix="p' OR '1'='1", secret_hash="s", name=nasty)
    assert store.find_api_key_by_prefix("p' OR '1'='1") == key
    assert store.find_api_key_by_prefix("' OR '1'='1") is None
    assert [u.username for u in store.list_users()] == [nasty]


def test_data_survives_restart(database: Database) -> None:
    first = database.open()
    user = first.create_user("alice", "h")
    key = first.create_api_key(user.id, prefix="hf_1", secret_hash="s", scopes=["chat"])
    first.add_revocation("user", "u")
    first.close()

    second = database.open()
    try:
        assert second.get_user(user.id) == user
        assert second.find_api_key_by_prefix("hf_1") == key
        assert [r.value for r in second.list_revocations()] == ["u"]
    finally:
        second.close()


def test_migrations_idempotent_and_too_new_refused(database: Database) -> None:
    for _ in range(3):  # reopening an up-to-date database is a no-op
        store = database.open()
        assert store.schema_version() == SCHEMA_VERSION
        store.close()

    database.raw("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match="newer"):
        database.open()


def test_open_store_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="DATABASE_PATH"):
        open_store("sqlite")
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        open_store("postgres")
    with pytest.raises(ConfigError, match="DATABASE_TYPE"):
        open_store("mysql", path=tmp_path / "x.db")


def test_sqlite_uses_wal(tmp_path: Path) -> None:
    store = open_store("sqlite", path=tmp_path / "auth.db")
    store.close()
    with sqlite3.connect(tmp_path / "auth.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


def test_concurrent_use_from_threads(store: Store) -> None:
    owner = store.create_user("owner", "h")
    token = store.add_refresh_token(
        "shared", family_id="f", user_id=owner.id, token_hash="h", expires_at=T0 + 60
    )
    errors: list[BaseException] = []
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def work(n: int) -> None:
        try:
            barrier.wait()
            user = store.create_user(f"user{n}", "h")
            for i in range(5):
                store.create_api_key(user.id, prefix=f"hf_{n}_{i}", secret_hash="s")
            assert len(store.list_api_keys(user.id)) == 5
            wins.append(store.mark_refresh_used(token.jti))
            with pytest.raises(StoreConflict):
                store.create_user("owner", "h")
        except BaseException as exc:
            errors.append(exc)

    run_threads(work, 8)
    assert errors == []
    assert sorted(wins) == [False] * 7 + [True]  # exactly one exchange of the token wins
    assert len(store.list_users()) == 9


def run_threads(target: Callable[[int], None], count: int) -> None:
    threads = [threading.Thread(target=target, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
