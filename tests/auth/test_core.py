"""AuthCore on SQLite and PostgreSQL: sessions, refresh rotation and reuse, API keys,
revocation of every kind, key rotation, throttling, and what other processes see."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from auth_testing import T0, Clock, Database

from helixflow.auth.core import AuthCore, AuthSettings
from helixflow.auth.revocations import RevocationEvent
from helixflow.auth.signing_keys import generate_master_key, load_master_key
from helixflow.auth.store import StoreConflict
from helixflow.auth.throttle import LoginThrottle
from helixflow.auth.tokens import InvalidTokenError
from helixflow.errors import (
    AuthenticationError,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitError,
)

MASTER = load_master_key(generate_master_key())
PASSWORD = "correct horse battery"


def make_core(database: Database, **settings: object) -> AuthCore:
    return AuthCore(
        database.open(),
        MASTER,
        AuthSettings(**settings),  # type: ignore[arg-type]
        throttle=LoginThrottle(now=database.clock),
        now=database.clock,
    )


@pytest.fixture
def core(database: Database) -> Iterator[AuthCore]:
    made = make_core(database)
    yield made
    made.store.close()


@pytest.fixture
def alice(core: AuthCore) -> str:
    return core.create_user("Alice", PASSWORD).id


def test_login_issues_a_verifiable_pair_and_generic_failures(core: AuthCore, alice: str) -> None:
    pair = core.login("ALICE", PASSWORD, source="10.0.0.1")  # usernames are case-insensitive
    assert pair.token_type == "Bearer" and pair.expires_in == 900
    assert pair.refresh_token.startswith("hfr_")
    principal = core.validate_token(pair.access_token)
    assert (principal.user_id, principal.username, principal.role) == (alice, "alice", "user")
    assert principal.scopes == ("model:*",) and principal.session_id
    assert not principal.is_admin

    core.create_user("mallory", PASSWORD)
    core.set_user_disabled("mallory", True)
    messages = set()
    for user, password in (("alice", "wrong password"), ("nobody", PASSWORD),
                           ("mallory", PASSWORD), ("", PASSWORD), ("x" * 5000, "y")):  # fmt: skip
        with pytest.raises(AuthenticationError) as caught:
            core.login(user, password, source=f"10.0.1.{len(messages)}")
        messages.add((caught.value.message, caught.value.code, caught.value.status))
    assert messages == {("Invalid username or password.", "invalid_credentials", 401)}


def test_refresh_rotates_and_reuse_revokes_the_family(core: AuthCore, alice: str,
                                                      clock: Clock) -> None:  # fmt: skip
    first = core.login("alice", PASSWORD, source="s")
    clock.advance(60)
    second = core.refresh(first.refresh_token)
    assert second.refresh_token != first.refresh_token
    assert (
        core.validate_token(second.access_token).session_id
        == core.validate_token(first.access_token).session_id
    )
    # Reuse of the spent token: refused, and the whole session dies with it.
    with pytest.raises(AuthenticationError):
        core.refresh(first.refresh_token)
    with pytest.raises(AuthenticationError):
        core.refresh(second.refresh_token)
    for access in (first.access_token, second.access_token):
        with pytest.raises(InvalidTokenError) as caught:
            core.validate_token(access)
        assert caught.value.reason == "revoked"
    # Another session of the same user is untouched.
    other = core.login("alice", PASSWORD, source="s")
    assert core.refresh(other.refresh_token).access_token


def test_refresh_garbage_expiry_and_no_extension(core: AuthCore, alice: str,
                                                 clock: Clock) -> None:  # fmt: skip
    for bad in ("", "hfr_x.y", "eyJhbGciOi.x.y", "hfr_" + "a" * 22 + "." + "b" * 43):
        with pytest.raises(AuthenticationError):
            core.refresh(bad)
    pair = core.login("alice", PASSWORD, source="s")
    tampered = pair.refresh_token[:-1] + ("A" if pair.refresh_token[-1] != "A" else "B")
    with pytest.raises(AuthenticationError):
        core.refresh(tampered)  # right jti, wrong secret
    lifetime = core.settings.refresh_ttl
    clock.advance(lifetime - 10)
    pair = core.refresh(pair.refresh_token)  # rotation keeps the family's end
    assert pair.refresh_expires_in == 10
    clock.advance(11)
    with pytest.raises(AuthenticationError):
        core.refresh(pair.refresh_token)


def test_logout_and_disable_end_sessions(core: AuthCore, alice: str, clock: Clock) -> None:
    pair = core.login("alice", PASSWORD, source="s")
    core.logout(pair.refresh_token)
    with pytest.raises(AuthenticationError):
        core.refresh(pair.refresh_token)
    with pytest.raises(InvalidTokenError):
        core.validate_token(pair.access_token)

    clock.advance(2)
    pair = core.login("alice", PASSWORD, source="s")
    core.set_user_disabled("alice", True)
    with pytest.raises(InvalidTokenError) as caught:
        core.validate_token(pair.access_token)
    assert caught.value.reason == "revoked"
    with pytest.raises(AuthenticationError):
        core.refresh(pair.refresh_token)
    core.set_user_disabled("alice", False)
    clock.advance(2)
    assert core.validate_token(core.login("alice", PASSWORD, source="s").access_token)
    with pytest.raises(InvalidTokenError):  # re-enabling does not revive old tokens
        core.validate_token(pair.access_token)


def test_api_keys_scopes_limits_expiry_and_revocation(core: AuthCore, alice: str,
                                                      clock: Clock) -> None:  # fmt: skip
    owner = core.get_user(alice)
    record, key = core.create_api_key(owner, name="ci", scopes=["model:smol", "model:smol"],
                                      rpm_limit=60, tpm_limit=10_000,
                                      expires_at=T0 + 3600)  # fmt: skip
    assert key.startswith("hfx_") and record.prefix in key and key not in repr(record)
    principal = core.validate_api_key(key)
    assert principal.scopes == ("model:smol",) and principal.key_id == record.id
    assert (principal.rpm_limit, principal.tpm_limit) == (60, 10_000)
    assert principal.may_use_model("smol") and not principal.may_use_model("other")
    assert core.authenticate(key) == principal

    with pytest.raises(PermissionDeniedError):
        core.create_api_key(owner, scopes=["admin"])
    for bad in (["root"], ["model:"], ["model:a b"], [""]):
        with pytest.raises(InvalidRequestError):
            core.create_api_key(owner, scopes=bad)
    with pytest.raises(InvalidRequestError):
        core.create_api_key(owner, rpm_limit=0)
    with pytest.raises(InvalidRequestError):
        core.create_api_key(owner, expires_at=T0 - 1)

    for garbage in ("", "hfx_", "hfx_abcdefgh_" + "x" * 43, key[:-1] + "?", key + "x"):
        with pytest.raises(AuthenticationError):
            core.validate_api_key(garbage)
    clock.advance(3600)
    with pytest.raises(AuthenticationError):
        core.validate_api_key(key)  # expired

    record, key = core.create_api_key(owner)
    core.revoke_api_key(record.id)
    with pytest.raises(AuthenticationError):
        core.validate_api_key(key)
    _, key = core.create_api_key(owner)
    core.set_user_disabled(alice, True)
    with pytest.raises(AuthenticationError):
        core.validate_api_key(key)


def test_revoking_a_user_revokes_everything(core: AuthCore, alice: str, clock: Clock) -> None:
    pair = core.login("alice", PASSWORD, source="s")
    _, key = core.create_api_key(core.get_user(alice))
    event = core.revoke("user", "alice")
    assert (event.kind, event.value) == ("user", alice)
    with pytest.raises(InvalidTokenError):
        core.validate_token(pair.access_token)
    with pytest.raises(AuthenticationError):
        core.refresh(pair.refresh_token)
    with pytest.raises(AuthenticationError):
        core.validate_api_key(key)
    clock.advance(1)
    assert core.validate_token(core.login("alice", PASSWORD, source="s").access_token)


def test_revoke_token_own_only_unless_admin(core: AuthCore, alice: str) -> None:
    core.create_user("root", PASSWORD, role="admin")
    bob = core.create_user("bob", PASSWORD)
    alice_pair = core.login("alice", PASSWORD, source="s")
    bob_principal = core.validate_token(core.login("bob", PASSWORD, source="s").access_token)
    admin = core.validate_token(core.login("root", PASSWORD, source="s").access_token)
    assert admin.is_admin and bob_principal.user_id == bob.id
    with pytest.raises(PermissionDeniedError):
        core.revoke_token(alice_pair.access_token, bob_principal)
    with pytest.raises(PermissionDeniedError):
        core.revoke_token(alice_pair.refresh_token, bob_principal)
    with pytest.raises(InvalidRequestError):
        core.revoke_token("not a token", bob_principal)
    assert core.revoke_token(alice_pair.access_token, admin).kind == "jti"
    with pytest.raises(InvalidTokenError):
        core.validate_token(alice_pair.access_token)
    assert core.revoke_token(alice_pair.refresh_token, admin).kind == "family"


def test_rotation_keeps_old_tokens_valid_and_other_processes_follow(
    core: AuthCore, alice: str, database: Database, clock: Clock
) -> None:
    old = core.login("alice", PASSWORD, source="s").access_token
    old_kid = core.current_kid
    other = make_core(database)  # a second replica (or the admin CLI) on the same database
    try:
        heard: list[RevocationEvent | None] = []
        core.add_listener(heard.append)
        new_kid = other.rotate_keys()
        assert new_kid != old_kid
        assert core.reload_keys() and heard == [None]
        assert core.current_kid == new_kid
        assert {k["kid"] for k in core.jwks()["keys"]} == {old_kid, new_kid}
        assert core.validate_token(old)
        new = core.login("alice", PASSWORD, source="s").access_token
        assert other.validate_token(new)
        clock.advance(core.settings.access_ttl + 1)  # the old key's tokens are all expired
        core.rotate_keys()
        assert old_kid not in {k["kid"] for k in core.jwks()["keys"]}
    finally:
        other.store.close()


def test_revocations_from_other_processes_are_polled_and_survive_restarts(
    core: AuthCore, alice: str, database: Database, clock: Clock
) -> None:
    pair = core.login("alice", PASSWORD, source="s")
    claims_jti = core.validate_token(pair.access_token).token_id
    heard: list[RevocationEvent | None] = []
    core.add_listener(heard.append)
    other = make_core(database)
    other.revoke("jti", claims_jti)
    other.store.close()
    assert core.validate_token(pair.access_token)  # not polled yet
    fresh = core.poll_revocations()
    assert [(e.kind, e.value) for e in fresh] == [("jti", claims_jti)]
    assert heard == fresh
    assert core.poll_revocations() == []  # the overlap window does not repeat events
    with pytest.raises(InvalidTokenError):
        core.validate_token(pair.access_token)
    restarted = make_core(database)
    try:
        with pytest.raises(InvalidTokenError) as caught:
            restarted.validate_token(pair.access_token)
        assert caught.value.reason == "revoked"
    finally:
        restarted.store.close()


def test_throttling_applies_to_unknown_accounts_too(core: AuthCore, alice: str,
                                                    clock: Clock) -> None:  # fmt: skip
    for name in ("alice", "ghost"):
        for _ in range(5):
            with pytest.raises(AuthenticationError):
                core.login(name, "wrong password", source=f"ip-{name}")
        with pytest.raises(RateLimitError) as caught:
            core.login(name, PASSWORD, source=f"ip-{name}")  # even the right password waits
        assert caught.value.retry_after == pytest.approx(1.0)
        assert caught.value.message == "Too many failed logins; try again later."
    clock.advance(1.0)
    assert core.login("alice", PASSWORD, source="ip-alice").access_token


def test_users_registration_and_passwords(database: Database) -> None:
    core = make_core(database)
    try:
        with pytest.raises(PermissionDeniedError):
            core.register("eve", PASSWORD)
        for bad_name in ("", "-x", "a b", "x" * 65, "ünï"):
            with pytest.raises(InvalidRequestError):
                core.create_user(bad_name, PASSWORD)
        with pytest.raises(InvalidRequestError):
            core.create_user("eve", "short")
        with pytest.raises(InvalidRequestError):
            core.create_user("eve", PASSWORD, role="root")
        core.create_user("eve", PASSWORD)
        with pytest.raises(StoreConflict):
            core.create_user("EVE", PASSWORD)
    finally:
        core.store.close()
    core = make_core(database, allow_registration=True)
    try:
        user = core.register("frank", PASSWORD)
        assert user.role == "user"
        pair = core.login("frank", PASSWORD, source="s")
        with pytest.raises(AuthenticationError):
            core.change_password(user.id, "wrong password", "new password 1", source="s")
        core.change_password(user.id, PASSWORD, "new password 1", source="s")
        with pytest.raises(AuthenticationError):
            core.refresh(pair.refresh_token)  # sessions end with the old password
        with pytest.raises(AuthenticationError):
            core.login("frank", PASSWORD, source="s")
        assert core.login("frank", "new password 1", source="s")
    finally:
        core.store.close()


def test_a_refresh_that_raced_a_revocation_cannot_outlive_it(core: AuthCore, alice: str,
                                                             clock: Clock) -> None:  # fmt: skip
    pair = core.login("alice", PASSWORD, source="s")
    session = core.validate_token(pair.access_token).session_id
    core.revoke_family(session)
    # The race: a successor written by a rotation the revocation's UPDATE did not see.
    racer = "hfr_" + "r" * 22 + "." + "s" * 43
    import hashlib

    core.store.add_refresh_token("r" * 22, family_id=session, user_id=alice,
                                 token_hash=hashlib.sha256(racer.encode()).hexdigest(),
                                 expires_at=clock() + 1e6)  # fmt: skip
    clock.advance(core.settings.access_ttl * 10)  # long after the access tokens expired
    with pytest.raises(AuthenticationError):
        core.refresh(racer)
    # The same for everything of a user.
    pair = core.login("alice", PASSWORD, source="s")
    session = core.validate_token(pair.access_token).session_id
    core.revoke("user", alice)
    racer = "hfr_" + "q" * 22 + "." + "s" * 43
    core.store.add_refresh_token("q" * 22, family_id=session, user_id=alice,
                                 token_hash=hashlib.sha256(racer.encode()).hexdigest(),
                                 expires_at=clock() + 1e6)  # fmt: skip
    clock.advance(core.settings.access_ttl * 10)
    with pytest.raises(AuthenticationError):
        core.refresh(racer)


def test_made_up_kids_do_not_flood_the_store(core: AuthCore, alice: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import jwt

    reads = []
    original = core.store.load_signing_keys
    monkeypatch.setattr(core.store, "load_signing_keys",
                        lambda: reads.append(1) or original())  # fmt: skip
    key = core._ring.current
    for i in range(50):
        token = jwt.encode({"sub": "x"}, key.private_key, algorithm="RS256",
                           headers={"kid": f"made-up-{i}", "typ": "at+jwt"})  # fmt: skip
        with pytest.raises(InvalidTokenError):
            core.validate_token(token)
    assert len(reads) <= 1


def test_throttle_keys_on_the_normalized_name(core: AuthCore, alice: str) -> None:
    for variant in ("alice", " alice", "ALICE", "alice\t", "Alice "):
        with pytest.raises(AuthenticationError):
            core.login(variant, "wrong password", source=f"ip-{len(variant)}-{variant[0]}")
    with pytest.raises(RateLimitError):
        core.login(" alice ", PASSWORD, source="elsewhere")
    for _ in range(25):  # names that cannot exist only cost the source
        with pytest.raises((AuthenticationError, RateLimitError)):
            core.login("x" * 100_000, "y", source="spammer")
    assert len(core.throttle._failures) < 10


def test_revocation_values_and_limits_are_checked_before_any_write(core: AuthCore,
                                                                   alice: str) -> None:  # fmt: skip
    for kind in ("family", "jti", "user", "api_key"):
        with pytest.raises(InvalidRequestError):
            core.revoke(kind, "")
        with pytest.raises(InvalidRequestError):
            core.revoke(kind, "x" * 129)
    with pytest.raises(InvalidRequestError):
        core.revoke("session", "x")
    from helixflow.errors import NotFoundError

    for kind in ("family", "user", "api_key"):
        with pytest.raises(NotFoundError):
            core.revoke(kind, "no-such-thing")
    assert core.store.list_revocations() == []
    with pytest.raises(InvalidRequestError):
        core.create_api_key(core.get_user(alice), rpm_limit=2**63)


def test_a_key_can_make_no_more_than_its_maker(core: AuthCore) -> None:
    root = core.create_user("root", PASSWORD, role="admin")
    _, narrow = core.create_api_key(root, scopes=["admin", "model:smol"], rpm_limit=10)
    caller = core.validate_api_key(narrow)
    assert caller.is_admin
    for scopes, rpm in ((["model:*"], 10), (["model:other"], 10), (["model:smol"], None),
                        (["model:smol"], 11)):  # fmt: skip
        with pytest.raises(PermissionDeniedError):
            core.create_api_key(root, caller=caller, scopes=scopes, rpm_limit=rpm)
    assert core.create_api_key(root, caller=caller, scopes=["model:smol"], rpm_limit=5)


def test_password_changes_are_throttled(core: AuthCore, alice: str) -> None:
    for _ in range(5):
        with pytest.raises(AuthenticationError):
            core.change_password(alice, "wrong password", "new password 1", source="s")
    with pytest.raises(RateLimitError):
        core.change_password(alice, PASSWORD, "new password 1", source="s")
