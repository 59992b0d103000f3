"""The typed responses of the gateway and the auth service, as msgspec Structs.

Decoding ignores fields a struct does not name, so a newer server never breaks an older client;
fields a server may leave out have defaults. Shapes follow OpenAI's API reference (gateway) and
the auth service's HTTP API (`helixflow.auth.http_api`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec

__all__ = [
    "ApiKey",
    "ApiKeyList",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionMessage",
    "ChatMessage",
    "ChoiceDelta",
    "ChoiceLogprobs",
    "Completion",
    "CompletionChoice",
    "CompletionLogprobs",
    "CreateEmbeddingResponse",
    "CreatedApiKey",
    "DetokenizeResult",
    "Embedding",
    "ErrorBody",
    "ErrorEnvelope",
    "Model",
    "ModelList",
    "Principal",
    "TokenLogprob",
    "TokenPair",
    "TokenizeResult",
    "TopLogprob",
    "Usage",
]


class Usage(msgspec.Struct, kw_only=True):
    """Token counts of one request (embeddings have no completion tokens)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


# -- chat completions --------------------------------------------------------------------------


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One message of a chat request: text `content`, or a list of content parts."""

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The message of a chat completion's choice; it can go back into the next request as
    is (it encodes only the fields a request accepts)."""

    role: str
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class TopLogprob(msgspec.Struct, kw_only=True):
    """One of the most likely tokens at a position."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(msgspec.Struct, kw_only=True):
    """The log probability of one sampled token and its top alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = msgspec.field(default_factory=list)


class ChoiceLogprobs(msgspec.Struct, kw_only=True):
    """A chat choice's `logprobs`."""

    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class ChatChoice(msgspec.Struct, kw_only=True):
    """One choice of a chat completion."""

    index: int = 0
    message: ChatCompletionMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    """``POST /v1/chat/completions`` answered whole."""

    id: str
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[ChatChoice] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChoiceDelta(msgspec.Struct, kw_only=True):
    """What one stream chunk adds to a choice."""

    role: str | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    """One choice's part of a stream chunk."""

    index: int = 0
    delta: ChoiceDelta = msgspec.field(default_factory=ChoiceDelta)
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    """One event of a streamed chat completion; the usage-only last chunk has no choices."""

    id: str
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChatChunkChoice] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    system_fingerprint: str | None = None


# -- text completions --------------------------------------------------------------------------


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    """Legacy completions' `logprobs`."""

    tokens: list[str] = msgspec.field(default_factory=list)
    token_logprobs: list[float | None] = msgspec.field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = msgspec.field(default_factory=list)


class CompletionChoice(msgspec.Struct, kw_only=True):
    """One choice of a text completion (or its part of a stream chunk)."""

    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(msgspec.Struct, kw_only=True):
    """``POST /v1/completions``, whole or one stream chunk (OpenAI uses one shape for both)."""

    id: str
    object: str = "text_completion"
    created: int = 0
    model: str = ""
    choices: list[CompletionChoice] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    system_fingerprint: str | None = None


# -- embeddings, models, tokens -------------------------------------------------------------


class Embedding(msgspec.Struct, kw_only=True):
    """One input's vector: floats, or base64 of little-endian float32 when asked for."""

    index: int = 0
    embedding: list[float] | str
    object: str = "embedding"


class CreateEmbeddingResponse(msgspec.Struct, kw_only=True):
    """``POST /v1/embeddings``."""

    data: list[Embedding]
    model: str = ""
    usage: Usage | None = None
    object: str = "list"


class Model(msgspec.Struct, kw_only=True):
    """A model the caller may use."""

    id: str
    created: int = 0
    owned_by: str = ""
    object: str = "model"


class ModelList(msgspec.Struct, kw_only=True):
    """``GET /v1/models``; iterating it yields the models."""

    data: list[Model] = msgspec.field(default_factory=list)
    object: str = "list"

    def __iter__(self) -> Iterator[Model]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


class TokenizeResult(msgspec.Struct, kw_only=True):
    """``POST /tokenize``."""

    tokens: list[int]
    count: int = 0
    max_model_len: int | None = None


class DetokenizeResult(msgspec.Struct, kw_only=True):
    """``POST /detokenize``."""

    prompt: str


# -- the auth service --------------------------------------------------------------------------


class TokenPair(msgspec.Struct, kw_only=True):
    """A login's or a refresh's tokens; `expires_in` counts seconds from when it was made."""

    access_token: str
    refresh_token: str
    expires_in: int = 0
    refresh_expires_in: int = 0
    token_type: str = "Bearer"

    def __repr__(self) -> str:  # NOTE: never print a secret into a log
        return f"TokenPair(token_type={self.token_type!r}, expires_in={self.expires_in})"


class Principal(msgspec.Struct, kw_only=True):
    """``GET /v1/auth/me``: who the credentials belong to and what they may do."""

    kind: str
    user_id: str
    username: str = ""
    role: str = "user"
    scopes: list[str] = msgspec.field(default_factory=list)
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    key_id: str | None = None
    session_id: str | None = None
    expires_at: float | None = None


class ApiKey(msgspec.Struct, kw_only=True):
    """An API key's record (never its secret, which only `CreatedApiKey` carries, once)."""

    id: str
    user_id: str = ""
    prefix: str = ""
    name: str = ""
    scopes: list[str] = msgspec.field(default_factory=list)
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    expires_at: float | None = None
    revoked_at: float | None = None
    created_at: float | None = None
    last_used_at: float | None = None


class CreatedApiKey(ApiKey, kw_only=True):
    """A new API key: its record and its secret `key`, shown this once."""

    key: str

    def __repr__(self) -> str:  # NOTE: never print a secret into a log
        return f"CreatedApiKey(id={self.id!r}, prefix={self.prefix!r}, name={self.name!r})"


class ApiKeyList(msgspec.Struct, kw_only=True):
    """``GET /v1/api-keys``; iterating it yields the keys."""

    data: list[ApiKey] = msgspec.field(default_factory=list)
    object: str = "list"

    def __iter__(self) -> Iterator[ApiKey]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


# -- errors ------------------------------------------------------------------------------------


class ErrorBody(msgspec.Struct, kw_only=True):
    """The inner object of an OpenAI error response."""

    message: str = ""
    type: str = "server_error"
    param: str | None = None
    code: str | int | None = None


class ErrorEnvelope(msgspec.Struct, kw_only=True):
    """An OpenAI error response body, ``{"error": {...}}``."""

    error: ErrorBody
