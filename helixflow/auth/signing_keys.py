"""RS256 signing keys: generation, encryption at rest, rotation and the published JWKS.

A `KeyRing` holds the current `SigningKey` (the one that signs new tokens) plus retired ones
that stay published in the JWKS until every token they signed has expired. Storage is kept
abstract: the ring serializes to and from plain JSON-safe dicts, with each private key
encrypted under a master key; the SQL store and the reading of the master key from the
environment or a file come later.

NOTE: encryption at rest is an AES-256-GCM envelope, not PEM `BestAvailableEncryption`. The
master key is 32 random bytes (not a password), so PEM's password KDF buys nothing; GCM
authenticates the ciphertext, so a wrong master key or a corrupted record fails loudly instead
of yielding garbage; and the key's `kid` is bound as associated data, so an attacker who can
write the store cannot swap one key's ciphertext into another key's record.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from helixflow.errors import ConfigError

__all__ = [
    "DEFAULT_ACCESS_TOKEN_TTL",
    "JwksKeySet",
    "KeyRing",
    "PublicKeyLookup",
    "SigningKey",
    "generate_master_key",
    "load_master_key",
]

DEFAULT_ACCESS_TOKEN_TTL = 900.0
MASTER_KEY_BYTES = 32
_ENVELOPE_VERSION = "v1"
_NONCE_BYTES = 12
_RSA_EXPONENT = 65537


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _uint_to_b64url(value: int) -> str:
    # RFC 7518 §6.3.1: big-endian, minimal length, no padding.
    return _b64url_encode(value.to_bytes((value.bit_length() + 7) // 8 or 1, "big"))


def _b64url_to_uint(text: str) -> int:
    return int.from_bytes(_b64url_decode(text), "big")


def generate_master_key() -> str:
    """Return a fresh master key as base64url text, the form `load_master_key` reads."""
    return _b64url_encode(secrets.token_bytes(MASTER_KEY_BYTES))


def load_master_key(text: str, *, name: str = "master key") -> bytes:
    """Decode a base64url master key (as read from env or a file) into its 32 bytes.

    `name` is the config key or file the text came from; it is named in the error, the text
    never is.
    """
    try:
        key = _b64url_decode(text.strip())
    except (binascii.Error, ValueError):
        raise ConfigError(f"{name} is not valid base64url") from None
    if len(key) != MASTER_KEY_BYTES:
        raise ConfigError(f"{name} must decode to {MASTER_KEY_BYTES} bytes, got {len(key)}")
    return key


def _check_master_key(master_key: bytes) -> None:
    if len(master_key) != MASTER_KEY_BYTES:
        # Caller misuse: a raw key of the wrong size (load_master_key validates text input).
        raise ValueError(f"master key must be {MASTER_KEY_BYTES} bytes, got {len(master_key)}")


def _rsa_thumbprint(public_key: rsa.RSAPublicKey) -> str:
    numbers = public_key.public_numbers()
    # RFC 7638: the required members in lexicographic order, no whitespace.
    canonical = json.dumps(
        {"e": _uint_to_b64url(numbers.e), "kty": "RSA", "n": _uint_to_b64url(numbers.n)},
        separators=(",", ":"),
        sort_keys=True,
    )
    return _b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest())


@dataclasses.dataclass(frozen=True, slots=True)
class SigningKey:
    """One RSA signing key; `retired_at` is None while it is the ring's current key.

    Times are Unix seconds. NOTE: `kid` is the RFC 7638 thumbprint of the public key, so it
    is derived, unique in practice and reveals nothing.
    """

    kid: str
    private_key: rsa.RSAPrivateKey
    created_at: float
    retired_at: float | None = None

    @classmethod
    def generate(cls, *, now: float, key_size: int = 2048) -> SigningKey:
        """Generate a fresh RSA key (`key_size` bits, e = 65537) created at `now`."""
        private_key = rsa.generate_private_key(public_exponent=_RSA_EXPONENT, key_size=key_size)
        return cls.from_private_key(private_key, now=now)

    @classmethod
    def from_private_key(cls, private_key: rsa.RSAPrivateKey, *, now: float) -> SigningKey:
        """Wrap an existing RSA key as a current key created at `now`, deriving its kid."""
        return cls(
            kid=_rsa_thumbprint(private_key.public_key()),
            private_key=private_key,
            created_at=now,
        )

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        """The public half, which verifies this key's signatures."""
        return self.private_key.public_key()

    def is_published(self, now: float, access_token_ttl: float) -> bool:
        """Whether tokens this key signed may still be unexpired at `now`."""
        return self.retired_at is None or now <= self.retired_at + access_token_ttl

    def public_jwk(self) -> dict[str, str]:
        """The RFC 7517 JWK of the public key, as published in the JWKS."""
        numbers = self.public_key.public_numbers()
        return {
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "n": _uint_to_b64url(numbers.n),
            "e": _uint_to_b64url(numbers.e),
        }

    def encrypt_private_key(self, master_key: bytes) -> str:
        """Return the private key (PKCS#8 DER) sealed with AES-256-GCM under `master_key`."""
        _check_master_key(master_key)
        der = self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = AESGCM(master_key).encrypt(nonce, der, self.kid.encode("ascii"))
        return f"{_ENVELOPE_VERSION}.{_b64url_encode(nonce)}.{_b64url_encode(sealed)}"

    @staticmethod
    def decrypt_private_key(envelope: str, master_key: bytes, *, kid: str) -> rsa.RSAPrivateKey:
        """Open an envelope made by `encrypt_private_key` for the key `kid`.

        Raises `ConfigError` if the master key is wrong or the record was altered.
        """
        _check_master_key(master_key)
        try:
            version, nonce_text, sealed_text = envelope.split(".")
            if version != _ENVELOPE_VERSION:
                raise ValueError(version)
            der = AESGCM(master_key).decrypt(
                _b64url_decode(nonce_text), _b64url_decode(sealed_text), kid.encode("ascii")
            )
        except InvalidTag:
            raise ConfigError(
                f"signing key {kid} cannot be decrypted: wrong master key or altered record"
            ) from None
        except (ValueError, binascii.Error):
            raise ConfigError(f"signing key {kid} has a malformed encrypted record") from None
        private_key = serialization.load_der_private_key(der, password=None)
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise ConfigError(f"signing key {kid} is not an RSA key")
        if _rsa_thumbprint(private_key.public_key()) != kid:
            raise ConfigError(f"signing key {kid} does not match its kid")
        return private_key

    def to_dict(self, master_key: bytes) -> dict[str, Any]:
        """Serialize to a JSON-safe dict with the private key encrypted under `master_key`."""
        return {
            "kid": self.kid,
            "created_at": self.created_at,
            "retired_at": self.retired_at,
            "private_key": self.encrypt_private_key(master_key),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], master_key: bytes) -> SigningKey:
        """Load a key serialized by `to_dict`; raises `ConfigError` on a bad record."""
        try:
            kid = str(data["kid"])
            created_at = float(data["created_at"])
            retired = data["retired_at"]
            retired_at = None if retired is None else float(retired)
            envelope = str(data["private_key"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"signing key record is malformed: {exc!r}") from None
        private_key = cls.decrypt_private_key(envelope, master_key, kid=kid)
        return cls(kid=kid, private_key=private_key, created_at=created_at, retired_at=retired_at)


class PublicKeyLookup(Protocol):
    """Anything that finds the published RS256 public key of a `kid` (None if unknown)."""

    def public_key(self, kid: str) -> rsa.RSAPublicKey | None:
        """Return the public key published under `kid`, or None."""
        ...


class KeyRing:
    """The current signing key plus retired keys still published for verification.

    A retired key stays published (in `jwks()` and to `public_key`) while
    ``now <= retired_at + access_token_ttl``, i.e. until the last token it signed has expired,
    and is dropped from the ring by the next `rotate()` or `prune()` after that.
    """

    def __init__(
        self,
        keys: Iterable[SigningKey],
        *,
        access_token_ttl: float = DEFAULT_ACCESS_TOKEN_TTL,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._keys = list(keys)
        current = [key for key in self._keys if key.retired_at is None]
        if len(current) != 1:
            raise ValueError(f"a key ring needs exactly one current key, got {len(current)}")
        if len({key.kid for key in self._keys}) != len(self._keys):
            raise ValueError("a key ring's kids must be unique")
        self.access_token_ttl = access_token_ttl
        self._now = now
        self._key_size = current[0].private_key.key_size

    @classmethod
    def generate(
        cls,
        *,
        access_token_ttl: float = DEFAULT_ACCESS_TOKEN_TTL,
        now: Callable[[], float] = time.time,
        key_size: int = 2048,
    ) -> KeyRing:
        """Return a ring holding one freshly generated current key."""
        key = SigningKey.generate(now=now(), key_size=key_size)
        return cls([key], access_token_ttl=access_token_ttl, now=now)

    @property
    def current(self) -> SigningKey:
        """The key that signs new tokens."""
        return next(key for key in self._keys if key.retired_at is None)

    @property
    def keys(self) -> tuple[SigningKey, ...]:
        """Every key the ring holds, published or not yet pruned."""
        return tuple(self._keys)

    def published(self) -> list[SigningKey]:
        """The keys whose tokens may still be valid now, current key first."""
        now = self._now()
        keys = [key for key in self._keys if key.is_published(now, self.access_token_ttl)]
        return sorted(keys, key=lambda key: key.retired_at is not None)

    def public_key(self, kid: str) -> rsa.RSAPublicKey | None:
        """Return the public key of a published key `kid`, or None."""
        for key in self.published():
            if key.kid == kid:
                return key.public_key
        return None

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The RFC 7517 JWK Set of every published key (``/.well-known/jwks.json``)."""
        return {"keys": [key.public_jwk() for key in self.published()]}

    def rotate(self, new_key: SigningKey | None = None) -> SigningKey:
        """Retire the current key now, make `new_key` (default: a fresh one) current.

        Keys no longer published are pruned. Returns the new current key.
        """
        now = self._now()
        if new_key is None:
            new_key = SigningKey.generate(now=now, key_size=self._key_size)
        if new_key.retired_at is not None:
            raise ValueError("the new current key must not be retired")
        if any(key.kid == new_key.kid for key in self._keys):
            raise ValueError(f"key {new_key.kid} is already in the ring")
        self._keys = [
            dataclasses.replace(key, retired_at=now) if key.retired_at is None else key
            for key in self._keys
        ]
        self._keys.insert(0, new_key)
        self.prune()
        return new_key

    def prune(self) -> list[SigningKey]:
        """Drop keys that are no longer published; returns the dropped keys."""
        now = self._now()
        dropped = [k for k in self._keys if not k.is_published(now, self.access_token_ttl)]
        self._keys = [k for k in self._keys if k.is_published(now, self.access_token_ttl)]
        return dropped

    def to_dict(self, master_key: bytes) -> dict[str, Any]:
        """Serialize to a JSON-safe dict; private keys are encrypted under `master_key`."""
        return {"keys": [key.to_dict(master_key) for key in self._keys]}

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        master_key: bytes,
        *,
        access_token_ttl: float = DEFAULT_ACCESS_TOKEN_TTL,
        now: Callable[[], float] = time.time,
    ) -> KeyRing:
        """Load a ring serialized by `to_dict`; raises `ConfigError` on a bad record."""
        records = data.get("keys")
        if not isinstance(records, list):
            raise ConfigError("signing key ring record has no 'keys' list")
        keys = [SigningKey.from_dict(record, master_key) for record in records]
        try:
            return cls(keys, access_token_ttl=access_token_ttl, now=now)
        except ValueError as exc:
            raise ConfigError(f"signing key ring record is invalid: {exc}") from None


class JwksKeySet:
    """The public keys of a JWK Set document, as fetched by a verifier from the auth service.

    Only RSA keys meant for RS256 signatures are kept; others are ignored. Caching and
    refreshing the document is the caller's concern.
    """

    def __init__(self, keys: Mapping[str, rsa.RSAPublicKey]) -> None:
        self._keys = dict(keys)

    @classmethod
    def from_jwks(cls, document: Mapping[str, Any]) -> JwksKeySet:
        """Build from an RFC 7517 JWK Set; raises `ValueError` on a malformed document."""
        entries = document.get("keys")
        if not isinstance(entries, list):
            raise ValueError("JWK Set has no 'keys' list")
        keys: dict[str, rsa.RSAPublicKey] = {}
        for jwk in entries:
            if not isinstance(jwk, Mapping) or jwk.get("kty") != "RSA":
                continue
            if jwk.get("use", "sig") != "sig" or jwk.get("alg", "RS256") != "RS256":
                continue
            kid, n, e = jwk.get("kid"), jwk.get("n"), jwk.get("e")
            if not (isinstance(kid, str) and isinstance(n, str) and isinstance(e, str)):
                raise ValueError("RSA JWK needs string 'kid', 'n' and 'e'")
            numbers = rsa.RSAPublicNumbers(_b64url_to_uint(e), _b64url_to_uint(n))
            keys[kid] = numbers.public_key()
        return cls(keys)

    def public_key(self, kid: str) -> rsa.RSAPublicKey | None:
        """Return the public key published under `kid`, or None."""
        return self._keys.get(kid)
