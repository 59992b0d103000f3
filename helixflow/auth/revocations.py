"""The revocation list as every process holds it in memory: `RevocationSet`.

The auth service writes each revocation to its store (the source of truth, so the list survives
restarts), applies it to its own set and pushes it to subscribers: gateways over a gRPC server
stream, other replicas over Redis. A gateway keeps its own `RevocationSet` fed by that stream and
checks every token against it, so a revoked token is refused on its next use without a round
trip to the auth service.

Kinds (the ``revocations`` table's ``kind``):

- ``jti``: one access token; kept until the token would have expired anyway.
- ``family``: a refresh-token family (a login session): its refresh tokens are revoked in the
  store, and every access token issued in it (claim ``sid``) is refused.
- ``api_key``: one API key (by key id): a gateway drops it from its cache.
- ``user``: everything of a user: every access token issued at or before ``revoked_at`` is
  refused, and a gateway drops the user's cached API keys so they are validated afresh.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

__all__ = ["KINDS", "RevocationEvent", "RevocationSet"]

KINDS: Final = ("jti", "family", "api_key", "user")


@dataclasses.dataclass(frozen=True, slots=True)
class RevocationEvent:
    """One revocation: `expires_at` (None: never) is when it may be forgotten."""

    kind: str
    value: str
    revoked_at: float
    expires_at: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"revocation kind must be one of {KINDS}, got {self.kind!r}")
        if not self.value:
            raise ValueError("a revocation needs a value")

    def to_json(self) -> str:
        """The wire form used on Redis."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> RevocationEvent:
        """Parse `to_json` output; ValueError for anything else."""
        try:
            data: Any = json.loads(text)
            expires = data.get("expires_at")
            return cls(
                kind=str(data["kind"]),
                value=str(data["value"]),
                revoked_at=float(data["revoked_at"]),
                expires_at=None if expires is None else float(expires),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a revocation event: {exc}") from None


class RevocationSet:
    """Revocations in force, looked up in O(1); thread-safe.

    `add` returns False for an event it already holds (so relays can drop duplicates: an event
    may arrive both from the store poll and from Redis).
    """

    def __init__(self, *, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], RevocationEvent] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, event: RevocationEvent) -> bool:
        """Hold `event`; False if nothing changed (an equal or wider entry is held).

        Two entries for one (kind, value) merge: the later `revoked_at` (a user's newer
        cut-off) and the later `expires_at` (None, never, being the latest) both win.
        """
        key = (event.kind, event.value)
        with self._lock:
            held = self._entries.get(key)
            if held is not None:
                expires = (
                    None
                    if held.expires_at is None or event.expires_at is None
                    else max(held.expires_at, event.expires_at)
                )
                event = RevocationEvent(
                    event.kind, event.value, max(held.revoked_at, event.revoked_at), expires
                )
                if event == held:
                    return False
            self._entries[key] = event
        return True

    def update(self, events: Iterable[RevocationEvent]) -> list[RevocationEvent]:
        """Add each event; returns the ones that were new."""
        return [event for event in events if self.add(event)]

    def events(self) -> list[RevocationEvent]:
        """Every entry still in force, oldest first (a subscriber's snapshot)."""
        now = self._now()
        with self._lock:
            held = list(self._entries.values())
        live = [e for e in held if e.expires_at is None or e.expires_at > now]
        return sorted(live, key=lambda e: e.revoked_at)

    def _get(self, kind: str, value: str) -> RevocationEvent | None:
        entry = self._entries.get((kind, value))
        if entry is None or (entry.expires_at is not None and entry.expires_at <= self._now()):
            return None
        return entry

    def is_token_revoked(self, *, jti: str, sub: str, iat: float, sid: str | None) -> bool:
        """True if the access token `jti` of user `sub`, issued at `iat` in session `sid`, is
        revoked by its jti, its session's family, or a revocation of everything of its user."""
        if self._get("jti", jti) is not None:
            return True
        if sid and self._get("family", sid) is not None:
            return True
        user = self._get("user", sub)
        # NOTE: iat has whole-second resolution, so a token issued in the very second of the
        # revocation is refused too (the client logs in again); letting it through could
        # let a token issued just before the revocation survive it.
        return user is not None and iat <= user.revoked_at

    def is_api_key_revoked(self, key_id: str) -> bool:
        """True if the API key `key_id` is revoked."""
        return self._get("api_key", key_id) is not None

    def user_revoked_at(self, user_id: str) -> float | None:
        """When everything of `user_id` was last revoked (None: never, or long expired)."""
        entry = self._get("user", user_id)
        return None if entry is None else entry.revoked_at

    def prune(self) -> int:
        """Forget entries past their `expires_at`; returns how many."""
        now = self._now()
        with self._lock:
            dead = [
                k
                for k, e in self._entries.items()
                if e.expires_at is not None and e.expires_at <= now
            ]
            for key in dead:
                del self._entries[key]
        return len(dead)
