"""``helixflow auth``: the auth service process (gRPC :8081 for gateways, HTTP :8082).

One process, one asyncio loop: the grpc.aio server (`AuthServicer`: API key and token
validation, the revocation stream, the JWKS) and the HTTP API (`AuthHttpApp`, served by granian
embedded in the same loop), both over one `AuthCore`. Background tasks poll the store for
revocations and signing keys written by other processes (the admin CLI, other replicas), send
heartbeats down every revocation stream, and, with `REDIS_URL`, relay revocations between
replicas over Redis pub/sub.

Configuration: flags, else the environment of the original scripts: `PORT` (gRPC), `HTTP_PORT`,
`DATABASE_TYPE` (sqlite|postgres), `DATABASE_PATH`, `DATABASE_URL`, `REDIS_URL`, `TLS_CERT`,
`TLS_KEY`; the master key that encrypts the signing keys at rest comes from
`HELIXFLOW_MASTER_KEY` (base64url) or the file named by `HELIXFLOW_MASTER_KEY_FILE`. With SQLite
and neither set, a key file is made next to the database (mode 0600).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from helixflow._proto import auth_pb2 as pb
from helixflow._proto import auth_pb2_grpc as pb_grpc
from helixflow.auth.core import AuthCore, AuthSettings
from helixflow.auth.metrics import AuthMetrics
from helixflow.auth.principal import Principal
from helixflow.auth.revocations import RevocationEvent
from helixflow.auth.signing_keys import generate_master_key, load_master_key
from helixflow.auth.store import Store, open_store
from helixflow.auth.throttle import RedisLoginThrottle
from helixflow.errors import AuthenticationError, ConfigError

__all__ = ["AuthOptions", "AuthServicer", "RevocationHub", "options_from_env", "serve"]

log = logging.getLogger("helixflow.auth")

SERVICE_NAME: Final = "helixflow.auth.v1.Auth"
REDIS_CHANNEL: Final = "helixflow:auth:revocations"
HEARTBEAT_S: Final = 2.0
POLL_REVOCATIONS_S: Final = 1.0
POLL_KEYS_S: Final = 10.0
SUBSCRIBER_QUEUE: Final = 10_000
MAX_SUBSCRIBERS: Final = 1024
KEYS_ROTATED: Final = "keys_rotated"
CLOSE: Final = "close"


@dataclasses.dataclass(frozen=True)
class AuthOptions:
    """Everything `serve` needs; built from flags and the environment by `options_from_env`."""

    host: str = "127.0.0.1"
    grpc_port: int = 8081
    http_port: int = 8082
    database_type: str = "sqlite"
    database_path: str | None = None
    database_url: str | None = None
    redis_url: str | None = None
    master_key: bytes = b""
    tls_cert: str | None = None
    tls_key: str | None = None
    settings: AuthSettings = dataclasses.field(default_factory=AuthSettings)


def helixflow_home(env: Mapping[str, str]) -> Path:
    """``$HELIXFLOW_HOME`` (default ``~/.cache/helixflow``)."""
    home = env.get("HELIXFLOW_HOME")
    return Path(home) if home else Path.home() / ".cache" / "helixflow"


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name)
    if not text:
        return default
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"{name}: must be a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name}: must be a port number, got {text!r}")
    return port


def _seconds(args: Any, env: Mapping[str, str], flag: str, name: str, default: float) -> float:
    value = getattr(args, flag, None)
    if value is not None:
        return float(value)
    text = env.get(name)
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{name}: must be a number of seconds, got {text!r}") from None


def resolve_master_key(
    env: Mapping[str, str], *, database_type: str, database_path: str | None
) -> bytes:
    """The master key from HELIXFLOW_MASTER_KEY or HELIXFLOW_MASTER_KEY_FILE.

    With SQLite and neither set, ``<database>.master-key`` next to the database file is read,
    or made (0600) on first use: the embedded mode needs no set-up. With PostgreSQL every
    replica must share one key, so it must be given.
    """
    text = env.get("HELIXFLOW_MASTER_KEY")
    if text:
        return load_master_key(text, name="HELIXFLOW_MASTER_KEY")
    file = env.get("HELIXFLOW_MASTER_KEY_FILE")
    if not file:
        if database_type != "sqlite" or database_path is None:
            raise ConfigError(
                "HELIXFLOW_MASTER_KEY or HELIXFLOW_MASTER_KEY_FILE is required with "
                "DATABASE_TYPE=postgres (every replica must share the key; make one with "
                "`helixflow admin gen-master-key`)"
            )
        path = Path(database_path).with_name(Path(database_path).name + ".master-key")
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(generate_master_key() + "\n")
            log.info("made a new master key file %s", path)
        file = str(path)
    try:
        return load_master_key(Path(file).read_text(), name=file)
    except OSError as exc:
        raise ConfigError(
            f"HELIXFLOW_MASTER_KEY_FILE: cannot read {file} ({exc.strerror})"
        ) from None


def options_from_env(args: Any, env: Mapping[str, str]) -> AuthOptions:
    """AuthOptions from ``helixflow auth``/``admin`` flags, falling back on the environment."""
    database_type = getattr(args, "database_type", None) or env.get("DATABASE_TYPE") or "sqlite"
    if database_type not in ("sqlite", "postgres", "postgresql"):
        raise ConfigError(f"DATABASE_TYPE must be sqlite or postgres, got {database_type!r}")
    database_type = "postgres" if database_type == "postgresql" else database_type
    path = getattr(args, "database_path", None) or env.get("DATABASE_PATH")
    if database_type == "sqlite" and not path:
        path = str(helixflow_home(env) / "auth.db")
    url = getattr(args, "database_url", None) or env.get("DATABASE_URL")
    if database_type == "postgres" and not url:
        raise ConfigError("DATABASE_URL is required when DATABASE_TYPE is postgres")
    settings = AuthSettings(
        issuer=getattr(args, "issuer", None) or env.get("HELIXFLOW_JWT_ISSUER") or "helixflow",
        audience=getattr(args, "audience", None)
        or env.get("HELIXFLOW_JWT_AUDIENCE")
        or "helixflow",
        access_ttl=_seconds(args, env, "access_ttl", "HELIXFLOW_ACCESS_TTL", 900.0),
        refresh_ttl=_seconds(args, env, "refresh_ttl", "HELIXFLOW_REFRESH_TTL", 30 * 86400.0),
        allow_registration=bool(getattr(args, "allow_registration", False)),
    )
    if settings.access_ttl <= 0 or settings.refresh_ttl <= settings.access_ttl:
        raise ConfigError("--access-ttl must be positive and below --refresh-ttl")
    grpc_port = getattr(args, "port", None)
    http_port = getattr(args, "http_port", None)
    return AuthOptions(
        host=getattr(args, "host", None) or "127.0.0.1",
        grpc_port=grpc_port if grpc_port is not None else _port(env, "PORT", 8081),
        http_port=http_port if http_port is not None else _port(env, "HTTP_PORT", 8082),
        database_type=database_type,
        database_path=path if database_type == "sqlite" else None,
        database_url=url if database_type == "postgres" else None,
        redis_url=getattr(args, "redis_url", None) or env.get("REDIS_URL") or None,
        master_key=resolve_master_key(env, database_type=database_type, database_path=path),
        tls_cert=getattr(args, "tls_cert", None) or env.get("TLS_CERT") or None,
        tls_key=getattr(args, "tls_key", None) or env.get("TLS_KEY") or None,
        settings=settings,
    )


def open_core(opts: AuthOptions) -> AuthCore:
    """Open the store and build the core (blocking: run it in a thread from async code)."""
    if opts.database_path is not None:
        Path(opts.database_path).parent.mkdir(parents=True, exist_ok=True)
    store: Store = open_store(opts.database_type, path=opts.database_path, url=opts.database_url)
    try:
        # NOTE: with Redis, replicas share login throttling (else each would allow the budget).
        throttle = RedisLoginThrottle.from_url(opts.redis_url) if opts.redis_url else None
        return AuthCore(store, opts.master_key, opts.settings, throttle=throttle)
    except BaseException:
        store.close()
        raise


# -- the revocation fan-out ------------------------------------------------------------------


class Subscriber:
    """One revocation stream: its queue of (sequence number, item) and the last sequence
    number the subscriber acknowledged (applied)."""

    __slots__ = ("acked", "closed", "name", "queue")

    def __init__(self, name: str, acked: int) -> None:
        self.name = name
        self.closed = False
        self.queue: asyncio.Queue[tuple[int, RevocationEvent | str]] = asyncio.Queue(
            SUBSCRIBER_QUEUE
        )
        self.acked = acked


class RevocationHub:
    """Fans revocations out to gRPC subscribers and, with Redis, to every other replica.

    `on_core_event` is the `AuthCore` listener: it may run on any thread. Every item gets a
    sequence number, which each subscriber acknowledges once it has applied the item; `settle`
    waits for those acknowledgements, and the HTTP API settles before it answers a request that
    revoked something: when the answer arrives, every connected gateway already refuses what
    was revoked.
    """

    def __init__(self, core: AuthCore, loop: asyncio.AbstractEventLoop) -> None:
        self.core = core
        self._loop = loop
        self._subscribers: set[Subscriber] = set()
        self._origin = uuid.uuid4().hex
        self._redis: Any = None
        self._redis_url: str | None = None
        self._acked = asyncio.Condition()
        self.seq = 0
        self.relayed = 0

    def on_core_event(self, event: RevocationEvent | None) -> None:
        self._loop.call_soon_threadsafe(self._deliver, event, True)

    def _deliver(self, event: RevocationEvent | None, publish: bool) -> None:
        item: RevocationEvent | str = KEYS_ROTATED if event is None else event
        self.seq += 1
        for sub in list(self._subscribers):
            try:
                sub.queue.put_nowait((self.seq, item))
            except asyncio.QueueFull:  # a stuck subscriber: end its stream, it resyncs
                log.warning("revocation subscriber %s fell behind; closing its stream", sub.name)
                self._subscribers.discard(sub)
                sub.closed = True
                with contextlib.suppress(asyncio.QueueEmpty):
                    sub.queue.get_nowait()
                sub.queue.put_nowait((self.seq, CLOSE))
        if publish and self._redis is not None:
            self._loop.create_task(self._publish(event))

    def subscribe(self, name: str) -> Subscriber:
        sub = Subscriber(name, self.seq)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)
        self._loop.create_task(self.ack(sub, self.seq))

    async def ack(self, sub: Subscriber, seq: int) -> None:
        """Record that `sub` applied every item up to `seq`."""
        if seq > sub.acked:
            sub.acked = min(seq, self.seq)
            async with self._acked:
                self._acked.notify_all()

    async def settle(self, timeout: float = 1.0) -> bool:
        """Wait until every subscriber has applied every item delivered so far; False on
        timeout (a slow or dead subscriber does not hold the caller longer)."""
        target = self.seq

        def done() -> bool:
            return all(sub.acked >= target for sub in self._subscribers)

        if done():
            return True
        try:
            async with self._acked:
                await asyncio.wait_for(self._acked.wait_for(done), timeout)
        except TimeoutError:
            # A subscriber that cannot keep up is cut off (it reconnects and resyncs from a
            # snapshot), so it cannot hold up the next revoking request as well.
            for sub in [s for s in self._subscribers if s.acked < target]:
                log.warning("revocation subscriber %s did not take an event within %.1fs; "
                            "closing its stream", sub.name, timeout)  # fmt: skip
                self._subscribers.discard(sub)
                sub.closed = True
                with contextlib.suppress(asyncio.QueueFull):
                    sub.queue.put_nowait((self.seq, CLOSE))
            return False
        return True

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    @property
    def redis_connected(self) -> bool | None:
        """None without Redis; else whether the relay is subscribed right now."""
        return None if not self._redis_url else self._redis is not None

    async def _publish(self, event: RevocationEvent | None) -> None:
        message = {"origin": self._origin}
        if event is None:
            message["type"] = "keys_rotated"
        else:
            message.update(type="revocation", event=event.to_json())
        try:
            await self._redis.publish(REDIS_CHANNEL, json.dumps(message))
        except Exception as exc:  # Redis down: the store poll still carries it (<= 1 s)
            log.warning("cannot publish a revocation on Redis: %s", exc)

    async def run_redis(self, url: str) -> None:
        """Relay revocations between replicas over Redis until cancelled (reconnecting)."""
        import redis.asyncio as aioredis

        self._redis_url = url
        delay = 0.5
        while True:
            client = aioredis.Redis.from_url(url, socket_connect_timeout=3)
            try:
                pubsub = client.pubsub()
                await pubsub.subscribe(REDIS_CHANNEL)
                # Relayed from here on only once Redis confirmed the subscription.
                for _ in range(3):
                    confirmed = await pubsub.get_message(timeout=5.0)
                    if confirmed is not None and confirmed.get("type") == "subscribe":
                        break
                else:
                    raise ConnectionError("Redis did not confirm the subscription")
                self._redis = client
                log.info("revocations relayed over Redis channel %s", REDIS_CHANNEL)
                delay = 0.5
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        await self._on_redis(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("Redis relay lost (%s); retrying in %.1fs", exc, delay)
            finally:
                self._redis = None
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _on_redis(self, data: bytes | str) -> None:
        try:
            message = json.loads(data)
            if message.get("origin") == self._origin:
                return
            if message.get("type") == "keys_rotated":
                await asyncio.to_thread(self.core.reload_keys)
                return
            event = RevocationEvent.from_json(message["event"])
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("ignored a malformed message on %s", REDIS_CHANNEL)
            return
        if self.core.revocations.add(event):
            self.relayed += 1
            self._deliver(event, False)


# -- gRPC ------------------------------------------------------------------------------------


def _principal_pb(p: Principal) -> pb.Principal:
    return pb.Principal(
        user_id=p.user_id,
        username=p.username,
        role=p.role,
        scopes=list(p.scopes),
        rpm_limit=p.rpm_limit,
        tpm_limit=p.tpm_limit,
        key_id=p.key_id,
        token_id=p.token_id,
        expires_at=p.expires_at or 0.0,
        issued_at=p.issued_at,
        session_id=p.session_id,
    )


def _event_pb(event: RevocationEvent) -> pb.RevocationEvent:
    return pb.RevocationEvent(
        type=pb.RevocationEvent.REVOCATION,
        kind=event.kind,
        value=event.value,
        revoked_at=event.revoked_at,
        expires_at=event.expires_at or 0.0,
    )


class AuthServicer(pb_grpc.AuthServicer):
    """The gRPC API over `AuthCore` (blocking calls run in worker threads)."""

    def __init__(self, core: AuthCore, hub: RevocationHub,
                 metrics: AuthMetrics | None = None) -> None:  # fmt: skip
        self.core = core
        self.hub = hub
        self.metrics = metrics or AuthMetrics()
        self.stopping = asyncio.Event()

    async def _principal(self, fn: Any, credential: str, context: Any,
                         operation: str) -> pb.Principal:  # fmt: skip
        if not credential:
            self.metrics.failed(operation)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the credential is empty")
        try:
            principal = await asyncio.to_thread(fn, credential)
        except AuthenticationError as exc:
            self.metrics.failed(operation, exc)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)
        return _principal_pb(principal)

    async def ValidateApiKey(self, request: Any, context: Any) -> pb.Principal:
        return await self._principal(self.core.validate_api_key, request.api_key, context,
                                     "api_key")  # fmt: skip

    async def ValidateToken(self, request: Any, context: Any) -> pb.Principal:
        return await self._principal(self.core.validate_token, request.token, context, "token")

    async def GetJwks(self, request: Any, context: Any) -> pb.Jwks:
        return pb.Jwks(json=json.dumps(self.core.jwks()))

    async def WatchRevocations(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[pb.RevocationEvent]:
        try:
            first = await asyncio.wait_for(request_iterator.__anext__(), 10.0)
        except (TimeoutError, StopAsyncIteration):
            message = "send a WatchRevocationsRequest naming the subscriber first"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        who = (first.subscriber or "")[:64] or context.peer()
        if self.hub.subscribers >= MAX_SUBSCRIBERS:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many subscribers")
        sub = self.hub.subscribe(who)  # before the snapshot, so nothing falls in between
        log.info("revocation subscriber %s joined (%d)", who, self.hub.subscribers)

        async def read_acks() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                async for message in request_iterator:
                    await self.hub.ack(sub, message.ack)

        acks = asyncio.create_task(read_acks())
        try:
            for event in self.core.revocations.events():
                yield _event_pb(event)
            yield pb.RevocationEvent(type=pb.RevocationEvent.SYNCED)
            while not self.stopping.is_set():
                if sub.closed:  # cut off by the hub: the client resyncs
                    return
                try:
                    seq, item = await asyncio.wait_for(sub.queue.get(), HEARTBEAT_S)
                except TimeoutError:
                    yield pb.RevocationEvent(type=pb.RevocationEvent.HEARTBEAT)
                    continue
                if item == CLOSE:  # dropped for falling behind: the client resyncs
                    return
                if isinstance(item, RevocationEvent):
                    message = _event_pb(item)
                else:
                    message = pb.RevocationEvent(type=pb.RevocationEvent.KEYS_ROTATED)
                message.seq = seq
                yield message
        finally:
            acks.cancel()
            self.hub.unsubscribe(sub)
            log.info("revocation subscriber %s left", who)


# -- the process -----------------------------------------------------------------------------


def _read_pem(option: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{option}: cannot read {path} ({exc.strerror})") from None


async def _every(seconds: float, fn: Any, what: str) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await asyncio.to_thread(fn)
        except Exception as exc:  # the store is down for a moment: try again next time
            log.warning("%s failed: %s", what, exc)


async def serve(opts: AuthOptions, *, ready: asyncio.Event | None = None) -> int:
    """Serve gRPC and HTTP until SIGTERM/SIGINT; returns the exit code (0)."""
    from granian.constants import Interfaces
    from granian.server.embed import Server as Granian

    from helixflow.auth.http_api import AuthHttpApp

    if (opts.tls_cert is None) != (opts.tls_key is None):
        raise ConfigError("TLS_CERT and TLS_KEY: give both or neither")
    core = await asyncio.to_thread(open_core, opts)
    loop = asyncio.get_running_loop()
    hub = RevocationHub(core, loop)
    core.add_listener(hub.on_core_event)
    metrics = AuthMetrics(lambda: hub.subscribers)
    core.add_listener(metrics.on_revocation)
    servicer = AuthServicer(core, hub, metrics)
    server = grpc.aio.server()
    pb_grpc.add_AuthServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{opts.host}:{opts.grpc_port}"
    try:
        if opts.tls_cert and opts.tls_key:
            pair = (_read_pem("TLS_KEY", opts.tls_key), _read_pem("TLS_CERT", opts.tls_cert))
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([pair]))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        core.store.close()
        raise OSError(f"gRPC: cannot listen on {address} (in use, or not an address of this host)")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    tls: dict[str, Any] = {}
    if opts.tls_cert and opts.tls_key:
        tls = {"ssl_cert": Path(opts.tls_cert), "ssl_key": Path(opts.tls_key)}
    http = Granian(AuthHttpApp(core, hub=hub, metrics=metrics), address=opts.host,
                   port=opts.http_port, interface=Interfaces.ASGI, log_enabled=False,
                   **tls)  # fmt: skip
    http_task = asyncio.create_task(http.serve())
    await asyncio.sleep(0.05)
    if http_task.done():
        await server.stop(None)
        core.store.close()
        exc = http_task.exception()
        raise OSError(f"HTTP: cannot listen on {opts.host}:{opts.http_port} ({exc})")

    # Revocations a poll finds were recorded by another process: not counted here.
    poll = functools.partial(metrics.foreign, core.poll_revocations)
    tasks = [
        asyncio.create_task(_every(POLL_REVOCATIONS_S, poll, "revocation poll")),
        asyncio.create_task(_every(POLL_KEYS_S, core.reload_keys, "signing key reload")),
        http_task,
    ]
    if opts.redis_url:
        tasks.append(asyncio.create_task(hub.run_redis(opts.redis_url)))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    scheme = "https" if tls else "http"
    log.info("auth serving gRPC on %s, HTTP on %s://%s:%d (%s)", address, scheme, opts.host,
             opts.http_port, opts.database_type)  # fmt: skip
    print(f"helixflow auth: gRPC on {address}, HTTP on {scheme}://{opts.host}:{opts.http_port}",
          flush=True)  # fmt: skip
    if ready is not None:
        ready.set()
    await asyncio.wait([asyncio.create_task(stop.wait()), http_task],
                       return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
    log.info("stopping")
    servicer.stopping.set()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    http.stop()  # type: ignore[no-untyped-call]
    await server.stop(grace=1.0)
    with contextlib.suppress(asyncio.TimeoutError, Exception):
        await asyncio.wait_for(http_task, 5.0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.to_thread(core.store.close)
    log.info("stopped")
    return 0
