"""The gateway as its users meet it: OpenAI's own Python SDK, unchanged, over real TLS, against
real pool, auth and gateway processes; every response and stream chunk is also checked against
OpenAI's published OpenAPI schemas."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from contract.openai_schema import (
    CHAT_COMPLETION,
    CHAT_COMPLETION_CHUNK,
    COMPLETION,
    COMPLETION_CHUNK,
    EMBEDDING_LIST,
    EMBEDDING_LIST_BASE64,
    ERROR,
    MODEL,
    MODEL_LIST,
    validate,
)
from stack_testing import CHAT, EMBED, Stack

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def stack(platform_stack: Stack) -> Stack:
    return platform_stack


@pytest.fixture(scope="module")
def port(stack: Stack) -> int:
    return stack.start_gateway()  # this module's own gateway on the shared platform


@pytest.fixture(scope="module")
def key(stack: Stack) -> str:
    return stack.key()


@pytest.fixture(scope="module")
def client(stack: Stack, port: int, key: str) -> openai.OpenAI:
    return stack.openai(port, key)


def sse(response: httpx.Response) -> list[Any]:
    """The JSON events of an SSE response, checking the framing and the final [DONE]."""
    events = [line for line in response.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events), events[:3]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]]


# -- the SDK ---------------------------------------------------------------------------------


def test_chat_with_the_official_sdk(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=16,
                                           temperature=0)  # type: ignore[arg-type]  # fmt: skip
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens > 0

    stream = client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # type: ignore[arg-type]  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content  # greedy: streamed == whole
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_n_and_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=8, n=2,
                                           logprobs=True, top_logprobs=3, temperature=0.9,
                                           seed=7)  # type: ignore[arg-type]  # fmt: skip
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        first = choice.logprobs.content[0]
        assert first.logprob <= 0 and len(first.top_logprobs) == 3
        assert "".join(t.token for t in choice.logprobs.content) == choice.message.content


def test_completions_embeddings_models(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=CHAT, prompt=["The capital of France is", "1, 2, 3,"],
                                      max_tokens=6, temperature=0, logprobs=2)  # fmt: skip
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].logprobs is not None
    assert reply.choices[0].logprobs.tokens and len(reply.choices[0].logprobs.top_logprobs[0]) == 2
    streamed = client.completions.create(model=CHAT, prompt="The capital of France is",
                                         max_tokens=6, temperature=0, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text

    vectors = client.embeddings.create(model=EMBED, input=["a cat", "a kitten", "tax law"])
    a, b, c = (v.embedding for v in vectors.data)
    assert len(a) == 384

    def cos(x: list[float], y: list[float]) -> float:
        return sum(i * j for i, j in zip(x, y, strict=True))

    assert cos(a, b) > cos(a, c)
    packed = client.embeddings.create(model=EMBED, input="a cat", encoding_format="base64")
    raw = base64.b64decode(packed.data[0].embedding)  # type: ignore[arg-type]
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(a, abs=1e-6)

    assert {m.id for m in client.models.list()} == {CHAT, EMBED}
    assert client.models.retrieve(CHAT).id == CHAT


def test_sdk_errors(stack: Stack, port: int, client: openai.OpenAI) -> None:
    with pytest.raises(openai.AuthenticationError):
        stack.openai(port, "hfx_notakey0_" + "x" * 43).models.list()
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-9", messages=QUESTION)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found"
    limited = stack.openai(port, stack.key("--rpm", "2"))
    limited.embeddings.create(model=EMBED, input="x")
    limited.embeddings.create(model=EMBED, input="x")
    with pytest.raises(openai.RateLimitError) as over:
        limited.embeddings.create(model=EMBED, input="x")
    assert int(over.value.response.headers["retry-after"]) >= 1
    assert over.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    scoped = stack.openai(port, stack.key("--scope", f"model:{EMBED}"))
    with pytest.raises(openai.PermissionDeniedError):
        scoped.chat.completions.create(model=CHAT, messages=QUESTION)  # type: ignore[arg-type]
    assert [m.id for m in scoped.models.list()] == [EMBED]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=CHAT, messages=QUESTION,
                                       temperature=3.5)  # type: ignore[arg-type]  # fmt: skip
    assert bad.value.param == "temperature"


# -- the wire format against OpenAI's spec ---------------------------------------------------


def test_responses_and_chunks_match_openais_schemas(stack: Stack, port: int, key: str) -> None:
    http = stack.http(port, key)
    body = {"model": CHAT, "messages": QUESTION, "max_tokens": 8, "logprobs": True,
            "top_logprobs": 2, "n": 2}  # fmt: skip
    validate(http.post("/v1/chat/completions", json=body).json(), CHAT_COMPLETION)
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    stream = http.post("/v1/chat/completions", json=streamed)
    assert stream.headers["content-type"] == "text/event-stream"
    chunks = sse(stream)
    for chunk in chunks:
        validate(chunk, CHAT_COMPLETION_CHUNK)
    assert {c["choices"][0]["index"] for c in chunks if c["choices"]} == {0, 1}
    completion = {"model": CHAT, "prompt": "Hello", "max_tokens": 5, "logprobs": 1}
    validate(http.post("/v1/completions", json=completion).json(), COMPLETION)
    for chunk in sse(http.post("/v1/completions", json={**completion, "stream": True})):
        validate(chunk, COMPLETION_CHUNK)
    validate(http.post("/v1/embeddings", json={"model": EMBED, "input": [[101, 2023, 102]]}
                       ).json(), EMBEDDING_LIST)  # fmt: skip
    validate(http.post("/v1/embeddings", json={"model": EMBED, "input": "x",
                                                "encoding_format": "base64"}).json(),
             EMBEDDING_LIST_BASE64)  # fmt: skip
    validate(http.get("/v1/models").json(), MODEL_LIST)
    validate(http.get(f"/v1/models/{CHAT}").json(), MODEL)
    for reply in (http.get("/v1/models/none"), http.post("/v1/chat/completions", json={}),
                  stack.http(port).get("/v1/models")):  # fmt: skip
        assert reply.status_code in (400, 401, 404)
        validate(reply.json(), ERROR)


# -- limits, abuse and disconnects -----------------------------------------------------------


def test_a_tls12_only_client_is_refused(port: int, stack: Stack) -> None:
    context = stack.ssl_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        pytest.raises(ssl.SSLError),
    ):
        context.wrap_socket(raw, server_hostname="localhost")
    modern = stack.ssl_context()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        modern.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() == "TLSv1.3"


def test_oversized_and_malformed_bodies(stack: Stack, port: int, key: str,
                                        client: openai.OpenAI) -> None:  # fmt: skip
    http = stack.http(port, key)
    big = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (5 << 20) + b'"}]}'
    reply = http.post("/v1/chat/completions", content=big)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"
    for content, status in ((b"{not json", 400), (b"[]", 400), (b"", 400),
                            (b'{"model": 5, "messages": []}', 400),
                            (b'{"model": "m", "messages": [], "bogus": 1}', 400)):  # fmt: skip
        reply = http.post("/v1/chat/completions", content=content)
        assert reply.status_code == status, (content, reply.text)
        assert reply.json()["error"]["type"] == "invalid_request_error"
        assert reply.headers["x-request-id"]
    assert http.post("/v1/nope").status_code == 404
    assert http.get("/v1/chat/completions").status_code == 405
    # ... and it keeps serving.
    reply = client.chat.completions.create(model=CHAT, messages=QUESTION,
                                           max_tokens=4)  # type: ignore[arg-type]  # fmt: skip
    assert reply.choices[0].message.content
    log = stack.gateway(port).log.read_text()
    assert "Traceback" not in log


def test_disconnect_mid_stream_frees_the_pool(stack: Stack, port: int, key: str) -> None:
    http = stack.http(port, key)
    body = {"model": CHAT, "messages": QUESTION, "max_tokens": 900, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        for seen, _ in enumerate(response.iter_lines()):
            if seen >= 6:
                break
        assert stack.pool_load()[CHAT].running == 1
    http.close()  # the client is gone
    deadline = time.monotonic() + 10
    while True:
        load = stack.pool_load()[CHAT]
        if load.running == 0 and load.waiting == 0 and load.kv_cache_usage == 0.0:
            break
        assert time.monotonic() < deadline, f"the pool still works for a gone client: {load}"
        time.sleep(0.05)


def test_a_client_that_gives_up_on_a_whole_response_frees_the_pool(stack: Stack, port: int,
                                                                   key: str) -> None:  # fmt: skip
    body = {"model": CHAT, "messages": QUESTION, "max_tokens": 900, "ignore_eos": True}
    with stack.http(port, key) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=body, timeout=1.5)
    deadline = time.monotonic() + 10
    while (load := stack.pool_load()[CHAT]).running or load.kv_cache_usage:
        assert time.monotonic() < deadline, f"the pool still works for a gone client: {load}"
        time.sleep(0.05)


def test_revoked_key_fails_on_the_next_request(stack: Stack, port: int) -> None:
    made = stack.admin("create-key", "root")
    client = stack.openai(port, made["key"])
    assert client.models.list().data
    token = httpx.post(f"http://127.0.0.1:{stack.auth_http}/v1/auth/login",
                       json={"username": "root", "password": "admin password 1"}
                       ).json()["access_token"]  # fmt: skip
    revoked = httpx.delete(f"http://127.0.0.1:{stack.auth_http}/v1/api-keys/{made['id']}",
                           headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    assert revoked.status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    jwt_client = stack.openai(port, token)  # a login token works as a bearer credential too
    assert jwt_client.models.list().data


def test_operations_endpoints(stack: Stack, port: int, key: str) -> None:
    chat = {"model": CHAT, "messages": QUESTION, "max_tokens": 2}
    assert stack.http(port, key).post("/v1/chat/completions", json=chat).status_code == 200
    http = stack.http(port)
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready").json()
    assert ready["auth"] is True and ready["models"] == {CHAT: True, EMBED: True}
    metrics = http.get("/metrics").text
    assert 'helixflow_gateway_requests_total{route="/v1/chat/completions",status="200"}' in metrics
    assert "helixflow_gateway_backend_healthy" in metrics
    reply = stack.http(port, key).get("/v1/models", headers={"x-request-id": "trace-me-1"})
    assert reply.headers["x-request-id"] == "trace-me-1"
    deadline = time.monotonic() + 5  # the access log is written in batches
    while "GET /v1/models 200" not in (log := stack.gateway(port).log.read_text()) or (
        "[trace-me-1]" not in log
    ):
        assert time.monotonic() < deadline, "no access line with the request id"
        time.sleep(0.05)
    spec = http.get("/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"]


def test_two_gateways_sharing_redis_hold_one_rpm_limit(stack: Stack, tmp_path: Path) -> None:
    from process_testing import RedisServer

    try:
        redis = RedisServer(tmp_path)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    ports: list[int] = []
    try:
        env = {"REDIS_URL": redis.url}
        ports += [stack.start_gateway(env=env), stack.start_gateway(env=env)]
        key = stack.key("--rpm", "10")
        clients = [stack.http(p, key) for p in ports]
        statuses = [clients[i % 2].post("/v1/embeddings", json={"model": EMBED, "input": "x"}
                                        ).status_code for i in range(20)]  # fmt: skip
        assert statuses.count(200) == 10 and statuses.count(429) == 10, statuses
        assert statuses[:10] == [200] * 10  # the first ten, whichever gateway took them
    finally:
        for started in ports:
            stack.gateway(started).stop()
        redis.close()
