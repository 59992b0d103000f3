"""The gateway's access log: one line per request, buffered and written by a background task.

NOTE: going through `logging` cost ~70 µs per request on the event loop (a LogRecord, the
formatter, a synchronous write), time the next request waits for. Here a request appends one
preformatted line (a few µs) and a task writes the batch every 50 ms; the lines have the same
shape as the other log lines (text or JSON), with the request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import TextIO

import msgspec

__all__ = ["AccessLog"]

FLUSH_S = 0.05
_LOGGER = "helixflow.gateway.access"
# Control characters and Unicode line breaks as \xNN/\uNNNN: what a client sent stays
# readable, on one line.
_ESCAPES = {c: f"\\x{c:02x}" if c < 256 else f"\\u{c:04x}"
            for c in (*range(32), *range(127, 160), 0x2028, 0x2029)}  # fmt: skip


class AccessLog:
    """Collects access lines; `run` writes them until cancelled (then flushes the rest)."""

    def __init__(self, fmt: str = "text", stream: TextIO | None = None) -> None:
        self.json = fmt == "json"
        self._stream = stream
        self._lines: list[str] = []
        self._second = -1
        self._stamp = ""

    def _now(self) -> tuple[str, int]:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            form = "%Y-%m-%dT%H:%M:%S" if self.json else "%Y-%m-%d %H:%M:%S"
            self._stamp = time.strftime(form, time.gmtime(now) if self.json
                                        else time.localtime(now))  # fmt: skip
        return self._stamp, int((now - second) * 1000)

    def record(self, method: str, path: str, status: int, ms: float, model: str, user: str,
               request_id: str) -> None:  # fmt: skip
        stamp, millis = self._now()
        msg = f"{method} {path} {status} {ms:.1f}ms model={model} user={user}"
        if not msg.isprintable():  # a client's CR/LF in the path or model forges no line
            msg = msg.translate(_ESCAPES)
        if self.json:
            line = msgspec.json.encode({
                "ts": f"{stamp}.{millis:03d}Z", "level": "info", "logger": _LOGGER, "msg": msg,
                "request_id": request_id, "method": method, "path": path, "status": status,
                "ms": round(ms, 2), "model": model, "user": user,
            }).decode()  # fmt: skip
        else:
            line = f"{stamp},{millis:03d} INFO {_LOGGER} {msg} [{request_id}]"
        self._lines.append(line + "\n")

    def flush(self) -> None:
        if self._lines:
            stream = self._stream or sys.stderr
            stream.write("".join(self._lines))
            stream.flush()
            self._lines.clear()

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(FLUSH_S)
                with contextlib.suppress(OSError, ValueError):
                    self.flush()
        finally:
            with contextlib.suppress(OSError, ValueError):
                self.flush()
