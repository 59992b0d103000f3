"""`AsyncHelixFlow`, the asyncio client: the same loop over `_core` as `_sync`, awaited."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, Unpack, overload

import httpx

from helixflow.client import _calls
from helixflow.client._calls import ChatParams, CompletionParams, Messages, Prompt
from helixflow.client._core import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    Call,
    ClientCore,
    RetryPolicy,
    SSEDecoder,
    connection_error,
    decode_event,
    make_ssl_context,
    make_timeout,
    status_error,
)
from helixflow.client.errors import APIConnectionError, APIError, AuthenticationError
from helixflow.client.types import (
    ApiKey,
    ApiKeyList,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CreatedApiKey,
    CreateEmbeddingResponse,
    Model,
    ModelList,
    Principal,
    TokenizeResult,
    TokenPair,
)

__all__ = ["AsyncHelixFlow", "AsyncStream"]

T = TypeVar("T")


class AsyncStream(Generic[T]):
    """The chunks of a streamed response, typed, as they arrive. The HTTP response is closed
    when the stream ends, fails or is closed (`aclose`, or leaving an ``async with`` block)."""

    def __init__(self, response: httpx.Response, kind: type[T]) -> None:
        self.response = response
        self._kind = kind
        self._chunks = self._iterate()

    @property
    def request_id(self) -> str | None:
        """The server's ``x-request-id`` of this response."""
        request_id: str | None = self.response.headers.get("x-request-id")
        return request_id

    async def _iterate(self) -> AsyncGenerator[T, None]:
        decoder = SSEDecoder()
        url = str(self.response.request.url)
        events = self._events(decoder, url)
        try:
            async for data in events:
                chunk = decode_event(data, self._kind, self.request_id)
                if chunk is None:
                    return
                yield chunk
        finally:
            await events.aclose()
            await self.response.aclose()

    async def _events(self, decoder: SSEDecoder, url: str) -> AsyncGenerator[bytes, None]:
        try:
            async for raw in self.response.aiter_bytes():
                for data in decoder.feed(raw):
                    yield data
        except httpx.HTTPError as exc:
            raise connection_error(exc, url) from exc
        raise APIConnectionError(f"the stream from {url} ended before [DONE]")

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        """Stop reading and close the HTTP response (the server stops generating)."""
        await self._chunks.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:  # fmt: skip
        await self.aclose()


class AsyncHelixFlow:
    """A client of a HelixFlow gateway (inference) and its auth service (logins, API keys).

    `api_key` authenticates inference; after ``client.auth.login(...)`` the login's access
    token does (and manages API keys), renewed once per call with the refresh token when it
    expires. `ca_bundle` (a PEM path or an `ssl.SSLContext`) verifies self-signed servers;
    `timeout` is seconds without progress (or an `httpx.Timeout`); failed calls are sent again
    up to `max_retries` times (429 and 5xx, honouring ``Retry-After``; connection failures;
    `retry_policy` sets the waits too).
    Arguments not given come from ``HELIXFLOW_API_KEY``, ``HELIXFLOW_BASE_URL``,
    ``HELIXFLOW_AUTH_URL`` and ``HELIXFLOW_CA``. Close it (`aclose`, or ``async with``) when done.
    """

    def __init__(self, *, api_key: str | None = None, base_url: str | None = None,
                 auth_url: str | None = None,
                 ca_bundle: str | os.PathLike[str] | ssl.SSLContext | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 max_retries: int = DEFAULT_MAX_RETRIES, retry_policy: RetryPolicy | None = None,
                 access_token: str | None = None, refresh_token: str | None = None,
                 default_headers: Mapping[str, str] | None = None) -> None:  # fmt: skip
        self._core = ClientCore.from_options(
            api_key=api_key, base_url=base_url, auth_url=auth_url, max_retries=max_retries,
            retry_policy=retry_policy, access_token=access_token, refresh_token=refresh_token,
            default_headers=default_headers)  # fmt: skip
        verify = make_ssl_context(ca_bundle)
        self._http = httpx.AsyncClient(verify=verify, timeout=make_timeout(timeout))
        self._refresh_lock = asyncio.Lock()
        self.chat = Chat(self)
        self.completions = Completions(self)
        self.embeddings = Embeddings(self)
        self.models = Models(self)
        self.auth = Auth(self)
        self.api_keys = ApiKeys(self)

    @property
    def base_url(self) -> str:
        """The gateway's URL."""
        return self._core.base_url

    async def tokenize(self, *, model: str, prompt: str | None = None,
                 messages: Messages | None = None,
                 add_special_tokens: bool = True) -> TokenizeResult:  # fmt: skip
        """The token ids of `prompt`, or of chat `messages` with the model's template."""
        result: TokenizeResult = await self._send(_calls.tokenize(model, prompt, messages,
                                                            add_special_tokens))  # fmt: skip
        return result

    async def detokenize(self, *, model: str, tokens: Sequence[int]) -> str:
        """The text of token ids."""
        return str((await self._send(_calls.detokenize(model, tokens))).prompt)

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncHelixFlow:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:  # fmt: skip
        await self.aclose()

    async def _send(self, call: Call) -> Any:
        """Run `call`: its decoded answer, or a `AsyncStream` when it streams."""
        refreshed = False
        attempt = 0
        while True:
            prepared = self._core.prepare(call)
            request = self._http.build_request(prepared.method, prepared.url,
                                               headers=prepared.headers, content=prepared.content,
                                               params=prepared.query)  # fmt: skip
            try:
                response = await self._http.send(request, stream=True)
                if response.is_success and call.stream:
                    return AsyncStream(response, call.type or dict)
                try:
                    content = await response.aread()
                finally:
                    await response.aclose()
            except httpx.HTTPError as exc:
                error: APIError = connection_error(exc, prepared.url)
            else:
                if response.is_success:
                    return self._core.decode(call, content)
                error = status_error(response.status_code, response.headers, content)
                if not refreshed and self._core.should_refresh(prepared, error):
                    refreshed = True
                    await self._refresh_after(prepared.bearer)
                    continue
            delay = self._core.retry_delay(call, attempt, error)
            if delay is None:
                raise error
            await asyncio.sleep(delay)
            attempt += 1

    async def _refresh_after(self, expired: str | None) -> None:
        """Renew the access token `expired` (unless another thread did meanwhile)."""
        async with self._refresh_lock:
            if self._core.credentials.access_token == expired:
                await self.auth.refresh()


class ChatCompletions:
    """``client.chat.completions``."""

    def __init__(self, client: AsyncHelixFlow) -> None:
        self._client = client

    @overload
    async def create(self, *, model: str, messages: Messages, stream: Literal[False] = False,
               **params: Unpack[ChatParams]) -> ChatCompletion: ...
    @overload
    async def create(self, *, model: str, messages: Messages, stream: Literal[True],
               **params: Unpack[ChatParams]) -> AsyncStream[ChatCompletionChunk]: ...
    @overload
    async def create(
        self, *, model: str, messages: Messages, stream: bool, **params: Unpack[ChatParams]
    ) -> ChatCompletion | AsyncStream[ChatCompletionChunk]: ...

    async def create(
        self, *, model: str, messages: Messages, stream: bool = False,
        **params: Unpack[ChatParams],
    ) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:  # fmt: skip
        """A chat completion; with `stream`, a `AsyncStream` of its chunks."""
        result: ChatCompletion | AsyncStream[ChatCompletionChunk] = await self._client._send(
            _calls.chat_completion(model, messages, stream, params))
        return result


class Chat:
    """``client.chat``."""

    def __init__(self, client: AsyncHelixFlow) -> None:
        self.completions = ChatCompletions(client)


class Completions:
    """``client.completions``: legacy text completions."""

    def __init__(self, client: AsyncHelixFlow) -> None:
        self._client = client

    @overload
    async def create(self, *, model: str, prompt: Prompt, stream: Literal[False] = False,
               **params: Unpack[CompletionParams]) -> Completion: ...
    @overload
    async def create(self, *, model: str, prompt: Prompt, stream: Literal[True],
               **params: Unpack[CompletionParams]) -> AsyncStream[Completion]: ...
    @overload
    async def create(self, *, model: str, prompt: Prompt, stream: bool,
               **params: Unpack[CompletionParams]) -> Completion | AsyncStream[Completion]: ...

    async def create(self, *, model: str, prompt: Prompt, stream: bool = False,
               **params: Unpack[CompletionParams]) -> Completion | AsyncStream[Completion]:
        """A text completion of `prompt`; with `stream`, a `AsyncStream` of its chunks."""
        result: Completion | AsyncStream[Completion] = await self._client._send(
            _calls.completion(model, prompt, stream, params))
        return result


class Embeddings:
    """``client.embeddings``."""

    def __init__(self, client: AsyncHelixFlow) -> None:
        self._client = client

    async def create(self, *, model: str, input: Prompt,
               encoding_format: Literal["float", "base64"] | None = None,
               extra_body: Mapping[str, Any] | None = None) -> CreateEmbeddingResponse:
        """The embedding vectors of `input` (a text, texts or token ids)."""
        result: CreateEmbeddingResponse = await self._client._send(
            _calls.embeddings(model, input, encoding_format, extra_body))
        return result


class Models:
    """``client.models``."""

    def __init__(self, client: AsyncHelixFlow) -> None:
        self._client = client

    async def list(self) -> ModelList:
        """The models the caller may use."""
        result: ModelList = await self._client._send(_calls.list_models())
        return result

    async def retrieve(self, model: str) -> Model:
        """One model by its id or alias."""
        result: Model = await self._client._send(_calls.get_model(model))
        return result


class Auth:
    """``client.auth``: log in and out; the client keeps the tokens and renews them."""

    def __init__(self, client: AsyncHelixFlow) -> None:
        self._client = client

    async def login(self, username: str, password: str) -> TokenPair:
        """Log in; later calls carry the access token."""
        pair: TokenPair = await self._client._send(_calls.login(username, password))
        self._client._core.credentials.store(pair)
        return pair

    async def refresh(self) -> TokenPair:
        """Renew the tokens now (the client also does so by itself when the access token
        expires); AuthenticationError if the session ended (the tokens are then forgotten)."""
        creds = self._client._core.credentials
        if creds.refresh_token is None:
            raise AuthenticationError("no refresh token: log in first", status=401,
                                      code="no_refresh_token")  # fmt: skip
        try:
            pair: TokenPair = await self._client._send(_calls.refresh(creds.refresh_token))
        except AuthenticationError:
            creds.forget_tokens()
            raise
        creds.store(pair)
        return pair

    async def logout(self) -> None:
        """End the session on the server (if there is one) and forget its tokens."""
        creds = self._client._core.credentials
        if creds.refresh_token is not None:
            await self._client._send(_calls.logout(creds.refresh_token))
        creds.forget_tokens()

    async def me(self) -> Principal:
        """Who the client's credentials belong to, and what they may do."""
        result: Principal = await self._client._send(_calls.me())
        return result


class ApiKeys:
    """``client.api_keys``: the caller's API keys (all users' for an admin); needs a login."""

    def __init__(self, client: AsyncHelixFlow) -> None:
        self._client = client

    async def create(self, *, name: str = "", scopes: Sequence[str] | None = None,
               rpm_limit: int | None = None, tpm_limit: int | None = None,
               expires_in: float | None = None, expires_at: float | None = None,
               user_id: str | None = None) -> CreatedApiKey:  # fmt: skip
        """A new key; its secret `key` is shown this once."""
        result: CreatedApiKey = await self._client._send(_calls.create_api_key(
            name=name, scopes=scopes, rpm_limit=rpm_limit, tpm_limit=tpm_limit,
            expires_in=expires_in, expires_at=expires_at, user_id=user_id))  # fmt: skip
        return result

    async def list(self, *, user_id: str | None = None, prefix: str | None = None) -> ApiKeyList:
        """Your keys, another user's (an admin), or the one with public `prefix`."""
        result: ApiKeyList = await self._client._send(_calls.list_api_keys(user_id=user_id,
                                                                     prefix=prefix))  # fmt: skip
        return result

    async def get(self, key_id: str) -> ApiKey:
        """One key's record."""
        result: ApiKey = await self._client._send(_calls.get_api_key(key_id))
        return result

    async def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key at once, everywhere; returns its record."""
        result: ApiKey = await self._client._send(_calls.revoke_api_key(key_id))
        return result
