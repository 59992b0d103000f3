"""The gateway's metrics of refusals and first tokens, read from its ``GET /metrics``: the ASGI
app in this process, with the real rate limiter, a fake pool (its gRPC stub) and a fake auth
client that raises what `AuthClient` raises."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helixflow._proto import inference_pb2 as pb
from helixflow.auth.principal import Principal
from helixflow.auth.tokens import InvalidTokenError
from helixflow.errors import AuthenticationError, OverloadedError
from helixflow.gateway.app import Gateway
from helixflow.gateway.backends import PoolBackend
from helixflow.gateway.config import BackendConfig, GatewayConfig, ModelConfig
from helixflow.gateway.metrics import rate_limit_kind
from helixflow.gateway.ratelimit import MemoryRateLimiter, RateLimiter, RateLimitExceeded

CHAT = [{"role": "user", "content": "Hi"}]
PRINCIPALS = {  # credential: who it is
    "free": Principal(kind="api_key", user_id="u", username="u", role="user",
                      scopes=("model:m",), key_id="k-free"),
    "rpm1": Principal(kind="api_key", user_id="u", username="u", role="user",
                      scopes=("model:m",), rpm_limit=1, key_id="k-rpm1"),
    "tpm10": Principal(kind="api_key", user_id="u", username="u", role="user",
                       scopes=("model:m",), tpm_limit=10, key_id="k-tpm10"),
}  # fmt: skip


class FakeAuth:
    """Raises what `AuthClient.authenticate` raises for each kind of bad credential."""

    stream_healthy = True

    async def authenticate(self, credential: str) -> Principal:
        if credential in PRINCIPALS:
            return PRINCIPALS[credential]
        if credential == "expired-token":
            raise InvalidTokenError("expired")
        if credential == "auth-down":
            raise OverloadedError("the auth service is unavailable", code="auth_unavailable")
        raise AuthenticationError("Invalid API key.", code="invalid_api_key")


class FakeCall:
    """A Generate call of the fake pool: two messages, then the end."""

    async def _messages(self) -> AsyncIterator[pb.GenerateResponse]:
        yield pb.GenerateResponse(index=0, text="Hel", token_ids=[1])
        yield pb.GenerateResponse(index=0, text="lo", token_ids=[2], finished=True,
                                  finish_reason="stop",
                                  usage=pb.Usage(prompt_tokens=3, completion_tokens=2))  # fmt: skip

    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]:
        return self._messages()

    def cancel(self) -> bool:
        return True


class FakeStub:
    def Generate(self, request: pb.GenerateRequest, timeout: float | None = None) -> FakeCall:
        return FakeCall()


async def with_gateway(body: Callable[[Gateway], Awaitable[None]]) -> None:
    """A gateway serving models m and n from the fake pool."""
    config = GatewayConfig(models=[ModelConfig(id=m, backends=[BackendConfig(pool="127.0.0.1:9")])
                                   for m in ("m", "n")])  # fmt: skip
    app = Gateway(config, {}, auth=FakeAuth(), limiter=MemoryRateLimiter())
    try:
        for backend in app.registry.backends:
            assert isinstance(backend, PoolBackend)
            backend.stub = FakeStub()
            backend.reachable = True
            backend.models = {m: pb.ModelInfo(id=m, kind="chat") for m in ("m", "n")}
        await body(app)
    finally:
        await app.registry.close()


async def call(app: Gateway, method: str, path: str, key: str | None = None,
               body: Any = None) -> tuple[int, bytes]:  # fmt: skip
    """One request through the ASGI app: (status, body)."""
    headers = [(b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    pending = [{"type": "http.request", "more_body": False,
                "body": b"" if body is None else msgspec.json.encode(body)}]  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers,
             "client": ("127.0.0.1", 40000)}  # fmt: skip
    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def metrics(app: Gateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of ``GET /metrics``: (name, labels) → value."""
    status, text = await call(app, "GET", "/metrics")
    assert status == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples}  # fmt: skip


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:  # fmt: skip
    return samples[(name, frozenset(labels.items()))]


def test_auth_failures_are_counted_by_reason() -> None:
    async def body(app: Gateway) -> None:
        chat = {"model": "n", "messages": CHAT}
        refusals = [(None, 401), ("hfx_bogus", 401), ("expired-token", 401), ("auth-down", 503),
                    ("free", 403)]  # fmt: skip
        for key, status in refusals:
            assert (await call(app, "POST", "/v1/chat/completions", key, chat))[0] == status
        samples = await metrics(app)
        name = "helixflow_gateway_auth_failures_total"
        counts = {reason: sample(samples, name, reason=reason) for reason in (
            "missing_credentials", "invalid_api_key", "invalid_token", "expired", "revoked",
            "forbidden_model", "auth_unavailable")}  # fmt: skip
        assert counts == {"missing_credentials": 1, "invalid_api_key": 1, "invalid_token": 0,
                          "expired": 1, "revoked": 0, "forbidden_model": 1,
                          "auth_unavailable": 1}  # fmt: skip

    asyncio.run(with_gateway(body))


def test_rate_limited_requests_and_time_to_first_token() -> None:
    async def body(app: Gateway) -> None:
        streamed = {"model": "m", "messages": CHAT, "stream": True, "max_tokens": 4}
        status, text = await call(app, "POST", "/v1/chat/completions", "free", streamed)
        assert status == 200 and b"Hel" in text and text.endswith(b"data: [DONE]\n\n")
        whole = {"model": "m", "messages": CHAT, "max_tokens": 4}
        assert (await call(app, "POST", "/v1/chat/completions", "free", whole))[0] == 200
        assert (await call(app, "POST", "/v1/chat/completions", "rpm1", whole))[0] == 200
        assert (await call(app, "POST", "/v1/chat/completions", "rpm1", whole))[0] == 429
        big = {"model": "m", "messages": CHAT, "max_tokens": 100}  # more than the whole TPM
        assert (await call(app, "POST", "/v1/chat/completions", "tpm10", big))[0] == 429
        samples = await metrics(app)
        name = "helixflow_gateway_rate_limited_total"
        assert sample(samples, name, limit="rpm") == 1
        assert sample(samples, name, limit="tpm") == 1
        ttft = "helixflow_gateway_time_to_first_token_seconds"
        assert sample(samples, ttft + "_count", model="m") == 1  # the streamed request only
        assert sample(samples, ttft + "_sum", model="m") > 0
        assert not any(n.startswith(ttft) and ("model", "n") in labels
                       for n, labels in samples)  # fmt: skip

    asyncio.run(with_gateway(body))


def test_the_limit_that_refused_is_the_one_named() -> None:
    async def refused(limiter: RateLimiter, key: str, rpm: int | None, tpm: int | None,
                      tokens: int) -> str:  # fmt: skip
        with pytest.raises(RateLimitExceeded) as caught:
            await limiter.admit(key, rpm, tpm, tokens)
        return rate_limit_kind(caught.value)

    async def main() -> None:
        limiter = MemoryRateLimiter(clock=lambda: 0.0)  # nothing refills
        await limiter.admit("a", 1, 100, 10)  # no request left, 90 tokens
        assert await refused(limiter, "a", 1, None, 0) == "rpm"
        assert await refused(limiter, "a", 1, 100, 95) == "rpm"  # both refuse: counted as rpm
        await limiter.admit("b", 5, 100, 10)  # 4 requests left, 90 tokens
        assert await refused(limiter, "b", 5, 100, 95) == "tpm"
        assert await refused(limiter, "c", None, 100, 101) == "tpm"  # more than the whole limit

    asyncio.run(main())
