"""The SDK's pure logic: retry policy, Retry-After, error mapping, SSE parsing, decoding."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest

from helixflow import errors as server_errors
from helixflow.client import _calls
from helixflow.client._core import (
    Call,
    ClientCore,
    RetryPolicy,
    SSEDecoder,
    decode_event,
    parse_retry_after,
    status_error,
)
from helixflow.client.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    RateLimitError,
    ServerError,
)
from helixflow.client.types import ChatCompletion, ChatCompletionChunk, ChatMessage, TokenPair


def core(**options: object) -> ClientCore:
    defaults: dict[str, object] = dict(api_key=None, base_url="https://gw:8443/v1/",
                                       auth_url="http://auth:8082", max_retries=2,
                                       retry_policy=None, access_token=None, refresh_token=None,
                                       default_headers=None)  # fmt: skip
    return ClientCore.from_options(**{**defaults, **options})  # type: ignore[arg-type]


def test_import_helixflow_does_not_import_httpx() -> None:
    code = "import sys, helixflow, helixflow.errors; print('httpx' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_retry_policy_backoff_and_retry_after() -> None:
    policy = RetryPolicy(max_retries=3, initial_delay=0.5, max_delay=2.0, jitter=0.25)
    assert policy.delay(0, None, rand=0.0) == 0.5
    assert policy.delay(1, None, rand=0.0) == 1.0
    assert policy.delay(2, None, rand=0.0) == 2.0  # capped
    assert policy.delay(1, None, rand=0.999) == pytest.approx(1.0 * (1 - 0.25 * 0.999))
    assert policy.delay(3, None) is None  # out of retries
    assert policy.delay(0, 0.2) == 0.2  # the server's word wins
    assert policy.delay(0, 3600.0) is None  # too long to wait here: raise with retry_after
    for attempt in range(3):
        assert 0 < policy.delay(attempt, None)  <= 2.0  # type: ignore[operator]


def test_parse_retry_after() -> None:
    assert parse_retry_after({"retry-after": "0.2"}) == 0.2
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "150", "retry-after": "9"}) == 0.15
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"},
                             now=1445412480.0) == 10.0  # fmt: skip
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_status_errors_are_typed_and_in_the_project_tree() -> None:
    body = b'{"error": {"message": "slow down", "type": "rate_limit_error", "param": null,' \
           b' "code": "rate_limit_exceeded"}}'  # fmt: skip
    error = status_error(429, {"retry-after": "2", "x-request-id": "r1"}, body)
    assert isinstance(error, RateLimitError) and isinstance(error, server_errors.RateLimitError)
    assert isinstance(error, server_errors.HelixFlowError)
    assert (error.status, error.code, error.retry_after, error.request_id) == \
        (429, "rate_limit_exceeded", 2.0, "r1")  # fmt: skip
    assert error.to_openai()["error"]["message"] == "slow down"
    assert "429" in str(error) and "r1" in str(error)

    bad = status_error(400, {}, b'{"error": {"message": "m", "type": "invalid_request_error",'
                                b' "param": "temperature", "code": null}}')  # fmt: skip
    assert isinstance(bad, BadRequestError) and isinstance(bad, server_errors.InvalidRequestError)
    assert (bad.param, bad.code) == ("temperature", None)
    assert isinstance(status_error(422, {}, b"{}"), BadRequestError)
    assert isinstance(status_error(401, {}, b""), AuthenticationError)
    missing = status_error(404, {}, b"not json at all")
    assert isinstance(missing, NotFoundError) and missing.message == "not json at all"
    assert isinstance(status_error(502, {}, b"<html>bad gateway</html>"), ServerError)


def test_sse_decoder_handles_split_lines_and_line_endings() -> None:
    decoder = SSEDecoder()
    stream = b'data: {"a": 1}\r\n\r\n: keep-alive\n\ndata: x\ndata:y\n\nevent: e\ndata: [DONE]\r\r'
    events: list[bytes] = []
    for i in range(len(stream)):  # one byte at a time: every split point
        events.extend(decoder.feed(stream[i : i + 1]))
    assert events == [b'{"a": 1}', b"x\ny", b"[DONE]"]
    assert SSEDecoder().feed(stream) == events


def test_decode_event_chunks_done_and_errors() -> None:
    chunk = decode_event(b'{"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hi"}}],'
                         b' "future_field": {"x": 1}}', ChatCompletionChunk)  # fmt: skip
    assert chunk is not None and chunk.choices[0].delta.content == "Hi"
    assert decode_event(b"[DONE]", ChatCompletionChunk) is None
    with pytest.raises(ServerError) as failed:
        decode_event(b'{"error": {"message": "pool gone", "type": "server_error", "param": null,'
                     b' "code": "overloaded"}}', ChatCompletionChunk, "r9")  # fmt: skip
    assert (failed.value.status, failed.value.code, failed.value.request_id) == \
        (503, "overloaded", "r9")  # fmt: skip
    with pytest.raises(RateLimitError):
        decode_event(b'{"error": {"message": "m", "type": "rate_limit_error"}}', ChatCompletion)
    with pytest.raises(APIError) as odd:
        decode_event(b"{not json", ChatCompletionChunk)
    assert not isinstance(odd.value, APIStatusError)


def test_responses_ignore_unknown_fields_and_hide_secrets() -> None:
    reply = msgspec.json.decode(
        b'{"id": "x", "object": "chat.completion", "created": 1, "model": "m", "new": [1],'
        b' "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi",'
        b' "annotations": [], "audio": null}, "finish_reason": "stop"}]}', type=ChatCompletion)
    message = reply.choices[0].message
    # a reply's message goes back into a request with only the fields a request accepts
    assert msgspec.json.decode(msgspec.json.encode(message)) == \
        {"role": "assistant", "content": "Hi"}  # fmt: skip
    pair = TokenPair(access_token="secret-a", refresh_token="secret-r", expires_in=900)
    assert "secret" not in repr(pair)


def test_requests_are_built_for_the_right_service() -> None:
    made = core(api_key="hfx_key", access_token="jwt", default_headers={"x-team": "a"})
    call = _calls.chat_completion("m", [ChatMessage(role="user", content="hi"),
                                        {"role": "user", "content": "again"}], True,
                                  {"max_tokens": 4, "stop": ("a", "b"),
                                   "extra_body": {"top_k": 3}})  # fmt: skip
    prepared = made.prepare(call)
    assert prepared.url == "https://gw:8443/v1/chat/completions"  # /v1 in base_url is dropped
    assert prepared.headers["authorization"] == "Bearer hfx_key"  # the gateway gets the key
    assert prepared.headers["accept"] == "text/event-stream"
    assert prepared.headers["x-team"] == "a"
    assert prepared.headers["user-agent"].startswith("helixflow-python/")
    assert msgspec.json.decode(prepared.content or b"") == {
        "model": "m", "stream": True, "max_tokens": 4, "stop": ["a", "b"], "top_k": 3,
        "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}
    keys = made.prepare(_calls.list_api_keys(user_id=None, prefix="abc"))
    assert keys.url == "http://auth:8082/v1/api-keys" and keys.query == {"prefix": "abc"}
    assert keys.headers["authorization"] == "Bearer jwt"  # the auth service gets the login
    login = made.prepare(_calls.login("u", "p"))
    assert "authorization" not in login.headers


def test_retry_decisions() -> None:
    made = core(max_retries=1)
    inference = Call("gateway", "POST", "/v1/completions", None)
    refresh = _calls.refresh("r")
    assert made.retry_delay(inference, 0, status_error(500, {}, b"")) is not None
    assert made.retry_delay(inference, 0, status_error(400, {}, b"")) is None
    assert made.retry_delay(inference, 1, status_error(503, {}, b"")) is None  # spent
    # a refresh token is spent by its first use: only "surely not processed" is retried
    assert made.retry_delay(refresh, 0, status_error(500, {}, b"")) is None
    assert made.retry_delay(refresh, 0, status_error(429, {"retry-after": "0"}, b"")) == 0.0
    tls = APIConnectionError("x", code="tls_verification_failed")
    assert made.retry_delay(inference, 0, tls) is None
