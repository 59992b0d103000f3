"""Passwords (argon2id) and API keys (``hfx_`` + prefix + secret, stored as a hash).

Passwords: argon2id with argon2-cffi's RFC 9106 low-memory profile (64 MiB, 3 passes); a login
for an unknown user is checked against a dummy hash, so it costs what a wrong password costs
(no user enumeration by timing).

API keys: ``hfx_<prefix>_<secret>``. The 8-character prefix is public (it names the key in
listings and finds its row); the secret is 32 random bytes. The store keeps SHA-256 of the whole
key: the secret has 256 bits of entropy, so a slow hash would add cost without adding safety.
Comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from helixflow.auth.principal import API_KEY_PREFIX

__all__ = [
    "API_KEY_PREFIX",
    "NewApiKey",
    "api_key_hash",
    "api_key_matches",
    "api_key_prefix",
    "hash_password",
    "new_api_key",
    "password_needs_rehash",
    "verify_password",
]

_PREFIX_CHARS = 8
_KEY_PATTERN = re.compile(r"hfx_([a-z0-9]{8})_([A-Za-z0-9_-]{43})")
_HASHER = PasswordHasher()  # argon2id, RFC 9106 low-memory profile
MAX_PASSWORD_BYTES = 1024  # longer input is refused, not hashed (hashing cost is the attack)
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    """The argon2id PHC string of ``password`` (salted); ValueError for an empty or huge one."""
    if not password or len(password.encode()) > MAX_PASSWORD_BYTES:
        raise ValueError(f"a password must be 1 to {MAX_PASSWORD_BYTES} bytes")
    return _HASHER.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True iff ``password`` matches. ``stored_hash`` None (no such user) costs the same time
    as a wrong password and is False."""
    if len(password.encode()) > MAX_PASSWORD_BYTES:
        return False
    try:
        _HASHER.verify(stored_hash or _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return False
    return stored_hash is not None


def password_needs_rehash(stored_hash: str) -> bool:
    """True when the hash was made with weaker parameters than today's (rehash at login)."""
    return _HASHER.check_needs_rehash(stored_hash)


@dataclass(frozen=True)
class NewApiKey:
    """A freshly made key: ``key`` is shown to its owner once; store ``prefix`` and ``hash``."""

    key: str
    prefix: str
    hash: str


def api_key_hash(key: str) -> str:
    """SHA-256 (hex) of the whole key, as stored."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> NewApiKey:
    """A new random key ``hfx_<8 lowercase letters/digits>_<43 url-safe chars>``."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    prefix = "".join(secrets.choice(alphabet) for _ in range(_PREFIX_CHARS))
    key = f"{API_KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    return NewApiKey(key, prefix, api_key_hash(key))


def api_key_prefix(key: str) -> str | None:
    """The prefix of a well-formed key, None for anything else (never an exception)."""
    match = _KEY_PATTERN.fullmatch(key)
    return match.group(1) if match else None


def api_key_matches(key: str, stored_hash: str) -> bool:
    """Constant-time check of a presented key against the stored hash."""
    return hmac.compare_digest(api_key_hash(key), stored_hash)
