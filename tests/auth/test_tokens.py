"""Access tokens and signing keys: round trip, every rejection, rotation, JWKS, encryption.

Time is a fixed `Clock` injected everywhere; RSA keys are generated once per module.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import pytest
from auth_testing import T0, Clock
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from helixflow.auth.signing_keys import (
    JwksKeySet,
    KeyRing,
    PublicKeyLookup,
    SigningKey,
    generate_master_key,
    load_master_key,
)
from helixflow.auth.tokens import InvalidTokenError, TokenIssuer, TokenVerifier
from helixflow.errors import AuthenticationError, ConfigError

ISSUER = "https://auth.helixflow.test"
AUDIENCE = "helixflow-gateway"
TTL = 900


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]


def make_key(private_key: rsa.RSAPrivateKey, created_at: float = T0) -> SigningKey:
    return SigningKey.from_private_key(private_key, now=created_at)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ring(rsa_keys: list[rsa.RSAPrivateKey], clock: Clock) -> KeyRing:
    return KeyRing([make_key(rsa_keys[0])], access_token_ttl=TTL, now=clock)


@pytest.fixture
def issuer(ring: KeyRing, clock: Clock) -> TokenIssuer:
    return TokenIssuer(ring, ISSUER, AUDIENCE, ttl=TTL, now=clock)


def make_verifier(
    keys: PublicKeyLookup,
    clock: Clock,
    *,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    is_revoked: Callable[[str], bool] | None = None,
    is_active: Callable[[str], bool] | None = None,
) -> TokenVerifier:
    return TokenVerifier(
        keys, issuer, audience, leeway=0, is_revoked=is_revoked, is_active=is_active, now=clock
    )


@pytest.fixture
def verifier(ring: KeyRing, clock: Clock) -> TokenVerifier:
    return make_verifier(ring, clock)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(obj: dict[str, Any]) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def payload_of(token: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(unb64url(token.split(".")[1]))
    return result


def header_of(token: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(unb64url(token.split(".")[0]))
    return result


def resign(token: str, key: SigningKey, **changes: Any) -> str:
    """Re-sign `token` with RS256 after applying `changes` to its payload (None deletes)."""
    payload = payload_of(token)
    for name, value in changes.items():
        if value is None:
            payload.pop(name, None)
        else:
            payload[name] = value
    signing_input = f"{token.split('.')[0]}.{b64url_json(payload)}"
    signature = key.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def reject_reason(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(InvalidTokenError) as info:
        verifier.verify(token)
    error = info.value
    assert isinstance(error, AuthenticationError)
    assert error.status == 401
    assert error.message == "Invalid or expired access token."
    if len(token) > 8:
        assert token not in str(error) and token not in json.dumps(error.to_openai())
    return error.reason


# --- round trip and claims -------------------------------------------------------------------


def test_round_trip(issuer: TokenIssuer, verifier: TokenVerifier, ring: KeyRing) -> None:
    token = issuer.issue("user-1", "admin", scopes=["chat", "models:read"], extra={"org": "acme"})
    claims = verifier.verify(token)
    assert claims.sub == "user-1"
    assert claims.role == "admin"
    assert claims.scopes == ("chat", "models:read")
    assert claims.iss == ISSUER and claims.aud == AUDIENCE
    assert claims.iat == claims.nbf == int(T0) and claims.exp == int(T0) + TTL
    assert claims.kid == ring.current.kid
    assert claims.extra == {"org": "acme"}


def test_claims_present(issuer: TokenIssuer, ring: KeyRing) -> None:
    token = issuer.issue("user-1", "user")
    header, payload = header_of(token), payload_of(token)
    assert header == {"alg": "RS256", "kid": ring.current.kid, "typ": "at+jwt"}
    assert {"iss", "aud", "sub", "exp", "iat", "nbf", "jti"} <= payload.keys()
    assert payload["exp"] - payload["iat"] == TTL
    # 128 random bits, url-safe, unique per token.
    assert len(unb64url(payload["jti"])) == 16
    assert payload["jti"] != payload_of(issuer.issue("user-1", "user"))["jti"]


def test_extra_cannot_override_registered_claims(issuer: TokenIssuer) -> None:
    with pytest.raises(ValueError, match="sub"):
        issuer.issue("user-1", "user", extra={"sub": "admin"})


def test_issuer_ttl_cannot_outlive_key_publication(ring: KeyRing) -> None:
    with pytest.raises(ValueError, match="access_token_ttl"):
        TokenIssuer(ring, ISSUER, AUDIENCE, ttl=TTL + 1)


def test_verify_within_lifetime(issuer: TokenIssuer, verifier: TokenVerifier, clock: Clock) -> None:
    token = issuer.issue("user-1", "user")
    clock.advance(TTL - 1)
    assert verifier.verify(token).sub == "user-1"


# --- rejections, one per test ----------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_rejects_alg_none(issuer: TokenIssuer, verifier: TokenVerifier, alg: str) -> None:
    payload = payload_of(issuer.issue("user-1", "user"))
    header = {**header_of(issuer.issue("user-1", "user")), "alg": alg}
    payload["role"] = "admin"
    forged = f"{b64url_json(header)}.{b64url_json(payload)}."
    assert reject_reason(verifier, forged) == "bad_algorithm"


def test_rejects_hs256_signed_with_public_key(
    issuer: TokenIssuer, verifier: TokenVerifier, ring: KeyRing
) -> None:
    # The key-confusion attack: HMAC keyed with the (public) PEM a naive verifier would use.
    public_pem = ring.current.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    payload = {**payload_of(issuer.issue("user-1", "user")), "role": "admin"}
    header = {"alg": "HS256", "kid": ring.current.kid, "typ": "at+jwt"}
    signing_input = f"{b64url_json(header)}.{b64url_json(payload)}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{b64url(signature)}"
    assert reject_reason(verifier, forged) == "bad_algorithm"


def test_rejects_expired(issuer: TokenIssuer, verifier: TokenVerifier, clock: Clock) -> None:
    token = issuer.issue("user-1", "user")
    clock.advance(TTL)
    assert reject_reason(verifier, token) == "expired"


def test_rejects_not_yet_valid(issuer: TokenIssuer, verifier: TokenVerifier, ring: KeyRing) -> None:
    token = issuer.issue("user-1", "user")
    future = resign(token, ring.current, nbf=int(T0) + 60)
    assert reject_reason(verifier, future) == "not_yet_valid"


def test_leeway_tolerates_small_skew(issuer: TokenIssuer, ring: KeyRing, clock: Clock) -> None:
    token = resign(issuer.issue("user-1", "user"), ring.current, nbf=int(T0) + 20)
    lenient = TokenVerifier(ring, ISSUER, AUDIENCE, leeway=30, now=clock)
    assert lenient.verify(token).sub == "user-1"


def test_rejects_wrong_issuer(issuer: TokenIssuer, ring: KeyRing, clock: Clock) -> None:
    token = issuer.issue("user-1", "user")
    verifier = make_verifier(ring, clock, issuer="https://evil.test")
    assert reject_reason(verifier, token) == "bad_issuer"


def test_rejects_wrong_audience(issuer: TokenIssuer, ring: KeyRing, clock: Clock) -> None:
    token = issuer.issue("user-1", "user")
    verifier = make_verifier(ring, clock, audience="another-service")
    assert reject_reason(verifier, token) == "bad_audience"


def test_rejects_unknown_kid(
    issuer: TokenIssuer, rsa_keys: list[rsa.RSAPrivateKey], clock: Clock
) -> None:
    token = issuer.issue("user-1", "user")
    other_ring = KeyRing([make_key(rsa_keys[1])], access_token_ttl=TTL, now=clock)
    assert reject_reason(make_verifier(other_ring, clock), token) == "unknown_kid"


def test_rejects_tampered_payload(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    header, _, signature = issuer.issue("user-1", "user").split(".")
    payload = {**payload_of(issuer.issue("user-1", "user")), "role": "admin"}
    tampered = f"{header}.{b64url_json(payload)}.{signature}"
    assert reject_reason(verifier, tampered) == "bad_signature"


def test_rejects_revoked_jti(issuer: TokenIssuer, ring: KeyRing, clock: Clock) -> None:
    token = issuer.issue("user-1", "user")
    revoked = {payload_of(token)["jti"]}
    verifier = make_verifier(ring, clock, is_revoked=revoked.__contains__)
    assert reject_reason(verifier, token) == "revoked"
    assert verifier.verify(issuer.issue("user-1", "user")).sub == "user-1"


def test_rejects_disabled_user(issuer: TokenIssuer, ring: KeyRing, clock: Clock) -> None:
    verifier = make_verifier(ring, clock, is_active=lambda sub: sub != "disabled")
    assert reject_reason(verifier, issuer.issue("disabled", "user")) == "inactive_user"
    assert verifier.verify(issuer.issue("user-1", "user")).sub == "user-1"


@pytest.mark.parametrize("claim", ["iss", "aud", "sub", "exp", "iat", "nbf", "jti"])
def test_rejects_missing_claim(
    issuer: TokenIssuer, verifier: TokenVerifier, ring: KeyRing, claim: str
) -> None:
    token = resign(issuer.issue("user-1", "user"), ring.current, **{claim: None})
    assert reject_reason(verifier, token) == "missing_claim"


def test_rejects_non_integer_time(
    issuer: TokenIssuer, verifier: TokenVerifier, ring: KeyRing
) -> None:
    token = resign(issuer.issue("user-1", "user"), ring.current, exp="never")
    assert reject_reason(verifier, token) == "bad_claim"


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        ("", "malformed"),
        ("abc", "malformed"),
        ("a.b.c", "malformed"),
        ("....", "malformed"),
        ("e30.e30.e30", "bad_algorithm"),  # {} header: no alg
        (f"{b64url_json({'alg': 'RS256'})}.e30.e30", "bad_type"),
        (f"{b64url_json({'alg': 'RS256', 'typ': 'at+jwt'})}.e30.e30", "missing_kid"),
    ],
)
def test_rejects_malformed(verifier: TokenVerifier, garbage: str, reason: str) -> None:
    assert reject_reason(verifier, garbage) == reason


# --- rotation --------------------------------------------------------------------------------


def test_rotation_keeps_old_key_until_its_tokens_expire(
    issuer: TokenIssuer,
    verifier: TokenVerifier,
    ring: KeyRing,
    rsa_keys: list[rsa.RSAPrivateKey],
    clock: Clock,
) -> None:
    old_kid = ring.current.kid
    old_token = issuer.issue("user-1", "user")
    clock.advance(60)
    new_key = ring.rotate(make_key(rsa_keys[1], created_at=clock()))
    assert ring.current is new_key
    assert [jwk["kid"] for jwk in ring.jwks()["keys"]] == [new_key.kid, old_kid]
    assert verifier.verify(old_token).kid == old_kid
    new_token = issuer.issue("user-2", "user")
    assert header_of(new_token)["kid"] == new_key.kid
    assert verifier.verify(new_token).sub == "user-2"
    # The last token the old key signed expires TTL after its retirement; it stays published
    # until then (the old_token itself expires earlier, at T0 + TTL).
    clock.advance(TTL)
    assert old_kid in {jwk["kid"] for jwk in ring.jwks()["keys"]}
    clock.advance(1)
    assert [jwk["kid"] for jwk in ring.jwks()["keys"]] == [new_key.kid]
    assert reject_reason(verifier, old_token) == "unknown_kid"
    assert [key.kid for key in ring.prune()] == [old_kid]
    assert ring.keys == (new_key,)


def test_old_key_token_verifies_right_up_to_expiry(
    issuer: TokenIssuer, ring: KeyRing, rsa_keys: list[rsa.RSAPrivateKey], clock: Clock
) -> None:
    verifier = make_verifier(ring, clock)
    token = issuer.issue("user-1", "user")  # signed just before rotation
    ring.rotate(make_key(rsa_keys[1]))
    clock.advance(TTL - 1)
    assert verifier.verify(token).sub == "user-1"


def test_rotate_generates_fresh_key(rsa_keys: list[rsa.RSAPrivateKey], clock: Clock) -> None:
    ring = KeyRing([make_key(rsa_keys[0])], access_token_ttl=TTL, now=clock)
    old = ring.current
    new = ring.rotate()
    assert new.kid != old.kid and new.private_key.key_size == 2048
    assert new.created_at == clock() and new.retired_at is None
    assert {key.kid: key.retired_at for key in ring.keys} == {new.kid: None, old.kid: clock()}


def test_ring_needs_exactly_one_current_key(rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    retired = SigningKey(**{**_fields(make_key(rsa_keys[0])), "retired_at": T0})
    with pytest.raises(ValueError, match="exactly one current key"):
        KeyRing([retired])
    with pytest.raises(ValueError, match="exactly one current key"):
        KeyRing([make_key(rsa_keys[0]), make_key(rsa_keys[1])])


def _fields(key: SigningKey) -> dict[str, Any]:
    return {
        "kid": key.kid,
        "private_key": key.private_key,
        "created_at": key.created_at,
        "retired_at": key.retired_at,
    }


# --- JWKS ------------------------------------------------------------------------------------


def test_jwks_is_valid_rfc7517(ring: KeyRing, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    ring.rotate(make_key(rsa_keys[1]))
    document = json.loads(json.dumps(ring.jwks()))
    assert len(document["keys"]) == 2
    for jwk in document["keys"]:
        assert set(jwk) == {"kty", "use", "alg", "kid", "n", "e"}
        assert (jwk["kty"], jwk["use"], jwk["alg"], jwk["e"]) == ("RSA", "sig", "RS256", "AQAB")
        assert "=" not in jwk["n"] and not unb64url(jwk["n"]).startswith(b"\0")
        numbers = rsa.RSAPublicNumbers(
            int.from_bytes(unb64url(jwk["e"]), "big"), int.from_bytes(unb64url(jwk["n"]), "big")
        )
        public_key = numbers.public_key()
        private_key = next(k.private_key for k in ring.keys if k.kid == jwk["kid"])
        signature = private_key.sign(b"message", padding.PKCS1v15(), hashes.SHA256())
        public_key.verify(signature, b"message", padding.PKCS1v15(), hashes.SHA256())


def test_jwks_exposes_no_private_material(ring: KeyRing) -> None:
    text = json.dumps(ring.jwks())
    for private_member in ('"d"', '"p"', '"q"', '"dp"', '"dq"', '"qi"'):
        assert private_member not in text


def test_verifier_from_fetched_jwks(issuer: TokenIssuer, ring: KeyRing, clock: Clock) -> None:
    key_set = JwksKeySet.from_jwks(json.loads(json.dumps(ring.jwks())))
    verifier = make_verifier(key_set, clock)
    token = issuer.issue("user-1", "user")
    assert verifier.verify(token).sub == "user-1"
    tampered = resign(token, ring.current, sub="user-2")[:-4] + "AAAA"
    assert reject_reason(verifier, tampered) == "bad_signature"


# --- encryption at rest ----------------------------------------------------------------------


def test_encrypted_ring_round_trip(
    ring: KeyRing, rsa_keys: list[rsa.RSAPrivateKey], clock: Clock
) -> None:
    ring.rotate(make_key(rsa_keys[1]))
    master = load_master_key(generate_master_key())
    record = json.loads(json.dumps(ring.to_dict(master)))
    der = ring.current.private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert b64url(der)[:40] not in json.dumps(record)
    loaded = KeyRing.from_dict(record, master, access_token_ttl=TTL, now=clock)
    assert loaded.jwks() == ring.jwks()
    assert [(k.kid, k.created_at, k.retired_at) for k in loaded.keys] == [
        (k.kid, k.created_at, k.retired_at) for k in ring.keys
    ]
    assert (
        loaded.current.private_key.private_numbers() == ring.current.private_key.private_numbers()
    )


def test_wrong_master_key_fails_clearly(ring: KeyRing) -> None:
    record = ring.to_dict(load_master_key(generate_master_key()))
    with pytest.raises(ConfigError, match="wrong master key") as info:
        KeyRing.from_dict(record, load_master_key(generate_master_key()))
    assert record["keys"][0]["private_key"] not in str(info.value)


def test_encrypted_key_bound_to_its_kid(ring: KeyRing, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    master = load_master_key(generate_master_key())
    other = make_key(rsa_keys[1])
    record = ring.current.to_dict(master)
    record["private_key"] = other.encrypt_private_key(master)  # swapped between records
    with pytest.raises(ConfigError, match=ring.current.kid):
        SigningKey.from_dict(record, master)


@pytest.mark.parametrize("text", ["not base64!", b64url(b"short")])
def test_bad_master_key_text_names_the_key(text: str) -> None:
    with pytest.raises(ConfigError, match="HELIXFLOW_SIGNING_MASTER_KEY"):
        load_master_key(text, name="HELIXFLOW_SIGNING_MASTER_KEY")
