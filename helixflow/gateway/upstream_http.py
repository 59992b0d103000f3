"""A lean HTTP/1.1 client for upstream OpenAI-compatible APIs: keep-alive connections on
asyncio streams (TLS when the URL is https), Content-Length, chunked and close-delimited bodies,
streaming.

NOTE: the gateway's first upstream client was httpx. Profiled under load (bench_gateway.py),
httpx + httpcore took ~70% of the gateway's CPU per proxied request: its pool probes every
idle connection's socket on every request and anyio/sniffio look up the running task several
times per call. This client does one thing (POST/GET to one origin, reuse the connection) and
costs a fraction of that; see bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator
from typing import Final
from urllib.parse import urlsplit

__all__ = ["UpstreamClient", "UpstreamError", "UpstreamResponse"]

MAX_HEAD: Final = 64 * 1024
READ_SIZE: Final = 64 * 1024


class UpstreamError(Exception):
    """The upstream could not be reached or broke the protocol."""


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class UpstreamResponse:
    """Status, headers (lower-case names) and a body to `read()` whole or stream with
    `chunks()`; `close()` returns the connection to the pool when the body was consumed."""

    def __init__(self, client: UpstreamClient, conn: _Connection, status: int,
                 headers: list[tuple[bytes, bytes]], timeout: float) -> None:  # fmt: skip
        self.status = status
        self.headers = headers
        self._client = client
        self._conn: _Connection | None = conn
        self._timeout = timeout
        self._done = False
        found = dict(headers)
        self._chunked = b"chunked" in found.get(b"transfer-encoding", b"").lower()
        length = found.get(b"content-length")
        self._length = int(length) if length is not None and length.isdigit() else None
        self._keep = found.get(b"connection", b"").lower() != b"close" and (
            self._chunked or self._length is not None
        )

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked encoding removed)."""
        assert self._conn is not None, "the body was already read"
        reader = self._conn.reader
        try:
            if self._chunked:
                while True:
                    line = await asyncio.wait_for(reader.readuntil(b"\r\n"), self._timeout)
                    size = int(line.split(b";", 1)[0].strip(), 16)
                    if size == 0:
                        trailer = await asyncio.wait_for(reader.readuntil(b"\r\n"),
                                                         self._timeout)  # fmt: skip
                        while trailer != b"\r\n":  # trailers: skip them
                            trailer = await reader.readuntil(b"\r\n")
                        break
                    data = await asyncio.wait_for(reader.readexactly(size + 2), self._timeout)
                    yield data[:-2]
            elif self._length is not None:
                left = self._length
                while left > 0:
                    data = await asyncio.wait_for(reader.read(min(left, READ_SIZE)),
                                                  self._timeout)  # fmt: skip
                    if not data:
                        raise UpstreamError("the upstream closed the connection mid-body")
                    left -= len(data)
                    yield data
            else:
                while data := await asyncio.wait_for(reader.read(READ_SIZE), self._timeout):
                    yield data
            self._done = True
        except (asyncio.IncompleteReadError, ValueError, ConnectionError) as exc:
            raise UpstreamError(f"bad response body: {type(exc).__name__}") from None

    async def read(self) -> bytes:
        """The whole body."""
        if self._length is not None and not self._chunked:
            assert self._conn is not None
            try:
                async with asyncio.timeout(self._timeout):
                    data = await self._conn.reader.readexactly(self._length)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                raise UpstreamError(f"bad response body: {type(exc).__name__}") from None
            self._done = True
            return data
        return b"".join([chunk async for chunk in self.chunks()])

    def close(self) -> None:
        """Give the connection back (a fully read keep-alive one) or close it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and self._keep and conn.usable():
            self._client._release(conn)
        else:
            conn.close()


class UpstreamClient:
    """Requests to one origin (``base_url``'s scheme, host and port) over pooled
    connections; `headers` go with every request (e.g. the upstream's API key)."""

    def __init__(self, base_url: str, *, headers: dict[str, str] | None = None,
                 timeout: float = 600.0, connect_timeout: float = 5.0, max_idle: int = 128,
                 ssl_context: ssl.SSLContext | None = None) -> None:  # fmt: skip
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.path.rstrip("/")
        self.ssl = (ssl_context or ssl.create_default_context()) if url.scheme == "https" else None
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._idle: collections.deque[_Connection] = collections.deque()
        self._max_idle = max_idle
        host = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._fixed = f"host: {host}\r\n{extra}".encode()

    async def _connect(self) -> _Connection:
        try:
            opening = asyncio.open_connection(self.host, self.port, ssl=self.ssl, limit=MAX_HEAD)
            reader, writer = await asyncio.wait_for(opening, self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: "
                                f"{type(exc).__name__}") from None  # fmt: skip
        return _Connection(reader, writer)

    def _release(self, conn: _Connection) -> None:
        if len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            conn.close()

    async def request(self, method: str, path: str, body: bytes = b"",
                      content_type: bytes = b"application/json") -> UpstreamResponse:  # fmt: skip
        """Send the request; returns once the response head arrived (body not yet read).

        A reused connection that turns out closed before any response byte arrived is
        replaced once by a fresh one (the upstream never saw the request)."""
        head = (f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode() + self._fixed
                + b"content-type: " + content_type
                + b"\r\ncontent-length: %d\r\n\r\n" % len(body))  # fmt: skip
        for attempt in (0, 1):
            conn = None
            while self._idle:
                candidate = self._idle.pop()
                if candidate.usable():
                    conn = candidate
                    break
                candidate.close()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            try:
                conn.writer.write(head + body)
                async with asyncio.timeout(self.timeout):  # cheaper than wait_for (no task)
                    raw = await conn.reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                conn.close()
                if reused and attempt == 0:
                    continue
                raise UpstreamError(f"the upstream closed the connection: "
                                    f"{type(exc).__name__}") from None  # fmt: skip
            except asyncio.LimitOverrunError:
                conn.close()
                raise UpstreamError("the upstream's response head is too large") from None
            except BaseException:
                conn.close()
                raise
            return self._parse(conn, raw)
        raise AssertionError("unreachable")  # pragma: no cover

    def _parse(self, conn: _Connection, raw: bytes) -> UpstreamResponse:
        lines = raw[:-4].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            conn.close()
            raise UpstreamError("the upstream did not answer in HTTP/1.1")
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers.append((name.strip().lower(), value.strip()))
        return UpstreamResponse(self, conn, int(parts[1]), headers, self.timeout)

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()
