"""The auth service as users meet it: real `helixflow auth` processes on SQLite and on
PostgreSQL, real HTTP and gRPC clients, and a gateway-side validator (`AuthClient`).

Every rejection the issue lists has its own test against the validator, and against the auth
service's own online check. Forged tokens are signed with the service's real current key (read
from its database with the master key), so each differs from a valid token in one thing only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
from auth_testing import Database
from conftest import provision
from cryptography.hazmat.primitives import serialization
from process_testing import RedisServer
from service_testing import AuthProcess, Validator

from helixflow._proto import auth_pb2 as pb
from helixflow._proto import auth_pb2_grpc as pb_grpc
from helixflow.auth.signing_keys import KeyRing, generate_master_key, load_master_key
from helixflow.auth.tokens import InvalidTokenError
from helixflow.errors import AuthenticationError, OverloadedError

ADMIN_PASSWORD = "admin password 1"
PASSWORD = "user password 1"


class Service:
    """One auth process with an admin and a user, plus a validator subscribed to it."""

    def __init__(self, database: Database, log_dir: Path) -> None:
        self.master_key = generate_master_key()
        self.database = database
        self.auth = AuthProcess(database, self.master_key, log_dir)
        made = self.auth.admin("create-user", "root", "--role", "admin", "--password-stdin",
                               stdin=ADMIN_PASSWORD + "\n")  # fmt: skip
        assert made.returncode == 0, made.stderr
        self.admin_token = self.auth.login("root", ADMIN_PASSWORD)["access_token"]
        reply = self.auth.http("POST", "/v1/users", self.admin_token,
                               json={"username": "alice", "password": PASSWORD})  # fmt: skip
        assert reply.status_code == 201, reply.text
        self.alice_id = reply.json()["id"]
        self.validator = Validator(self.auth.grpc_target)
        self.channel = grpc.insecure_channel(self.auth.grpc_target)
        self.stub = pb_grpc.AuthStub(self.channel)

    def ring(self) -> KeyRing:
        store = self.database.open()
        try:
            record = store.load_signing_keys()
        finally:
            store.close()
        assert record is not None
        return KeyRing.from_dict(record, load_master_key(self.master_key))

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": "helixflow", "aud": "helixflow", "sub": self.alice_id, "iat": now,
                  "nbf": now, "exp": now + 600, "jti": f"forged-{time.monotonic_ns()}",
                  "role": "user", "scope": "model:*"}  # fmt: skip
        claims.update(overrides)
        return claims

    def forge(self, headers: dict[str, Any] | None = None, **overrides: Any) -> str:
        key = self.ring().current
        return jwt.encode(self.claims(**overrides), key.private_key, algorithm="RS256",
                          headers={"kid": key.kid, "typ": "at+jwt", **(headers or {})})  # fmt: skip

    def refused(self, token: str, reason: str | None = None) -> None:
        """The validator, the online gRPC check and the HTTP API all refuse `token`."""
        with pytest.raises(AuthenticationError) as caught:
            self.validator.authenticate(token)
        if reason is not None:
            assert isinstance(caught.value, InvalidTokenError)
            assert caught.value.reason == reason
        assert caught.value.status == 401
        with pytest.raises(grpc.RpcError) as rpc:
            self.stub.ValidateToken(pb.ValidateTokenRequest(token=token), timeout=10)
        assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert rpc.value.details() == "Invalid or expired access token."
        reply = self.auth.http("GET", "/v1/auth/me", token)
        assert reply.status_code == 401
        assert reply.json()["error"]["message"] == "Invalid or expired access token."

    def close(self) -> None:
        self.validator.close()
        self.channel.close()
        self.auth.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Service]:  # fmt: skip
    directory = tmp_path_factory.mktemp(f"auth-{request.param}")
    with provision(request.param, directory) as database:
        made = Service(database, directory)
        yield made
        made.close()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- sessions --------------------------------------------------------------------------------


def test_login_refresh_rotation_and_reuse_revokes_the_family(service: Service) -> None:
    auth = service.auth
    first = auth.login("alice", PASSWORD)
    assert set(first) == {"access_token", "refresh_token", "expires_in", "refresh_expires_in",
                          "token_type"}  # fmt: skip
    assert first["token_type"] == "Bearer" and first["expires_in"] == 900
    header = jwt.get_unverified_header(first["access_token"])
    claims = jwt.decode(first["access_token"], options={"verify_signature": False})
    assert header["alg"] == "RS256" and header["kid"] == service.ring().current.kid
    assert {"iss", "aud", "sub", "exp", "iat", "nbf", "jti"} <= set(claims)
    principal = service.validator.authenticate(first["access_token"])
    assert principal.user_id == service.alice_id and principal.username == "alice"

    second = auth.http("POST", "/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert second.status_code == 200 and second.headers["cache-control"] == "no-store"
    second_tokens = second.json()
    assert second_tokens["refresh_token"] != first["refresh_token"]
    assert service.validator.authenticate(second_tokens["access_token"]).session_id == (
        principal.session_id
    )

    reuse = auth.http("POST", "/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert reuse.status_code == 401
    assert reuse.json()["error"]["code"] == "invalid_refresh_token"
    # The whole family is gone: the newest refresh token and both access tokens.
    again = auth.http("POST", "/v1/auth/refresh",
                      json={"refresh_token": second_tokens["refresh_token"]})  # fmt: skip
    assert again.status_code == 401
    for token in (first["access_token"], second_tokens["access_token"]):
        service.refused(token, "revoked")


def test_logout_ends_the_session_everywhere(service: Service) -> None:
    tokens = service.auth.login("alice", PASSWORD)
    reply = service.auth.http("POST", "/v1/auth/logout",
                              json={"refresh_token": tokens["refresh_token"]})  # fmt: skip
    assert reply.status_code == 204
    service.refused(tokens["access_token"], "revoked")


def test_a_token_revoked_over_http_is_refused_on_its_very_next_use(service: Service) -> None:
    delays = []
    for _ in range(20):
        token = service.auth.login("alice", PASSWORD)["access_token"]
        assert service.validator.authenticate(token).user_id == service.alice_id
        reply = service.auth.http("POST", "/v1/auth/revoke", token, json={"token": token})
        answered = time.perf_counter()
        assert reply.status_code == 200 and reply.json()["kind"] == "jti"
        with pytest.raises(InvalidTokenError) as caught:
            service.validator.authenticate(token)  # the very next use
        assert caught.value.reason == "revoked"
        delays.append(service.validator.arrivals[("jti", reply.json()["value"])] - answered)
    ms = sorted(d * 1e3 for d in delays)
    print(f"\n[{service.database.kind}] revocation applied at the validator relative to the "
          f"HTTP answer: median {statistics.median(ms):+.2f} ms, max {ms[-1]:+.2f} ms "
          f"(negative: before the answer arrived), {len(ms)} revocations")  # fmt: skip


# -- the rejections, one test each -----------------------------------------------------------


def test_rejects_alg_none(service: Service) -> None:
    header = {"alg": "none", "typ": "at+jwt", "kid": service.ring().current.kid}
    token = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(service.claims()).encode())}."
    service.refused(token, "bad_algorithm")


def test_rejects_hs256_signed_with_the_public_key(service: Service) -> None:
    key = service.ring().current
    pem = key.public_key.public_bytes(serialization.Encoding.PEM,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
    header = {"alg": "HS256", "typ": "at+jwt", "kid": key.kid}
    signing_input = (
        f"{b64(json.dumps(header).encode())}.{b64(json.dumps(service.claims()).encode())}"
    )
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    service.refused(f"{signing_input}.{b64(signature)}", "bad_algorithm")


def test_rejects_an_expired_token(service: Service) -> None:
    now = int(time.time())
    service.refused(service.forge(iat=now - 1000, nbf=now - 1000, exp=now - 100), "expired")


def test_rejects_a_token_not_yet_valid(service: Service) -> None:
    service.refused(service.forge(nbf=int(time.time()) + 600), "not_yet_valid")


def test_rejects_a_wrong_issuer(service: Service) -> None:
    service.refused(service.forge(iss="https://evil.example"), "bad_issuer")


def test_rejects_a_wrong_audience(service: Service) -> None:
    service.refused(service.forge(aud="some-other-api"), "bad_audience")


def test_rejects_an_unknown_kid(service: Service) -> None:
    service.refused(service.forge(headers={"kid": "not-a-published-key"}), "unknown_kid")


def test_rejects_a_tampered_payload(service: Service) -> None:
    token = service.auth.login("alice", PASSWORD)["access_token"]
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["role"] = "admin"
    claims["scope"] = "admin model:*"
    service.refused(f"{head}.{b64(json.dumps(claims).encode())}.{signature}", "bad_signature")


def test_rejects_a_revoked_jti(service: Service) -> None:
    token = service.auth.login("alice", PASSWORD)["access_token"]
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    reply = service.auth.http("POST", "/v1/revocations", service.admin_token,
                              json={"kind": "jti", "value": jti})  # fmt: skip
    assert reply.status_code == 201, reply.text
    service.refused(token, "revoked")


def test_rejects_a_disabled_user(service: Service) -> None:
    reply = service.auth.http("POST", "/v1/users", service.admin_token,
                              json={"username": "dave", "password": PASSWORD})  # fmt: skip
    dave = reply.json()["id"]
    tokens = service.auth.login("dave", PASSWORD)
    key = service.auth.http("POST", "/v1/api-keys", tokens["access_token"], json={}).json()["key"]
    assert service.validator.authenticate(key).user_id == dave
    reply = service.auth.http("PATCH", f"/v1/users/{dave}", service.admin_token,
                              json={"disabled": True})  # fmt: skip
    assert reply.status_code == 200 and reply.json()["disabled"] is True
    service.refused(tokens["access_token"], "revoked")
    with pytest.raises(AuthenticationError):
        service.validator.authenticate(key)  # the cached key was evicted and re-checked
    login = service.auth.http("POST", "/v1/auth/login",
                              json={"username": "dave", "password": PASSWORD})  # fmt: skip
    assert login.status_code == 401
    assert login.json()["error"]["message"] == "Invalid username or password."


def test_rejects_an_expired_api_key(service: Service) -> None:
    reply = service.auth.http("POST", "/v1/api-keys", service.admin_token,
                              json={"user_id": "alice", "expires_in": 1.5})  # fmt: skip
    assert reply.status_code == 201, reply.text
    key = reply.json()["key"]
    assert service.validator.authenticate(key).user_id == service.alice_id  # now cached
    time.sleep(1.6)
    with pytest.raises(AuthenticationError):
        service.validator.authenticate(key)
    with pytest.raises(grpc.RpcError) as rpc:
        service.stub.ValidateApiKey(pb.ValidateApiKeyRequest(api_key=key), timeout=10)
    assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert rpc.value.details() == "Invalid API key."


def test_rejects_a_revoked_api_key(service: Service) -> None:
    tokens = service.auth.login("alice", PASSWORD)
    made = service.auth.http("POST", "/v1/api-keys", tokens["access_token"],
                             json={"name": "ci", "scopes": ["model:smol"], "rpm_limit": 60,
                                   "tpm_limit": 5000})  # fmt: skip
    assert made.status_code == 201
    key, key_id = made.json()["key"], made.json()["id"]
    principal = service.validator.authenticate(key)
    assert (principal.scopes, principal.rpm_limit, principal.tpm_limit) == (("model:smol",), 60,
                                                                            5000)  # fmt: skip
    listed = service.auth.http("GET", "/v1/api-keys", tokens["access_token"]).json()["data"]
    assert key_id in {k["id"] for k in listed} and all("key" not in k for k in listed)
    reply = service.auth.http("DELETE", f"/v1/api-keys/{key_id}", tokens["access_token"])
    assert reply.status_code == 200 and reply.json()["revoked_at"] is not None
    with pytest.raises(AuthenticationError):
        service.validator.authenticate(key)  # cached a moment ago: evicted by the stream
    with pytest.raises(grpc.RpcError) as rpc:
        service.stub.ValidateApiKey(pb.ValidateApiKeyRequest(api_key=key), timeout=10)
    assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_remembered_token_still_expires(service: Service) -> None:
    from auth_testing import Clock

    clock = Clock(time.time())
    validator = Validator(service.auth.grpc_target, now=clock)
    try:
        token = service.auth.login("alice", PASSWORD)["access_token"]
        assert validator.authenticate(token)  # verified once, then remembered
        assert validator.authenticate(token)
        clock.advance(900 + 30 + 2)  # past exp + leeway (iat is whole seconds, after t0)
        with pytest.raises(InvalidTokenError) as caught:
            validator.authenticate(token)
        assert caught.value.reason == "expired"
    finally:
        validator.close()


def test_keys_are_found_by_prefix_and_no_secret_reaches_the_log(service: Service) -> None:
    auth = service.auth
    tokens = auth.login("alice", PASSWORD)
    made = auth.http("POST", "/v1/api-keys", tokens["access_token"], json={}).json()
    found = auth.http("GET", f"/v1/api-keys?prefix={made['prefix']}", tokens["access_token"])
    assert [k["id"] for k in found.json()["data"]] == [made["id"]]
    other = auth.http("POST", "/v1/users", service.admin_token,
                      json={"username": "erin", "password": PASSWORD})  # fmt: skip
    assert other.status_code == 201
    erin = auth.login("erin", PASSWORD)["access_token"]
    assert auth.http("GET", f"/v1/api-keys?prefix={made['prefix']}", erin).json()["data"] == []
    refreshed = auth.http("POST", "/v1/auth/refresh",
                          json={"refresh_token": tokens["refresh_token"]}).json()  # fmt: skip
    auth.http("POST", "/v1/auth/login", json={"username": "alice", "password": "hunter2-typo"})
    assert service.validator.authenticate(made["key"])
    log = auth.log.read_text()
    secrets = [PASSWORD, ADMIN_PASSWORD, "hunter2-typo", made["key"], made["key"][13:],
               tokens["access_token"], tokens["refresh_token"], refreshed["refresh_token"],
               tokens["refresh_token"].split(".")[1]]  # fmt: skip
    for secret in secrets:
        assert secret not in log
    assert "login: user=" in log and "API key" in log  # the log does say what happened


# -- the HTTP API's guards -------------------------------------------------------------------


def test_users_cannot_act_as_admins_or_on_each_other(service: Service) -> None:
    auth = service.auth
    alice = auth.login("alice", PASSWORD)["access_token"]
    assert auth.http("GET", "/v1/users", alice).status_code == 403
    assert auth.http("POST", "/v1/users", alice,
                     json={"username": "x1", "password": PASSWORD}).status_code == 403  # fmt: skip
    assert auth.http("POST", "/v1/revocations", alice,
                     json={"kind": "user", "value": "root"}).status_code == 403  # fmt: skip
    assert auth.http("POST", "/v1/signing-keys/rotate", alice).status_code == 403
    assert auth.http("POST", "/v1/api-keys", alice, json={"scopes": ["admin"]}).status_code == 403
    assert auth.http("POST", "/v1/api-keys", alice, json={"user_id": "root"}).status_code == 403
    root_key = auth.http("POST", "/v1/api-keys", service.admin_token, json={}).json()["id"]
    assert auth.http("GET", f"/v1/api-keys/{root_key}", alice).status_code == 404
    assert auth.http("DELETE", f"/v1/api-keys/{root_key}", alice).status_code == 404
    assert auth.http("GET", "/v1/api-keys?user_id=root", alice).status_code == 403
    # An admin's key acts as admin only with the admin scope.
    plain = auth.http("POST", "/v1/api-keys", service.admin_token, json={}).json()["key"]
    scoped = auth.http("POST", "/v1/api-keys", service.admin_token,
                       json={"scopes": ["admin"]}).json()["key"]  # fmt: skip
    assert auth.http("GET", "/v1/users", plain).status_code == 403
    assert auth.http("GET", "/v1/users", scoped).status_code == 200
    # A plain key cannot manage its account: a leaked inference key cannot widen itself.
    own = auth.http("POST", "/v1/api-keys", alice, json={"scopes": ["model:smol"],
                                                         "rpm_limit": 1}).json()  # fmt: skip
    assert auth.http("GET", "/v1/auth/me", own["key"]).status_code == 200
    assert auth.http("POST", "/v1/api-keys", own["key"], json={}).status_code == 403
    assert auth.http("DELETE", f"/v1/api-keys/{own['id']}", own["key"]).status_code == 403
    assert auth.http("POST", "/v1/auth/password", own["key"],
                     json={"old_password": PASSWORD, "new_password": "x" * 10}
                     ).status_code == 403  # fmt: skip
    for bad in (None, "Bearer", "Basic abc", "Bearer not-a-token"):
        headers = {} if bad is None else {"Authorization": bad}
        reply = auth.http("GET", "/v1/auth/me", headers=headers)
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"


def test_bad_requests_get_clear_json_errors(service: Service) -> None:
    auth = service.auth
    cases = [
        ("POST", "/v1/auth/login", {"content": b"{not json"}, 400, "not valid JSON"),
        ("POST", "/v1/auth/login", {"json": {"username": 5, "password": "x"}}, 400,
         "Expected `str`, got `int` - at `$.username`"),
        ("POST", "/v1/auth/login", {"json": {"username": "a", "password": "b", "x": 1}}, 400,
         "unknown field `x`"),
        ("POST", "/v1/auth/login", {"content": b"x" * 70_000}, 413, "larger than"),
        ("POST", "/v1/auth/login", {}, 400, "needs a JSON body"),
        ("GET", "/v1/nothing", {}, 404, "no route"),
        ("DELETE", "/v1/users", {}, 405, "method not allowed"),
        ("POST", "/v1/auth/register", {"json": {"username": "e", "password": PASSWORD}}, 403,
         "registration is disabled"),
    ]  # fmt: skip
    for method, path, kwargs, status, text in cases:
        reply = auth.http(method, path, **kwargs)
        assert reply.status_code == status, (path, reply.text)
        assert text in reply.json()["error"]["message"], reply.text
    admin = service.admin_token
    for body, text in (({"username": "bad name", "password": PASSWORD}, "username must be"),
                       ({"username": "ok", "password": "short"}, "at least 8"),
                       ({"username": "ok", "password": PASSWORD, "role": "god"}, "role must be"),
                       ({"username": "alice", "password": PASSWORD}, "already taken")):  # fmt: skip
        reply = auth.http("POST", "/v1/users", admin, json=body)
        assert reply.status_code in (400, 409) and text in reply.json()["error"]["message"]
    reply = auth.http("POST", "/v1/api-keys", admin, json={"scopes": ["root"]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "scopes"
    with pytest.raises(grpc.RpcError) as rpc:
        service.stub.ValidateApiKey(pb.ValidateApiKeyRequest(api_key=""), timeout=10)
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Traceback" not in service.auth.log.read_text()


def test_login_throttling_is_generic(service: Service) -> None:
    statuses: dict[str, list[int]] = {}
    for name in ("alice", "nobody-here"):
        statuses[name] = []
        for _ in range(6):
            body = {"username": name, "password": "wrong password"}
            reply = service.auth.http("POST", "/v1/auth/login", json=body)
            statuses[name].append(reply.status_code)
        assert reply.json()["error"]["message"] == "Too many failed logins; try again later."
        assert int(reply.headers["retry-after"]) >= 1
    # Existing and unknown accounts look the same from outside.
    assert statuses["alice"] == statuses["nobody-here"] == [401] * 5 + [429]
    time.sleep(1.1)  # the first lock is one second; the right password then works
    assert service.auth.login("alice", PASSWORD)["access_token"]


def test_jwks_and_rotation_keep_old_tokens_valid(service: Service) -> None:
    old = service.auth.login("alice", PASSWORD)["access_token"]
    old_kid = jwt.get_unverified_header(old)["kid"]
    reply = service.auth.http("POST", "/v1/signing-keys/rotate", service.admin_token)
    new_kid = reply.json()["kid"]
    jwks = service.auth.http("GET", "/.well-known/jwks.json").json()
    assert [k["kid"] for k in jwks["keys"]] == [new_kid, old_kid]
    assert all(set(k) == {"kty", "use", "alg", "kid", "n", "e"} for k in jwks["keys"])
    new = service.auth.login("alice", PASSWORD)["access_token"]
    assert jwt.get_unverified_header(new)["kid"] == new_kid
    assert service.validator.authenticate(new) and service.validator.authenticate(old)


# -- restarts, the CLI, failure of the auth service, Redis -----------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_restart_keeps_users_keys_and_revocations(kind: str, tmp_path: Path) -> None:
    with provision(kind, tmp_path) as database:
        service = Service(database, tmp_path)
        try:
            auth = service.auth
            alice = auth.login("alice", PASSWORD)
            kept = auth.http("POST", "/v1/api-keys", alice["access_token"], json={}).json()
            gone = auth.http("POST", "/v1/api-keys", alice["access_token"], json={}).json()
            auth.http("DELETE", f"/v1/api-keys/{gone['id']}", alice["access_token"])
            auth.http("POST", "/v1/auth/revoke", alice["access_token"],
                      json={"token": alice["access_token"]})  # fmt: skip
            kid = auth.http("GET", "/.well-known/jwks.json").json()["keys"][0]["kid"]
            service.validator.close()
            auth.restart()
            service.validator = Validator(auth.grpc_target)  # learns the list from scratch
            assert auth.http("GET", "/.well-known/jwks.json").json()["keys"][0]["kid"] == kid
            assert auth.login("alice", PASSWORD)["access_token"]
            assert service.validator.authenticate(kept["key"]).key_id == kept["id"]
            with pytest.raises(AuthenticationError):
                service.validator.authenticate(gone["key"])
            service.refused(alice["access_token"], "revoked")
            refreshed = auth.http("POST", "/v1/auth/refresh",
                                  json={"refresh_token": alice["refresh_token"]})  # fmt: skip
            assert refreshed.status_code == 200  # the session outlived the restart
        finally:
            service.close()
        assert "Traceback" not in service.auth.log.read_text()


def test_admin_cli_on_a_running_service(tmp_path: Path) -> None:
    with provision("sqlite", tmp_path) as database:
        service = Service(database, tmp_path)
        try:
            auth = service.auth
            made = auth.admin("create-key", "alice", "--name", "cli", "--scope", "model:smol",
                              "--rpm", "10", "--json")  # fmt: skip
            assert made.returncode == 0, made.stderr
            key = json.loads(made.stdout)
            assert service.validator.authenticate(key["key"]).rpm_limit == 10
            token = auth.login("alice", PASSWORD)["access_token"]
            jti = jwt.decode(token, options={"verify_signature": False})["jti"]
            started = time.monotonic()
            assert auth.admin("revoke", "jti", jti).returncode == 0
            # No Redis here: the service's store poll (every second) picks the CLI's write up.
            while True:
                try:
                    service.validator.authenticate(token)
                except InvalidTokenError:
                    break
                assert time.monotonic() - started < 5, "the CLI's revocation never arrived"
                time.sleep(0.05)
            listed = auth.admin("list-users")
            assert listed.returncode == 0 and "alice" in listed.stdout and "root" in listed.stdout
            bad = auth.admin("create-key", "nobody")
            assert bad.returncode == 1 and "no such user" in bad.stderr
            bad = auth.admin("create-user", "x y", "--password-stdin", stdin="p\n")
            assert bad.returncode == 1 and "username must be" in bad.stderr
        finally:
            service.close()


def test_while_auth_is_down_tokens_pass_for_a_grace_and_api_keys_fail_closed(
        tmp_path: Path) -> None:  # fmt: skip
    with provision("sqlite", tmp_path) as database:
        service = Service(database, tmp_path)
        try:
            token = service.auth.login("alice", PASSWORD)["access_token"]
            made = service.auth.admin("create-key", "alice", "--json")
            assert made.returncode == 0, made.stderr
            key = json.loads(made.stdout)["key"]
            service.validator.close()
            service.validator = Validator(service.auth.grpc_target, max_staleness=1.0,
                                          outage_grace=3.0)  # fmt: skip
            assert service.validator.authenticate(token)
            assert service.validator.authenticate(key)  # cached now
            assert service.auth.stop() == 0
            time.sleep(1.5)  # no heartbeat for longer than max_staleness
            # JWTs verify locally with the cached keys and the last known revocations...
            assert service.validator.authenticate(token).user_id == service.alice_id
            # ... API keys need the auth service: closed, even a cached one.
            with pytest.raises(OverloadedError) as caught:
                service.validator.authenticate(key)
            assert caught.value.status == 503
            time.sleep(3.0)  # past the outage grace: tokens fail closed too
            with pytest.raises(OverloadedError):
                service.validator.authenticate(token)
            service.auth.start()  # same ports: the validator reconnects and resyncs
            deadline = time.monotonic() + 15
            while not service.validator.client.stream_healthy:
                assert time.monotonic() < deadline, "the validator never resynced"
                time.sleep(0.1)
            assert service.validator.authenticate(token).user_id == service.alice_id
            assert service.validator.authenticate(key).user_id == service.alice_id
            assert service.validator.client.stream_connects >= 2
        finally:
            service.close()


def test_revocations_reach_every_replica_over_redis(tmp_path: Path) -> None:
    try:
        redis = RedisServer(tmp_path)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    try:
        with provision("postgres", tmp_path) as database:
            env = {"REDIS_URL": redis.url}
            service = Service(database, tmp_path)
            service.auth.extra_env = env
            service.auth.restart()
            replica = AuthProcess(database, service.master_key, tmp_path, env=env)
            far = Validator(replica.grpc_target)  # a gateway that talks to the other replica
            try:
                deadline = time.monotonic() + 10
                while not all(a.http("GET", "/health").json()["redis"]
                              for a in (service.auth, replica)):  # fmt: skip
                    assert time.monotonic() < deadline, "the replicas never subscribed to Redis"
                    time.sleep(0.05)
                delays = []
                for _ in range(10):
                    token = service.auth.login("alice", PASSWORD)["access_token"]
                    assert far.authenticate(token)
                    reply = service.auth.http("POST", "/v1/auth/revoke", token,
                                              json={"token": token})  # fmt: skip
                    answered = time.perf_counter()
                    jti = reply.json()["value"]
                    deadline = time.monotonic() + 5
                    while ("jti", jti) not in far.arrivals:
                        assert time.monotonic() < deadline, "the revocation never crossed"
                        time.sleep(0.0005)
                    delays.append(far.arrivals[("jti", jti)] - answered)
                    with pytest.raises(InvalidTokenError):
                        far.authenticate(token)
                relayed = replica.http("GET", "/health").json()["relayed"]
                # Over Redis, not by the one-second store poll. (A poll tick that lands between a
                # revocation and its Redis message takes that one: most, not all, are relayed.)
                assert relayed >= 7
                ms = sorted(d * 1e3 for d in delays)
                print(f"\n[redis] revocation on replica A applied at a validator of replica B "
                      f"{statistics.median(ms):+.2f} ms (median), {ms[-1]:+.2f} ms (max) after "
                      f"A's HTTP answer")  # fmt: skip
                # A rotation through the CLI reaches the running replicas at once as well.
                rotated = service.auth.admin("rotate-keys", "--json")
                new_kid = json.loads(rotated.stdout)["kid"]
                deadline = time.monotonic() + 5
                while True:
                    kids = [k["kid"] for k in replica.http("GET", "/.well-known/jwks.json")
                            .json()["keys"]]  # fmt: skip
                    if kids[0] == new_kid:
                        break
                    assert time.monotonic() < deadline, "the rotation never reached the replica"
                    time.sleep(0.05)
                token = replica.login("alice", PASSWORD)["access_token"]
                assert jwt.get_unverified_header(token)["kid"] == new_kid
                assert far.authenticate(token)
            finally:
                far.close()
                replica.stop()
                service.close()
    finally:
        redis.close()


def test_tls_on_both_ports(tmp_path: Path) -> None:
    from service_testing import ssl_context
    from tls_testing import make_pki

    pki = make_pki(tmp_path)
    with provision("sqlite", tmp_path) as database:
        auth = AuthProcess(database, generate_master_key(), tmp_path, tls=pki)
        try:
            made = auth.admin("create-user", "root", "--password-stdin",
                              stdin=ADMIN_PASSWORD + "\n")  # fmt: skip
            assert made.returncode == 0, made.stderr
            with httpx.Client(verify=ssl_context(pki["ca"])) as client:
                body = {"username": "root", "password": ADMIN_PASSWORD}
                reply = client.post(auth.url + "/v1/auth/login", json=body)
                assert reply.status_code == 200
                stream = client.stream("GET", auth.url + "/health")
                with stream as response:
                    tls_version = response.extensions["network_stream"].get_extra_info(
                        "ssl_object").version()  # fmt: skip
            assert tls_version == "TLSv1.3"
            with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
                httpx.get(auth.url.replace("https:", "http:") + "/health", timeout=5)
            creds = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
            validator = Validator(auth.grpc_target, credentials=creds)
            try:
                token = reply.json()["access_token"]
                assert validator.authenticate(token).username == "root"
                assert validator.client.stream_healthy
            finally:
                validator.close()
            # A gateway reaches auth over TLS, trusting its CA (--auth-tls-ca).
            from process_testing import Process, free_port

            port = free_port()
            gateway = Process(["gateway", "--port", str(port), "--auth", auth.grpc_target,
                               "--auth-tls-ca", str(pki["ca"]), "--pool",
                               f"127.0.0.1:{free_port()}"], auth.env,
                              tmp_path / "gateway.log")  # fmt: skip
            try:
                url = f"http://127.0.0.1:{port}/v1/models"
                bearer = {"Authorization": f"Bearer {token}"}
                gateway.ready(lambda: httpx.get(url, headers=bearer).status_code == 200, 60)
            finally:
                gateway.stop()
        finally:
            assert auth.stop() == 0
