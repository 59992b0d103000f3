"""RevocationSet (what every process checks tokens against) and LoginThrottle."""

from __future__ import annotations

import pytest
from auth_testing import T0, Clock

from helixflow.auth.revocations import RevocationEvent, RevocationSet
from helixflow.auth.throttle import LoginThrottle


def test_token_revoked_by_jti_family_or_user_cutoff() -> None:
    clock = Clock()
    revoked = RevocationSet(now=clock)
    assert revoked.add(RevocationEvent("jti", "j1", T0, T0 + 100))
    assert revoked.add(RevocationEvent("family", "f1", T0, T0 + 100))
    assert revoked.add(RevocationEvent("user", "u1", T0, T0 + 100))

    def check(jti: str = "j", sub: str = "u", iat: float = T0 - 5, sid: str | None = None) -> bool:
        return revoked.is_token_revoked(jti=jti, sub=sub, iat=iat, sid=sid)

    assert check(jti="j1")
    assert check(sid="f1")
    assert not check(sid="f2")
    assert check(sub="u1", iat=T0 - 5)
    assert check(sub="u1", iat=T0)  # the very second of the revocation: refused
    assert not check(sub="u1", iat=T0 + 1)  # a login after the revocation is fine
    assert not check()
    clock.advance(100)  # expired entries stop counting, then are pruned
    assert not check(jti="j1")
    assert revoked.prune() == 3
    assert len(revoked) == 0


def test_duplicates_are_reported_and_newer_cutoffs_win() -> None:
    revoked = RevocationSet(now=Clock())
    event = RevocationEvent("user", "u", T0, T0 + 10)
    assert revoked.add(event)
    assert not revoked.add(event)  # the same event from a second source (poll + Redis)
    assert not revoked.add(RevocationEvent("user", "u", T0 - 5, T0 + 10))  # older
    assert revoked.add(RevocationEvent("user", "u", T0 + 5, T0 + 20))  # a new cut-off
    assert revoked.user_revoked_at("u") == T0 + 5
    assert revoked.add(RevocationEvent("api_key", "k", T0, None))
    assert revoked.is_api_key_revoked("k")
    assert [e.kind for e in revoked.events()] == ["api_key", "user"]


def test_event_wire_form_round_trips_and_rejects_garbage() -> None:
    event = RevocationEvent("family", "f", T0, None)
    assert RevocationEvent.from_json(event.to_json()) == event
    for bad in ("{", "[]", '{"kind": "jti"}', '{"kind": "x", "value": "v", "revoked_at": 1}'):
        with pytest.raises(ValueError):
            RevocationEvent.from_json(bad)


def test_account_backoff_doubles_after_the_threshold() -> None:
    clock = Clock(0.0)
    throttle = LoginThrottle(account_failures=3, source_failures=1000, now=clock)
    for _ in range(3):
        assert throttle.retry_after("Alice", "10.0.0.1") == 0.0
        throttle.failure("Alice", "10.0.0.1")
    assert throttle.retry_after("alice", "10.0.0.2") == pytest.approx(1.0)  # name case-folded
    clock.advance(1.0)
    throttle.failure("alice", "10.0.0.2")
    assert throttle.retry_after("alice", "10.0.0.3") == pytest.approx(2.0)
    clock.advance(2.0)
    throttle.failure("alice", "10.0.0.3")
    assert throttle.retry_after("alice", "10.0.0.3") == pytest.approx(4.0)
    assert throttle.retry_after("bob", "10.0.0.3") == 0.0  # other accounts are not affected
    throttle.success("alice")
    assert throttle.retry_after("alice", "10.0.0.3") == 0.0


def test_source_limit_spans_accounts_and_success_does_not_reset_it() -> None:
    clock = Clock(0.0)
    throttle = LoginThrottle(account_failures=100, source_failures=4, window=60, now=clock)
    for i in range(4):
        throttle.failure(f"user{i}", "10.0.0.9")
        clock.advance(1.0)
    assert throttle.retry_after("someone-else", "10.0.0.9") == pytest.approx(56.0)
    throttle.success("user0")
    assert throttle.retry_after("someone-else", "10.0.0.9") > 0
    assert throttle.retry_after("someone-else", "10.0.0.10") == 0.0
    clock.advance(57.0)  # the oldest failure left the window
    assert throttle.retry_after("someone-else", "10.0.0.9") == 0.0


def test_throttle_memory_is_bounded() -> None:
    throttle = LoginThrottle(max_keys=100, now=Clock(0.0))
    for i in range(1000):
        throttle.failure(f"user{i}", f"10.0.{i // 256}.{i % 256}")
    assert len(throttle._failures) <= 100
