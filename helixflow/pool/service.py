"""``helixflow pool``: the inference pool's gRPC service (``protos/inference.proto``).

One process serves one or more models: chat models, each an ``LLMEngine`` stepped on its own
thread behind an ``AsyncLLMEngine``, and embedding models (``Embedder``, run on worker threads).
The gRPC server is ``grpc.aio`` on the event loop: network I/O never waits on a step, and a step
never waits on a client (outputs are handed to each stream's queue).

- Admission control: a chat model admits at most ``max_waiting_requests`` requests that have not
  produced their first token yet, holding at most ``max_waiting_prompt_tokens`` prompt tokens;
  beyond that RESOURCE_EXHAUSTED at once (the request count is checked before tokenizing).
- Cancellation: a cancelled RPC (client gone, deadline) closes its stream, which aborts the
  request in the engine; its KV blocks are free at the engine's next drain.
- Health (``grpc.health.v1``, service "" and "helixflow.inference.v1.InferencePool"): SERVING
  while every engine is alive and making progress; NOT_SERVING when an engine has died, has had
  work but finished no step for ``stall_timeout`` seconds, or the pool is draining.
- SIGTERM / SIGINT: drain. New requests get UNAVAILABLE, in-flight ones finish (up to
  ``shutdown_timeout`` seconds, then they are cancelled), and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from helixflow._proto import inference_pb2 as pb
from helixflow._proto import inference_pb2_grpc as pb_grpc
from helixflow.errors import ConfigError, HelixFlowError, InvalidRequestError
from helixflow.pool.async_engine import AsyncLLMEngine
from helixflow.pool.embedder import Embedder, build_embedder
from helixflow.pool.llm_engine import RequestOutput
from helixflow.pool.metrics import PoolMetrics
from helixflow.pool.models.loader import load_model_files
from helixflow.pool.models.tokenizer import Tokenizer
from helixflow.pool.runner import EngineOptions, build_engine
from helixflow.pool.sampling_params import SamplingParams

log = logging.getLogger("helixflow.pool.service")

SERVICE_NAME = "helixflow.inference.v1.InferencePool"
_STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


@dataclass(frozen=True)
class PoolOptions:
    """What ``helixflow pool`` serves and how; every field has a default."""

    host: str = "127.0.0.1"
    port: int = 50051
    chat_models: tuple[str, ...] = ("SmolLM2-135M-Instruct",)
    embedding_models: tuple[str, ...] = ("all-MiniLM-L6-v2",)
    engine: EngineOptions = field(default_factory=EngineOptions)
    max_waiting_requests: int = 256
    max_waiting_prompt_tokens: int = 262_144
    shutdown_timeout: float = 30.0
    stall_timeout: float = 10.0
    # testing aid: SIGUSR1 stalls every engine for FAULT_STALL_SECONDS, SIGUSR2 kills them
    fault_injection: bool = False
    # TLS: certificate chain and key (PEM); with a client CA, clients must present a
    # certificate it signed (mTLS). Plaintext when no certificate is given.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    metrics_port: int | None = None  # Prometheus over HTTP; None: port + 1, 0: off
    register_url: str | None = None  # Redis of the pool registry (helixflow.discovery)
    advertise: str | None = None  # the address registered; None: host:port


@dataclass
class ChatModel:
    """A chat model being served, and its admission counters."""

    model_id: str
    front: AsyncLLMEngine
    tokenizer: Tokenizer
    max_model_len: int
    waiting: int = 0  # admitted requests without their first token yet
    waiting_tokens: int = 0


@dataclass
class EmbeddingModel:
    model_id: str
    embedder: Embedder
    max_length: int


def _model_id(name: str) -> str:
    """The id clients use: a known model's name, or a path's last component."""
    return name.rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf")


def load_models(opts: PoolOptions) -> tuple[dict[str, ChatModel], dict[str, EmbeddingModel]]:
    """Load every configured model (pulling known ones on first use)."""
    chats: dict[str, ChatModel] = {}
    for name in opts.chat_models:
        engine = build_engine(load_model_files(name), opts.engine)
        tok = engine.tokenizer
        assert isinstance(tok, Tokenizer)
        chats[_model_id(name)] = ChatModel(
            _model_id(name), AsyncLLMEngine(engine), tok, engine.max_model_len
        )
    embeds: dict[str, EmbeddingModel] = {}
    for name in opts.embedding_models:
        embedder = build_embedder(name, device=opts.engine.device)
        embeds[_model_id(name)] = EmbeddingModel(_model_id(name), embedder, embedder.max_model_len)
    return chats, embeds


def _params(p: pb.SamplingParams) -> SamplingParams:
    """Proto sampling parameters -> ``SamplingParams`` (InvalidRequestError names the field)."""
    given: dict[str, Any] = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "n", "max_tokens",
                 "min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty",
                 "top_logprobs"):  # fmt: skip
        if p.HasField(name):
            given[name] = getattr(p, name)
    return SamplingParams(
        **given, stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos, logprobs=p.logprobs,
        logit_bias=dict(p.logit_bias) or None,
    )  # fmt: skip


class PoolServicer(pb_grpc.InferencePoolServicer):
    """The RPCs of ``InferencePool`` over the loaded models."""

    def __init__(
        self, chats: dict[str, ChatModel], embeds: dict[str, EmbeddingModel], opts: PoolOptions
    ) -> None:
        self.chats = chats
        self.embeds = embeds
        self.opts = opts
        self.metrics = PoolMetrics(lambda: {m: c.front.load for m, c in chats.items()})
        self.draining = False
        self.in_flight = 0

    # ---- helpers ----------------------------------------------------------------------------
    async def _fail(
        self, context: grpc.aio.ServicerContext, err: HelixFlowError, model: str, rpc: str
    ) -> NoReturn:
        code = _STATUS_CODES.get(err.status, grpc.StatusCode.INTERNAL)
        self.metrics.requests.labels(model, rpc, code.name.lower()).inc()
        message = err.message
        if err.param and not message.startswith("'"):
            message = f"'{err.param}': {message}"  # every INVALID_ARGUMENT names its field
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    async def _chat(self, model: str, context: grpc.aio.ServicerContext) -> ChatModel:
        chat = self.chats.get(model)
        if chat is None:
            known = ", ".join(sorted(self.chats)) or "none"
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"model {model!r} is not served here (chat: {known})"
            )
        assert chat is not None
        return chat

    def _prompt(self, chat: ChatModel, request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind == "chat":
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            if not messages:
                raise InvalidRequestError("'messages' must not be empty", param="messages")
            return chat.tokenizer.encode_chat(messages)
        if kind == "prompt":
            return chat.tokenizer.encode(request.prompt)
        if kind == "prompt_token_ids":
            return list(request.prompt_token_ids.ids)
        raise InvalidRequestError("one of 'chat', 'prompt' or 'prompt_token_ids' is required",
                                  param="input")  # fmt: skip

    # ---- RPCs -------------------------------------------------------------------------------
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        chat = await self._chat(request.model, context)
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the pool is shutting down")
        opts = self.opts
        if chat.waiting >= opts.max_waiting_requests:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{chat.waiting} requests are already waiting; retry later",
            )
        try:
            params = _params(request.params)
            prompt = self._prompt(chat, request)
        except HelixFlowError as err:
            await self._fail(context, err, chat.model_id, "Generate")
        if chat.waiting_tokens + len(prompt) > opts.max_waiting_prompt_tokens and chat.waiting:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                "too many prompt tokens are waiting; retry later")  # fmt: skip
        request_id = request.request_id or uuid.uuid4().hex
        chat.waiting += 1
        chat.waiting_tokens += len(prompt)
        self.in_flight += 1
        m, model = self.metrics, chat.model_id
        started = last = time.monotonic()
        first = True
        completion_tokens: dict[int, int] = {}
        outcome = "cancelled"
        try:
            async for out in chat.front.generate(request_id, prompt, params):
                now = time.monotonic()
                if first:
                    first = False
                    chat.waiting -= 1
                    chat.waiting_tokens -= len(prompt)
                    m.ttft.labels(model).observe(now - started)
                    m.prompt_tokens.labels(model).inc(len(prompt))
                else:
                    m.itl.labels(model).observe(now - last)
                last = now
                m.generation_tokens.labels(model).inc(len(out.new_token_ids))
                completion_tokens[out.index] = out.num_output_tokens
                yield self._response(chat, out, completion_tokens)
            outcome = "ok"
            log.info("generated %d prompt + %d completion tokens in %.2fs", len(prompt),
                     sum(completion_tokens.values()), time.monotonic() - started,
                     extra={"request_id": request_id})  # fmt: skip
        except HelixFlowError as err:
            outcome = "error"
            log.warning("failed: %s", err.message, extra={"request_id": request_id})
            await self._fail(context, err, model, "Generate")
        finally:
            if outcome == "cancelled":
                log.info("cancelled by the client", extra={"request_id": request_id})
            if first:
                chat.waiting -= 1
                chat.waiting_tokens -= len(prompt)
            self.in_flight -= 1
            if outcome != "error":  # (_fail counted it under its status code)
                m.requests.labels(model, "Generate", outcome).inc()
            m.latency.labels(model, "Generate").observe(time.monotonic() - started)

    def _response(
        self, chat: ChatModel, out: RequestOutput, completion: dict[int, int]
    ) -> pb.GenerateResponse:
        tok = chat.tokenizer
        msg = pb.GenerateResponse(
            index=out.index, text=out.new_text, token_ids=out.new_token_ids,
            finished=out.finished, finish_reason=out.finish_reason or "",
        )  # fmt: skip
        for lp in out.logprobs:
            msg.logprobs.append(pb.TokenLogprob(
                token_id=lp.token_id, logprob=lp.logprob, token=tok.token_text(lp.token_id),
                top=[pb.TopLogprob(token_id=t, logprob=v, token=tok.token_text(t))
                     for t, v in lp.top],
            ))  # fmt: skip
        if out.request_finished:
            msg.usage.prompt_tokens = out.num_prompt_tokens
            msg.usage.completion_tokens = sum(completion.values())
        return msg

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        model = self.embeds.get(request.model)
        if model is None:
            known = ", ".join(sorted(self.embeds)) or "none"
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model {request.model!r} is not served here (embedding: {known})",
            )
        assert model is not None
        if request.texts and request.token_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "'input': give texts or token ids, not both")  # fmt: skip
        inputs: list[str | list[int]] = list(request.texts) or [
            list(t.ids) for t in request.token_ids
        ]
        started = time.monotonic()
        try:
            result = await asyncio.to_thread(model.embedder.embed, inputs,
                                             truncate=request.truncate)  # fmt: skip
        except HelixFlowError as err:
            await self._fail(context, err, model.model_id, "Embed")
        self.metrics.requests.labels(model.model_id, "Embed", "ok").inc()
        self.metrics.prompt_tokens.labels(model.model_id).inc(result.num_prompt_tokens)
        self.metrics.latency.labels(model.model_id, "Embed").observe(time.monotonic() - started)
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=row) for row in result.embeddings.tolist()],
            usage=pb.Usage(prompt_tokens=result.num_prompt_tokens),
        )

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        chat = await self._chat(request.model, context)
        if request.WhichOneof("input") == "chat":
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            ids = chat.tokenizer.encode_chat(messages)
        else:
            ids = chat.tokenizer.encode(request.text,
                                        add_special_tokens=request.add_special_tokens)  # fmt: skip
        return pb.TokenizeResponse(token_ids=ids, max_model_len=chat.max_model_len)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        chat = await self._chat(request.model, context)
        vocab = chat.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in request.token_ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"'token_ids' must be in [0, {vocab})")  # fmt: skip
        text = chat.tokenizer.decode(list(request.token_ids),
                                     skip_special_tokens=request.skip_special_tokens)  # fmt: skip
        return pb.DetokenizeResponse(text=text)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models = [pb.ModelInfo(id=c.model_id, context_length=c.max_model_len, kind="chat",
                               owned_by="helixflow") for c in self.chats.values()]  # fmt: skip
        models += [pb.ModelInfo(id=e.model_id, context_length=e.max_length, kind="embedding",
                                owned_by="helixflow") for e in self.embeds.values()]  # fmt: skip
        return pb.ListModelsResponse(models=models)

    async def Load(
        self, request: pb.LoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadResponse:
        models = []
        for c in self.chats.values():
            load = c.front.load
            models.append(pb.ModelLoad(
                model=c.model_id, waiting=load.waiting, running=load.running,
                kv_cache_usage=load.kv_cache_usage, kv_cache_free_blocks=load.kv_cache_free_blocks,
                tokens_per_second=load.tokens_per_second,
            ))  # fmt: skip
        return pb.LoadResponse(models=models, draining=self.draining)

    def registry_record(self) -> dict[str, Any]:
        """What the pool registry holds for this pool (helixflow.discovery)."""
        load = {c.model_id: {"running": c.front.load.running, "waiting": c.front.load.waiting,
                             "kv_cache_usage": c.front.load.kv_cache_usage}
                for c in self.chats.values()}  # fmt: skip
        return {"models": [*self.chats, *self.embeds], "load": load, "draining": self.draining,
                "serving": self.serving()}  # fmt: skip

    # ---- health -----------------------------------------------------------------------------
    def serving(self) -> bool:
        """Every engine alive and making progress, and not draining."""
        if self.draining:
            return False
        now = time.monotonic()
        for c in self.chats.values():
            if not c.front.healthy:
                return False
            if c.front.num_streams and now - c.front.last_progress > self.opts.stall_timeout:
                return False
        return True


def server_credentials(opts: PoolOptions) -> grpc.ServerCredentials | None:
    """TLS credentials from the PEM files of ``opts`` (None: plaintext); ConfigError if the
    files are missing, unreadable or only half given."""
    if opts.tls_cert is None and opts.tls_key is None:
        if opts.tls_client_ca is not None:
            raise ConfigError("tls_client_ca: needs tls_cert and tls_key (mTLS is TLS first)")
        return None
    if opts.tls_cert is None or opts.tls_key is None:
        raise ConfigError("tls_cert and tls_key: give both or neither")

    def read(option: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{option}: cannot read {path} ({exc.strerror})") from None

    pair = (read("tls_key", opts.tls_key), read("tls_cert", opts.tls_cert))
    if opts.tls_client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=read("tls_client_ca", opts.tls_client_ca),
        require_client_auth=True,
    )  # fmt: skip


async def serve(opts: PoolOptions, *, ready: asyncio.Event | None = None) -> int:
    """Load the models, serve until SIGTERM/SIGINT, drain, and return the exit code (0)."""
    credentials = server_credentials(opts)  # bad TLS files fail before any model loads
    chats, embeds = await asyncio.to_thread(load_models, opts)
    servicer = PoolServicer(chats, embeds, opts)
    server = grpc.aio.server()
    pb_grpc.add_InferencePoolServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{opts.host}:{opts.port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpc raises for an address in use
        bound = 0
    if bound == 0:
        for c in chats.values():
            c.front.shutdown()
        raise OSError(f"cannot listen on {address} (in use, or not an address of this host)")
    await server.start()
    metrics_port = opts.port + 1 if opts.metrics_port is None else opts.metrics_port
    if metrics_port:
        try:
            start_http_server(metrics_port, addr=opts.host, registry=servicer.metrics.registry)
        except OSError as exc:
            await server.stop(None)
            for c in chats.values():
                c.front.shutdown()
            raise OSError(f"metrics: cannot listen on {opts.host}:{metrics_port} "
                          f"({exc.strerror})") from None  # fmt: skip
        log.info("Prometheus metrics on http://%s:%d/metrics", opts.host, metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if opts.fault_injection:
        log.warning("fault injection is on: SIGUSR1 stalls the engines, SIGUSR2 kills them")
        for sig, kind in ((signal.SIGUSR1, "stall"), (signal.SIGUSR2, "fail")):
            loop.add_signal_handler(sig, _inject, chats, kind)

    async def watch_health() -> None:
        last: bool | None = None
        while True:
            now = servicer.serving()
            if now != last:
                status = (health_pb2.HealthCheckResponse.SERVING if now
                          else health_pb2.HealthCheckResponse.NOT_SERVING)  # fmt: skip
                for name in ("", SERVICE_NAME):
                    await health_servicer.set(name, status)
                if last is not None:
                    log.warning("health: %s", "SERVING" if now else "NOT_SERVING")
                last = now
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch_health())
    announcer = None
    if opts.register_url:
        from helixflow.discovery import PoolAnnouncer

        announcer = PoolAnnouncer(opts.register_url, advertised_address(opts),
                                  lambda: servicer.registry_record())  # fmt: skip
        await announcer.start()
    names = ", ".join([*chats, *embeds])
    log.info("inference pool serving %s on %s", names, address)
    print(f"helixflow pool: serving {names} on {address}", flush=True)
    if ready is not None:
        ready.set()
    await stop.wait()
    servicer.draining = True
    if announcer is not None:  # out of the registry first: gateways send no new work
        await announcer.close()
    log.info("draining: %d requests in flight", servicer.in_flight)
    deadline = time.monotonic() + opts.shutdown_timeout
    while servicer.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await server.stop(grace=0.5)
    watcher.cancel()
    for c in chats.values():
        c.front.shutdown()
    log.info("stopped")
    return 0


def advertised_address(opts: PoolOptions) -> str:
    """What the pool registers: `advertise`, else host:port (this host's address for a
    wildcard host)."""
    if opts.advertise:
        return opts.advertise
    host = opts.host
    if host in ("0.0.0.0", "::", ""):
        import socket

        host = socket.gethostbyname(socket.gethostname())
    return f"{host}:{opts.port}"


FAULT_STALL_SECONDS = 5.0


def _inject(chats: dict[str, ChatModel], kind: str) -> None:
    log.warning("injecting an engine %s", kind)
    for c in chats.values():
        c.front.inject_fault(kind, FAULT_STALL_SECONDS)


def options_from_args(args: Any, env: Mapping[str, str]) -> PoolOptions:
    """PoolOptions from ``helixflow pool`` flags, falling back on PORT, TLS_CERT, TLS_KEY."""
    embeds: Sequence[str] = args.embedding_models or ("all-MiniLM-L6-v2",)
    port = args.port
    if port is None:
        try:
            port = int(env.get("PORT") or 50051)
        except ValueError:
            raise ConfigError(f"PORT: must be a port number, got {env['PORT']!r}") from None
    return PoolOptions(
        host=args.host,
        port=port,
        chat_models=tuple(args.models or ("SmolLM2-135M-Instruct",)),
        embedding_models=tuple(e for e in embeds if e != "none"),
        engine=EngineOptions(device=args.device, max_model_len=args.max_model_len,
                             num_blocks=args.num_blocks, max_num_seqs=args.max_num_seqs),
        max_waiting_requests=args.max_waiting_requests,
        shutdown_timeout=args.shutdown_timeout,
        stall_timeout=args.stall_timeout,
        fault_injection=args.fault_injection,
        tls_cert=args.tls_cert or env.get("TLS_CERT") or None,
        tls_key=args.tls_key or env.get("TLS_KEY") or None,
        tls_client_ca=args.tls_client_ca,
        metrics_port=args.metrics_port,
        register_url=args.register or env.get("HELIXFLOW_REGISTER") or None,
        advertise=args.advertise or env.get("HELIXFLOW_ADVERTISE") or None,
    )  # fmt: skip
