"""Who a request acts for: `Principal`, and the scope vocabulary.

Kept free of heavy imports: gateways use it without the auth service's store or password
hashing.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from helixflow.auth.tokens import Claims

__all__ = ["ADMIN_SCOPE", "ALL_MODELS_SCOPE", "API_KEY_PREFIX", "Principal"]

ADMIN_SCOPE: Final = "admin"
ALL_MODELS_SCOPE: Final = "model:*"
API_KEY_PREFIX: Final = "hfx_"


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """Who a valid API key or access token acts for, and what it may do."""

    kind: str  # "api_key" | "token"
    user_id: str
    username: str
    role: str
    scopes: tuple[str, ...]
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    key_id: str = ""
    token_id: str = ""
    session_id: str = ""
    expires_at: float | None = None
    issued_at: float = 0.0

    @property
    def is_admin(self) -> bool:
        """An admin user acting with the admin scope (an API key must be given it)."""
        return self.role == "admin" and ADMIN_SCOPE in self.scopes

    @classmethod
    def from_claims(cls, claims: Claims, *, username: str | None = None) -> Principal:
        """The principal of a verified access token (`username` overrides its claim)."""
        sid = claims.extra.get("sid")
        name = claims.extra.get("preferred_username") if username is None else username
        return cls(
            kind="token",
            user_id=claims.sub,
            username=name if isinstance(name, str) else "",
            role=claims.role,
            scopes=claims.scopes,
            token_id=claims.jti,
            session_id=sid if isinstance(sid, str) else "",
            expires_at=float(claims.exp),
            issued_at=float(claims.iat),
        )

    def may_use_model(self, model: str) -> bool:
        """True if a ``model:`` scope (or ``model:*``) covers `model`."""
        return ALL_MODELS_SCOPE in self.scopes or f"model:{model}" in self.scopes
