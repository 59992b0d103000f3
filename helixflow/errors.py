"""The one exception tree of HelixFlow, rooted at `HelixFlowError`.

Every error that reaches a client leaves as an OpenAI error object with the HTTP status of its
class (`HelixFlowError.to_openai`). Messages are written for clients: never put a traceback, a
secret or a token in one.
"""

from __future__ import annotations

from typing import TypedDict

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "HelixFlowError",
    "InvalidRequestError",
    "NotFoundError",
    "OpenAIError",
    "OpenAIErrorBody",
    "OverloadedError",
    "PermissionDeniedError",
    "RateLimitError",
    "UpstreamTimeoutError",
]


class OpenAIErrorBody(TypedDict):
    """The inner object of an OpenAI error response."""

    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(TypedDict):
    """An OpenAI error response body: ``{"error": {...}}``."""

    error: OpenAIErrorBody


class HelixFlowError(Exception):
    """Base of every error HelixFlow raises on purpose.

    Subclasses set the HTTP `status` and the OpenAI error `type` and default `code`; an
    instance may narrow `code` (e.g. ``NotFoundError(..., code="model_not_found")``) and name
    the offending request field in `param`.
    """

    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_openai(self) -> OpenAIError:
        """Return the OpenAI error object that a client receives for this error."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class ConfigError(HelixFlowError):
    """A configuration value is missing or invalid; the message names the key."""

    code = "config_error"


class ModelLoadError(HelixFlowError):
    """A model's files are missing, corrupt or of an unsupported kind; the message says which."""

    code = "model_load_error"


class InvalidRequestError(HelixFlowError):
    """The request body or parameters are malformed or out of range."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None


class AuthenticationError(HelixFlowError):
    """No credentials, or an unknown, expired or revoked API key or token."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"
    reason: str | None = None  # machine-readable, for logs and metrics; never sent


class PermissionDeniedError(HelixFlowError):
    """Valid credentials that lack the scope or role the request needs."""

    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFoundError(HelixFlowError):
    """The model or resource named by the request does not exist."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class _RetryLater(HelixFlowError):
    """An error after which the same request may succeed; `retry_after` (seconds), when
    known, becomes the response's ``Retry-After``."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after


class RateLimitError(_RetryLater):
    """A request or token rate limit is exhausted; `retry_after` is in seconds."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class OverloadedError(_RetryLater):
    """No healthy backend has capacity for the request right now (or a service the request
    needs is unavailable)."""

    status = 503
    code = "overloaded"


class EngineDeadError(HelixFlowError):
    """The inference engine failed; it serves nothing more until it is restarted."""

    status = 503
    type = "server_error"
    code = "engine_dead"


class UpstreamTimeoutError(HelixFlowError):
    """A backend (inference pool or upstream provider) did not answer in time."""

    status = 504
    code = "upstream_timeout"
