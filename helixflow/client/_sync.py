"""`HelixFlow`, the blocking client: a thin loop over `_core` with httpx's sync transport."""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
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

__all__ = ["HelixFlow", "Stream"]

T = TypeVar("T")


class Stream(Generic[T]):
    """The chunks of a streamed response, typed, as they arrive. The HTTP response is closed
    when the stream ends, fails or is closed (`close`, or leaving a ``with`` block)."""

    def __init__(self, response: httpx.Response, kind: type[T]) -> None:
        self.response = response
        self._kind = kind
        self._chunks = self._iterate()

    @property
    def request_id(self) -> str | None:
        """The server's ``x-request-id`` of this response."""
        request_id: str | None = self.response.headers.get("x-request-id")
        return request_id

    def _iterate(self) -> Generator[T, None, None]:
        decoder = SSEDecoder()
        url = str(self.response.request.url)
        events = self._events(decoder, url)
        try:
            for data in events:
                chunk = decode_event(data, self._kind, self.request_id)
                if chunk is None:
                    return
                yield chunk
        finally:
            events.close()
            self.response.close()

    def _events(self, decoder: SSEDecoder, url: str) -> Generator[bytes, None, None]:
        try:
            for raw in self.response.iter_bytes():
                yield from decoder.feed(raw)
        except httpx.HTTPError as exc:
            raise connection_error(exc, url) from exc
        raise APIConnectionError(f"the stream from {url} ended before [DONE]")

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        return next(self._chunks)

    def close(self) -> None:
        """Stop reading and close the HTTP response (the server stops generating)."""
        self._chunks.close()
        self.response.close()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:  # fmt: skip
        self.close()


class HelixFlow:
    """A client of a HelixFlow gateway (inference) and its auth service (logins, API keys).

    `api_key` authenticates inference; after ``client.auth.login(...)`` the login's access
    token does (and manages API keys), renewed once per call with the refresh token when it
    expires. `ca_bundle` (a PEM path or an `ssl.SSLContext`) verifies self-signed servers;
    `timeout` is seconds without progress (or an `httpx.Timeout`); failed calls are sent again
    up to `max_retries` times (429 and 5xx, honouring ``Retry-After``; connection failures;
    `retry_policy` sets the waits too).
    Arguments not given come from ``HELIXFLOW_API_KEY``, ``HELIXFLOW_BASE_URL``,
    ``HELIXFLOW_AUTH_URL`` and ``HELIXFLOW_CA``. Close it (or use ``with``) when done.
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
        self._http = httpx.Client(verify=verify, timeout=make_timeout(timeout))
        self._refresh_lock = threading.Lock()
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

    def tokenize(self, *, model: str, prompt: str | None = None,
                 messages: Messages | None = None,
                 add_special_tokens: bool = True) -> TokenizeResult:  # fmt: skip
        """The token ids of `prompt`, or of chat `messages` with the model's template."""
        result: TokenizeResult = self._send(_calls.tokenize(model, prompt, messages,
                                                            add_special_tokens))  # fmt: skip
        return result

    def detokenize(self, *, model: str, tokens: Sequence[int]) -> str:
        """The text of token ids."""
        return str(self._send(_calls.detokenize(model, tokens)).prompt)

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> HelixFlow:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:  # fmt: skip
        self.close()

    def _send(self, call: Call) -> Any:
        """Run `call`: its decoded answer, or a `Stream` when it streams."""
        refreshed = False
        attempt = 0
        while True:
            prepared = self._core.prepare(call)
            request = self._http.build_request(prepared.method, prepared.url,
                                               headers=prepared.headers, content=prepared.content,
                                               params=prepared.query)  # fmt: skip
            try:
                response = self._http.send(request, stream=True)
                if response.is_success and call.stream:
                    return Stream(response, call.type or dict)
                try:
                    content = response.read()
                finally:
                    response.close()
            except httpx.HTTPError as exc:
                error: APIError = connection_error(exc, prepared.url)
            else:
                if response.is_success:
                    return self._core.decode(call, content)
                error = status_error(response.status_code, response.headers, content)
                if not refreshed and self._core.should_refresh(prepared, error):
                    refreshed = True
                    self._refresh_after(prepared.bearer)
                    continue
            delay = self._core.retry_delay(call, attempt, error)
            if delay is None:
                raise error
            time.sleep(delay)
            attempt += 1

    def _refresh_after(self, expired: str | None) -> None:
        """Renew the access token `expired` (unless another thread did meanwhile)."""
        with self._refresh_lock:
            if self._core.credentials.access_token == expired:
                self.auth.refresh()


class ChatCompletions:
    """``client.chat.completions``."""

    def __init__(self, client: HelixFlow) -> None:
        self._client = client

    @overload
    def create(self, *, model: str, messages: Messages, stream: Literal[False] = False,
               **params: Unpack[ChatParams]) -> ChatCompletion: ...
    @overload
    def create(self, *, model: str, messages: Messages, stream: Literal[True],
               **params: Unpack[ChatParams]) -> Stream[ChatCompletionChunk]: ...
    @overload
    def create(self, *, model: str, messages: Messages, stream: bool,
               **params: Unpack[ChatParams]) -> ChatCompletion | Stream[ChatCompletionChunk]: ...

    def create(self, *, model: str, messages: Messages, stream: bool = False,
               **params: Unpack[ChatParams]) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """A chat completion; with `stream`, a `Stream` of its chunks."""
        result: ChatCompletion | Stream[ChatCompletionChunk] = self._client._send(
            _calls.chat_completion(model, messages, stream, params))
        return result


class Chat:
    """``client.chat``."""

    def __init__(self, client: HelixFlow) -> None:
        self.completions = ChatCompletions(client)


class Completions:
    """``client.completions``: legacy text completions."""

    def __init__(self, client: HelixFlow) -> None:
        self._client = client

    @overload
    def create(self, *, model: str, prompt: Prompt, stream: Literal[False] = False,
               **params: Unpack[CompletionParams]) -> Completion: ...
    @overload
    def create(self, *, model: str, prompt: Prompt, stream: Literal[True],
               **params: Unpack[CompletionParams]) -> Stream[Completion]: ...
    @overload
    def create(self, *, model: str, prompt: Prompt, stream: bool,
               **params: Unpack[CompletionParams]) -> Completion | Stream[Completion]: ...

    def create(self, *, model: str, prompt: Prompt, stream: bool = False,
               **params: Unpack[CompletionParams]) -> Completion | Stream[Completion]:
        """A text completion of `prompt`; with `stream`, a `Stream` of its chunks."""
        result: Completion | Stream[Completion] = self._client._send(
            _calls.completion(model, prompt, stream, params))
        return result


class Embeddings:
    """``client.embeddings``."""

    def __init__(self, client: HelixFlow) -> None:
        self._client = client

    def create(self, *, model: str, input: Prompt,
               encoding_format: Literal["float", "base64"] | None = None,
               extra_body: Mapping[str, Any] | None = None) -> CreateEmbeddingResponse:
        """The embedding vectors of `input` (a text, texts or token ids)."""
        result: CreateEmbeddingResponse = self._client._send(
            _calls.embeddings(model, input, encoding_format, extra_body))
        return result


class Models:
    """``client.models``."""

    def __init__(self, client: HelixFlow) -> None:
        self._client = client

    def list(self) -> ModelList:
        """The models the caller may use."""
        result: ModelList = self._client._send(_calls.list_models())
        return result

    def retrieve(self, model: str) -> Model:
        """One model by its id or alias."""
        result: Model = self._client._send(_calls.get_model(model))
        return result


class Auth:
    """``client.auth``: log in and out; the client keeps the tokens and renews them."""

    def __init__(self, client: HelixFlow) -> None:
        self._client = client

    def login(self, username: str, password: str) -> TokenPair:
        """Log in; later calls carry the access token."""
        pair: TokenPair = self._client._send(_calls.login(username, password))
        self._client._core.credentials.store(pair)
        return pair

    def refresh(self) -> TokenPair:
        """Renew the tokens now (the client also does so by itself when the access token
        expires); AuthenticationError if the session ended (the tokens are then forgotten)."""
        creds = self._client._core.credentials
        if creds.refresh_token is None:
            raise AuthenticationError("no refresh token: log in first", status=401,
                                      code="no_refresh_token")  # fmt: skip
        try:
            pair: TokenPair = self._client._send(_calls.refresh(creds.refresh_token))
        except AuthenticationError:
            creds.forget_tokens()
            raise
        creds.store(pair)
        return pair

    def logout(self) -> None:
        """End the session on the server (if there is one) and forget its tokens."""
        creds = self._client._core.credentials
        if creds.refresh_token is not None:
            self._client._send(_calls.logout(creds.refresh_token))
        creds.forget_tokens()

    def me(self) -> Principal:
        """Who the client's credentials belong to, and what they may do."""
        result: Principal = self._client._send(_calls.me())
        return result


class ApiKeys:
    """``client.api_keys``: the caller's API keys (all users' for an admin); needs a login."""

    def __init__(self, client: HelixFlow) -> None:
        self._client = client

    def create(self, *, name: str = "", scopes: Sequence[str] | None = None,
               rpm_limit: int | None = None, tpm_limit: int | None = None,
               expires_in: float | None = None, expires_at: float | None = None,
               user_id: str | None = None) -> CreatedApiKey:  # fmt: skip
        """A new key; its secret `key` is shown this once."""
        result: CreatedApiKey = self._client._send(_calls.create_api_key(
            name=name, scopes=scopes, rpm_limit=rpm_limit, tpm_limit=tpm_limit,
            expires_in=expires_in, expires_at=expires_at, user_id=user_id))  # fmt: skip
        return result

    def list(self, *, user_id: str | None = None, prefix: str | None = None) -> ApiKeyList:
        """Your keys, another user's (an admin), or the one with public `prefix`."""
        result: ApiKeyList = self._client._send(_calls.list_api_keys(user_id=user_id,
                                                                     prefix=prefix))  # fmt: skip
        return result

    def get(self, key_id: str) -> ApiKey:
        """One key's record."""
        result: ApiKey = self._client._send(_calls.get_api_key(key_id))
        return result

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key at once, everywhere; returns its record."""
        result: ApiKey = self._client._send(_calls.revoke_api_key(key_id))
        return result
