"""Where requests go: inference pools (gRPC) and upstream OpenAI-compatible APIs (HTTP), each
behind a circuit breaker, and the model registry that routes a model to its backends.

A pool reports its load (`Load`: waiting and running requests, KV-cache use) every second;
the router sends a request to the least loaded healthy pool of its model, counting what this
gateway already has in flight there. A backend that fails `failures` times in a row is skipped
for `cooldown` seconds, then one trial request decides whether it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from helixflow._proto import inference_pb2 as pb
from helixflow._proto import inference_pb2_grpc as pb_grpc
from helixflow.errors import ConfigError, NotFoundError, OverloadedError
from helixflow.gateway.config import GatewayConfig
from helixflow.gateway.upstream_http import UpstreamClient, UpstreamResponse

if TYPE_CHECKING:
    from helixflow.discovery import PoolDirectory

__all__ = ["CircuitBreaker", "ModelRoute", "PoolBackend", "Registry", "UpstreamBackend"]

log = logging.getLogger("helixflow.gateway")

LOAD_INTERVAL_S = 1.0


class CircuitBreaker:
    """Closed → open after `failures` consecutive failures → half-open after `cooldown` s
    (one trial at a time) → closed on a success."""

    def __init__(self, failures: int = 3, cooldown: float = 5.0) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self._count = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half-open" if time.monotonic() - self._opened_at >= self.cooldown else "open"

    def allows(self) -> bool:
        state = self.state
        return state == "closed" or (state == "half-open" and not self._trial)

    def begin(self) -> None:
        if self.state == "half-open":
            self._trial = True

    def success(self) -> None:
        self._count = 0
        self._opened_at = None
        self._trial = False

    def failure(self) -> None:
        self._count += 1
        self._trial = False
        if self._count >= self.failures or self._opened_at is not None:
            if self._opened_at is None:
                log.warning("circuit opened after %d failures", self._count)
            self._opened_at = time.monotonic()


@dataclass(frozen=True)
class PoolTls:
    """How the gateway reaches a pool over TLS: the CA that signed the pool's certificate and,
    for a pool that requires client certificates (mTLS), the gateway's own pair."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(option: str, path: str | None) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"{option}: cannot read {path} ({exc.strerror})") from None

        if (self.cert is None) != (self.key is None):
            raise ConfigError("pool TLS: give the client certificate and its key together")
        return grpc.ssl_channel_credentials(root_certificates=read("tls_ca", self.ca),
                                            private_key=read("tls_key", self.key),
                                            certificate_chain=read("tls_cert", self.cert))


class PoolBackend:
    """One inference pool: a gRPC channel, its models and its last reported load."""

    kind = "pool"

    def __init__(self, target: str, *, tls: PoolTls | None = None) -> None:
        self.target = target
        # NOTE: gRPC's reconnect back-off grows to two minutes by default: a pool that comes
        # back would wait that long to rejoin. One second keeps the rejoin prompt.
        options = [("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
                   ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                   ("grpc.initial_reconnect_backoff_ms", 250),
                   ("grpc.min_reconnect_backoff_ms", 250),
                   ("grpc.max_reconnect_backoff_ms", 1000)]  # fmt: skip
        if tls is None or (tls.ca is None and tls.cert is None):
            self.channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self.channel = grpc.aio.secure_channel(target, tls.credentials(), options=options)
        self.stub: Any = pb_grpc.InferencePoolStub(self.channel)  # type: ignore[no-untyped-call]
        self.breaker = CircuitBreaker()
        self.models: dict[str, pb.ModelInfo] = {}
        self.load: dict[str, pb.ModelLoad] = {}
        self.draining = False
        self.reachable = False
        self.in_flight = 0

    @property
    def name(self) -> str:
        return f"pool {self.target}"

    def healthy(self) -> bool:
        return self.reachable and not self.draining and self.breaker.allows()

    def score(self, model: str) -> float:
        """Lower is better: queued + running work, ours in flight, and KV-cache pressure."""
        load = self.load.get(model)
        base = 0.0 if load is None else load.waiting * 2 + load.running + 4 * load.kv_cache_usage
        return base + self.in_flight

    async def refresh(self) -> None:
        """Ask the pool for its models and load (the health probe)."""
        try:
            models = await self.stub.ListModels(pb.ListModelsRequest(), timeout=2)
            load = await self.stub.Load(pb.LoadRequest(), timeout=2)
        except grpc.aio.AioRpcError as exc:
            if self.reachable:
                log.warning("%s unreachable: %s", self.name, exc.code().name)
            self.reachable = False
            return
        if not self.reachable:
            log.info("%s reachable: %s", self.name, ", ".join(m.id for m in models.models))
        self.models = {m.id: m for m in models.models}
        self.load = {m.model: m for m in load.models}
        self.draining = load.draining
        self.reachable = True

    async def close(self) -> None:
        await self.channel.close()


class UpstreamBackend:
    """An OpenAI-compatible API (``base_url`` like ``https://api.openai.com/v1``)."""

    kind = "openai"

    def __init__(self, base_url: str, api_key: str | None, *, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {} if not api_key else {"authorization": f"Bearer {api_key}"}
        self.client = UpstreamClient(self.base_url, headers=headers, timeout=timeout)
        self.breaker = CircuitBreaker()
        self.in_flight = 0
        self.reachable = True

    @property
    def name(self) -> str:
        return f"upstream {self.base_url}"

    def healthy(self) -> bool:
        return self.breaker.allows()

    def score(self, model: str) -> float:
        return float(self.in_flight)

    async def refresh(self) -> None:
        return None

    async def post(self, path: str, body: bytes) -> UpstreamResponse:
        """POST JSON `body` to `path`; the response's body is not read yet (close it)."""
        return await self.client.request("POST", path, body)

    async def close(self) -> None:
        await self.client.aclose()


Backend = PoolBackend | UpstreamBackend


class ModelRoute:
    """A model id, its aliases and its backends (with each upstream's name for the model)."""

    def __init__(self, model_id: str, kind: str = "chat") -> None:
        self.id = model_id
        self.kind = kind
        self.backends: list[tuple[Backend, str]] = []
        self.created = int(time.time())

    def candidates(self, exclude: Sequence[Backend] = ()) -> list[tuple[Backend, str]]:
        """Healthy backends not yet tried, least loaded first."""
        live = [(b, name) for b, name in self.backends
                if b not in exclude and b.healthy()
                and (b.kind != "pool" or name in b.models)]  # type: ignore[union-attr]  # fmt: skip
        return sorted(live, key=lambda pair: pair[0].score(pair[1]))


class Registry:
    """Model ids and aliases → routes; keeps the pools' health and load current."""

    def __init__(self, config: GatewayConfig, env: dict[str, str]) -> None:
        self.config = config
        self._pools: dict[str, PoolBackend] = {}
        self._upstreams: list[UpstreamBackend] = []
        self.routes: dict[str, ModelRoute] = {}
        self.aliases: dict[str, str] = {}
        self._discover = not config.models
        # Pools named by address (and found in the registry) share the gateway-wide TLS.
        self._pool_tls = PoolTls(config.pool_tls_ca, config.pool_tls_cert, config.pool_tls_key)
        for url in config.pool_urls if self._discover else ():
            self._pool(url, self._pool_tls)
        for model in config.models:
            route = self.routes.setdefault(model.id, ModelRoute(model.id))
            for alias in model.aliases:
                self.aliases[alias] = model.id
            for backend in model.backends:
                if backend.pool is not None:
                    tls = PoolTls(backend.tls_ca, backend.tls_cert, backend.tls_key)
                    route.backends.append((self._pool(backend.pool, tls),
                                           backend.model or model.id))  # fmt: skip
                else:
                    assert backend.openai is not None
                    key = env.get(backend.api_key_env) if backend.api_key_env else None
                    upstream = UpstreamBackend(backend.openai, key,
                                               timeout=config.request_timeout)  # fmt: skip
                    self._upstreams.append(upstream)
                    route.backends.append((upstream, backend.model or model.id))
        self._task: asyncio.Task[None] | None = None
        self._static = set(self._pools)  # given by address: never removed
        self._directory: PoolDirectory | None = None
        self._closing: set[asyncio.Task[None]] = set()
        if config.discover_pools and config.redis_url:
            from helixflow.discovery import PoolDirectory

            self._directory = PoolDirectory(config.redis_url)

    def _pool(self, target: str, tls: PoolTls) -> PoolBackend:
        if target not in self._pools:
            self._pools[target] = PoolBackend(target, tls=tls)
        return self._pools[target]

    @property
    def backends(self) -> list[Backend]:
        return [*self._pools.values(), *self._upstreams]

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._watch())

    async def _discover_pools(self) -> None:
        """Add the pools registered in Redis, drop those whose registration ended."""
        assert self._directory is not None
        registered = await self._directory.pools()
        if registered is None:  # Redis unreadable: keep routing to what we know
            return
        for address in registered.keys() - self._pools.keys():
            log.info("pool registry: found pool %s", address)
            self._pool(address, self._pool_tls)
        for address in self._pools.keys() - registered.keys() - self._static:
            pool = self._pools.pop(address)
            log.info("pool registry: pool %s left", address)
            for route in self.routes.values():
                route.backends = [(b, n) for b, n in route.backends if b is not pool]
            task = asyncio.get_running_loop().create_task(_close_when_idle(pool))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def refresh(self) -> None:
        if self._directory is not None:
            await self._discover_pools()
        await asyncio.gather(*(pool.refresh() for pool in self._pools.values()))
        for pool in self._pools.values():
            for info in pool.models.values():
                if self._discover:
                    route = self.routes.setdefault(info.id, ModelRoute(info.id, info.kind))
                    if all(b is not pool for b, _ in route.backends):
                        route.backends.append((pool, info.id))
                known = self.routes.get(info.id) or self.routes.get(self.aliases.get(info.id, ""))
                if known is not None:
                    known.kind = info.kind or known.kind

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(LOAD_INTERVAL_S)
            try:
                await self.refresh()
            except Exception:  # a probe must never kill the watcher
                log.exception("backend refresh failed")

    def resolve(self, name: str) -> ModelRoute:
        """The route of a model id or alias; NotFoundError in OpenAI's words."""
        route = self.routes.get(name) or self.routes.get(self.aliases.get(name, ""))
        if route is None:
            raise NotFoundError(f"The model `{name}` does not exist or you do not have access "
                                "to it.", param="model", code="model_not_found")  # fmt: skip
        return route

    def ready(self) -> dict[str, bool]:
        """Per model: has it at least one healthy backend?"""
        return {m: bool(r.candidates()) for m, r in self.routes.items()}

    def pick(self, route: ModelRoute, exclude: Sequence[Backend] = ()) -> tuple[Backend, str]:
        candidates = route.candidates(exclude)
        if not candidates:
            raise OverloadedError(f"no healthy backend for model {route.id!r}; retry later",
                                  code="no_backend")  # fmt: skip
        return candidates[0]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(b.close() for b in self.backends), return_exceptions=True)
        if self._directory is not None:
            await self._directory.close()


async def _close_when_idle(pool: PoolBackend, timeout: float = 600.0) -> None:
    """Close a pool that left the registry once its requests here are done."""
    deadline = time.monotonic() + timeout
    while pool.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    await pool.close()
