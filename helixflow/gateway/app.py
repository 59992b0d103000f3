"""The gateway's ASGI application: OpenAI's REST API in front of pools and upstream APIs.

Per request: a request id; the route; the caller (`AuthClient`: API key or JWT); the body
(size and time limited, decoded by msgspec into a typed request); the model (id or alias; the
caller's scopes must cover it); the rate limits (requests now, tokens reserved from the prompt
estimate and `max_tokens`, settled from the real usage); then the backend: the least loaded
healthy one, another one if it fails before its first token; streamed as SSE or answered
whole. A client that goes away cancels the backend call. Every error leaves as an OpenAI error
object with its status; every response carries ``x-request-id``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import itertools
import logging
import re
import secrets
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import grpc
import msgspec

from helixflow._proto import inference_pb2 as pb
from helixflow.auth.principal import Principal
from helixflow.errors import (
    AuthenticationError,
    HelixFlowError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    RateLimitError,
    UpstreamTimeoutError,
)
from helixflow.gateway import openai_pool as oai
from helixflow.gateway.accesslog import AccessLog
from helixflow.gateway.backends import ModelRoute, PoolBackend, Registry, UpstreamBackend
from helixflow.gateway.config import GatewayConfig
from helixflow.gateway.metrics import GatewayMetrics
from helixflow.gateway.ratelimit import Admission, RateLimiter, make_rate_limiter
from helixflow.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from helixflow.gateway.upstream_http import UpstreamError, UpstreamResponse

__all__ = ["Gateway", "HttpError"]

log = logging.getLogger("helixflow.gateway")
_PROBE_PATHS = frozenset(("/health", "/ready", "/metrics"))

Headers = list[tuple[bytes, bytes]]
_JSON: Final = (b"content-type", b"application/json")
_SSE: Final = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]  # fmt: skip
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_RETRYABLE: Final = frozenset((grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                               grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL))  # fmt: skip
DEFAULT_RESERVE_TOKENS: Final = 1024  # reserved when a request sets no max_tokens


class HttpError(HelixFlowError):
    """A protocol-level error with its own status (405, 408, 413, 415)."""

    type = "invalid_request_error"

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message, code=code)
        self.status = status


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: Headers) -> None:
        self.status = status
        self.body = body
        self.headers = headers


class Stream:
    """A streamed response: SSE bytes from `chunks`, `cancel` ends the backend call."""

    __slots__ = ("cancel", "chunks", "finish", "headers")

    def __init__(self, chunks: AsyncIterator[bytes], cancel: Callable[[], None],
                 headers: Headers, finish: Callable[[], Awaitable[None]]) -> None:  # fmt: skip
        self.chunks = chunks
        self.cancel = cancel
        self.headers = headers
        self.finish = finish


class Ctx:
    """One request as the handlers see it."""

    __slots__ = ("body", "client", "headers", "method", "model", "model_id", "path",
                 "principal", "receive", "request_id", "scope", "started", "status")  # fmt: skip

    def __init__(self, scope: dict[str, Any], receive: Any, request_id: str,
                 started: float = 0.0) -> None:  # fmt: skip
        self.scope = scope
        self.receive = receive
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers: dict[bytes, bytes] = dict(scope.get("headers", ()))
        client = scope.get("client")
        self.client = client[0] if client else "-"
        self.request_id = request_id
        self.principal: Principal | None = None
        self.body = b""
        self.model = "-"  # as the client named it
        self.model_id = "-"  # the registry's id of that model, once resolved
        self.started = started  # time.perf_counter() at arrival
        self.status = 0


def json_response(status: int, body: Any, headers: Headers | None = None) -> Response:
    return Response(status, msgspec.json.encode(body), [_JSON, *(headers or [])])


def error_response(exc: HelixFlowError) -> Response:
    headers: Headers = []
    if isinstance(exc, (RateLimitError, OverloadedError)) and exc.retry_after is not None:
        headers.append((b"retry-after", str(max(1, int(exc.retry_after + 0.999))).encode()))
    if isinstance(exc, RateLimitError):
        headers.extend(getattr(exc, "headers", None) or [])
    if isinstance(exc, AuthenticationError):
        headers.append((b"www-authenticate", b"Bearer"))
    return json_response(exc.status, exc.to_openai(), headers)


class Gateway:
    """The ASGI app; `startup`/`shutdown` run in the ASGI lifespan of each worker."""

    def __init__(self, config: GatewayConfig, env: dict[str, str], *,
                 auth: Any = None, limiter: RateLimiter | None = None) -> None:  # fmt: skip
        self.config = config
        self.env = env
        self.registry = Registry(config, env)
        self.auth = auth
        self.limiter = limiter
        self.metrics = GatewayMetrics()
        self.access = AccessLog(config.log_format)
        self._access_task: asyncio.Task[None] | None = None
        self.draining = False
        self.routes: dict[tuple[str, str], Callable[[Ctx], Awaitable[Response | Stream]]] = {
            ("GET", "/health"): self.health,
            ("GET", "/ready"): self.ready,
            ("GET", "/metrics"): self.prometheus,
            ("GET", "/openapi.json"): self.openapi,
            ("GET", "/v1/models"): self.list_models,
            ("POST", "/v1/chat/completions"): self.chat,
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/embeddings"): self.embeddings,
            ("POST", "/tokenize"): self.tokenize,
            ("POST", "/detokenize"): self.detokenize,
        }
        self.public = {"/health", "/ready", "/metrics", "/openapi.json"}

    # -- lifespan ----------------------------------------------------------------------------

    async def startup(self) -> None:
        if self.auth is None and not self.config.insecure_no_auth:
            from helixflow.auth.client import AuthClient

            credentials = None
            if self.config.auth_tls_ca:  # auth serves gRPC over TLS (its TLS_CERT)
                from pathlib import Path

                import grpc

                root = Path(self.config.auth_tls_ca).read_bytes()  # checked by load_config
                credentials = grpc.ssl_channel_credentials(root_certificates=root)
            self.auth = AuthClient(self.config.auth_grpc, name=f"gateway:{self.config.port}",
                                   credentials=credentials)  # fmt: skip
        if self.auth is not None:
            await self.auth.start(wait=5.0)
        else:
            log.warning("AUTHENTICATION IS OFF (insecure_no_auth): every request is admitted")
        if self.limiter is None:
            self.limiter = make_rate_limiter(
                self.config.redis_url, fail_closed=self.config.rate_limit_failure == "closed")
        await self.registry.start()
        self._access_task = asyncio.create_task(self.access.run())

    async def shutdown(self) -> None:
        if self._access_task is not None:
            self._access_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._access_task
        await self.registry.close()
        if self.auth is not None:
            await self.auth.close()
        if self.limiter is not None:
            await self.limiter.aclose()

    # -- ASGI --------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        given = dict(scope.get("headers", ())).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else _new_request_id()
        ctx = Ctx(scope, receive, request_id, started)
        try:
            result = await self._handle(ctx)
        except HelixFlowError as exc:
            result = error_response(exc)
        except Exception:
            log.exception("unhandled error id=%s", request_id)
            result = error_response(HelixFlowError("internal error"))
        rid = (b"x-request-id", request_id.encode())
        if isinstance(result, Response):
            ctx.status = result.status
            await send({"type": "http.response.start", "status": result.status,
                        "headers": [*result.headers, rid]})  # fmt: skip
            await send({"type": "http.response.body", "body": result.body})
        else:
            ctx.status = 200
            await self._stream(ctx, result, send, rid)
        elapsed = time.perf_counter() - started
        self.metrics.observe(ctx.path if (ctx.method, ctx.path) in self.routes else "other",
                             ctx.status, elapsed)  # fmt: skip
        # NOTE: monitoring probes /health, /ready and /metrics every second: only their
        # failures are worth a line (they are counted in the metrics either way).
        if ctx.status != 200 or ctx.path not in _PROBE_PATHS:
            self.access.record(ctx.method, ctx.path[:200], ctx.status, elapsed * 1e3, ctx.model,
                               ctx.principal.user_id if ctx.principal else "-",
                               request_id)  # fmt: skip

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("gateway start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _stream(self, ctx: Ctx, stream: Stream, send: Any, rid: tuple[bytes, bytes]) -> None:
        watcher = asyncio.create_task(self._watch_disconnect(ctx, stream))
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [*_SSE, *stream.headers, rid]})  # fmt: skip
            # NOTE: the first event apart, so that the time to first token costs nothing per
            # event; it is sent once the backend's first token has arrived (`_open`).
            first = await anext(stream.chunks, None)
            if first is not None:
                await send({"type": "http.response.body", "body": first, "more_body": True})
                self.metrics.first_token(ctx.model_id, time.perf_counter() - ctx.started)
                async for chunk in stream.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except (OSError, RuntimeError, asyncio.CancelledError) as exc:
            # The client went away (send fails): stop the backend at once.
            stream.cancel()
            self.metrics.disconnects.inc()
            log.info("client gone mid-stream (%s) id=%s", type(exc).__name__, ctx.request_id)
            ctx.status = 499
        except HelixFlowError as exc:  # after the headers: end the stream with an error event
            stream.cancel()
            event = b"data: " + msgspec.json.encode(exc.to_openai()) + b"\n\ndata: [DONE]\n\n"
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": event})
            ctx.status = exc.status
        finally:
            watcher.cancel()
            await stream.finish()

    async def _watch_disconnect(self, ctx: Ctx, stream: Stream) -> None:
        while True:
            message = await ctx.receive()
            if message["type"] == "http.disconnect":
                stream.cancel()
                self.metrics.disconnects.inc()
                return

    # -- the pipeline ------------------------------------------------------------------------

    async def _handle(self, ctx: Ctx) -> Response | Stream:
        handler = self.routes.get((ctx.method, ctx.path))
        if handler is None:
            if ctx.method == "GET" and ctx.path.startswith("/v1/models/"):
                handler = self.get_model
            elif any(path == ctx.path for _, path in self.routes):
                raise HttpError(405, f"method {ctx.method} not allowed on {ctx.path}",
                                "method_not_allowed")  # fmt: skip
            else:
                raise NotFoundError(f"no route {ctx.method} {ctx.path[:200]}",
                                    code="unknown_url")  # fmt: skip
        if ctx.path not in self.public:
            try:
                ctx.principal = await self._authenticate(ctx)
            except HelixFlowError as exc:
                self.metrics.count_auth_failure(exc)
                raise
        if ctx.method == "POST":
            ctx.body = await self._read_body(ctx)
        return await handler(ctx)

    async def _authenticate(self, ctx: Ctx) -> Principal:
        if self.auth is None:
            return Principal(kind="token", user_id="anonymous", username="anonymous",
                             role="user", scopes=("model:*",))  # fmt: skip
        header = ctx.headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise AuthenticationError(
                "You didn't provide an API key. Provide it in the Authorization header as "
                "'Bearer YOUR_KEY'.", code="missing_api_key")  # fmt: skip
        principal: Principal = await self.auth.authenticate(credential.strip())
        return principal

    async def _read_body(self, ctx: Ctx) -> bytes:
        limit = self.config.max_body_bytes
        length = ctx.headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise HttpError(413, f"the request body is larger than {limit} bytes",
                            "request_too_large")  # fmt: skip
        chunks: list[bytes] = []
        size = 0

        async def read() -> None:
            nonlocal size
            while True:
                message = await ctx.receive()
                if message["type"] == "http.disconnect":
                    raise HttpError(400, "the client disconnected", "client_disconnected")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise HttpError(413, f"the request body is larger than {limit} bytes",
                                    "request_too_large")  # fmt: skip
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return

        try:
            async with asyncio.timeout(self.config.body_timeout):
                await read()
        except TimeoutError:
            message = f"the request body did not arrive within {self.config.body_timeout:g}s"
            raise HttpError(408, message, "request_timeout") from None
        return b"".join(chunks)

    def _decode(self, ctx: Ctx, kind: type[Any]) -> Any:
        if not ctx.body:
            raise InvalidRequestError("the request needs a JSON body")
        try:
            return msgspec.json.decode(ctx.body, type=kind)
        except msgspec.ValidationError as exc:
            text = str(exc)
            param = text.rsplit("at `$.", 1)[1].rstrip("`").split(".")[0].split("[")[0] \
                if "at `$." in text else None  # fmt: skip
            raise InvalidRequestError(f"invalid request: {text}", param=param) from None
        except msgspec.DecodeError:
            raise InvalidRequestError("the request body is not valid JSON") from None

    def _route(self, ctx: Ctx, model: str) -> ModelRoute:
        ctx.model = model[:200]
        route = self.registry.resolve(model)
        ctx.model_id = route.id
        assert ctx.principal is not None
        if not (ctx.principal.may_use_model(route.id) or ctx.principal.may_use_model(model)):
            denied = PermissionDeniedError(f"this key may not use model {model!r}",
                                           code="model_not_allowed")  # fmt: skip
            self.metrics.count_auth_failure(denied)
            raise denied
        return route

    async def _admit(self, ctx: Ctx, reserve: int) -> Admission:
        principal = ctx.principal
        assert principal is not None and self.limiter is not None
        key = principal.key_id or principal.user_id
        try:
            return await self.limiter.admit(key, principal.rpm_limit, principal.tpm_limit,
                                            reserve)  # fmt: skip
        except RateLimitError as exc:
            self.metrics.count_rate_limited(exc)
            raise

    # -- generation --------------------------------------------------------------------------

    async def _open(self, route: ModelRoute, make: Callable[[str], pb.GenerateRequest],
                    ctx: Ctx) -> tuple[Any, AsyncIterator[Any], PoolBackend]:  # fmt: skip
        """Start a Generate call on the best pool; fail over to the next pool on a failure
        before the first message. Returns the call, its messages (the first one included)."""
        tried: list[Any] = []
        while True:
            backend, name = self.registry.pick(route, tried)
            if not isinstance(backend, PoolBackend):
                raise InvalidRequestError("mixed pool and upstream backends are not supported")
            backend.breaker.begin()
            backend.in_flight += 1
            call = backend.stub.Generate(make(name), timeout=self.config.request_timeout)
            iterator = call.__aiter__()
            try:
                first = await asyncio.wait_for(iterator.__anext__(),
                                               self.config.first_token_timeout)  # fmt: skip
            except StopAsyncIteration:
                first = None
            except grpc.aio.AioRpcError as exc:
                backend.in_flight -= 1
                if exc.code() in _RETRYABLE:
                    backend.breaker.failure()
                    tried.append(backend)
                    log.warning("%s failed before the first token (%s); %s id=%s",
                                backend.name, exc.code().name,
                                "trying another" if route.candidates(tried) else "giving up",
                                ctx.request_id)  # fmt: skip
                    if route.candidates(tried):
                        self.metrics.failovers.inc()
                        continue
                raise oai.pool_error(exc, backend.name) from None
            except TimeoutError:
                call.cancel()
                backend.in_flight -= 1
                backend.breaker.failure()
                message = (f"{backend.name} produced no token within "
                           f"{self.config.first_token_timeout:g}s")  # fmt: skip
                raise UpstreamTimeoutError(message) from None
            except BaseException:
                call.cancel()
                backend.in_flight -= 1
                raise
            backend.breaker.success()
            return call, _prepend(first, iterator), backend

    async def _generate(self, ctx: Ctx, route: ModelRoute, requests: list[Callable[[str],
                        pb.GenerateRequest]], reserve: int, stream: bool,
                        build: Callable[..., Any]) -> Response | Stream:  # fmt: skip
        admission = await self._admit(ctx, reserve)
        opened: list[tuple[Any, AsyncIterator[Any], PoolBackend]] = []
        usage = oai.Usage()
        settled = False

        async def finish() -> None:
            nonlocal settled
            if settled:
                return
            settled = True
            for _, _, backend in opened:
                backend.in_flight -= 1
            assert self.limiter is not None
            await self.limiter.settle(admission, usage.prompt + usage.completion)
            self.metrics.tokens(ctx.model, usage.prompt, usage.completion)

        def cancel() -> None:
            for call, _, _ in opened:
                call.cancel()

        try:
            for make in requests:
                opened.append(await self._open(route, make, ctx))
        except BaseException:
            cancel()
            await finish()
            raise
        streams = [messages for _, messages, _ in opened]
        if stream:
            return Stream(_guard(build(streams, usage), opened), cancel, admission.headers(),
                          finish)  # fmt: skip
        try:
            body = await self._unless_disconnected(ctx, build(streams, usage))
        except grpc.aio.AioRpcError as exc:
            raise oai.pool_error(exc, opened[0][2].name) from None
        finally:
            cancel()
            await finish()
        return json_response(200, body, admission.headers())

    async def _unless_disconnected(self, ctx: Ctx, work: Awaitable[Any]) -> Any:
        """Await `work`; if the client disconnects first, cancel it (and its backend calls)."""
        task = asyncio.ensure_future(work)

        async def disconnected() -> None:
            while (await ctx.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            self.metrics.disconnects.inc()
            raise HttpError(499, "the client closed the request", "client_closed_request")
        return task.result()

    async def chat(self, ctx: Ctx) -> Response | Stream:
        req: ChatCompletionRequest = self._decode(ctx, ChatCompletionRequest)
        route = self._route(ctx, req.model)
        if route.backends and isinstance(route.backends[0][0], UpstreamBackend):
            return await self._upstream(ctx, route, "/chat/completions", req.stream)
        prompt_chars = sum(len(m.content) if isinstance(m.content, str) else 64
                           for m in req.messages)  # fmt: skip
        max_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_RESERVE_TOKENS
        reserve = prompt_chars // 4 + max_tokens * (req.n or 1)
        request = oai.chat_request(req, route.id, _pool_id(ctx))  # validates before admission

        def make(name: str) -> pb.GenerateRequest:
            request.model = name
            return request

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            def build(streams: list[Any], usage: oai.Usage) -> AsyncIterator[bytes]:
                return oai.chat_chunks(streams[0], model=route.id, include_usage=include_usage,
                                       usage=usage)  # fmt: skip
        else:
            def build(streams: list[Any], usage: oai.Usage) -> Any:  # type: ignore[misc]
                return oai.chat_response(streams[0], model=route.id, usage=usage,
                                         logprobs=bool(req.logprobs))  # fmt: skip
        return await self._generate(ctx, route, [make], reserve, bool(req.stream), build)

    async def completions(self, ctx: Ctx) -> Response | Stream:
        req: CompletionRequest = self._decode(ctx, CompletionRequest)
        route = self._route(ctx, req.model)
        if route.backends and isinstance(route.backends[0][0], UpstreamBackend):
            return await self._upstream(ctx, route, "/completions", req.stream)
        prompts = oai.prompts_of(req)
        if len(prompts) > 64:
            raise InvalidRequestError("at most 64 prompts per request", param="prompt")
        n = req.n or 1
        reserve = sum(len(p) // 4 if isinstance(p, str) else len(p) for p in prompts) + \
            (16 if req.max_tokens is None else req.max_tokens) * n * len(prompts)  # fmt: skip
        requests: list[Callable[[str], pb.GenerateRequest]] = []
        for prompt in prompts:
            request = oai.completion_request(req, prompt, route.id, _pool_id(ctx))

            requests.append(functools.partial(_renamed, request))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            def build(streams: list[Any], usage: oai.Usage) -> AsyncIterator[bytes]:
                return oai.completion_chunks(streams, n=n, model=route.id,
                                             include_usage=include_usage, usage=usage)  # fmt: skip
        else:
            def build(streams: list[Any], usage: oai.Usage) -> Any:  # type: ignore[misc]
                return oai.completion_response(streams, n=n, model=route.id, usage=usage,
                                               logprobs=req.logprobs is not None)  # fmt: skip
        return await self._generate(ctx, route, requests, reserve, bool(req.stream), build)

    # -- the other endpoints -----------------------------------------------------------------

    async def _unary(self, route: ModelRoute, rpc: str, make: Callable[[str], Any]) -> Any:
        tried: list[Any] = []
        while True:
            backend, name = self.registry.pick(route, tried)
            if not isinstance(backend, PoolBackend):
                raise InvalidRequestError(f"{rpc} is not available for model {route.id!r}")
            try:
                reply = await getattr(backend.stub, rpc)(make(name), timeout=60)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _RETRYABLE and route.candidates([*tried, backend]):
                    backend.breaker.failure()
                    tried.append(backend)
                    continue
                raise oai.pool_error(exc, backend.name) from None
            backend.breaker.success()
            return reply

    async def embeddings(self, ctx: Ctx) -> Response | Stream:
        req: EmbeddingRequest = self._decode(ctx, EmbeddingRequest)
        route = self._route(ctx, req.model)
        if route.backends and isinstance(route.backends[0][0], UpstreamBackend):
            return await self._upstream(ctx, route, "/embeddings", False)
        if req.dimensions is not None:
            raise InvalidRequestError("`dimensions` is not supported by this model",
                                      param="dimensions")  # fmt: skip
        inputs = oai.split_inputs(req.input, "input")
        texts = [i for i in inputs if isinstance(i, str)]
        ids = [i for i in inputs if not isinstance(i, str)]
        if len(texts) + len(ids) > 2048:
            raise InvalidRequestError("at most 2048 inputs per request", param="input")
        admission = await self._admit(ctx, sum(len(t) // 4 + 1 for t in texts)
                                      + sum(len(i) for i in ids))  # fmt: skip

        def make(name: str) -> pb.EmbedRequest:
            return pb.EmbedRequest(model=name, texts=texts,
                                   token_ids=[pb.TokenIds(ids=i) for i in ids])  # fmt: skip

        try:
            reply = await self._unary(route, "Embed", make)
        finally:
            assert self.limiter is not None
            await self.limiter.settle(admission, 0)
        data = []
        for i, embedding in enumerate(reply.embeddings):
            values: Any = list(embedding.values)
            if req.encoding_format == "base64":
                values = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
            data.append({"object": "embedding", "index": i, "embedding": values})
        tokens = reply.usage.prompt_tokens
        return json_response(200, {"object": "list", "data": data, "model": route.id,
                                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                             admission.headers())  # fmt: skip

    async def tokenize(self, ctx: Ctx) -> Response | Stream:
        req: TokenizeRequest = self._decode(ctx, TokenizeRequest)
        route = self._route(ctx, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequestError("give `prompt` or `messages`", param="prompt")

        def make(name: str) -> pb.TokenizeRequest:
            if req.prompt is not None:
                return pb.TokenizeRequest(model=name, text=req.prompt,
                                          add_special_tokens=req.add_special_tokens)  # fmt: skip
            assert req.messages is not None
            chat = pb.Chat(messages=[pb.ChatMessage(role=m.role, content=oai._text(m))
                                     for m in req.messages])  # fmt: skip
            return pb.TokenizeRequest(model=name, chat=chat)

        reply = await self._unary(route, "Tokenize", make)
        return json_response(200, {"tokens": list(reply.token_ids), "count": len(reply.token_ids),
                                   "max_model_len": reply.max_model_len})  # fmt: skip

    async def detokenize(self, ctx: Ctx) -> Response | Stream:
        req: DetokenizeRequest = self._decode(ctx, DetokenizeRequest)
        route = self._route(ctx, req.model)
        def make(name: str) -> pb.DetokenizeRequest:
            return pb.DetokenizeRequest(model=name, token_ids=req.tokens)

        reply = await self._unary(route, "Detokenize", make)
        return json_response(200, {"prompt": reply.text})

    def _model_json(self, route: ModelRoute) -> dict[str, Any]:
        return {"id": route.id, "object": "model", "created": route.created,
                "owned_by": "helixflow"}  # fmt: skip

    async def list_models(self, ctx: Ctx) -> Response | Stream:
        assert ctx.principal is not None
        data = [self._model_json(r) for m, r in sorted(self.registry.routes.items())
                if ctx.principal.may_use_model(m)]  # fmt: skip
        return json_response(200, {"object": "list", "data": data})

    async def get_model(self, ctx: Ctx) -> Response | Stream:
        name = ctx.path[len("/v1/models/"):]
        return json_response(200, self._model_json(self._route(ctx, name)))

    # -- upstream OpenAI-compatible APIs -----------------------------------------------------

    async def _upstream(self, ctx: Ctx, route: ModelRoute, path: str,
                        stream: bool | None) -> Response | Stream:  # fmt: skip
        backend, name = self.registry.pick(route)
        assert isinstance(backend, UpstreamBackend) and self.limiter is not None
        payload = ctx.body
        if name != ctx.model:  # the upstream calls the model otherwise: rename it
            body = msgspec.json.decode(ctx.body)
            body["model"] = name
            payload = msgspec.json.encode(body)
        admission = await self._admit(ctx, DEFAULT_RESERVE_TOKENS)
        backend.in_flight += 1
        try:
            response = await backend.post(path, payload)
        except (UpstreamError, TimeoutError) as exc:
            backend.in_flight -= 1
            backend.breaker.failure()
            await self.limiter.settle(admission, 0)
            raise OverloadedError(f"{backend.name} is unavailable ({exc})",
                                  code="backend_unavailable") from None  # fmt: skip
        if response.status >= 500:
            backend.breaker.failure()
        else:
            backend.breaker.success()

        async def finish(used: int = DEFAULT_RESERVE_TOKENS) -> None:
            backend.in_flight -= 1
            response.close()
            assert self.limiter is not None
            await self.limiter.settle(admission, used)

        if stream and response.status == 200:
            return Stream(_upstream_chunks(response, backend.name), lambda: None,
                          admission.headers(), finish)  # fmt: skip
        try:
            content = await response.read()
        except (UpstreamError, TimeoutError) as exc:
            await finish(0)
            raise OverloadedError(f"{backend.name} broke off its answer ({exc})",
                                  code="backend_unavailable") from None  # fmt: skip
        used = DEFAULT_RESERVE_TOKENS
        with contextlib.suppress(Exception):
            used = int(msgspec.json.decode(content)["usage"]["total_tokens"])
        await finish(used)
        status = response.status if response.status < 500 else 502
        return Response(status, content, [_JSON, *admission.headers()])

    # -- operations --------------------------------------------------------------------------

    async def health(self, ctx: Ctx) -> Response | Stream:
        return json_response(200, {"status": "ok"})

    async def ready(self, ctx: Ctx) -> Response | Stream:
        models = self.registry.ready()
        auth_ok = self.auth is None or self.auth.stream_healthy
        ok = auth_ok and bool(models) and all(models.values()) and not self.draining
        return json_response(200 if ok else 503, {"status": "ready" if ok else "not ready",
                                                  "auth": auth_ok, "models": models})  # fmt: skip

    async def prometheus(self, ctx: Ctx) -> Response | Stream:
        body, content_type = self.metrics.render(self.registry)
        return Response(200, body, [(b"content-type", content_type.encode())])

    async def openapi(self, ctx: Ctx) -> Response | Stream:
        from helixflow.gateway.openapi import document

        return json_response(200, document())


async def _upstream_chunks(response: UpstreamResponse, name: str) -> AsyncIterator[bytes]:
    """An upstream's SSE body as it arrives; a broken upstream ends the stream with an error."""
    try:
        async for chunk in response.chunks():
            yield chunk
    except (UpstreamError, TimeoutError) as exc:
        raise OverloadedError(f"{name} broke off its stream ({exc})",
                              code="backend_unavailable") from None  # fmt: skip


_ID_PREFIX = secrets.token_hex(6)  # per process: ids stay unique across workers and restarts
_REQUESTS = itertools.count(1)
_POOL_CALLS = itertools.count(1)


def _new_request_id() -> str:
    """A unique request id without a syscall (uuid4 reads os.urandom on every call)."""
    return f"{_ID_PREFIX}{next(_REQUESTS):010x}"


def _pool_id(ctx: Ctx) -> str:
    """A request id for the pool: the client's x-request-id (for tracing) made unique (a
    client may reuse one, and one request may make several pool calls)."""
    return f"{ctx.request_id}.{next(_POOL_CALLS):x}"


def _renamed(request: pb.GenerateRequest, name: str) -> pb.GenerateRequest:
    request.model = name
    return request


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is not None:
        yield first
    async for item in rest:
        yield item


Opened = list[tuple[Any, AsyncIterator[Any], PoolBackend]]


async def _guard(chunks: AsyncIterator[bytes], opened: Opened) -> AsyncIterator[bytes]:
    """Turn a pool failure mid-stream into a HelixFlowError the stream writer reports."""
    try:
        async for chunk in chunks:
            yield chunk
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED:
            return
        raise oai.pool_error(exc, opened[0][2].name) from None
