"""The HelixFlow Python SDK: `HelixFlow` (blocking) and `AsyncHelixFlow` (asyncio).

    from helixflow.client import HelixFlow

    with HelixFlow(api_key="hfx_...", ca_bundle="ca.pem") as client:
        reply = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi!"}])
        print(reply.choices[0].message.content)
        with client.chat.completions.create(model=..., messages=..., stream=True) as stream:
            for chunk in stream:
                print("".join(c.delta.content or "" for c in chunk.choices), end="")

Inference (`chat.completions`, `completions`, `embeddings`, `models`, `tokenize`) goes to the
gateway; `auth` (login, refresh, logout, me) and `api_keys` go to the auth service. Answers are
typed msgspec Structs (`helixflow.client.types`); failures raise the `APIError` subtree of
HelixFlow's error tree (`helixflow.client.errors`). Needs the ``client`` extra (httpx).
"""

from helixflow.client._async import AsyncHelixFlow, AsyncStream
from helixflow.client._core import DEFAULT_AUTH_URL, DEFAULT_BASE_URL, RetryPolicy
from helixflow.client._sync import HelixFlow, Stream
from helixflow.client.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
)

__all__ = [
    "DEFAULT_AUTH_URL",
    "DEFAULT_BASE_URL",
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncHelixFlow",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "HelixFlow",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RetryPolicy",
    "ServerError",
    "Stream",
]
