"""Passwords (argon2id, timing-equal for unknown users) and API keys (format, hash, parse)."""

from __future__ import annotations

import time

import pytest

from helixflow.auth.credentials import (
    MAX_PASSWORD_BYTES,
    api_key_hash,
    api_key_matches,
    api_key_prefix,
    hash_password,
    new_api_key,
    password_needs_rehash,
    verify_password,
)


def test_password_round_trip_is_salted_argon2id() -> None:
    first, second = hash_password("correct horse"), hash_password("correct horse")
    assert first.startswith("$argon2id$") and first != second  # a fresh salt each time
    assert verify_password(first, "correct horse") and verify_password(second, "correct horse")
    assert not verify_password(first, "correct horsE")
    assert not verify_password(first, "")
    assert not password_needs_rehash(first)


def test_weak_parameters_ask_for_a_rehash() -> None:
    from argon2 import PasswordHasher

    weak = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("pw")
    assert verify_password(weak, "pw") and password_needs_rehash(weak)


def test_bad_inputs_are_refused_not_hashed() -> None:
    for bad in ("", "x" * (MAX_PASSWORD_BYTES + 1)):
        with pytest.raises(ValueError, match="password must be"):
            hash_password(bad)
    assert not verify_password(hash_password("pw"), "x" * (MAX_PASSWORD_BYTES + 1))
    assert not verify_password("not a hash", "pw")


def test_unknown_user_costs_what_a_wrong_password_costs() -> None:
    stored = hash_password("pw")

    def timed(stored_hash: str | None) -> float:
        start = time.perf_counter()
        for _ in range(3):
            assert not verify_password(stored_hash, "wrong")
        return time.perf_counter() - start

    unknown, wrong = timed(None), timed(stored)
    # both run one full argon2id verification; a skipped check would be ~1000x faster
    assert unknown > 0.3 * wrong


def test_api_keys_have_the_format_and_only_their_hash_is_kept() -> None:
    keys = [new_api_key() for _ in range(50)]
    assert len({k.key for k in keys}) == 50 and len({k.prefix for k in keys}) == 50
    k = keys[0]
    assert k.key.startswith(f"hfx_{k.prefix}_") and len(k.key) == 4 + 8 + 1 + 43
    assert k.hash == api_key_hash(k.key) and k.key not in k.hash and len(k.hash) == 64
    assert api_key_prefix(k.key) == k.prefix
    assert api_key_matches(k.key, k.hash)
    assert not api_key_matches(k.key[:-1] + ("A" if k.key[-1] != "A" else "B"), k.hash)


@pytest.mark.parametrize(
    "bad",
    ["", "hfx_", "sk-abc", "hfx_ABCDEFGH_" + "a" * 43, "hfx_abcdefgh_" + "a" * 42,
     "hfx_abcdefgh_" + "a" * 44, "hfx_abcdefgh_" + "a" * 42 + "!", " hfx_abcdefgh_" + "a" * 43],
)  # fmt: skip
def test_malformed_keys_have_no_prefix(bad: str) -> None:
    assert api_key_prefix(bad) is None
