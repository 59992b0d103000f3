"""Tiny real HTTP servers on loopback that misbehave on cue, for the SDK's retry, timeout and
streaming tests (the real services are tested in test_sdk_e2e)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Seen:
    """One request the server received, and when (time.monotonic)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Reply:
    """An answer: `body` as JSON (or bytes); `chunks` are sent one by one instead; `cut` closes
    the connection after the chunks, before the promised end of the body."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] | None = None
    cut: bool = False


def error(status: int, message: str, kind: str, code: str | None = None,
          **headers: str) -> Reply:  # fmt: skip
    """An OpenAI error object reply."""
    return Reply(status, {"error": {"message": message, "type": kind, "param": None,
                                    "code": code}}, dict(headers))  # fmt: skip


def sse(*events: Any) -> list[bytes]:
    """SSE event bytes of JSON `events`, then ``[DONE]``."""
    return [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]


class FakeServer:
    """A threaded HTTP/1.1 server on 127.0.0.1; `respond(seen, number)` makes each answer
    (`number` counts from 0). `seen` lists the requests."""

    def __init__(self, respond: Callable[[Seen, int], Reply]) -> None:
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                headers = {k.lower(): v for k, v in self.headers.items()}
                seen = Seen(self.command, self.path, headers, self.rfile.read(length),
                            time.monotonic())  # fmt: skip
                with fake._lock:
                    number = len(fake.seen)
                    fake.seen.append(seen)
                fake._send(self, respond(seen, number))

            do_GET = do_POST = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, reply: Reply) -> None:
        if reply.chunks is not None:
            content = b"".join(reply.chunks)
            headers = {"content-type": "text/event-stream", **reply.headers}
        else:
            content = reply.body if isinstance(reply.body, bytes) else \
                json.dumps(reply.body).encode()  # fmt: skip
            headers = {"content-type": "application/json", **reply.headers}
        handler.send_response(reply.status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("content-length", str(len(content) + (100 if reply.cut else 0)))
        handler.send_header("connection", "close")
        handler.end_headers()
        for chunk in reply.chunks or [content]:
            handler.wfile.write(chunk)
            handler.wfile.flush()
        handler.close_connection = True

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scripted(*replies: Reply) -> Callable[[Seen, int], Reply]:
    """Answer the n-th request with the n-th reply (the last one from then on)."""
    return lambda seen, number: replies[min(number, len(replies) - 1)]


class SilentServer:
    """Accepts connections (the kernel's backlog does) and never answers."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(16)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
