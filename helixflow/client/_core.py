"""What the sync and the async client share, without I/O: the configuration, the credentials,
building a request, reading a response or an error, the retry policy and SSE parsing.

A facade (`_sync`, `_async`) runs one loop per call: `ClientCore.prepare` → send → on an
error status `ClientCore.status_error`, then maybe a token refresh (`should_refresh`) or a
retry after `ClientCore.retry_delay`; on success `decode`, or a stream of `decode_event`s.
"""

from __future__ import annotations

import email.utils
import os
import random
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import httpx
import msgspec

from helixflow import __version__
from helixflow.client.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    error_for_status,
)
from helixflow.client.types import ErrorEnvelope, TokenPair
from helixflow.errors import ConfigError

__all__ = [
    "DEFAULT_AUTH_URL",
    "DEFAULT_BASE_URL",
    "Call",
    "ClientCore",
    "RetryPolicy",
    "SSEDecoder",
    "connection_error",
    "decode_event",
    "parse_retry_after",
]

DEFAULT_BASE_URL: Final = "https://localhost:8443"
DEFAULT_AUTH_URL: Final = "http://127.0.0.1:8082"
DEFAULT_TIMEOUT: Final = 600.0  # seconds without a byte; a long generation may be silent
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
DEFAULT_MAX_RETRIES: Final = 2
_USER_AGENT: Final = f"helixflow-python/{__version__}"
# Statuses worth another try: the server did not do the work, or may do it next time.
_RETRY_STATUSES: Final = frozenset((408, 429, 500, 502, 503, 504))
# ... and those that say so for sure, so a call with effects (a refresh) may be sent again.
_UNPROCESSED_STATUSES: Final = frozenset((429, 503))
_STATUS_OF_TYPE: Final = {"invalid_request_error": 400, "authentication_error": 401,
                          "permission_error": 403, "rate_limit_error": 429}  # fmt: skip
_STATUS_OF_CODE: Final = {"overloaded": 503, "backend_unavailable": 503, "engine_dead": 503,
                          "upstream_timeout": 504, "not_found": 404,
                          "model_not_found": 404}  # fmt: skip

T = TypeVar("T")
Service = Literal["gateway", "auth"]


@dataclass(frozen=True, slots=True)
class Call:
    """One API call as a facade runs it. `type` is what the body decodes into (a stream's
    chunk type when `stream`; None for no body); `idempotent` calls may be sent again after
    an ambiguous failure (a timeout, a 500); `authenticate` adds the bearer credential."""

    service: Service
    method: str
    path: str
    type: type[Any] | None
    body: Any = None
    query: Mapping[str, str] | None = None
    stream: bool = False
    idempotent: bool = True
    authenticate: bool = True


@dataclass(frozen=True, slots=True)
class Prepared:
    """A call ready to send, and the bearer credential it carries (None: none)."""

    method: str
    url: str
    headers: dict[str, str]
    content: bytes | None
    query: Mapping[str, str] | None
    bearer: str | None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to wait before sending a failed call again.

    The server's ``Retry-After`` wins (up to `max_retry_after`; longer, and the error is raised
    with its `retry_after` for the caller to decide); otherwise the wait doubles from
    `initial_delay` up to `max_delay`, less a random `jitter` share so clients spread out.
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    initial_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0
    jitter: float = 0.25

    def backoff(self, attempt: int, rand: float) -> float:
        """The wait before retry number `attempt` (0: the first), `rand` in [0, 1)."""
        return min(self.max_delay, self.initial_delay * 2.0**attempt) * (1.0 - self.jitter * rand)

    def delay(self, attempt: int, retry_after: float | None,
              rand: float | None = None) -> float | None:  # fmt: skip
        """Seconds to wait before retry number `attempt`, or None: give up."""
        if attempt >= self.max_retries:
            return None
        if retry_after is not None:
            return max(0.0, retry_after) if retry_after <= self.max_retry_after else None
        return self.backoff(attempt, random.random() if rand is None else rand)


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date) in seconds; None if
    absent or unreadable."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def connection_error(exc: httpx.HTTPError, url: str) -> APIConnectionError:
    """The SDK's error for a transport failure of a request to `url` (`exc` is its cause)."""
    error = _connection_error(exc, url)
    error.__cause__ = exc
    return error


def _connection_error(exc: httpx.HTTPError, url: str) -> APIConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"no answer from {url} in time ({type(exc).__name__})")
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return APIConnectionError(
            f"TLS verification of {url} failed ({cause}); pass ca_bundle= the CA certificate "
            "that signed the server's (HelixFlow's own: the ca.pem of `helixflow certs`)",
            code="tls_verification_failed")  # fmt: skip
    return APIConnectionError(f"cannot reach {url}: {exc or type(exc).__name__}")


def _not_sent(exc: APIConnectionError) -> bool:
    """Whether the failed request surely never reached the server (safe to send again)."""
    return isinstance(exc.__cause__, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def status_error(status: int, headers: Mapping[str, str], content: bytes) -> APIStatusError:
    """The typed exception of an error response (an OpenAI error object, or any body)."""
    request_id = headers.get("x-request-id")
    retry_after = parse_retry_after(headers) if status == 429 else None
    try:
        error = msgspec.json.decode(content, type=ErrorEnvelope).error
    except msgspec.DecodeError:  # not an OpenAI error object (a proxy's page, say)
        text = content.decode("utf-8", "replace").strip()[:500]
        message = text or f"HTTP {status}"
        return error_for_status(status, message, request_id=request_id, headers=headers,
                                body=text, retry_after=retry_after)  # fmt: skip
    code = None if error.code is None else str(error.code)
    return error_for_status(status, error.message, type=error.type, code=code, param=error.param,
                            request_id=request_id, headers=headers, body=error,
                            retry_after=retry_after)  # fmt: skip


def decode_event(data: bytes, kind: type[T], request_id: str | None = None) -> T | None:
    """One SSE event's data as a `kind`; None for ``[DONE]``; an error event (the gateway's
    way to fail after the stream began) raises its APIStatusError."""
    if data.strip() == b"[DONE]":
        return None
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.DecodeError:
        try:
            error = msgspec.json.decode(data, type=ErrorEnvelope).error
        except msgspec.DecodeError:
            raise APIError(f"unexpected stream event: {data[:200]!r}") from None
    code = None if error.code is None else str(error.code)
    status = _STATUS_OF_CODE.get(code or "") or _STATUS_OF_TYPE.get(error.type, 500)
    raise error_for_status(status, error.message, type=error.type, code=code, param=error.param,
                           request_id=request_id, body=error)  # fmt: skip


class SSEDecoder:
    """Server-sent events, incrementally: `feed` bytes as they come, get the data of every
    event completed so far (its ``data:`` lines joined by newlines)."""

    def __init__(self) -> None:
        self._pending = b""
        self._data: list[bytes] = []
        self._after_cr = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of the events that `chunk` completes."""
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split between chunks
        lines = (self._pending + chunk).splitlines(keepends=True)
        self._pending = b""
        if lines and not lines[-1].endswith((b"\n", b"\r")):
            self._pending = lines.pop()  # a line without its end yet
        self._after_cr = chunk.endswith(b"\r")
        events: list[bytes] = []
        for line in lines:
            line = line.rstrip(b"\r\n")
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            # comments (":...") and the event, id and retry fields are not used by OpenAI APIs
        return events


@dataclass
class Credentials:
    """The caller's API key and login tokens. The gateway gets the key when there is one, the
    auth service the access token (managing keys needs a login)."""

    api_key: str | None = None
    access_token: str | None = None
    refresh_token: str | None = None

    def bearer(self, service: Service) -> str | None:
        """The credential a call to `service` carries."""
        if service == "gateway":
            return self.api_key or self.access_token
        return self.access_token or self.api_key

    def store(self, pair: TokenPair) -> None:
        self.access_token = pair.access_token
        self.refresh_token = pair.refresh_token

    def forget_tokens(self) -> None:
        self.access_token = self.refresh_token = None


def make_ssl_context(ca_bundle: str | os.PathLike[str] | ssl.SSLContext | None,
                     ) -> ssl.SSLContext | bool:  # fmt: skip
    """What httpx should verify with: the given context, one trusting the CA file (the
    argument, else ``$HELIXFLOW_CA``) and nothing else, or True (the default CAs)."""
    if isinstance(ca_bundle, ssl.SSLContext):
        return ca_bundle
    if ca_bundle is None:
        ca_bundle = os.environ.get("HELIXFLOW_CA") or None
        if ca_bundle is None:
            return True
    path = Path(ca_bundle)
    try:
        return ssl.create_default_context(cafile=str(path))
    except FileNotFoundError:
        raise ConfigError(f"ca_bundle: no such file {str(path)!r}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"ca_bundle: {str(path)!r} is not a PEM CA bundle ({exc})") from None


def make_timeout(timeout: float | httpx.Timeout) -> httpx.Timeout:
    """httpx's timeouts from seconds (each read, write and pool wait; connecting at most 10 s)."""
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(timeout, connect=min(timeout, DEFAULT_CONNECT_TIMEOUT))


@dataclass
class ClientCore:
    """A client's configuration and credentials, and the decisions of its request loop."""

    base_url: str
    auth_url: str
    credentials: Credentials
    retry: RetryPolicy
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_options(cls, *, api_key: str | None, base_url: str | None, auth_url: str | None,
                     max_retries: int, retry_policy: RetryPolicy | None,
                     access_token: str | None, refresh_token: str | None,
                     default_headers: Mapping[str, str] | None) -> ClientCore:  # fmt: skip
        """The core of a client; what is not given comes from the environment
        (``HELIXFLOW_API_KEY``, ``HELIXFLOW_BASE_URL``, ``HELIXFLOW_AUTH_URL`` or
        ``AUTH_SERVICE_URL``), then from the defaults of a single-machine install;
        `retry_policy`, when given, overrides `max_retries`."""
        if max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, not {max_retries}")
        env = os.environ
        base = base_url or env.get("HELIXFLOW_BASE_URL") or DEFAULT_BASE_URL
        auth = auth_url or env.get("HELIXFLOW_AUTH_URL") or env.get("AUTH_SERVICE_URL") \
            or DEFAULT_AUTH_URL  # fmt: skip
        credentials = Credentials(api_key or env.get("HELIXFLOW_API_KEY") or None,
                                  access_token, refresh_token)  # fmt: skip
        retry = retry_policy or RetryPolicy(max_retries=max_retries)
        return cls(_root(base), _root(auth), credentials, retry,
                   {"user-agent": _USER_AGENT, **(default_headers or {})})  # fmt: skip

    def prepare(self, call: Call) -> Prepared:
        """The method, URL, headers and body of `call` with the current credentials."""
        headers = dict(self.headers)
        headers["accept"] = "text/event-stream" if call.stream else "application/json"
        bearer = self.credentials.bearer(call.service) if call.authenticate else None
        if bearer:
            headers["authorization"] = f"Bearer {bearer}"
        content = None
        if call.body is not None:
            content = msgspec.json.encode(call.body)
            headers["content-type"] = "application/json"
        root = self.base_url if call.service == "gateway" else self.auth_url
        return Prepared(call.method, root + call.path, headers, content, call.query, bearer)

    def decode(self, call: Call, content: bytes) -> Any:
        """A successful response's body as the call's type."""
        if call.type is None:
            return None
        try:
            return msgspec.json.decode(content, type=call.type)
        except msgspec.DecodeError as exc:  # ValidationError included
            raise APIError(f"unexpected response to {call.method} {call.path}: {exc}") from None

    def should_refresh(self, prepared: Prepared, error: APIError) -> bool:
        """Whether a 401 came from an access token that a known refresh token can renew."""
        creds = self.credentials
        used_token = prepared.bearer is not None and prepared.bearer == creds.access_token
        return (isinstance(error, APIStatusError) and error.status == 401 and used_token
                and creds.refresh_token is not None)  # fmt: skip

    def retry_delay(self, call: Call, attempt: int, error: APIError) -> float | None:
        """Seconds to wait before sending `call` again after `error`, or None: raise it."""
        if isinstance(error, APIStatusError):
            retryable = _RETRY_STATUSES if call.idempotent else _UNPROCESSED_STATUSES
            if error.status not in retryable:
                return None
            return self.retry.delay(attempt, parse_retry_after(error.headers))
        if isinstance(error, APIConnectionError):
            if error.code == "tls_verification_failed":
                return None  # a certificate does not fix itself
            if call.idempotent or _not_sent(error):
                return self.retry.delay(attempt, None)
        return None


def _root(url: str) -> str:
    """A base URL without a trailing slash or ``/v1`` (paths here start at the root)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url
