"""The gateway side of auth: `AuthClient` turns a bearer credential into a `Principal`.

Access tokens (JWTs) are verified locally: RS256 signature against the auth service's JWKS,
claims, then the in-memory `RevocationSet` that the auth service keeps current over its
revocation stream (gRPC ``WatchRevocations``). No round trip per request, and a revoked token is
refused as soon as its revocation has arrived; the auth service answers a revoking request only
after the revocation was sent down every connected stream.

If the stream is down or silent for longer than `max_staleness` (it carries a heartbeat every
2 s), the client no longer trusts its revocation list and checks each token online
(``ValidateToken``) instead. If the auth service cannot be reached either (it is down), a token
that verifies locally (signature by a cached key, claims, the last known revocations) is still
accepted for `outage_grace` seconds after the stream's last message, with a warning: while auth
is down nobody can revoke through it, and access tokens live minutes. After that, or for a
token the cached keys cannot verify, the request fails with 503.

API keys are validated by the auth service (``ValidateApiKey``) and cached for `api_key_ttl`
seconds (keyed by the key's SHA-256, never the key); a revocation of the key or of its user
evicts the entry at once. While the stream is unhealthy a cached key is checked again, so with
auth down API-key traffic fails closed (503) and recovers by itself when auth returns.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import grpc

from helixflow._proto import auth_pb2 as pb
from helixflow._proto import auth_pb2_grpc as pb_grpc
from helixflow.auth.principal import API_KEY_PREFIX, Principal
from helixflow.auth.revocations import RevocationEvent, RevocationSet
from helixflow.auth.signing_keys import JwksKeySet
from helixflow.auth.tokens import InvalidTokenError, TokenVerifier
from helixflow.errors import AuthenticationError, OverloadedError

__all__ = ["AuthClient"]

log = logging.getLogger("helixflow.auth.client")

_JWKS_REFRESH_MIN_S: Final = 1.0
_RPC_TIMEOUT_S: Final = 3.0


def _principal(message: Any, kind: str) -> Principal:
    return Principal(
        kind=kind,
        user_id=message.user_id,
        username=message.username,
        role=message.role,
        scopes=tuple(message.scopes),
        rpm_limit=message.rpm_limit if message.HasField("rpm_limit") else None,
        tpm_limit=message.tpm_limit if message.HasField("tpm_limit") else None,
        key_id=message.key_id,
        token_id=message.token_id,
        session_id=message.session_id,
        expires_at=message.expires_at or None,
        issued_at=message.issued_at,
    )


# NOTE: gRPC's reconnect back-off grows to two minutes by default; a returning auth service
# should be used again within a second or two.
_CHANNEL_OPTIONS: Final = [("grpc.initial_reconnect_backoff_ms", 250),
                           ("grpc.min_reconnect_backoff_ms", 250),
                           ("grpc.max_reconnect_backoff_ms", 2000)]  # fmt: skip


class _Outbox:
    """The request side of the revocation stream: subscriber name, then acks.

    NOTE: a class, not an async generator: grpc keeps iterating it in a task of its own, and an
    async generator left suspended there is finalised by the garbage collector after its loop
    has closed (an error raised into whatever runs then); `close` ends the iteration instead.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[pb.WatchRevocationsRequest | None] = asyncio.Queue()

    def __aiter__(self) -> _Outbox:
        return self

    async def __anext__(self) -> pb.WatchRevocationsRequest:
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        return item

    def put(self, request: pb.WatchRevocationsRequest) -> None:
        self._queue.put_nowait(request)

    def close(self) -> None:
        self._queue.put_nowait(None)


class AuthClient:
    """Validates API keys and access tokens for a gateway; one per process, started once."""

    def __init__(
        self,
        target: str,
        *,
        issuer: str = "helixflow",
        audience: str = "helixflow",
        leeway: float = 30.0,
        api_key_ttl: float = 30.0,
        api_key_cache_size: int = 100_000,
        max_staleness: float = 5.0,
        outage_grace: float = 300.0,
        credentials: grpc.ChannelCredentials | None = None,
        name: str = "gateway",
        now: Callable[[], float] = time.time,
    ) -> None:
        self.target = target
        self.name = name
        self.api_key_ttl = api_key_ttl
        self.max_staleness = max_staleness
        self.outage_grace = outage_grace
        self._credentials = credentials
        self._outage_warned = 0.0
        self._now = now
        self.revocations = RevocationSet(now=now)
        self._keys = JwksKeySet({})
        self._verifier = TokenVerifier(self, issuer, audience, leeway=leeway, now=now)
        self._cache: collections.OrderedDict[str, tuple[Principal, float]] = (
            collections.OrderedDict()
        )
        self._cache_size = api_key_cache_size
        self._leeway = leeway
        self._verified: collections.OrderedDict[bytes, Principal] = collections.OrderedDict()
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._watch: asyncio.Task[None] | None = None
        self._jwks_fetched = 0.0
        self._jwks_inflight: asyncio.Future[None] | None = None
        self._synced = asyncio.Event()
        self._last_message = 0.0  # monotonic time of the stream's last message
        self.on_revocation: Callable[[RevocationEvent], None] | None = None
        self.stream_connects = 0
        # Local sequence numbers of key/user revocations, to tell whether one arrived while a
        # ValidateApiKey call was in flight (no clock comparison across hosts).
        self._seq = 0
        self._last_seq: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()
        self._pruned_at = time.monotonic()

    # -- life cycle --------------------------------------------------------------------------

    async def start(self, *, wait: float = 10.0) -> None:
        """Connect, fetch the JWKS and start the revocation stream; waits up to `wait` s for
        the first snapshot (the client works without it, checking tokens online)."""
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, _CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(self.target, self._credentials,
                                                    _CHANNEL_OPTIONS)  # fmt: skip
        self._stub = pb_grpc.AuthStub(self._channel)  # type: ignore[no-untyped-call]
        self._watch = asyncio.create_task(self._watch_revocations())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._synced.wait(), wait)
        with contextlib.suppress(OverloadedError):
            await self.refresh_jwks(force=True)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._channel is not None:
            await self._channel.close()
        await asyncio.sleep(0)  # let grpc's request reader see the closed outbox and end

    @property
    def stream_healthy(self) -> bool:
        """True while the revocation list is known to be current."""
        return self._synced.is_set() and time.monotonic() - self._last_message <= self.max_staleness

    # -- the revocation stream ---------------------------------------------------------------

    async def _watch_revocations(self) -> None:
        delay = 0.1
        while True:
            outbox = _Outbox()
            outbox.put(pb.WatchRevocationsRequest(subscriber=self.name))
            call = None
            try:
                call = self._stub.WatchRevocations(outbox)
                self.stream_connects += 1
                async for message in call:
                    self._last_message = time.monotonic()
                    if message.type == pb.RevocationEvent.REVOCATION:
                        self._apply(
                            RevocationEvent(
                                kind=message.kind,
                                value=message.value,
                                revoked_at=message.revoked_at,
                                expires_at=message.expires_at or None,
                            )
                        )
                    elif message.type == pb.RevocationEvent.SYNCED:
                        self._synced.set()
                        delay = 0.1
                        log.info("revocation stream synced (%d in force)", len(self.revocations))
                    elif message.type == pb.RevocationEvent.KEYS_ROTATED:
                        asyncio.get_running_loop().create_task(self._refresh_quietly())
                    if message.seq:  # applied: the auth service may now answer the revoker
                        outbox.put(pb.WatchRevocationsRequest(ack=message.seq))
                log.warning("revocation stream ended; reconnecting")
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.warning("revocation stream lost (%s); retrying in %.1fs",
                            exc.code().name, delay)  # fmt: skip
            except Exception:  # a malformed event must not kill the watcher for good
                log.exception("revocation stream failed; retrying in %.1fs", delay)
            finally:
                outbox.close()  # ends grpc's reader of our requests (no task left waiting)
                if call is not None:
                    call.cancel()
            self._synced.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _apply(self, event: RevocationEvent) -> None:
        if time.monotonic() - self._pruned_at > 60.0:
            self._pruned_at = time.monotonic()
            self.revocations.prune()
        if not self.revocations.add(event):
            return
        if event.kind in ("api_key", "user"):
            self._seq += 1
            self._last_seq[(event.kind, event.value)] = self._seq
            self._last_seq.move_to_end((event.kind, event.value))
            while len(self._last_seq) > self._cache_size:
                self._last_seq.popitem(last=False)
            field = "key_id" if event.kind == "api_key" else "user_id"
            stale = [k for k, (p, _) in self._cache.items() if getattr(p, field) == event.value]
            for digest in stale:
                self._cache.pop(digest, None)
        if self.on_revocation is not None:
            self.on_revocation(event)

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(OverloadedError):
            await self.refresh_jwks(force=True)

    # -- JWKS --------------------------------------------------------------------------------

    def public_key(self, kid: str) -> Any:
        return self._keys.public_key(kid)

    async def refresh_jwks(self, *, force: bool = False) -> bool:
        """Fetch the JWKS (at most once a second unless forced; a fetch already in flight is
        awaited, not repeated); True if keys were fetched."""
        if self._jwks_inflight is not None:
            await asyncio.shield(self._jwks_inflight)
            return True
        if not force and time.monotonic() - self._jwks_fetched < _JWKS_REFRESH_MIN_S:
            return False
        self._jwks_fetched = time.monotonic()
        self._jwks_inflight = asyncio.ensure_future(self._fetch_jwks())
        try:
            await asyncio.shield(self._jwks_inflight)
        finally:
            self._jwks_inflight = None
        return True

    async def _fetch_jwks(self) -> None:
        try:
            reply = await self._stub.GetJwks(pb.GetJwksRequest(), timeout=_RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise OverloadedError("the auth service is unavailable",
                                  code="auth_unavailable") from exc  # fmt: skip
        self._keys = JwksKeySet.from_jwks(json.loads(reply.json))

    # -- validation --------------------------------------------------------------------------

    async def authenticate(self, credential: str) -> Principal:
        """A bearer credential → its principal. AuthenticationError (401) for a bad one,
        OverloadedError (503) when it cannot be checked."""
        if not credential:
            raise AuthenticationError("Missing bearer credentials.", code="missing_credentials")
        if credential.startswith(API_KEY_PREFIX):
            return await self._api_key(credential)
        return await self._token(credential)

    async def _token(self, token: str) -> Principal:
        # NOTE: a verified token is remembered (by its SHA-256) until it expires, so a client
        # that sends the same token with every request pays the RS256 check once; the time
        # claims and the revocation list are still checked on every use.
        digest = hashlib.sha256(token.encode()).digest()
        principal = self._verified.get(digest)
        if principal is None:
            try:
                claims = self._verifier.verify(token)
            except InvalidTokenError as exc:
                if exc.reason != "unknown_kid" or not await self._try_refresh_jwks():
                    raise
                claims = self._verifier.verify(token)  # the key may be new: once more
            principal = Principal.from_claims(claims)
            self._verified[digest] = principal
            while len(self._verified) > self._cache_size:
                self._verified.popitem(last=False)
        elif (
            principal.expires_at is not None and self._now() >= principal.expires_at + self._leeway
        ):
            del self._verified[digest]
            raise InvalidTokenError("expired")
        if not self.stream_healthy:
            try:
                return await self._online(token)
            except OverloadedError:
                if not self._within_outage_grace():
                    raise
        if self.revocations.is_token_revoked(jti=principal.token_id, sub=principal.user_id,
                                             iat=principal.issued_at,
                                             sid=principal.session_id):  # fmt: skip
            raise InvalidTokenError("revoked")
        return principal

    def _within_outage_grace(self) -> bool:
        """Auth is unreachable: may a locally verified token still pass? (See the module.)"""
        if not self._last_message:  # never synced: no revocation list to trust at all
            return False
        silent = time.monotonic() - self._last_message
        if silent > self.max_staleness + self.outage_grace:
            return False
        if time.monotonic() - self._outage_warned > 10.0:
            self._outage_warned = time.monotonic()
            log.warning("auth unreachable for %.0fs: accepting locally verified tokens with the "
                        "last known revocations (for up to %.0fs)", silent,
                        self.max_staleness + self.outage_grace)  # fmt: skip
        return True

    async def _try_refresh_jwks(self) -> bool:
        try:
            return await self.refresh_jwks()
        except OverloadedError:
            return False

    async def _online(self, token: str) -> Principal:
        try:
            reply = await self._stub.ValidateToken(pb.ValidateTokenRequest(token=token),
                                                   timeout=_RPC_TIMEOUT_S)  # fmt: skip
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise InvalidTokenError("refused_online") from None
            raise OverloadedError("the auth service is unavailable", code="auth_unavailable") from (
                None
            )
        return _principal(reply, "token")

    async def _api_key(self, key: str) -> Principal:
        digest = hashlib.sha256(key.encode()).hexdigest()
        hit = self._cache.get(digest)
        if hit is not None:
            principal, fetched = hit
            fresh = time.monotonic() - fetched < self.api_key_ttl
            expired = principal.expires_at is not None and principal.expires_at <= self._now()
            if expired or self.revocations.is_api_key_revoked(principal.key_id):
                self._cache.pop(digest, None)
                raise AuthenticationError("Invalid API key.", code="invalid_api_key")
            if fresh and self.stream_healthy:
                self._cache.move_to_end(digest)
                return principal
        asked_at = self._seq
        try:
            reply = await self._stub.ValidateApiKey(pb.ValidateApiKeyRequest(api_key=key),
                                                    timeout=_RPC_TIMEOUT_S)  # fmt: skip
        except grpc.aio.AioRpcError as exc:
            self._cache.pop(digest, None)
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise AuthenticationError("Invalid API key.", code="invalid_api_key") from None
            raise OverloadedError("the auth service is unavailable", code="auth_unavailable") from (
                None
            )
        principal = _principal(reply, "api_key")
        # NOTE: a revocation may have arrived while the call was in flight (and found nothing
        # to evict); the answer is stale then, and must neither be used nor cached.
        if (
            self.revocations.is_api_key_revoked(principal.key_id)
            or self._last_seq.get(("api_key", principal.key_id), 0) > asked_at
            or self._last_seq.get(("user", principal.user_id), 0) > asked_at
        ):
            raise AuthenticationError("Invalid API key.", code="invalid_api_key")
        self._cache[digest] = (principal, time.monotonic())
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return principal
