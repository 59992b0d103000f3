"""Upstream OpenAI-compatible backends: a real gateway process proxies to a fake upstream (an
asyncio HTTP/1.1 server in this process) — whole answers, SSE streams sent in chunked encoding,
the upstream's errors, an upstream that is down, and the model name rewritten for the upstream.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from process_testing import Process, free_port

ANSWER = {
    "id": "chatcmpl-up",
    "object": "chat.completion",
    "created": 1,
    "model": "up-model",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "from upstream"},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}


class FakeUpstream:
    """Records each request body; answers JSON, a chunked SSE stream, or an error."""

    def __init__(self) -> None:
        self.port = free_port()
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def main() -> None:
            self.server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)
            ready.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(main(), self.loop)
        ready.wait(5)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {
                    k.lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = json.loads(await reader.readexactly(int(headers["content-length"])))
                self.bodies.append(body)
                self.auth.append(headers.get("authorization", ""))
                if body["messages"][0]["content"] == "fail":
                    payload = json.dumps(
                        {
                            "error": {
                                "message": "upstream says no",
                                "type": "invalid_request_error",
                                "param": None,
                                "code": "nope",
                            }
                        }
                    ).encode()
                    writer.write(
                        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(payload), payload)
                    )
                elif body.get("stream"):
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                        b"transfer-encoding: chunked\r\n\r\n"
                    )
                    for word in ("from", " the", " stream"):
                        chunk = {
                            "id": "c",
                            "object": "chat.completion.chunk",
                            "created": 1,
                            "model": "up-model",
                            "choices": [
                                {"index": 0, "delta": {"content": word}, "finish_reason": None}
                            ],
                        }
                        event = b"data: " + json.dumps(chunk).encode() + b"\n\n"
                        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                        await writer.drain()
                    done = b"data: [DONE]\n\n"
                    writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
                else:
                    payload = json.dumps(ANSWER).encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(payload), payload)
                    )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, FakeUpstream]]:
    work = tmp_path_factory.mktemp("upstream")
    upstream = FakeUpstream()
    dead = free_port()  # nothing listens here
    config = work / "helixflow.toml"
    config.write_text(
        f'[[models]]\nid = "gpt-proxied"\naliases = ["proxied"]\n'
        f'backends = [{{ openai = "http://127.0.0.1:{upstream.port}/v1", '
        f'api_key_env = "UPSTREAM_KEY", model = "up-model" }}]\n\n'
        f'[[models]]\nid = "gpt-down"\nbackends = [{{ openai = "http://127.0.0.1:{dead}/v1" }}]\n'
    )
    port = free_port()
    env = {**os.environ, "UPSTREAM_KEY": "sk-upstream-secret"}
    process = Process(
        ["gateway", "--port", str(port), "--config", str(config), "--insecure-no-auth"],
        env,
        work / "gateway.log",
    )
    process.ready(lambda: httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200)
    yield port, upstream
    assert process.stop() == 0
    upstream.close()
    assert "Traceback" not in Path(work / "gateway.log").read_text()


def test_whole_answers_and_streams_pass_through(gateway: tuple[int, FakeUpstream]) -> None:
    port, upstream = gateway
    with httpx.Client(timeout=30) as transport:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key="unused",
            max_retries=0,
            http_client=transport,
        )
        for _ in range(3):  # the upstream connection is reused
            reply = client.chat.completions.create(
                model="proxied", messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content == "from upstream"
        assert upstream.bodies[-1]["model"] == "up-model"  # the upstream's own name
        assert upstream.auth[-1] == "Bearer sk-upstream-secret"
        stream = client.chat.completions.create(
            model="gpt-proxied", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "from the stream"
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(
                model="proxied", messages=[{"role": "user", "content": "fail"}]
            )
        assert bad.value.code == "nope"  # the upstream's error, passed through
        with pytest.raises(openai.InternalServerError) as down:
            client.chat.completions.create(
                model="gpt-down", messages=[{"role": "user", "content": "hi"}]
            )
        assert down.value.status_code == 503
        assert (
            client.chat.completions.create(  # and the good upstream still works
                model="proxied", messages=[{"role": "user", "content": "hi"}]
            )
            .choices[0]
            .message.content
            == "from upstream"
        )
