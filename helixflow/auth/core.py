"""The auth service's logic, free of any transport: `AuthCore`.

The HTTP API (`http_api`) and the gRPC API (`grpc_api`) are thin shells over this class; the
admin command line calls it directly on the database. Every method is synchronous and
thread-safe (the servers call it from worker threads: argon2 and the store block).

Sessions: a login returns an RS256 access token (15 min by default) and an opaque refresh token
``hfr_<jti>.<secret>`` (stored as SHA-256). Each refresh returns a new pair and marks the old
refresh token used; presenting a used one again is taken as theft: the whole family (the
session) is revoked, its access tokens included (they carry the family as claim ``sid``).
A family lives at most `refresh_ttl` from its login: rotation does not extend it.

Revocations are written to the store first (the source of truth), then applied to the
in-memory `RevocationSet` and handed to every listener (the gRPC stream hub, Redis). Writes made
by other processes (the admin CLI, other replicas) are picked up by `poll_revocations`.

Errors a client sees are generic: a wrong password, an unknown user, a disabled user and a
throttled account all say as little as possible; the precise reason is logged (never a secret
or a token).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import rsa

from helixflow.auth import credentials
from helixflow.auth.principal import ADMIN_SCOPE, ALL_MODELS_SCOPE, Principal
from helixflow.auth.revocations import RevocationEvent, RevocationSet
from helixflow.auth.signing_keys import KeyRing
from helixflow.auth.store import ROLES, ApiKey, Revocation, Store, StoreConflict, User
from helixflow.auth.throttle import LoginThrottle, RedisLoginThrottle
from helixflow.auth.tokens import InvalidTokenError, TokenIssuer, TokenVerifier
from helixflow.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
)

__all__ = [
    "ADMIN_SCOPE",
    "AuthCore",
    "AuthSettings",
    "Principal",
    "TokenPair",
    "validate_scopes",
]

log = logging.getLogger("helixflow.auth")

REFRESH_PREFIX: Final = "hfr_"
_USERNAME = re.compile(r"[a-z0-9][a-z0-9_.@+-]{0,63}")
_MODEL_SCOPE = re.compile(r"model:[A-Za-z0-9._:/*-]{1,128}")
_REFRESH = re.compile(r"hfr_([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{43})")
MIN_PASSWORD_CHARS: Final = 8
_TOUCH_INTERVAL_S: Final = 60.0
_KEY_RELOAD_MIN_S: Final = 5.0  # an unknown kid reloads the ring at most this often
_PRUNE_EVERY_S: Final = 60.0
_API_KEY_REVOCATION_S: Final = 86400.0  # gateways cache keys for seconds; the store keeps it
MAX_LIMIT: Final = 10**12
_LOGIN_FAILED: Final = "Invalid username or password."
_REFRESH_FAILED: Final = "Invalid or expired refresh token."
_KEY_FAILED: Final = "Invalid API key."


@dataclasses.dataclass(frozen=True, slots=True)
class AuthSettings:
    """Policy knobs of the auth service (all times in seconds)."""

    issuer: str = "helixflow"
    audience: str = "helixflow"
    access_ttl: float = 900.0
    refresh_ttl: float = 30 * 86400.0
    leeway: float = 30.0
    allow_registration: bool = False
    key_size: int = 2048


@dataclasses.dataclass(frozen=True, slots=True)
class TokenPair:
    """What a login or refresh returns (the OAuth 2 token response fields)."""

    access_token: str
    refresh_token: str
    expires_in: int
    refresh_expires_in: int
    token_type: str = "Bearer"


def validate_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """Check scope strings (``admin``, ``model:*``, ``model:<id>``); InvalidRequestError."""
    out: list[str] = []
    for scope in scopes:
        if not isinstance(scope, str) or not (
            scope == ADMIN_SCOPE or _MODEL_SCOPE.fullmatch(scope)
        ):
            raise InvalidRequestError(
                f"invalid scope {str(scope)[:80]!r}: use 'admin', 'model:*' or 'model:<id>'",
                param="scopes",
            )
        if scope not in out:
            out.append(scope)
    return tuple(out)


def normalize_username(username: str) -> str:
    """The stored form of a username (lower case); InvalidRequestError if it cannot be one."""
    name = username.strip().lower() if isinstance(username, str) else ""
    if not _USERNAME.fullmatch(name):
        raise InvalidRequestError(
            "username must be 1-64 characters of a-z, 0-9 and _.@+- starting with a letter "
            "or digit",
            param="username",
        )
    return name


def _check_new_password(password: str) -> None:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_CHARS:
        raise InvalidRequestError(
            f"password must be at least {MIN_PASSWORD_CHARS} characters", param="password"
        )
    if len(password.encode()) > credentials.MAX_PASSWORD_BYTES:
        raise InvalidRequestError(
            f"password must be at most {credentials.MAX_PASSWORD_BYTES} bytes", param="password"
        )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _event(row: Revocation) -> RevocationEvent:
    return RevocationEvent(row.kind, row.value, row.created_at, row.expires_at)


def _refused(message: str, code: str, reason: str) -> AuthenticationError:
    """A generic AuthenticationError for the client, with the machine-readable `reason` for
    logs and metrics (never sent)."""
    exc = AuthenticationError(message, code=code)
    exc.reason = reason
    return exc


class AuthCore:
    """Users, sessions, API keys, signing keys and revocations over one `Store`."""

    def __init__(
        self,
        store: Store,
        master_key: bytes,
        settings: AuthSettings | None = None,
        *,
        throttle: LoginThrottle | RedisLoginThrottle | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings or AuthSettings()
        self._master_key = master_key
        self._now = now
        self.throttle = throttle or LoginThrottle()
        self.revocations = RevocationSet(now=now)
        self._listeners: list[Callable[[RevocationEvent | None], None]] = []
        self._lock = threading.RLock()
        self._ring = self._load_or_create_ring()
        self._issuer = TokenIssuer(
            self._ring,
            self.settings.issuer,
            self.settings.audience,
            self.settings.access_ttl,
            now=now,
        )
        self._verifier = TokenVerifier(
            self,
            self.settings.issuer,
            self.settings.audience,
            leeway=self.settings.leeway,
            now=now,
        )
        self._polled_at: float | None = None
        self._pruned_at = 0.0
        self._keys_reloaded_at = 0.0
        self.poll_revocations()

    # -- listeners ---------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[RevocationEvent | None], None]) -> None:
        """Call `listener(event)` for each new revocation, `listener(None)` after the signing
        keys changed. Listeners run on the revoking thread and must not block."""
        self._listeners.append(listener)

    def _notify(self, event: RevocationEvent | None) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken subscriber must not fail the revocation
                log.exception("revocation listener failed")

    # -- signing keys ------------------------------------------------------------------------

    def _ring_from_store(self) -> KeyRing | None:
        record = self.store.load_signing_keys()
        if record is None:
            return None
        return KeyRing.from_dict(
            record, self._master_key, access_token_ttl=self.settings.access_ttl, now=self._now
        )

    def _load_or_create_ring(self) -> KeyRing:
        ring = self._ring_from_store()
        if ring is None:
            ring = KeyRing.generate(
                access_token_ttl=self.settings.access_ttl,
                now=self._now,
                key_size=self.settings.key_size,
            )
            self.store.save_signing_keys(ring.to_dict(self._master_key))
            log.info("generated the first signing key %s", ring.current.kid)
        return ring

    def public_key(self, kid: str) -> rsa.RSAPublicKey | None:
        """The published key `kid` (the verifier's key lookup); reloads once on a miss."""
        with self._lock:
            key = self._ring.public_key(kid)
        # NOTE: rate-limited: a flood of tokens with made-up kids must not become a flood of
        # store reads (a rotation by another process is also picked up by the 10 s poll).
        if key is None and time.monotonic() - self._keys_reloaded_at >= _KEY_RELOAD_MIN_S:
            self._keys_reloaded_at = time.monotonic()
            if self.reload_keys():
                with self._lock:
                    key = self._ring.public_key(kid)
        return key

    def jwks(self) -> dict[str, Any]:
        """The JWK Set of every published signing key."""
        with self._lock:
            return self._ring.jwks()

    @property
    def current_kid(self) -> str:
        with self._lock:
            return self._ring.current.kid

    def rotate_keys(self) -> str:
        """Make a fresh key current, keep the old one published until its tokens expire;
        returns the new kid."""
        with self._lock:
            self.reload_keys(notify=False)
            new = self._ring.rotate()
            self.store.save_signing_keys(self._ring.to_dict(self._master_key))
            self._rebind_issuer()
        log.info("rotated signing keys: %s is current", new.kid)
        self._notify(None)
        return new.kid

    def reload_keys(self, *, notify: bool = True) -> bool:
        """Re-read the ring from the store (another process may have rotated it); True if the
        set of keys changed."""
        record = self.store.load_signing_keys()
        with self._lock:
            held = {k.kid for k in self._ring.keys}
        if record is None or {str(r["kid"]) for r in record["keys"]} == held:
            return False  # unchanged: nothing decrypted
        ring = KeyRing.from_dict(
            record, self._master_key, access_token_ttl=self.settings.access_ttl, now=self._now
        )
        with self._lock:
            self._ring = ring
            self._rebind_issuer()
        log.info("signing keys reloaded: %s is current", ring.current.kid)
        if notify:
            self._notify(None)
        return True

    def _rebind_issuer(self) -> None:
        self._issuer = TokenIssuer(
            self._ring,
            self.settings.issuer,
            self.settings.audience,
            self.settings.access_ttl,
            now=self._now,
        )

    # -- users -------------------------------------------------------------------------------

    def create_user(self, username: str, password: str, *, role: str = "user") -> User:
        """Add a user (admin action or registration); 409 if the name is taken."""
        name = normalize_username(username)
        if role not in ROLES:
            raise InvalidRequestError(f"role must be one of {ROLES}", param="role")
        _check_new_password(password)
        try:
            user = self.store.create_user(name, credentials.hash_password(password), role=role)
        except StoreConflict:
            raise StoreConflict(f"username {name!r} is already taken") from None
        log.info("created %s user %s", role, user.id)
        return user

    def register(self, username: str, password: str) -> User:
        """Self-service sign-up, if enabled: always role ``user``."""
        if not self.settings.allow_registration:
            raise PermissionDeniedError("registration is disabled", code="registration_disabled")
        return self.create_user(username, password, role="user")

    def get_user(self, user_ref: str) -> User:
        """A user by id or by username; NotFoundError."""
        user = self.store.get_user(user_ref)
        if user is None and isinstance(user_ref, str):
            user = self.store.get_user_by_name(user_ref.strip().lower())
        if user is None:
            raise NotFoundError("no such user", code="user_not_found")
        return user

    def list_users(self) -> list[User]:
        return self.store.list_users()

    def set_user_disabled(self, user_ref: str, disabled: bool) -> User:
        """Disable (everything of the user is revoked at once) or re-enable a user."""
        user = self.get_user(user_ref)
        self.store.set_user_disabled(user.id, disabled)
        if disabled:
            self._revoke_user_tokens(user.id)
        log.info("user %s %s", user.id, "disabled" if disabled else "enabled")
        return dataclasses.replace(user, disabled=disabled)

    def change_password(
        self, user_id: str, old_password: str, new_password: str, *, source: str
    ) -> None:
        """Change a password (the old one is required, throttled like a login); ends every
        session of the user."""
        user = self.store.get_user(user_id)
        if user is None:
            raise AuthenticationError(_LOGIN_FAILED, code="invalid_credentials")
        self._check_throttle(user.username, source)
        if not credentials.verify_password(user.password_hash, old_password):
            self.throttle.failure(user.username, source)
            raise AuthenticationError(_LOGIN_FAILED, code="invalid_credentials")
        _check_new_password(new_password)
        self.store.set_user_password(user.id, credentials.hash_password(new_password))
        for family in self.store.revoke_user_refresh_tokens(user.id):
            self._revoke("family", family, self._family_expiry())

    # -- sessions ----------------------------------------------------------------------------

    def _check_throttle(self, account: str, source: str) -> None:
        wait = self.throttle.retry_after(account, source)
        if wait > 0:
            log.warning("login throttled: source=%s retry_after=%.0fs", source, wait)
            raise RateLimitError(
                "Too many failed logins; try again later.",
                retry_after=wait,
                code="login_throttled",
            )

    def login(self, username: str, password: str, *, source: str) -> TokenPair:
        """Password login → token pair. AuthenticationError (generic) or RateLimitError."""
        try:
            name = normalize_username(username)
        except InvalidRequestError:
            # No such account can exist: only the source pays (and no argon2 is spent).
            self._check_throttle("", source)
            self.throttle.failure("", source)
            log.info("login failed: reason=invalid_username source=%s", source)
            raise _refused(_LOGIN_FAILED, "invalid_credentials", "invalid_username") from None
        self._check_throttle(name, source)
        user = self.store.get_user_by_name(name)
        # NOTE: an unknown user costs the same argon2 verification as a wrong password.
        ok = credentials.verify_password(None if user is None else user.password_hash, password)
        if user is None or not ok or user.disabled:
            reason = "unknown_user" if user is None else ("bad_password" if not ok else "disabled")
            self.throttle.failure(name, source)
            log.info(
                "login failed: reason=%s user=%s source=%s",
                reason,
                "-" if user is None else user.id,
                source,
            )
            raise _refused(_LOGIN_FAILED, "invalid_credentials", reason)
        self.throttle.success(name)
        if credentials.password_needs_rehash(user.password_hash):
            self.store.set_user_password(user.id, credentials.hash_password(password))
        family = secrets.token_urlsafe(16)
        jti, refresh = self._new_refresh()
        self.store.add_refresh_token(
            jti,
            family_id=family,
            user_id=user.id,
            token_hash=_sha256(refresh),
            expires_at=self._now() + self.settings.refresh_ttl,
        )
        log.info("login: user=%s session=%s source=%s", user.id, family[:8], source)
        return self._pair(user, family, refresh, self._now() + self.settings.refresh_ttl)

    @staticmethod
    def _new_refresh() -> tuple[str, str]:
        jti = secrets.token_urlsafe(16)
        return jti, f"{REFRESH_PREFIX}{jti}.{secrets.token_urlsafe(32)}"

    def _pair(self, user: User, family: str, refresh: str, family_ends: float) -> TokenPair:
        with self._lock:
            access = self._issuer.issue(
                user.id,
                user.role,
                self._user_scopes(user),
                extra={"sid": family, "preferred_username": user.username},
            )
        return TokenPair(
            access_token=access,
            refresh_token=refresh,
            expires_in=int(self.settings.access_ttl),
            refresh_expires_in=max(0, int(family_ends - self._now())),
        )

    @staticmethod
    def _user_scopes(user: User) -> tuple[str, ...]:
        return (ADMIN_SCOPE, ALL_MODELS_SCOPE) if user.role == "admin" else (ALL_MODELS_SCOPE,)

    def _find_refresh(self, refresh_token: str) -> tuple[str, Any]:
        match = _REFRESH.fullmatch(refresh_token) if isinstance(refresh_token, str) else None
        if match is None:
            raise AuthenticationError(_REFRESH_FAILED, code="invalid_refresh_token")
        row = self.store.get_refresh_token(match.group(1))
        if row is None or not hmac.compare_digest(row.token_hash, _sha256(refresh_token)):
            log.info("refresh refused: reason=unknown_token")
            raise _refused(_REFRESH_FAILED, "invalid_refresh_token", "unknown_token")
        return match.group(1), row

    def _session_revoked(self, family_id: str, user_id: str) -> bool:
        # NOTE: besides the rows' revoked_at, the revocation records are checked: a rotation
        # that raced a revocation may have written a successor the revocation's UPDATE did
        # not see. Family and user records outlive every refresh token they cover.
        if self.store.get_revocation("family", family_id) is not None:
            return True
        user_cut = self.store.get_revocation("user", user_id)
        bounds = self.store.family_bounds(family_id)
        return user_cut is not None and bounds is not None and bounds[0] <= user_cut.created_at

    def refresh(self, refresh_token: str) -> TokenPair:
        """Exchange a refresh token for a new pair; reuse of a used one revokes its family."""
        jti, row = self._find_refresh(refresh_token)
        reason = None
        new_jti, new_refresh = self._new_refresh()
        if row.revoked_at is not None or self._session_revoked(row.family_id, row.user_id):
            reason = "revoked"
        elif row.expires_at <= self._now():
            reason = "expired"
        elif (
            row.used_at is not None
            or self.store.rotate_refresh_token(jti, new_jti, token_hash=_sha256(new_refresh))
            is None
        ):
            # NOTE: spending the old token and writing its successor is one conditional
            # transaction, so of two racing exchanges of one token the loser counts as reuse.
            reason = "reuse"
            self.revoke_family(row.family_id)
            log.warning(
                "refresh token reuse: session %s of user %s revoked", row.family_id[:8], row.user_id
            )
        if reason is None:
            user = self.store.get_user(row.user_id)
            if user is None or user.disabled:
                reason = "inactive_user"
            else:
                return self._pair(user, row.family_id, new_refresh, row.expires_at)
        log.info("refresh refused: reason=%s user=%s", reason, row.user_id)
        raise _refused(_REFRESH_FAILED, "invalid_refresh_token", reason)

    def logout(self, refresh_token: str) -> None:
        """End the session of `refresh_token` (its family and the family's access tokens)."""
        _, row = self._find_refresh(refresh_token)
        self.revoke_family(row.family_id)

    # -- principals --------------------------------------------------------------------------

    def authenticate(self, credential: str) -> Principal:
        """An API key (``hfx_...``) or an access token → its principal; AuthenticationError."""
        if credential.startswith(credentials.API_KEY_PREFIX):
            return self.validate_api_key(credential)
        return self.validate_token(credential)

    def validate_token(self, token: str) -> Principal:
        """Verify an access token online: signature, claims, revocations and the user."""
        try:
            principal = Principal.from_claims(self._verifier.verify(token))
            if self.revocations.is_token_revoked(jti=principal.token_id, sub=principal.user_id,
                                                 iat=principal.issued_at,
                                                 sid=principal.session_id):  # fmt: skip
                raise InvalidTokenError("revoked")
            user = self.store.get_user(principal.user_id)
            if user is None or user.disabled:
                raise InvalidTokenError("inactive_user")
        except InvalidTokenError as exc:
            log.info("access token refused: reason=%s", exc.reason)
            raise
        return dataclasses.replace(principal, username=user.username)

    def validate_api_key(self, key: str) -> Principal:
        """An API key → its principal; AuthenticationError (generic) for any failure."""
        prefix = credentials.api_key_prefix(key) if isinstance(key, str) else None
        row = None if prefix is None else self.store.find_api_key_by_prefix(prefix)
        reason = None
        if row is None or not credentials.api_key_matches(key, row.secret_hash):
            reason = "unknown_key"
        elif row.revoked_at is not None or self.revocations.is_api_key_revoked(row.id):
            reason = "revoked"
        elif row.expires_at is not None and row.expires_at <= self._now():
            reason = "expired"
        user = None if reason is not None or row is None else self.store.get_user(row.user_id)
        if reason is None and (user is None or user.disabled):
            reason = "inactive_user"
        if reason is not None or row is None or user is None:
            log.info("API key refused: reason=%s prefix=%s", reason, prefix or "-")
            raise _refused(_KEY_FAILED, "invalid_api_key", reason or "unknown_key")
        if row.last_used_at is None or self._now() - row.last_used_at >= _TOUCH_INTERVAL_S:
            self.store.touch_api_key(row.id)
        return Principal(
            kind="api_key",
            user_id=user.id,
            username=user.username,
            role=user.role,
            scopes=row.scopes,
            rpm_limit=row.rpm_limit,
            tpm_limit=row.tpm_limit,
            key_id=row.id,
            expires_at=row.expires_at,
            issued_at=row.created_at,
        )

    # -- API keys ----------------------------------------------------------------------------

    def create_api_key(
        self,
        owner: User,
        *,
        caller: Principal | None = None,
        name: str = "",
        scopes: Sequence[str] = (ALL_MODELS_SCOPE,),
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        expires_at: float | None = None,
    ) -> tuple[ApiKey, str]:
        """Make a key for `owner`; returns its record and the key itself (shown once)."""
        checked = validate_scopes(scopes)
        if ADMIN_SCOPE in checked and owner.role != "admin":
            raise PermissionDeniedError("only an admin's key may have the admin scope")
        if caller is not None:
            # A key made by a key can do no more than its maker.
            for scope in checked:
                covered = scope in caller.scopes or (
                    scope.startswith("model:") and ALL_MODELS_SCOPE in caller.scopes
                )
                if not covered:
                    raise PermissionDeniedError(f"the caller lacks the scope {scope!r}")
            for param, mine, asked in (("rpm_limit", caller.rpm_limit, rpm_limit),
                                       ("tpm_limit", caller.tpm_limit, tpm_limit)):  # fmt: skip
                if mine is not None and (asked is None or asked > mine):
                    raise PermissionDeniedError(f"{param} may not exceed the caller's {mine}")
        if not isinstance(name, str) or len(name) > 128:
            raise InvalidRequestError("name must be a string of at most 128 characters",
                                      param="name")  # fmt: skip
        for param, limit in (("rpm_limit", rpm_limit), ("tpm_limit", tpm_limit)):
            if limit is not None and (
                isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT
            ):
                raise InvalidRequestError(
                    f"{param} must be an integer from 1 to {MAX_LIMIT}", param=param
                )
        if expires_at is not None and expires_at <= self._now():
            raise InvalidRequestError("expires_at must be in the future", param="expires_at")
        for _ in range(5):  # a prefix collision (36^8 space) is retried with a fresh key
            made = credentials.new_api_key()
            try:
                record = self.store.create_api_key(
                    owner.id,
                    prefix=made.prefix,
                    secret_hash=made.hash,
                    name=name,
                    scopes=checked,
                    rpm_limit=rpm_limit,
                    tpm_limit=tpm_limit,
                    expires_at=expires_at,
                )
            except StoreConflict:
                continue
            log.info("created API key %s (prefix %s) for user %s", record.id, made.prefix, owner.id)
            return record, made.key
        raise StoreConflict("could not find a free API key prefix")  # pragma: no cover

    def get_api_key(self, key_id: str) -> ApiKey:
        row = self.store.get_api_key(key_id)
        if row is None:
            raise NotFoundError("no such API key", code="api_key_not_found")
        return row

    def revoke_api_key(self, key_id: str) -> tuple[ApiKey, RevocationEvent]:
        """Revoke a key in the store and push the revocation; NotFoundError."""
        row = self.get_api_key(key_id)
        self.store.revoke_api_key(row.id)
        event = self._revoke("api_key", row.id, self._api_key_expiry(row.expires_at))
        return self.get_api_key(row.id), event

    # -- revocation --------------------------------------------------------------------------

    def _family_expiry(self) -> float:
        return self._now() + self.settings.access_ttl + self.settings.leeway

    def _api_key_expiry(self, key_expires_at: float | None) -> float:
        horizon = self._now() + _API_KEY_REVOCATION_S
        return horizon if key_expires_at is None else min(horizon, key_expires_at)

    @staticmethod
    def _check_value(value: str) -> str:
        if not isinstance(value, str) or not value.strip() or len(value) > 128:
            raise InvalidRequestError("value must be 1-128 characters", param="value")
        return value

    def _revoke(self, kind: str, value: str, expires_at: float | None) -> RevocationEvent:
        event = _event(self.store.add_revocation(kind, value, expires_at=expires_at))
        if self.revocations.add(event):
            self._notify(event)
        log.info("revoked %s %s", kind, value if kind != "jti" else value[:8])
        return event

    def revoke_family(self, family_id: str) -> RevocationEvent:
        """End a session: its refresh tokens and the access tokens issued in it."""
        bounds = self.store.family_bounds(self._check_value(family_id))
        if bounds is None:
            raise NotFoundError("no such session", code="session_not_found")
        self.store.revoke_refresh_family(family_id)
        # Kept while any of its tokens could live (see _session_revoked).
        return self._revoke("family", family_id, max(self._family_expiry(), bounds[1]))

    def revoke_jti(self, jti: str, *, expires_at: float | None = None) -> RevocationEvent:
        """Revoke one access token by its jti (kept until it would have expired)."""
        self._check_value(jti)
        return self._revoke("jti", jti, expires_at or self._family_expiry())

    def _revoke_user_tokens(self, user_id: str) -> RevocationEvent:
        self.store.revoke_user_refresh_tokens(user_id)
        # Kept while any session begun before it could live (see _session_revoked).
        expires = self._now() + max(self.settings.refresh_ttl,
                                    self.settings.access_ttl + self.settings.leeway)  # fmt: skip
        return self._revoke("user", user_id, expires)

    def revoke_user(self, user_ref: str) -> RevocationEvent:
        """Revoke everything of a user: access tokens, sessions and API keys."""
        user = self.get_user(user_ref)
        for key_id in self.store.revoke_user_api_keys(user.id):
            row = self.store.get_api_key(key_id)
            self._revoke("api_key", key_id, self._api_key_expiry(None if row is None
                                                                 else row.expires_at))  # fmt: skip
        return self._revoke_user_tokens(user.id)

    def revoke(self, kind: str, value: str) -> RevocationEvent:
        """Admin revocation by kind: ``jti``, ``family``, ``api_key`` or ``user``."""
        if kind == "jti":
            return self.revoke_jti(value)
        if kind == "family":
            return self.revoke_family(value)
        if kind == "api_key":
            return self.revoke_api_key(self._check_value(value))[1]
        if kind == "user":
            return self.revoke_user(self._check_value(value))
        raise InvalidRequestError("kind must be one of jti, family, api_key, user", param="kind")

    def revoke_token(self, token: str, principal: Principal) -> RevocationEvent:
        """Revoke an access or refresh token of `principal`'s own (any, for an admin)."""
        if isinstance(token, str) and token.startswith(REFRESH_PREFIX):
            _, row = self._find_refresh(token)
            if row.user_id != principal.user_id and not principal.is_admin:
                raise PermissionDeniedError("that token is not yours")
            return self.revoke_family(row.family_id)
        try:
            claims = self._verifier.verify(token)
        except InvalidTokenError:
            message = "not a valid access or refresh token"
            raise InvalidRequestError(message, param="token") from None
        if claims.sub != principal.user_id and not principal.is_admin:
            raise PermissionDeniedError("that token is not yours")
        return self.revoke_jti(claims.jti, expires_at=claims.exp + self.settings.leeway)

    def poll_revocations(self) -> list[RevocationEvent]:
        """Pick up revocations written by other processes; returns (and pushes) the new ones."""
        now = self._now()
        # NOTE: rows are stamped with their writer's clock; re-reading a minute back covers
        # clock skew between hosts, and the set drops the repeats.
        since = None if self._polled_at is None else self._polled_at - 60.0
        rows = self.store.list_revocations(now, since=since)
        self._polled_at = now
        events = []
        for row in rows:
            try:
                events.append(_event(row))
            except ValueError:  # a hand-edited row must not stop the service
                log.warning("ignored a malformed revocation row (kind %r)", row.kind)
        fresh = self.revocations.update(events)
        if since is not None:
            for event in fresh:
                self._notify(event)
        if now - self._pruned_at >= _PRUNE_EVERY_S:
            self._pruned_at = now
            self.revocations.prune()
            self.store.prune_revocations(now)
        return fresh
