"""Retries, timeouts, streams and token refresh of the SDK against small real HTTP servers
(sdk_fakes) that answer 429/503, never answer, or cut a stream on cue."""

from __future__ import annotations

import asyncio
import time

import pytest
from sdk_fakes import FakeServer, Reply, Seen, SilentServer, error, scripted, sse

from helixflow.client import (
    APIConnectionError,
    APITimeoutError,
    AsyncHelixFlow,
    AuthenticationError,
    BadRequestError,
    HelixFlow,
    RateLimitError,
    RetryPolicy,
    ServerError,
)
from helixflow.client.types import ChatCompletionChunk

MODELS = Reply(200, {"object": "list", "data": [{"id": "m", "object": "model", "created": 1,
                                                 "owned_by": "helixflow"}]})  # fmt: skip
CHUNK = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}]}
REPLY = {"id": "r", "object": "chat.completion", "created": 1, "model": "m",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                      "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
QUICK = RetryPolicy(max_retries=2, initial_delay=0.01, max_delay=0.05)
ASK = [{"role": "user", "content": "Hi"}]


def client(url: str, **options: object) -> HelixFlow:
    return HelixFlow(base_url=url, auth_url=url, api_key="hfx_test",
                     **options)  # type: ignore[arg-type]  # fmt: skip


def test_429_waits_for_retry_after_then_succeeds() -> None:
    limited = error(429, "slow down", "rate_limit_error", "rate_limit_exceeded",
                    **{"retry-after": "0.2", "x-ratelimit-remaining-requests": "0"})  # fmt: skip
    with FakeServer(scripted(limited, MODELS)) as server, client(server.url) as sdk:
        models = sdk.models.list()
    assert [m.id for m in models] == ["m"]
    assert len(server.seen) == 2
    assert server.seen[1].at - server.seen[0].at >= 0.2  # it waited as told
    assert server.seen[0].headers["authorization"] == "Bearer hfx_test"


def test_async_503_waits_for_retry_after_then_succeeds() -> None:
    busy = error(503, "at capacity", "server_error", "overloaded", **{"retry-after": "0.2"})

    async def main(url: str) -> str | None:
        async with AsyncHelixFlow(base_url=url, api_key="k") as sdk:
            reply = await sdk.chat.completions.create(model="m", messages=ASK, max_tokens=2)
        return reply.choices[0].message.content

    with FakeServer(scripted(busy, Reply(200, REPLY))) as server:
        assert asyncio.run(main(server.url)) == "Hi"
    assert len(server.seen) == 2 and server.seen[1].at - server.seen[0].at >= 0.2


def test_a_bad_request_is_not_retried() -> None:
    bad = Reply(400, {"error": {"message": "temperature too high", "param": "temperature",
                                "type": "invalid_request_error", "code": None}},
                {"x-request-id": "req-1"})  # fmt: skip
    with FakeServer(scripted(bad, MODELS)) as server, client(server.url, max_retries=5) as sdk, \
            pytest.raises(BadRequestError) as raised:  # fmt: skip
        sdk.chat.completions.create(model="m", messages=ASK, temperature=3.5)
    assert len(server.seen) == 1
    assert (raised.value.status, raised.value.param, raised.value.request_id) == \
        (400, "temperature", "req-1")  # fmt: skip


def test_spent_retries_raise_the_rate_limit_with_retry_after() -> None:
    limited = error(429, "slow down", "rate_limit_error", "rate_limit_exceeded",
                    **{"retry-after": "0.05"})  # fmt: skip
    with FakeServer(scripted(limited)) as server, client(server.url, max_retries=2) as sdk, \
            pytest.raises(RateLimitError) as raised:  # fmt: skip
        sdk.embeddings.create(model="m", input="x")
    assert len(server.seen) == 3  # the first try and two retries
    assert raised.value.retry_after == 0.05 and raised.value.code == "rate_limit_exceeded"


def test_5xx_without_retry_after_backs_off() -> None:
    with FakeServer(scripted(Reply(502, b"<html>bad gateway</html>"), MODELS)) as server, \
            client(server.url, retry_policy=QUICK) as sdk:  # fmt: skip
        assert len(sdk.models.list()) == 1
    with FakeServer(scripted(Reply(500, b"boom"))) as server, \
            client(server.url, retry_policy=QUICK) as sdk, pytest.raises(ServerError):  # fmt: skip
        sdk.models.list()
    assert len(server.seen) == 3


def test_timeout_when_the_server_never_answers() -> None:
    with SilentServer() as silent, client(silent.url, timeout=0.3, max_retries=0) as sdk:
        started = time.monotonic()
        with pytest.raises(APITimeoutError):
            sdk.models.list()
        assert time.monotonic() - started < 10

    async def main(url: str) -> None:
        async with AsyncHelixFlow(base_url=url, api_key="k", timeout=0.3, max_retries=0) as sdk:
            await sdk.models.list()

    with SilentServer() as silent, pytest.raises(APITimeoutError):
        asyncio.run(main(silent.url))


def test_connection_refused() -> None:
    with SilentServer() as gone:
        url = gone.url
    with client(url, retry_policy=QUICK) as sdk, pytest.raises(APIConnectionError) as raised:
        sdk.models.list()
    assert not isinstance(raised.value, APITimeoutError)


def test_a_stream_is_retried_before_its_body_never_after() -> None:
    busy = error(503, "busy", "server_error", "overloaded", **{"retry-after": "0"})
    broken = Reply(200, chunks=sse(CHUNK)[:1], cut=True)  # one event, then the line drops
    with FakeServer(scripted(busy, broken)) as server, client(server.url) as sdk:
        stream = sdk.chat.completions.create(model="m", messages=ASK, stream=True)
        first = next(stream)
        assert first.choices[0].delta.content == "Hello"
        with pytest.raises(APIConnectionError):
            next(stream)
        assert stream.response.is_closed
    assert len(server.seen) == 2  # the 503 was retried; the broken stream was not


def test_a_stream_yields_typed_chunks_and_closes() -> None:
    failing = {"error": {"message": "pool gone", "type": "server_error", "param": None,
                         "code": "backend_unavailable"}}  # fmt: skip
    with FakeServer(scripted(Reply(200, chunks=sse(CHUNK, CHUNK)),
                             Reply(200, chunks=sse(CHUNK, failing)))) as server, \
            client(server.url) as sdk:  # fmt: skip
        with sdk.chat.completions.create(model="m", messages=ASK, stream=True) as stream:
            chunks = list(stream)
        assert all(isinstance(c, ChatCompletionChunk) for c in chunks) and len(chunks) == 2
        assert stream.response.is_closed
        stream = sdk.chat.completions.create(model="m", messages=ASK, stream=True)
        with pytest.raises(ServerError) as raised:
            list(stream)
        assert raised.value.status == 503 and stream.response.is_closed

    async def main(url: str) -> list[str]:
        async with AsyncHelixFlow(base_url=url, api_key="k") as sdk:
            stream = await sdk.completions.create(model="m", prompt="x", stream=True)
            async with stream:
                return [c.id async for c in stream]

    text = {"id": "t", "object": "text_completion", "choices": [{"index": 0, "text": "a"}]}
    with FakeServer(scripted(Reply(200, chunks=sse(text, text)))) as server:
        assert asyncio.run(main(server.url)) == ["t", "t"]


def test_an_expired_access_token_is_refreshed_once() -> None:
    def respond(seen: Seen, number: int) -> Reply:
        if seen.path == "/v1/auth/refresh":
            return Reply(200, {"access_token": "new", "refresh_token": "r2", "expires_in": 900,
                               "refresh_expires_in": 9000, "token_type": "Bearer"})  # fmt: skip
        if seen.headers.get("authorization") == "Bearer new":
            return MODELS
        return error(401, "Invalid or expired access token.", "authentication_error",
                     "invalid_token")  # fmt: skip

    with FakeServer(respond) as server:
        with HelixFlow(base_url=server.url, auth_url=server.url, access_token="old",
                       refresh_token="r1") as sdk:  # fmt: skip
            assert len(sdk.models.list()) == 1
        assert [s.path for s in server.seen] == ["/v1/models", "/v1/auth/refresh", "/v1/models"]
        assert server.seen[1].body == b'{"refresh_token":"r1"}'
        with HelixFlow(base_url=server.url, api_key="hfx_bad") as sdk, \
                pytest.raises(AuthenticationError):  # fmt: skip
            sdk.models.list()  # an API key is never "refreshed"
        assert server.seen[-1].path == "/v1/models" and len(server.seen) == 4
