"""Hostile input to the real gateway over TLS: malformed and oversized bodies, out-of-range
numbers, invalid UTF-8, NUL bytes, CR/LF injection into every string that reaches a log or a
response, and clients that send their request a byte at a time.

Every answer is a 4xx with OpenAI's error object (or a correct 200 where the input is valid
after all), never a 5xx; no injected header comes back; every line the gateway, auth and pool
logged is one real log line (a client's CR/LF forges none); the gateway answers afterwards.

Covered elsewhere: a 5 MB body with a Content-Length, `{not json`, `[]`, an empty body and an
unknown field (tests/gateway/test_gateway_e2e.py::test_oversized_and_malformed_bodies), TLS 1.2
refused (::test_a_tls12_only_client_is_refused).
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from security_testing import (
    ADMIN_PASSWORD,
    CHAT,
    EMBED,
    LOG_LINE,
    Stack,
    assert_no_secret_in_logs,
    lines_with,
    openai_error,
    raw_exchange,
)

MARK = "FORGED-7f3a"  # in every injected string; a log line that starts with it is forged
FORGED = f"\r\n{MARK} INFO helixflow.gateway.access GET /\n2030-01-01 00:00:00,000 INFO x {MARK}"
BODY_TIMEOUT_S = 2.0


class Hostile:
    """The module's stack: a gateway as shipped, and one whose body timeout is short."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.port = stack.start_gateway()
        config = stack.dir / "short-body-timeout.toml"
        config.write_text(f"[gateway]\nbody_timeout = {BODY_TIMEOUT_S}\n")
        self.short_port = stack.start_gateway("--config", str(config))
        self.key = stack.key()
        self.http = stack.http(self.port, self.key)

    def chat(self, **changes: Any) -> dict[str, Any]:
        return {"model": CHAT, "messages": [{"role": "user", "content": "Say hi."}],
                "max_tokens": 2, **changes}  # fmt: skip

    def still_answers(self) -> None:
        reply = self.http.post("/v1/chat/completions", json=self.chat())
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def hostile(platform_stack: Stack) -> Hostile:
    return Hostile(platform_stack)


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _malformed(h: Hostile) -> list[tuple[str, str, bytes]]:
    """(what, path, body): each must get a 4xx."""
    msgs = b'"messages": [{"role": "user", "content": "hi"}]'
    chat = f'"model": "{CHAT}", '.encode() + msgs
    return [
        ("truncated JSON", "/v1/chat/completions", b'{"model": "m", "messages": [{"role": '),
        ("trailing garbage", "/v1/chat/completions", b"{" + chat + b"} trailing"),
        ("a UTF-8 BOM", "/v1/chat/completions", b"\xef\xbb\xbf{" + chat + b"}"),
        ("invalid UTF-8 in content", "/v1/chat/completions",
         f'{{"model": "{CHAT}", "messages": [{{"role": "user", "content": "a'.encode()
         + b'\xff\xfe\xc0\x80"}]}'),
        ("a lone surrogate", "/v1/chat/completions",
         b"{" + chat.replace(b'"hi"', b'"\\ud800"') + b"}"),
        ("NaN", "/v1/chat/completions", b"{" + chat + b', "temperature": NaN}'),
        ("temperature 1e309", "/v1/chat/completions", b"{" + chat + b', "temperature": 1e309}'),
        ("max_tokens 1e309", "/v1/chat/completions", b"{" + chat + b', "max_tokens": 1e309}'),
        ("max_tokens 2**70", "/v1/chat/completions", _json(h.chat(max_tokens=2**70))),
        ("max_completion_tokens 2**31", "/v1/chat/completions",
         _json(h.chat(max_completion_tokens=2**31))),
        ("max_tokens -1", "/v1/chat/completions", _json(h.chat(max_tokens=-1))),
        ("max_tokens as a string", "/v1/chat/completions", _json(h.chat(max_tokens="5"))),
        ("max_tokens 2**70 (completions)", "/v1/completions",
         _json({"model": CHAT, "prompt": "hi", "max_tokens": 2**70})),
        ("seed 2**70", "/v1/chat/completions", _json(h.chat(seed=2**70))),
        ("top_k 2**40", "/v1/chat/completions", _json(h.chat(top_k=2**40))),
        ("min_tokens 2**40", "/v1/chat/completions", _json(h.chat(min_tokens=2**40))),
        ("stop_token_ids [2**40]", "/v1/chat/completions", _json(h.chat(stop_token_ids=[2**40]))),
        ("logit_bias key 2**70", "/v1/chat/completions",
         _json(h.chat(logit_bias={str(2**70): 1.0}))),
        ("prompt token id 2**40", "/v1/completions",
         _json({"model": CHAT, "prompt": [2**40], "max_tokens": 1})),
        ("embedding token id 2**40", "/v1/embeddings", _json({"model": EMBED, "input": [[2**40]]})),
        ("detokenize 2**40", "/detokenize", _json({"model": CHAT, "tokens": [2**40]})),
        ("detokenize past the vocabulary", "/detokenize",
         _json({"model": CHAT, "tokens": [2**31 - 1]})),
        ("messages as an object", "/v1/chat/completions",
         _json({"model": CHAT, "messages": {"role": "user"}})),
        ("an unknown role", "/v1/chat/completions",
         _json(h.chat(messages=[{"role": "root", "content": "hi"}]))),
        ("content as a number", "/v1/chat/completions",
         _json(h.chat(messages=[{"role": "user", "content": 5}]))),
        ("a non-text content part", "/v1/chat/completions",
         _json(h.chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]))),
        ("100,000 nested arrays", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000),
        ("10,000 messages", "/v1/chat/completions",
         _json(h.chat(messages=[{"role": "user", "content": "hi"}] * 10_000))),
        ("17 stop strings", "/v1/chat/completions", _json(h.chat(stop=["x"] * 17))),
        ("a 1 MB stop string", "/v1/chat/completions", _json(h.chat(stop=["x" * (1 << 20)]))),
        ("65 prompts", "/v1/completions",
         _json({"model": CHAT, "prompt": ["hi"] * 65, "max_tokens": 1})),
        ("2049 embedding inputs", "/v1/embeddings", _json({"model": EMBED, "input": ["x"] * 2049})),
        ("a NUL in the model name", "/v1/chat/completions", _json(h.chat(model=f"{CHAT}\x00"))),
    ]  # fmt: skip


def test_malformed_bodies_get_a_4xx_error_object(hostile: Hostile) -> None:
    for what, path, body in _malformed(hostile):
        reply = hostile.http.post(path, content=body)
        assert 400 <= reply.status_code < 500, (what, reply.status_code, reply.text[:300])
        openai_error(reply, reply.status_code)
        assert reply.headers["x-request-id"]
    hostile.still_answers()


def test_valid_but_odd_input_gets_a_correct_200(hostile: Hostile) -> None:
    odd = [{"messages": [{"role": "user", "content": "a\x00b"}]},  # NUL in content
           {"user": "a\x00b"}, {"max_tokens": 1, "stop_token_ids": [2**31 - 1]}]  # fmt: skip
    for changes in odd:
        reply = hostile.http.post("/v1/chat/completions", json=hostile.chat(**changes))
        assert reply.status_code == 200, (changes, reply.text)
        assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_10_mb_body_gets_413_with_or_without_a_content_length(hostile: Hostile) -> None:
    """Chunked (no Content-Length), the limit is enforced while the body streams in."""

    def chunked() -> Iterator[bytes]:
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(160):  # 10 MiB
            yield b"a" * 65536
        yield b'"}]}'

    for body in (b"x" * (10 << 20), chunked()):
        try:
            reply = hostile.http.post("/v1/chat/completions", content=body)
        except (httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError):
            continue  # cut off mid-upload: refused as well
        assert openai_error(reply, 413)["code"] == "request_too_large"
    hostile.still_answers()


# -- CR/LF injection -------------------------------------------------------------------------


def test_crlf_in_body_fields_forges_no_header_and_no_log_line(hostile: Hostile) -> None:
    injected = [
        ("model", hostile.chat(model=f"{CHAT}{FORGED}")),
        ("user", hostile.chat(user=FORGED)),
        ("stop", hostile.chat(stop=[FORGED[:200], "\r\nX-Injected: 1"])),
        ("content", hostile.chat(messages=[{"role": "user", "content": FORGED}])),
        (
            "message name",
            hostile.chat(messages=[{"role": "user", "content": "hi", "name": FORGED}]),
        ),
        ("embedding model", {"model": FORGED, "input": "x"}),
    ]
    for field, body in injected:
        path = "/v1/embeddings" if "input" in body else "/v1/chat/completions"
        for stream in (False, True) if path != "/v1/embeddings" else (False,):
            reply = hostile.http.post(path, json={**body, **({"stream": True} if stream else {})})
            assert reply.status_code in (200, 400, 404), (field, reply.status_code, reply.text)
            assert "x-injected" not in reply.headers and MARK not in str(reply.headers), field
            if reply.status_code == 200 and stream:
                _assert_sse_framing(reply.text)
            elif reply.status_code != 200:
                openai_error(reply, reply.status_code)


def _assert_sse_framing(text: str) -> None:
    """Every event is `data: <one JSON object>` and the last is [DONE]: nothing the client sent
    or the model said broke the framing."""
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]", events[-3:]
    for event in events[:-1]:
        assert event.startswith("data: ") and "\n" not in event, event[:200]
        json.loads(event[6:])


def test_crlf_in_the_path_and_request_id_forges_no_header_and_no_log_line(hostile: Hostile) -> None:
    http = hostile.http
    for path in (f"/v1/models/x%0D%0A{MARK}%20INFO%0AX-Injected:%201",
                 f"/nope%0D%0A2030-01-01%2000:00:00,000%20INFO%20{MARK}"):  # fmt: skip
        reply = http.get(path)
        openai_error(reply, 404)
        assert "x-injected" not in reply.headers
    context = hostile.stack.ssl_context()
    key = f"Bearer {hostile.key}".encode()
    statuses: list[str] = []
    for header in (b"X-Request-Id: ok-1\r\nX-Injected: 1",  # two request headers: none comes back
                   b"X-Request-Id: ok-2\nX-Injected: 1",  # a bare LF ends a header line
                   b"X-Request-Id: a\rX-Injected: 1",  # a bare CR: invalid
                   b"X-Request-Id: a%0d%0aX-Injected:%201",  # not a valid id: replaced
                   b"X-Request-Id: " + MARK.encode() + b"\x00\x7f\xff"):  # fmt: skip
        request = (b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: " + key
                   + b"\r\n" + header + b"\r\nConnection: close\r\n\r\n")  # fmt: skip
        answer = raw_exchange(hostile.port, context, request)
        head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
        assert head.startswith(("http/1.1 200", "http/1.1 400")), (header, head)
        assert "x-injected" not in head and MARK.lower() not in head, (header, head)
        echoed = [line.split(":", 1)[1].strip() for line in head.split("\r\n")
                  if line.startswith("x-request-id:")]  # fmt: skip
        if head.startswith("http/1.1 200"):  # granian's own 400s never reach the gateway
            # the client's id when it is a plain token, else a fresh one of the gateway's own
            assert len(echoed) == 1 and re.fullmatch(r"ok-[12]|[0-9a-f]{22}", echoed[0]), head
        statuses.append(head[9:12])
    assert statuses[0] == statuses[3] == "200", statuses  # valid requests are still served
    hostile.still_answers()


# -- slow clients ----------------------------------------------------------------------------


def _cut_off_after(port: int, context: ssl.SSLContext | None, first: bytes, drip: bytes,
                   limit: float) -> tuple[float | None, bytes]:  # fmt: skip
    """Connect (TLS when `context`), send `first`, then `drip` one byte every 0.2 s; returns
    the seconds until the server answered or closed (None: still open after `limit`) and what
    it sent."""
    started = time.monotonic()
    raw = socket.create_connection(("127.0.0.1", port), timeout=limit)
    conn = raw
    try:
        conn = raw if context is None else context.wrap_socket(raw, server_hostname="localhost")
        conn.sendall(first)
        conn.settimeout(0.2)
        for i in itertools.count():
            if time.monotonic() - started > limit:
                return None, b""
            try:
                return time.monotonic() - started, conn.recv(65536)  # an answer, or b"": closed
            except TimeoutError:
                pass
            except OSError:
                return time.monotonic() - started, b""
            if i < len(drip):
                try:
                    conn.sendall(drip[i : i + 1])
                except OSError:
                    return time.monotonic() - started, b""
        raise AssertionError("unreachable")
    finally:
        conn.close()
        raw.close()


def test_slow_clients_are_cut_off(hostile: Hostile) -> None:
    """Three clients at once, each bounded by 25 s: headers a byte at a time (granian's header
    read timeout, 10 s), a TCP connection that never starts TLS, and a body a byte at a time to
    the gateway whose body timeout is 2 s (408). Prints what it measured."""
    context = hostile.stack.ssl_context()
    body_head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: "
                 f"Bearer {hostile.key}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: 100000\r\n\r\n").encode()  # fmt: skip
    runs = {
        "slow headers": (hostile.port, context, b"GET /v1/models HTTP/1.1\r\n",
                         b"X-Slow: " + b"a" * 1000),
        "no TLS handshake": (hostile.port, None, b"", b""),
        "slow body": (hostile.short_port, context, body_head, b'{"model": "' + b"a" * 1000),
    }  # fmt: skip
    results: dict[str, tuple[float | None, bytes]] = {}

    def run(name: str) -> None:
        results[name] = _cut_off_after(*runs[name], limit=25.0)

    threads = [threading.Thread(target=run, args=(name,)) for name in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    print("\n" + ", ".join(f"{n}: cut off after {r[0]:.1f}s" if r[0] is not None
                           else f"{n}: still open" for n, r in results.items()))  # fmt: skip
    for name in runs:
        assert results[name][0] is not None, f"{name}: still connected after 25 s"
    answer = results["slow body"][1]
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"request_timeout"' in answer
    hostile.still_answers()


# -- last: what the processes wrote ----------------------------------------------------------


def test_every_log_line_is_one_real_line_and_holds_no_secret(hostile: Hostile) -> None:
    sentinel = f"sentinel-{time.monotonic_ns()}"
    assert hostile.http.get("/v1/models", headers={"x-request-id": sentinel}).status_code == 200
    gateway_log = hostile.stack.dir / f"gateway-{hostile.port}.log"
    assert lines_with(sentinel, gateway_log), "the access log was not written"
    logs = sorted(hostile.stack.dir.glob("*.log"))
    marked = [line for log in logs for line in log.read_text().split("\n") if MARK in line]
    assert marked, "the injected strings reached no log (the check would prove nothing)"
    for log in logs:
        text = log.read_text()
        assert "Traceback" not in text, log.name
        for line in text.split("\n"):
            if line and not line.startswith("helixflow "):  # the start-up banner
                assert LOG_LINE.match(line), f"{log.name}: a forged or broken line: {line!r}"
                assert not line.startswith("2030-"), f"{log.name}: forged: {line!r}"
    assert_no_secret_in_logs([hostile.stack.dir], [hostile.key, hostile.key.split("_", 2)[2],
                                                   ADMIN_PASSWORD])  # fmt: skip
