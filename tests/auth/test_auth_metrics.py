"""The auth service's ``GET /metrics`` on a real `helixflow auth` process (SQLite): requests by
route template, refused credentials by operation and reason (HTTP and gRPC), revocations this
process recorded (not those another process wrote), and connected revocation streams."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from conftest import provision
from prometheus_client.parser import text_string_to_metric_families
from service_testing import AuthProcess, Validator

from helixflow._proto import auth_pb2 as pb
from helixflow._proto import auth_pb2_grpc as pb_grpc
from helixflow.auth.metrics import AuthMetrics, failure_reason
from helixflow.auth.revocations import RevocationEvent
from helixflow.auth.signing_keys import generate_master_key
from helixflow.auth.tokens import InvalidTokenError
from helixflow.errors import AuthenticationError, RateLimitError

PASSWORD = "admin password 1"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthProcess]:
    directory = tmp_path_factory.mktemp("auth-metrics")
    with provision("sqlite", directory) as database:
        process = AuthProcess(database, generate_master_key(), directory)
        try:
            made = process.admin("create-user", "root", "--role", "admin", "--password-stdin",
                                 stdin=PASSWORD + "\n")  # fmt: skip
            assert made.returncode == 0, made.stderr
            yield process
        finally:
            process.stop()
        assert "Traceback" not in process.log.read_text()


def scrape(auth: AuthProcess) -> Samples:
    reply = auth.http("GET", "/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(reply.text)
            for s in family.samples}  # fmt: skip


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class Growth:
    """How much each sample grew between two scrapes."""

    def __init__(self, before: Samples, after: Samples) -> None:
        self.before = before
        self.after = after

    def __call__(self, name: str, **labels: str) -> float:
        return sample(self.after, name, **labels) - sample(self.before, name, **labels)

    def exported(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.after


def test_refusals_are_counted_by_operation_and_reason(auth: AuthProcess) -> None:
    before = scrape(auth)
    admin = auth.login("root", PASSWORD)["access_token"]
    wrong = auth.http("POST", "/v1/auth/login", json={"username": "root", "password": "nope"})
    assert wrong.status_code == 401
    assert auth.http("POST", "/v1/auth/refresh", json={"refresh_token": "hfr_x.y"}
                     ).status_code == 401  # fmt: skip
    refresh = auth.login("root", PASSWORD)["refresh_token"]
    assert auth.http("POST", "/v1/auth/refresh", json={"refresh_token": refresh}
                     ).status_code == 200  # fmt: skip
    assert auth.http("POST", "/v1/auth/refresh", json={"refresh_token": refresh}
                     ).status_code == 401  # reused: the session is revoked  # fmt: skip
    assert auth.http("GET", "/v1/auth/me", "not-a-token").status_code == 401
    with grpc.insecure_channel(auth.grpc_target) as channel:
        stub = pb_grpc.AuthStub(channel)
        for rpc, request in (
            (stub.ValidateApiKey, pb.ValidateApiKeyRequest(api_key="hfx_bogus")),
            (stub.ValidateToken, pb.ValidateTokenRequest(token="bogus")),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                rpc(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.ValidateToken(pb.ValidateTokenRequest(token=admin), timeout=10).user_id

    grew = Growth(before, scrape(auth))
    failures = "helixflow_auth_failures_total"
    assert grew(failures, operation="login", reason="bad_credentials") == 1
    assert grew.exported(failures, operation="login", reason="throttled")  # before it happens
    assert grew(failures, operation="refresh", reason="invalid") == 1  # unknown token
    assert grew(failures, operation="refresh", reason="reused") == 1
    assert grew(failures, operation="api_key", reason="invalid") == 1
    assert grew(failures, operation="token", reason="invalid") == 2  # over HTTP, over gRPC
    assert grew("helixflow_auth_revocations_total", kind="family") == 1  # the reuse
    login = "/v1/auth/login"
    assert grew("helixflow_auth_requests_total", route=login, status="401") == 1
    assert grew("helixflow_auth_request_seconds_count", route=login) == 3


def test_revocations_routes_and_subscribers(auth: AuthProcess) -> None:
    admin = auth.login("root", PASSWORD)["access_token"]
    before = scrape(auth)
    made = auth.http("POST", "/v1/api-keys", admin, json={"name": "m"})
    assert made.status_code == 201
    assert auth.http("DELETE", f"/v1/api-keys/{made.json()['id']}", admin).status_code == 200
    assert auth.http("GET", "/v1/api-keys/no-such-key", admin).status_code == 404
    assert auth.http("POST", "/v1/revocations", admin,
                     json={"kind": "jti", "value": "here"}).status_code == 201  # fmt: skip
    assert auth.http("GET", "/no/such/path").status_code == 404
    validator = Validator(auth.grpc_target)
    try:
        samples = scrape(auth)
        assert sample(samples, "helixflow_auth_revocation_subscribers") == 1
    finally:
        validator.close()

    grew = Growth(before, samples)
    assert grew("helixflow_auth_revocations_total", kind="api_key") == 1
    assert grew("helixflow_auth_revocations_total", kind="jti") == 1
    requests = "helixflow_auth_requests_total"
    assert grew(requests, route="/v1/api-keys/{id}", status="200") == 1
    assert grew(requests, route="/v1/api-keys/{id}", status="404") == 1
    assert grew(requests, route="other", status="404") == 1
    assert not any(("route", "/no/such/path") in labels for _, labels in samples)

    # A revocation another process wrote reaches this one by the store poll: not counted here.
    assert auth.admin("revoke", "jti", "elsewhere").returncode == 0
    deadline = time.monotonic() + 10
    while "elsewhere" not in auth.http("GET", "/v1/revocations", admin).text:
        assert time.monotonic() < deadline, "the CLI's revocation never arrived"
        time.sleep(0.05)
    while sample(after := scrape(auth), "helixflow_auth_revocation_subscribers") != 0:
        assert time.monotonic() < deadline, "the closed stream is still counted"
        time.sleep(0.05)
    assert sample(after, "helixflow_auth_revocations_total", kind="jti") == sample(
        samples, "helixflow_auth_revocations_total", kind="jti"
    )


def test_reasons_are_a_fixed_set_and_counting_never_raises() -> None:
    assert failure_reason(InvalidTokenError("expired")) == "expired"
    assert failure_reason(InvalidTokenError("inactive_user")) == "disabled"
    assert failure_reason(InvalidTokenError("bad_signature")) == "invalid"
    assert failure_reason(AuthenticationError("x", code="invalid_credentials")) == "bad_credentials"
    assert failure_reason(RateLimitError("x", retry_after=1.0)) == "throttled"
    metrics = AuthMetrics()
    metrics.failed("login", RuntimeError("odd"))
    metrics.on_revocation(RevocationEvent(kind="jti", value="v", revoked_at=0.0))
    metrics.on_revocation(None)  # signing keys rotated: not a revocation
    found = RevocationEvent(kind="jti", value="w", revoked_at=0.0)
    metrics.foreign(lambda: metrics.on_revocation(found))  # a poll's find: not counted
    text = metrics.render()[0].decode()
    assert 'helixflow_auth_failures_total{operation="login",reason="invalid"} 1.0' in text
    assert 'helixflow_auth_revocations_total{kind="jti"} 1.0' in text
