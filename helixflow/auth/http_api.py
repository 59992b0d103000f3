"""The auth service's HTTP API (ASGI, msgspec), for people and tools; served on :8082.

    GET    /health                      liveness + the store answers
    GET    /metrics                     Prometheus metrics (`helixflow.auth.metrics`)
    GET    /.well-known/jwks.json       the public signing keys (RFC 7517)
    POST   /v1/auth/login               {username, password} -> tokens
    POST   /v1/auth/refresh             {refresh_token} -> new tokens (the old one is spent)
    POST   /v1/auth/logout              {refresh_token} -> 204; the session is revoked
    POST   /v1/auth/register            {username, password} -> 201 user (when enabled)
    POST   /v1/auth/revoke              {token}: revoke one of your access/refresh tokens
    POST   /v1/auth/password            {old_password, new_password}
    GET    /v1/auth/me                  the caller's principal
    GET    /v1/users                    (admin) every user
    POST   /v1/users                    (admin) {username, password, role}
    GET    /v1/users/{id}               (admin, or yourself)
    PATCH  /v1/users/{id}               (admin) {disabled}
    GET    /v1/api-keys[?user_id=|prefix=] your keys (an admin may name a user), or the
                                         one key with that public prefix
    POST   /v1/api-keys                 {name, scopes, rpm_limit, tpm_limit, expires_in|
                                         expires_at, user_id (admin)} -> 201, key shown once
    GET    /v1/api-keys/{id}            (owner or admin)
    DELETE /v1/api-keys/{id}            (owner or admin) revoke
    GET    /v1/revocations              (admin) every revocation in force
    POST   /v1/revocations              (admin) {kind: jti|family|api_key|user, value}
    POST   /v1/signing-keys/rotate      (admin) -> {kid}

Callers authenticate with ``Authorization: Bearer <access token | API key>``. Errors are OpenAI
error objects (``{"error": {"message", "type", "param", "code"}}``) with the status of their
class; nothing a client sends can produce a traceback. Bodies are JSON, at most 64 KiB.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import msgspec

from helixflow.asgi import accept_lifespan
from helixflow.auth.core import AuthCore
from helixflow.auth.metrics import AuthMetrics
from helixflow.auth.principal import API_KEY_PREFIX, Principal
from helixflow.auth.revocations import RevocationEvent
from helixflow.auth.store import ApiKey, User
from helixflow.errors import (
    AuthenticationError,
    HelixFlowError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
)

__all__ = ["AuthHttpApp"]

log = logging.getLogger("helixflow.auth.http")
_PROBE_ROUTES = frozenset(("/health", "/healthz", "/metrics"))

MAX_BODY_BYTES: Final = 64 * 1024
_JSON = (b"content-type", b"application/json")
_NO_STORE = (b"cache-control", b"no-store")


class LoginBody(msgspec.Struct, forbid_unknown_fields=True):
    username: str
    password: str


class RefreshBody(msgspec.Struct, forbid_unknown_fields=True):
    refresh_token: str


class TokenBody(msgspec.Struct, forbid_unknown_fields=True):
    token: str


class PasswordBody(msgspec.Struct, forbid_unknown_fields=True):
    old_password: str
    new_password: str


class NewUserBody(msgspec.Struct, forbid_unknown_fields=True):
    username: str
    password: str
    role: str = "user"


class UserPatchBody(msgspec.Struct, forbid_unknown_fields=True):
    disabled: bool


class NewKeyBody(msgspec.Struct, forbid_unknown_fields=True):
    name: str = ""
    scopes: list[str] = msgspec.field(default_factory=lambda: ["model:*"])
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    expires_in: float | None = None
    expires_at: float | None = None
    user_id: str | None = None


class RevocationBody(msgspec.Struct, forbid_unknown_fields=True):
    kind: str
    value: str


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(
        self, status: int, body: Any = None, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers or []


def _user_json(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "username": user.username,
        "role": user.role,
        "disabled": user.disabled,
        "created_at": user.created_at,
    }


def _key_json(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "user_id": key.user_id,
        "prefix": key.prefix,
        "name": key.name,
        "scopes": list(key.scopes),
        "rpm_limit": key.rpm_limit,
        "tpm_limit": key.tpm_limit,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
        "created_at": key.created_at,
        "last_used_at": key.last_used_at,
    }


def _event_json(event: RevocationEvent) -> dict[str, Any]:
    return {
        "kind": event.kind,
        "value": event.value,
        "revoked_at": event.revoked_at,
        "expires_at": event.expires_at,
    }


def _principal_json(p: Principal) -> dict[str, Any]:
    return {
        "kind": p.kind,
        "user_id": p.user_id,
        "username": p.username,
        "role": p.role,
        "scopes": list(p.scopes),
        "rpm_limit": p.rpm_limit,
        "tpm_limit": p.tpm_limit,
        "key_id": p.key_id or None,
        "session_id": p.session_id or None,
        "expires_at": p.expires_at,
    }


Handler = Callable[["Request"], Awaitable[Response]]


class SettlingHub(Protocol):
    """What the app needs of the revocation hub (`service.RevocationHub`)."""

    seq: int
    relayed: int

    @property
    def redis_connected(self) -> bool | None: ...

    @property
    def subscribers(self) -> int: ...

    async def settle(self, timeout: float = 1.0) -> bool: ...


class Request:
    """One parsed HTTP request as the handlers see it."""

    __slots__ = ("body", "client", "headers", "method", "params", "path", "query")

    def __init__(self, scope: dict[str, Any], body: bytes) -> None:
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query: str = scope.get("query_string", b"").decode("latin-1")
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                        for k, v in scope.get("headers", [])}  # fmt: skip
        client = scope.get("client")
        self.client: str = client[0] if client else "unknown"
        self.body = body
        self.params: dict[str, str] = {}

    def json(self, kind: type[Any]) -> Any:
        if not self.body:
            raise InvalidRequestError("the request needs a JSON body")
        try:
            return msgspec.json.decode(self.body, type=kind)
        except msgspec.ValidationError as exc:
            raise InvalidRequestError(f"invalid request body: {exc}") from None
        except msgspec.DecodeError:
            raise InvalidRequestError("the request body is not valid JSON") from None

    def query_param(self, name: str) -> str | None:
        for part in self.query.split("&"):
            key, _, value = part.partition("=")
            if key == name:
                from urllib.parse import unquote_plus

                return unquote_plus(value)
        return None


class AuthHttpApp:
    """The ASGI application; `core` does the work in worker threads."""

    def __init__(self, core: AuthCore, *, hub: SettlingHub | None = None,
                 metrics: AuthMetrics | None = None) -> None:  # fmt: skip
        self.core = core
        self._hub = hub
        if metrics is None:
            metrics = AuthMetrics(None if hub is None else lambda: hub.subscribers)
        self.metrics = metrics
        self._routes: dict[tuple[str, str], Handler] = {}
        self._param_routes: list[tuple[str, str, str, Handler]] = []
        for method, path, handler in (
            ("GET", "/health", self.health),
            ("GET", "/healthz", self.health),
            ("GET", "/metrics", self.prometheus),
            ("GET", "/.well-known/jwks.json", self.jwks),
            ("POST", "/v1/auth/login", self.login),
            ("POST", "/v1/auth/refresh", self.refresh),
            ("POST", "/v1/auth/logout", self.logout),
            ("POST", "/v1/auth/register", self.register),
            ("POST", "/v1/auth/revoke", self.revoke_token),
            ("POST", "/v1/auth/password", self.change_password),
            ("GET", "/v1/auth/me", self.me),
            ("GET", "/v1/users", self.list_users),
            ("POST", "/v1/users", self.create_user),
            ("GET", "/v1/users/{id}", self.get_user),
            ("PATCH", "/v1/users/{id}", self.patch_user),
            ("GET", "/v1/api-keys", self.list_keys),
            ("POST", "/v1/api-keys", self.create_key),
            ("GET", "/v1/api-keys/{id}", self.get_key),
            ("DELETE", "/v1/api-keys/{id}", self.delete_key),
            ("GET", "/v1/revocations", self.list_revocations),
            ("POST", "/v1/revocations", self.revoke),
            ("POST", "/v1/signing-keys/rotate", self.rotate),
        ):
            if "{id}" in path:
                prefix = path.split("{id}")[0]
                self._param_routes.append((method, prefix, path, handler))
            else:
                self._routes[(method, path)] = handler

    # -- ASGI --------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await accept_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        request_id = uuid.uuid4().hex[:16]
        handler, params, route = self._route(scope["method"], scope["path"])
        response = await self._dispatch(scope, receive, handler, params, route)
        headers = [(b"x-request-id", request_id.encode()), *response.headers]
        if isinstance(response.body, bytes):  # not JSON: its headers name its content type
            body = response.body
        else:
            headers.insert(0, _JSON)
            body = b"" if response.body is None else msgspec.json.encode(response.body)
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self.metrics.observe(route or "other", response.status, time.perf_counter() - started)
        # NOTE: monitoring probes /health and /metrics every second: only failures get a line.
        if response.status != 200 or route not in _PROBE_ROUTES:
            log.info("%s %s %d %.1fms id=%s", scope["method"], _printable(scope["path"][:200]),
                     response.status, (time.perf_counter() - started) * 1e3,
                     request_id)  # fmt: skip

    async def _read_body(self, receive: Any) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _route(self, method: str, path: str) -> tuple[Handler | None, dict[str, str], str | None]:
        """The handler, its path parameters, and the route template (None: no such path)."""
        handler = self._routes.get((method, path))
        if handler is not None:
            return handler, {}, path
        route = path if any(p == path for _, p in self._routes) else None
        for m, prefix, template, h in self._param_routes:
            rest = path[len(prefix) :] if path.startswith(prefix) else ""
            if rest and "/" not in rest:
                route = template
                if m == method:
                    return h, {"id": rest}, template
        return None, {}, route

    async def _dispatch(self, scope: dict[str, Any], receive: Any, handler: Handler | None,
                        params: dict[str, str], route: str | None) -> Response:  # fmt: skip
        try:
            if handler is None:
                if route is not None:
                    return _error(405, "method_not_allowed", "method not allowed")
                return _error(404, "not_found", f"no route {scope['path'][:100]}")
            body = await self._read_body(receive)
            if body is None:
                return _error(413, "request_too_large",
                              f"the body is larger than {MAX_BODY_BYTES} bytes")  # fmt: skip
            request = Request(scope, body)
            request.params = params
            seq = None if self._hub is None else self._hub.seq
            try:
                return await handler(request)
            finally:
                if self._hub is not None and self._hub.seq != seq:
                    # Anything this request revoked is on its way to every gateway before
                    # the client hears back (see RevocationHub.settle).
                    await self._hub.settle()
        except RateLimitError as exc:
            response = Response(exc.status, exc.to_openai())
            if exc.retry_after is not None:
                retry = str(max(1, int(exc.retry_after + 0.999)))
                response.headers.append((b"retry-after", retry.encode()))
            return response
        except AuthenticationError as exc:
            return Response(401, exc.to_openai(), [(b"www-authenticate", b"Bearer")])
        except HelixFlowError as exc:
            return Response(exc.status, exc.to_openai())
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"],
                          _printable(scope["path"][:200]))  # fmt: skip
            return _error(500, "internal_error", "internal error")

    # -- helpers -----------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def _principal(self, request: Request, *, api_key: bool = False) -> Principal:
        """The caller. Unless `api_key`, an API key is accepted only with the admin scope:
        managing an account (keys, password, sessions) takes a login, so a leaked inference
        key cannot widen itself."""
        header = request.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise AuthenticationError("Missing bearer credentials.", code="missing_credentials")
        credential = credential.strip()
        try:
            principal: Principal = await self._call(self.core.authenticate, credential)
        except AuthenticationError as exc:
            operation = "api_key" if credential.startswith(API_KEY_PREFIX) else "token"
            self.metrics.failed(operation, exc)
            raise
        if principal.kind == "api_key" and not api_key and not principal.is_admin:
            raise PermissionDeniedError("this needs a login token, not an API key")
        return principal

    async def _admin(self, request: Request) -> Principal:
        principal = await self._principal(request)
        if not principal.is_admin:
            raise PermissionDeniedError("this needs an admin")
        return principal

    # -- handlers ----------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        try:
            await self._call(self.core.store.schema_version)
        except Exception as exc:  # the store is down: not ready
            log.warning("health: the store does not answer: %s", type(exc).__name__)
            return Response(503, {"status": "unavailable", "store": "down"})
        body: dict[str, Any] = {"status": "ok", "kid": self.core.current_kid,
                                "revocations": len(self.core.revocations)}  # fmt: skip
        if self._hub is not None:
            body.update(subscribers=self._hub.subscribers, relayed=self._hub.relayed,
                        redis=self._hub.redis_connected)  # fmt: skip
        return Response(200, body)

    async def prometheus(self, request: Request) -> Response:
        body, content_type = self.metrics.render()
        return Response(200, body, [(b"content-type", content_type.encode())])

    async def jwks(self, request: Request) -> Response:
        return Response(200, self.core.jwks(), [(b"cache-control", b"public, max-age=60")])

    async def login(self, request: Request) -> Response:
        body: LoginBody = request.json(LoginBody)
        try:
            pair = await self._call(self.core.login, body.username, body.password,
                                    source=request.client)  # fmt: skip
        except (AuthenticationError, RateLimitError) as exc:
            self.metrics.failed("login", exc)
            raise
        return Response(200, pair, [_NO_STORE])

    async def refresh(self, request: Request) -> Response:
        body: RefreshBody = request.json(RefreshBody)
        try:
            pair = await self._call(self.core.refresh, body.refresh_token)
        except AuthenticationError as exc:
            self.metrics.failed("refresh", exc)
            raise
        return Response(200, pair, [_NO_STORE])

    async def logout(self, request: Request) -> Response:
        body: RefreshBody = request.json(RefreshBody)
        await self._call(self.core.logout, body.refresh_token)
        return Response(204)

    async def register(self, request: Request) -> Response:
        body: LoginBody = request.json(LoginBody)
        user = await self._call(self.core.register, body.username, body.password)
        return Response(201, _user_json(user))

    async def revoke_token(self, request: Request) -> Response:
        principal = await self._principal(request)
        body: TokenBody = request.json(TokenBody)
        event = await self._call(self.core.revoke_token, body.token, principal)
        return Response(200, _event_json(event))

    async def change_password(self, request: Request) -> Response:
        principal = await self._principal(request)
        body: PasswordBody = request.json(PasswordBody)
        if principal.kind != "token":
            raise PermissionDeniedError("this needs a login token, not an API key")
        try:
            await self._call(self.core.change_password, principal.user_id, body.old_password,
                             body.new_password, source=request.client)  # fmt: skip
        except (AuthenticationError, RateLimitError) as exc:
            self.metrics.failed("password", exc)
            raise
        return Response(204)

    async def me(self, request: Request) -> Response:
        return Response(200, _principal_json(await self._principal(request, api_key=True)))

    async def list_users(self, request: Request) -> Response:
        await self._admin(request)
        users = await self._call(self.core.list_users)
        return Response(200, {"object": "list", "data": [_user_json(u) for u in users]})

    async def create_user(self, request: Request) -> Response:
        await self._admin(request)
        body: NewUserBody = request.json(NewUserBody)
        user = await self._call(self.core.create_user, body.username, body.password,
                                role=body.role)  # fmt: skip
        return Response(201, _user_json(user))

    async def get_user(self, request: Request) -> Response:
        principal = await self._principal(request, api_key=True)
        user: User = await self._call(self.core.get_user, request.params["id"])
        if user.id != principal.user_id and not principal.is_admin:
            raise NotFoundError("no such user", code="user_not_found")
        return Response(200, _user_json(user))

    async def patch_user(self, request: Request) -> Response:
        await self._admin(request)
        body: UserPatchBody = request.json(UserPatchBody)
        user = await self._call(self.core.set_user_disabled, request.params["id"], body.disabled)
        return Response(200, _user_json(user))

    async def list_keys(self, request: Request) -> Response:
        principal = await self._principal(request, api_key=True)
        prefix = request.query_param("prefix")
        if prefix is not None:  # find one key by its public prefix (hfx_<prefix>_...)
            key = await self._call(self.core.store.find_api_key_by_prefix, prefix)
            visible = key is not None and (key.user_id == principal.user_id or principal.is_admin)
            return Response(200, {"object": "list", "data": [_key_json(key)] if visible else []})
        user_id = request.query_param("user_id") or principal.user_id
        if user_id != principal.user_id:
            if not principal.is_admin:
                raise PermissionDeniedError("only an admin may list another user's keys")
            user_id = (await self._call(self.core.get_user, user_id)).id
        keys = await self._call(self.core.store.list_api_keys, user_id)
        return Response(200, {"object": "list", "data": [_key_json(k) for k in keys]})

    async def create_key(self, request: Request) -> Response:
        principal = await self._principal(request)
        body: NewKeyBody = request.json(NewKeyBody)
        owner_ref = body.user_id or principal.user_id
        if owner_ref != principal.user_id and not principal.is_admin:
            raise PermissionDeniedError("only an admin may make keys for another user")
        owner: User = await self._call(self.core.get_user, owner_ref)
        if body.expires_in is not None and body.expires_at is not None:
            raise InvalidRequestError("give expires_in or expires_at, not both",
                                      param="expires_in")  # fmt: skip
        expires_at = body.expires_at
        if body.expires_in is not None:
            if body.expires_in <= 0:
                raise InvalidRequestError("expires_in must be positive", param="expires_in")
            expires_at = time.time() + body.expires_in
        record, key = await self._call(
            self.core.create_api_key,
            owner,
            caller=principal,
            name=body.name,
            scopes=body.scopes,
            rpm_limit=body.rpm_limit,
            tpm_limit=body.tpm_limit,
            expires_at=expires_at,
        )
        return Response(201, {**_key_json(record), "key": key}, [_NO_STORE])

    async def _owned_key(
        self, request: Request, *, api_key: bool = False
    ) -> tuple[Principal, ApiKey]:
        principal = await self._principal(request, api_key=api_key)
        key: ApiKey = await self._call(self.core.get_api_key, request.params["id"])
        if key.user_id != principal.user_id and not principal.is_admin:
            raise NotFoundError("no such API key", code="api_key_not_found")
        return principal, key

    async def get_key(self, request: Request) -> Response:
        _, key = await self._owned_key(request, api_key=True)
        return Response(200, _key_json(key))

    async def delete_key(self, request: Request) -> Response:
        _, key = await self._owned_key(request)
        revoked, _ = await self._call(self.core.revoke_api_key, key.id)
        return Response(200, _key_json(revoked))

    async def list_revocations(self, request: Request) -> Response:
        await self._admin(request)
        events = self.core.revocations.events()
        return Response(200, {"object": "list", "data": [_event_json(e) for e in events]})

    async def revoke(self, request: Request) -> Response:
        await self._admin(request)
        body: RevocationBody = request.json(RevocationBody)
        event = await self._call(self.core.revoke, body.kind, body.value)
        return Response(201, _event_json(event))

    async def rotate(self, request: Request) -> Response:
        await self._admin(request)
        kid = await self._call(self.core.rotate_keys)
        return Response(200, {"kid": kid})


# Control characters and Unicode line breaks as \xNN/\uNNNN (the path is percent-decoded:
# a client's %0D%0A must not start a forged log line).
_ESCAPES = {c: f"\\x{c:02x}" if c < 256 else f"\\u{c:04x}"
            for c in (*range(32), *range(127, 160), 0x2028, 0x2029)}  # fmt: skip


def _printable(text: str) -> str:
    return text if text.isprintable() else text.translate(_ESCAPES)


def _error(status: int, code: str, message: str) -> Response:
    kind = {404: "invalid_request_error", 405: "invalid_request_error",
            413: "invalid_request_error"}.get(status, "server_error")  # fmt: skip
    return Response(status, {"error": {"message": message, "type": kind, "param": None,
                                       "code": code}})  # fmt: skip
