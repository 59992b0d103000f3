"""The SDK's exceptions: a subtree of HelixFlow's one error tree, rooted at `APIError`.

    HelixFlowError
    └── APIError                       anything a call of the SDK raises on purpose
        ├── APIStatusError             the server answered with an error status
        │   ├── BadRequestError        400, 422   (also a helixflow.errors.InvalidRequestError)
        │   ├── AuthenticationError    401        (also a helixflow.errors.AuthenticationError)
        │   ├── PermissionDeniedError  403        (also a helixflow.errors.PermissionDeniedError)
        │   ├── NotFoundError          404        (also a helixflow.errors.NotFoundError)
        │   ├── ConflictError          409
        │   ├── RateLimitError         429        (also a helixflow.errors.RateLimitError)
        │   └── ServerError            5xx
        └── APIConnectionError         no answer: refused, reset, TLS verification failed
            └── APITimeoutError        no answer in time

NOTE: the four classes whose names `helixflow.errors` already uses subclass those as well, so
``except helixflow.errors.RateLimitError`` catches the SDK's too and there is one meaning per
name; import them from `helixflow.client` to get `status`, `request_id` and `headers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from helixflow import errors as _server
from helixflow.errors import HelixFlowError

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "error_for_status",
]


class APIError(HelixFlowError):
    """Base of every error the SDK raises; `request_id` is the server's ``x-request-id``."""

    def __init__(self, message: str, *, request_id: str | None = None,
                 param: str | None = None, code: str | None = None) -> None:  # fmt: skip
        super().__init__(message, param=param, code=code)
        self.request_id = request_id


class APIStatusError(APIError):
    """The server answered with an error status: the OpenAI error object's fields, the
    response's `headers` (lower-case names) and its decoded `body`."""

    def __init__(self, message: str, *, status: int, type: str = "server_error",
                 code: str | None = None, param: str | None = None,
                 request_id: str | None = None, headers: Mapping[str, str] | None = None,
                 body: Any = None) -> None:  # fmt: skip
        super().__init__(message, request_id=request_id, param=param)
        # NOTE: set on the instance, after the base classes' class defaults: the server's
        # word wins, a null code included.
        self.status = status
        self.type = type
        self.code = code
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.body = body

    def __str__(self) -> str:
        text = f"{self.status} {self.code or self.type}: {self.message}"
        return f"{text} (request {self.request_id})" if self.request_id else text


class BadRequestError(APIStatusError, _server.InvalidRequestError):
    """400 or 422: the request was malformed; `param` names the field when the server knows."""


class AuthenticationError(APIStatusError, _server.AuthenticationError):
    """401: no, an unknown, an expired or a revoked API key or token."""


class PermissionDeniedError(APIStatusError, _server.PermissionDeniedError):
    """403: valid credentials without the scope or role the request needs."""


class NotFoundError(APIStatusError, _server.NotFoundError):
    """404: no such model, route, API key or user."""


class ConflictError(APIStatusError):
    """409: the resource exists already (e.g. a user name that is taken)."""


class RateLimitError(APIStatusError, _server.RateLimitError):
    """429: a request or token limit is spent; `retry_after` (seconds) is when to try again,
    from the ``Retry-After`` header (None if the server sent none)."""

    def __init__(self, message: str, *, status: int = 429, type: str = "rate_limit_error",
                 code: str | None = None, param: str | None = None,
                 request_id: str | None = None, headers: Mapping[str, str] | None = None,
                 body: Any = None, retry_after: float | None = None) -> None:  # fmt: skip
        super().__init__(message, status=status, type=type, code=code, param=param,
                         request_id=request_id, headers=headers, body=body)  # fmt: skip
        self.retry_after = retry_after


class ServerError(APIStatusError):
    """5xx: the server failed, is overloaded, or a backend behind it did not answer."""


class APIConnectionError(APIError):
    """No HTTP answer: the connection was refused or broke, or TLS verification failed."""

    # NOTE: the status a HelixFlow service relaying this error would answer with.
    status = 502
    type = "server_error"
    code: str | None = "connection_error"


class APITimeoutError(APIConnectionError):
    """No answer within the client's timeout."""

    status = 504
    code = "timeout"


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError,
    404: NotFoundError, 409: ConflictError, 422: BadRequestError, 429: RateLimitError,
}  # fmt: skip


def error_for_status(
    status: int, message: str, *, type: str = "server_error", code: str | None = None,
    param: str | None = None, request_id: str | None = None,
    headers: Mapping[str, str] | None = None, body: Any = None, retry_after: float | None = None,
) -> APIStatusError:  # fmt: skip
    """The exception of the class that `status` maps to."""
    kind = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIStatusError)
    fields: dict[str, Any] = dict(status=status, type=type, code=code, param=param,
                                  request_id=request_id, headers=headers, body=body)  # fmt: skip
    if kind is RateLimitError:
        return RateLimitError(message, retry_after=retry_after, **fields)
    return kind(message, **fields)
