"""Credentials an attacker brings to the real gateway (and so to the real auth service): forged,
expired, misdirected, tampered and revoked JWTs, and expired, revoked and out-of-scope API keys.

Forged tokens are signed with the stack's own current RS256 key (read from the auth database
with the master key) from the claims of a real login token, so each differs from a valid token
in one thing only; `test_the_forger_makes_tokens_the_gateway_accepts` shows that the unchanged
forgery is accepted, so every refusal below is the gateway's doing. Every refusal is a 401 with
OpenAI's error object, and all of them carry the same message (no reason leaks to a client).

Covered elsewhere (not repeated here): the verifier's and auth service's own rejections
(tests/auth/test_tokens.py, tests/auth/test_service.py), a key revoked with DELETE
/v1/api-keys/{id} and an out-of-scope chat through the SDK (tests/gateway/test_gateway_e2e.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from security_testing import (
    ADMIN_PASSWORD,
    CHAT,
    EMBED,
    Stack,
    assert_no_secret_in_logs,
    b64url,
    claims_of,
    forge,
    login,
    openai_error,
    signing_ring,
)

GENERIC = "Invalid or expired access token."
USER_PASSWORD = "user password 1"


class Creds:
    """The module's stack, one gateway, an admin login, and every secret used (for the logs)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.port = stack.start_gateway()
        self.tokens = login(stack, "root", ADMIN_PASSWORD)
        self.admin = self.tokens["access_token"]
        self.ring = signing_ring(stack)
        self.secrets = [ADMIN_PASSWORD, USER_PASSWORD, self.admin, self.tokens["refresh_token"]]
        # An API key that expires while the module runs (checked by a late test).
        self.expiring = self.make_key(expires_in=2.0)
        self.expires_at = time.time() + 2.0
        assert self.get("/v1/models", self.expiring["key"]).status_code == 200  # now cached

    def get(self, path: str, credential: str | None) -> httpx.Response:
        headers = {} if credential is None else {"Authorization": f"Bearer {credential}"}
        return self.stack.http(self.port).get(path, headers=headers)

    def post(self, path: str, credential: str, body: dict[str, Any]) -> httpx.Response:
        headers = {"Authorization": f"Bearer {credential}"}
        return self.stack.http(self.port).post(path, json=body, headers=headers)

    def auth_api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, f"http://127.0.0.1:{self.stack.auth_http}{path}",
                             headers={"Authorization": f"Bearer {self.admin}"}, timeout=30,
                             **kwargs)  # fmt: skip

    def make_key(self, **body: Any) -> dict[str, Any]:
        reply = self.auth_api("POST", "/v1/api-keys", json=body)
        assert reply.status_code == 201, reply.text
        made: dict[str, Any] = reply.json()
        self.secrets.append(made["key"])
        return made

    def claims(self, **changes: Any) -> dict[str, Any]:
        """The admin token's claims with a fresh jti and times around now, plus `changes`."""
        now = int(time.time())
        claims = {**claims_of(self.admin), "jti": f"forged-{time.monotonic_ns()}", "iat": now,
                  "nbf": now, "exp": now + 600}  # fmt: skip
        claims.update(changes)
        return claims


@pytest.fixture(scope="module")
def creds(platform_stack: Stack) -> Creds:
    return Creds(platform_stack)


def refused(creds: Creds, credential: str | None, path: str = "/v1/models") -> dict[str, Any]:
    """`credential` gets a 401 with OpenAI's error object and a Bearer challenge."""
    if credential is not None:
        creds.secrets.append(credential)
    reply = creds.get(path, credential)
    error = openai_error(reply, 401)
    assert reply.headers["www-authenticate"] == "Bearer"
    assert error["type"] == "authentication_error"
    return error


# -- JWTs ------------------------------------------------------------------------------------


def _hs256_with_public_key(creds: Creds, fmt: serialization.PublicFormat) -> str:
    """HS/RS confusion: HMAC-SHA256 keyed with the published RSA public key (PyJWT refuses to
    make this token, so it is signed by hand)."""
    public = creds.ring.current.public_key.public_bytes(serialization.Encoding.PEM, fmt)
    header = {"alg": "HS256", "typ": "at+jwt", "kid": creds.ring.current.kid}
    signing_input = f"{b64url(json.dumps(header).encode())}." \
                    f"{b64url(json.dumps(creds.claims()).encode())}"  # fmt: skip
    signature = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def _alg_none(creds: Creds) -> str:
    return jwt.encode(creds.claims(), None, algorithm="none",
                      headers={"kid": creds.ring.current.kid, "typ": "at+jwt"})  # fmt: skip


def _tampered(creds: Creds) -> str:
    """A real user's token with role and scope raised, the signature kept."""
    made = creds.auth_api("POST", "/v1/users", json={"username": f"u{time.monotonic_ns()}",
                                                     "password": USER_PASSWORD})  # fmt: skip
    assert made.status_code == 201, made.text
    token = login(creds.stack, made.json()["username"], USER_PASSWORD)["access_token"]
    creds.secrets.append(token)
    assert creds.get("/v1/models", token).status_code == 200
    head, _, signature = token.split(".")
    claims = {**claims_of(token), "role": "admin", "scope": "admin model:*"}
    return f"{head}.{b64url(json.dumps(claims).encode())}.{signature}"


def _now() -> int:
    return int(time.time())


FORGERIES: dict[str, Callable[[Creds], str]] = {
    "alg none": _alg_none,
    "HS256 keyed with the public key (SPKI PEM)":
        lambda c: _hs256_with_public_key(c, serialization.PublicFormat.SubjectPublicKeyInfo),
    "HS256 keyed with the public key (PKCS#1 PEM)":
        lambda c: _hs256_with_public_key(c, serialization.PublicFormat.PKCS1),
    "expired an hour ago":
        lambda c: forge(c.ring, c.claims(iat=_now() - 7200, nbf=_now() - 7200, exp=_now() - 3600)),
    "nbf an hour ahead": lambda c: forge(c.ring, c.claims(nbf=_now() + 3600)),
    "wrong iss": lambda c: forge(c.ring, c.claims(iss="https://evil.example")),
    "wrong aud": lambda c: forge(c.ring, c.claims(aud="some-other-api")),
    "unknown kid": lambda c: forge(c.ring, c.claims(), headers={"kid": "not-a-published-key"}),
    "no kid": lambda c: forge(c.ring, c.claims(), headers={"kid": None}),
    "an attacker's key under the real kid":
        lambda c: forge(c.ring, c.claims(),
                        key=rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    "typ JWT, not at+jwt": lambda c: forge(c.ring, c.claims(), headers={"typ": "JWT"}),
    "no exp": lambda c: forge(c.ring, {k: v for k, v in c.claims().items() if k != "exp"}),
    "tampered payload (role and scope raised)": _tampered,
    "a refresh token as the bearer": lambda c: str(c.tokens["refresh_token"]),
    "garbage": lambda c: "not.a.jwt",
}  # fmt: skip


def test_the_forger_makes_tokens_the_gateway_accepts(creds: Creds) -> None:
    token = forge(creds.ring, creds.claims())
    creds.secrets.append(token)
    reply = creds.get("/v1/models", token)
    assert reply.status_code == 200, reply.text
    assert {m["id"] for m in reply.json()["data"]} == {CHAT, EMBED}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_bad_jwt_is_refused_with_401_and_the_generic_error(creds: Creds, forgery: str) -> None:
    token = FORGERIES[forgery](creds)
    error = refused(creds, token)
    assert (error["message"], error["code"]) == (GENERIC, "invalid_token"), error
    # ... on a generating endpoint too, before any work is done.
    body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    assert openai_error(creds.post("/v1/chat/completions", token, body), 401) == error


def test_no_credential_and_other_schemes_are_refused(creds: Creds) -> None:
    assert refused(creds, None)["code"] == "missing_api_key"
    key = creds.make_key()["key"]
    for header in (f"Basic {key}", "Bearer", f"Token {key}", key):
        reply = creds.stack.http(creds.port).get("/v1/models", headers={"Authorization": header})
        assert openai_error(reply, 401)["code"] == "missing_api_key", header


def test_a_token_revoked_with_post_revoke_is_refused_on_its_next_use(creds: Creds) -> None:
    token = login(creds.stack, "root", ADMIN_PASSWORD)["access_token"]
    creds.secrets.append(token)
    assert creds.get("/v1/models", token).status_code == 200  # verified, now remembered
    reply = httpx.post(f"http://127.0.0.1:{creds.stack.auth_http}/v1/auth/revoke",
                       json={"token": token}, headers={"Authorization": f"Bearer {token}"},
                       timeout=30)  # fmt: skip
    assert reply.status_code == 200 and reply.json()["kind"] == "jti", reply.text
    assert refused(creds, token)["message"] == GENERIC  # the very next request


# -- API keys --------------------------------------------------------------------------------


def test_a_key_revoked_by_an_admin_is_refused(creds: Creds) -> None:
    made = creds.make_key()
    assert creds.get("/v1/models", made["key"]).status_code == 200
    reply = creds.auth_api("POST", "/v1/revocations", json={"kind": "api_key", "value": made["id"]})
    assert reply.status_code == 201, reply.text
    assert refused(creds, made["key"])["code"] == "invalid_api_key"


def test_a_made_up_key_with_a_real_prefix_is_refused(creds: Creds) -> None:
    real = creds.make_key()["key"]
    hfx, prefix, secret = real.split("_", 2)  # hfx_<public prefix>_<secret>
    fake = f"{hfx}_{prefix}_{'A' * len(secret)}"
    assert refused(creds, fake)["code"] == "invalid_api_key"


def test_a_key_scoped_to_one_model_gets_403_for_every_other_use(creds: Creds) -> None:
    key = creds.make_key(scopes=[f"model:{EMBED}"])["key"]
    prompt = {"model": CHAT, "prompt": "hi", "max_tokens": 1}
    denied = [
        creds.get(f"/v1/models/{CHAT}", key),
        creds.post("/v1/completions", key, prompt),
        creds.post("/tokenize", key, {"model": CHAT, "prompt": "hi"}),
        creds.post("/detokenize", key, {"model": CHAT, "tokens": [1, 2]}),
        creds.post("/v1/chat/completions", key,
                   {"model": CHAT, "messages": [{"role": "user", "content": "hi"}]}),
    ]  # fmt: skip
    for reply in denied:
        error = openai_error(reply, 403)
        assert (error["type"], error["code"]) == ("permission_error", "model_not_allowed"), error
    allowed = creds.post("/v1/embeddings", key, {"model": EMBED, "input": "hi"})
    assert allowed.status_code == 200, allowed.text


def test_an_expired_key_is_refused_though_the_gateway_had_cached_it(creds: Creds) -> None:
    time.sleep(max(0.0, creds.expires_at + 0.5 - time.time()))
    assert refused(creds, creds.expiring["key"])["code"] == "invalid_api_key"


# -- last: what the processes wrote ----------------------------------------------------------


def test_no_key_token_or_password_reaches_any_log(creds: Creds) -> None:
    secrets = list(creds.secrets)
    for secret in creds.secrets:  # the secret parts alone, too
        if secret.startswith("hfx_"):
            secrets.append(secret.split("_", 2)[2])  # hfx_<public prefix>_<secret>
        elif "." in secret:
            secrets.append(secret.rsplit(".", 1)[1])  # a JWT's signature, a refresh secret
    assert len(secrets) > 30
    assert_no_secret_in_logs([creds.stack.dir], [s for s in secrets if len(s) >= 8])
