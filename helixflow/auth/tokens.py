"""RS256 access tokens (JWT): `TokenIssuer` signs them, `TokenVerifier` checks them.

A token carries `iss`, `aud`, `sub`, `exp`, `iat`, `nbf`, `jti`, the user's `role` and
space-separated `scope`, with `kid` and ``typ: at+jwt`` (RFC 9068) in the header. Every
verification failure raises `InvalidTokenError`: one generic client-facing message, and a
machine-readable `reason` for logs and metrics that is never sent to the client.

NOTE: PyJWT reads the wall clock itself, so the verifier turns its time checks off and checks
`exp`, `nbf` and `iat` against its own injected clock (tests run on a fixed clock, no sleeps).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from helixflow.auth.signing_keys import DEFAULT_ACCESS_TOKEN_TTL, KeyRing, PublicKeyLookup
from helixflow.errors import AuthenticationError

__all__ = [
    "ALGORITHM",
    "REGISTERED_CLAIMS",
    "Claims",
    "InvalidTokenError",
    "TokenIssuer",
    "TokenVerifier",
]

ALGORITHM: Final = "RS256"
TOKEN_TYPE: Final = "at+jwt"
_ACCEPTED_TYPES: Final = frozenset((TOKEN_TYPE, "application/" + TOKEN_TYPE))
REGISTERED_CLAIMS: Final = ("iss", "aud", "sub", "exp", "iat", "nbf", "jti")
_RESERVED_CLAIMS: Final = frozenset((*REGISTERED_CLAIMS, "role", "scope"))
_CLIENT_MESSAGE: Final = "Invalid or expired access token."
_JTI_BYTES: Final = 16


class InvalidTokenError(AuthenticationError):
    """An access token failed verification; `reason` says why, for logs only.

    Reasons: ``malformed``, ``bad_algorithm``, ``bad_type``, ``missing_kid``, ``unknown_kid``,
    ``bad_signature``, ``missing_claim``, ``bad_claim``, ``bad_issuer``, ``bad_audience``,
    ``expired``, ``not_yet_valid``, ``issued_in_future``, ``revoked``, ``inactive_user``.
    """

    code = "invalid_token"

    def __init__(self, reason: str) -> None:
        super().__init__(_CLIENT_MESSAGE)
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class Claims:
    """The verified contents of an access token."""

    sub: str
    role: str
    scopes: tuple[str, ...]
    iss: str
    aud: str
    exp: int
    iat: int
    nbf: int
    jti: str
    kid: str
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class TokenIssuer:
    """Signs access tokens with the key ring's current key."""

    def __init__(
        self,
        key_ring: KeyRing,
        issuer: str,
        audience: str,
        ttl: float = DEFAULT_ACCESS_TOKEN_TTL,
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        if ttl > key_ring.access_token_ttl:
            # NOTE: the ring unpublishes a retired key access_token_ttl after rotation; a
            # longer token lifetime would leave valid tokens whose key is gone.
            raise ValueError(
                f"ttl {ttl} exceeds the key ring's access_token_ttl {key_ring.access_token_ttl}"
            )
        self._key_ring = key_ring
        self.issuer = issuer
        self.audience = audience
        self.ttl = ttl
        self._now = now

    def issue(
        self,
        sub: str,
        role: str,
        scopes: Iterable[str] = (),
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """Return a signed access token for user `sub`.

        `extra` adds private claims; it may not override a registered or reserved claim.
        """
        extra = dict(extra or {})
        clash = _RESERVED_CLAIMS.intersection(extra)
        if clash:
            raise ValueError(f"extra claims may not override {sorted(clash)}")
        scope_list = list(scopes)
        if any(not scope or " " in scope for scope in scope_list):
            raise ValueError("scopes must be non-empty and contain no spaces")
        key = self._key_ring.current
        issued_at = int(self._now())
        payload: dict[str, Any] = {
            **extra,
            "iss": self.issuer,
            "aud": self.audience,
            "sub": sub,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": issued_at + int(self.ttl),
            "jti": secrets.token_urlsafe(_JTI_BYTES),
            "role": role,
            "scope": " ".join(scope_list),
        }
        return jwt.encode(
            payload,
            key.private_key,
            algorithm=ALGORITHM,
            headers={"kid": key.kid, "typ": TOKEN_TYPE},
        )


class TokenVerifier:
    """Verifies access tokens against published public keys.

    `keys` is a `KeyRing` (inside the auth service) or a `JwksKeySet` (a gateway's cached
    JWKS). `is_revoked(jti)` and `is_active(sub)` are optional hooks, checked only after the
    token is otherwise valid; when `is_active` is None the caller must check the user itself.
    `leeway` (seconds) tolerates clock skew on `exp`, `nbf` and `iat`.
    """

    def __init__(
        self,
        keys: PublicKeyLookup,
        issuer: str,
        audience: str,
        *,
        leeway: float = 30.0,
        is_revoked: Callable[[str], bool] | None = None,
        is_active: Callable[[str], bool] | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self._is_revoked = is_revoked
        self._is_active = is_active
        self._now = now

    def verify(self, token: str) -> Claims:
        """Return the claims of a valid token; raise `InvalidTokenError` otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidTokenError("malformed") from None
        # NOTE: the algorithm is pinned before any key is looked up, so `none` or an HMAC
        # algorithm keyed with the public key never reaches a signature check.
        if header.get("alg") != ALGORITHM:
            raise InvalidTokenError("bad_algorithm")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYPES:
            raise InvalidTokenError("bad_type")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidTokenError("missing_kid")
        public_key = self._keys.public_key(kid)
        if public_key is None:
            raise InvalidTokenError("unknown_kid")
        payload = self._decode(token, public_key)
        claims = self._check_claims(payload, kid)
        if self._is_revoked is not None and self._is_revoked(claims.jti):
            raise InvalidTokenError("revoked")
        if self._is_active is not None and not self._is_active(claims.sub):
            raise InvalidTokenError("inactive_user")
        return claims

    def _decode(self, token: str, public_key: rsa.RSAPublicKey) -> dict[str, Any]:
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                public_key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "require": list(REGISTERED_CLAIMS),
                    # Time claims are checked against our own clock in _check_claims.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "strict_aud": True,
                },
            )
        except jwt.InvalidSignatureError:
            raise InvalidTokenError("bad_signature") from None
        except jwt.MissingRequiredClaimError:
            raise InvalidTokenError("missing_claim") from None
        except jwt.InvalidIssuerError:
            raise InvalidTokenError("bad_issuer") from None
        except jwt.InvalidAudienceError:
            raise InvalidTokenError("bad_audience") from None
        except jwt.DecodeError:
            raise InvalidTokenError("malformed") from None
        except jwt.PyJWTError:
            raise InvalidTokenError("bad_claim") from None
        return payload

    def _check_claims(self, payload: dict[str, Any], kid: str) -> Claims:
        exp, iat, nbf = payload["exp"], payload["iat"], payload["nbf"]
        times_ok = all(isinstance(t, int) and not isinstance(t, bool) for t in (exp, iat, nbf))
        role, scope = payload.get("role"), payload.get("scope", "")
        if not times_ok or not isinstance(role, str) or not isinstance(scope, str):
            raise InvalidTokenError("bad_claim")
        now = self._now()
        if now >= exp + self.leeway:
            raise InvalidTokenError("expired")
        if now < nbf - self.leeway:
            raise InvalidTokenError("not_yet_valid")
        if now < iat - self.leeway:
            raise InvalidTokenError("issued_in_future")
        return Claims(
            sub=payload["sub"],
            role=role,
            scopes=tuple(scope.split()),
            iss=payload["iss"],
            aud=payload["aud"],
            exp=exp,
            iat=iat,
            nbf=nbf,
            jti=payload["jti"],
            kid=kid,
            extra={k: v for k, v in payload.items() if k not in _RESERVED_CLAIMS},
        )
