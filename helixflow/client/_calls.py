"""Every API call of the SDK as a `Call`: its route, its body and the type of its answer.

The sync and async resources are thin wrappers over these builders, so both send the very
same requests. Optional parameters go into the body only when given; ``extra_body`` adds
fields this SDK does not name (the server validates everything).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict
from urllib.parse import quote

from helixflow.client._core import Call
from helixflow.client.types import (
    ApiKey,
    ApiKeyList,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatMessage,
    Completion,
    CreatedApiKey,
    CreateEmbeddingResponse,
    DetokenizeResult,
    Model,
    ModelList,
    Principal,
    TokenizeResult,
    TokenPair,
)

__all__ = ["ChatParams", "CompletionParams", "Messages", "Prompt"]

Messages = Sequence[ChatMessage | ChatCompletionMessage | Mapping[str, Any]]
# a text, texts, token ids or lists of token ids
Prompt = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]


class _SamplingParams(TypedDict, total=False):
    """Sampling parameters of chat and text completions (OpenAI's, then vLLM-style extras)."""

    temperature: float
    top_p: float
    n: int
    stop: str | Sequence[str]
    seed: int
    presence_penalty: float
    frequency_penalty: float
    logit_bias: Mapping[str, float]
    stream_options: Mapping[str, Any]
    user: str
    top_k: int
    min_p: float
    repetition_penalty: float
    ignore_eos: bool
    min_tokens: int
    stop_token_ids: Sequence[int]
    extra_body: Mapping[str, Any]


class ChatParams(_SamplingParams, total=False):
    """The optional parameters of ``chat.completions.create``."""

    max_tokens: int
    max_completion_tokens: int
    logprobs: bool
    top_logprobs: int
    response_format: Mapping[str, Any]


class CompletionParams(_SamplingParams, total=False):
    """The optional parameters of ``completions.create``."""

    max_tokens: int
    logprobs: int
    echo: bool
    suffix: str
    best_of: int


def _body(fixed: dict[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    body = {**fixed, **{k: _plain(v) for k, v in params.items() if k != "extra_body"}}
    body.update(params.get("extra_body") or {})
    return body


def _plain(value: Any) -> Any:
    """A value msgspec can encode: mappings as dicts, sequences as lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value


def _message(message: ChatMessage | ChatCompletionMessage | Mapping[str, Any]) -> Any:
    return message if isinstance(message, ChatMessage | ChatCompletionMessage) else _plain(message)


def chat_completion(model: str, messages: Messages, stream: bool, params: ChatParams) -> Call:
    """``POST /v1/chat/completions``."""
    wire = [_message(m) for m in messages]
    body = _body({"model": model, "messages": wire}, params)
    if stream:
        body["stream"] = True
    return Call("gateway", "POST", "/v1/chat/completions",
                ChatCompletionChunk if stream else ChatCompletion, body, stream=stream)  # fmt: skip


def completion(model: str, prompt: Prompt, stream: bool, params: CompletionParams) -> Call:
    """``POST /v1/completions``; a stream's chunks are `Completion`s too."""
    body = _body({"model": model, "prompt": _plain(prompt)}, params)
    if stream:
        body["stream"] = True
    return Call("gateway", "POST", "/v1/completions", Completion, body, stream=stream)


def embeddings(model: str, input: Prompt, encoding_format: str | None,
               extra_body: Mapping[str, Any] | None) -> Call:  # fmt: skip
    """``POST /v1/embeddings``."""
    params: dict[str, Any] = {"extra_body": extra_body}
    if encoding_format is not None:
        params["encoding_format"] = encoding_format
    body = _body({"model": model, "input": _plain(input)}, params)
    return Call("gateway", "POST", "/v1/embeddings", CreateEmbeddingResponse, body)


def list_models() -> Call:
    """``GET /v1/models``."""
    return Call("gateway", "GET", "/v1/models", ModelList)


def get_model(model: str) -> Call:
    """``GET /v1/models/{model}``."""
    return Call("gateway", "GET", f"/v1/models/{quote(model, safe='/')}", Model)


def tokenize(model: str, prompt: str | None, messages: Messages | None,
             add_special_tokens: bool) -> Call:  # fmt: skip
    """``POST /tokenize``: a `prompt` or chat `messages`."""
    body: dict[str, Any] = {"model": model, "add_special_tokens": add_special_tokens}
    if prompt is not None:
        body["prompt"] = prompt
    if messages is not None:
        body["messages"] = [_message(m) for m in messages]
    return Call("gateway", "POST", "/tokenize", TokenizeResult, body)


def detokenize(model: str, tokens: Sequence[int]) -> Call:
    """``POST /detokenize``."""
    return Call("gateway", "POST", "/detokenize", DetokenizeResult,
                {"model": model, "tokens": list(tokens)})  # fmt: skip


# -- the auth service --------------------------------------------------------------------------
# NOTE: login, refresh and logout carry their secret in the body, not as a bearer, and are
# never sent twice after an ambiguous failure: a refresh token is spent by its first use.


def login(username: str, password: str) -> Call:
    """``POST /v1/auth/login``."""
    return Call("auth", "POST", "/v1/auth/login", TokenPair,
                {"username": username, "password": password}, idempotent=False,
                authenticate=False)  # fmt: skip


def refresh(refresh_token: str) -> Call:
    """``POST /v1/auth/refresh``."""
    return Call("auth", "POST", "/v1/auth/refresh", TokenPair, {"refresh_token": refresh_token},
                idempotent=False, authenticate=False)  # fmt: skip


def logout(refresh_token: str) -> Call:
    """``POST /v1/auth/logout``."""
    return Call("auth", "POST", "/v1/auth/logout", None, {"refresh_token": refresh_token},
                idempotent=False, authenticate=False)  # fmt: skip


def me() -> Call:
    """``GET /v1/auth/me``."""
    return Call("auth", "GET", "/v1/auth/me", Principal)


def create_api_key(*, name: str, scopes: Sequence[str] | None, rpm_limit: int | None,
                   tpm_limit: int | None, expires_in: float | None, expires_at: float | None,
                   user_id: str | None) -> Call:  # fmt: skip
    """``POST /v1/api-keys``."""
    body: dict[str, Any] = {"name": name}
    optional = {"scopes": None if scopes is None else list(scopes), "rpm_limit": rpm_limit,
                "tpm_limit": tpm_limit, "expires_in": expires_in, "expires_at": expires_at,
                "user_id": user_id}  # fmt: skip
    body.update((k, v) for k, v in optional.items() if v is not None)
    return Call("auth", "POST", "/v1/api-keys", CreatedApiKey, body, idempotent=False)


def list_api_keys(*, user_id: str | None, prefix: str | None) -> Call:
    """``GET /v1/api-keys``: the caller's keys, another user's (an admin), or one by prefix."""
    query = {k: v for k, v in (("user_id", user_id), ("prefix", prefix)) if v is not None}
    return Call("auth", "GET", "/v1/api-keys", ApiKeyList, query=query or None)


def get_api_key(key_id: str) -> Call:
    """``GET /v1/api-keys/{id}``."""
    return Call("auth", "GET", f"/v1/api-keys/{quote(key_id, safe='')}", ApiKey)


def revoke_api_key(key_id: str) -> Call:
    """``DELETE /v1/api-keys/{id}``; answers the revoked key's record."""
    return Call("auth", "DELETE", f"/v1/api-keys/{quote(key_id, safe='')}", ApiKey)
