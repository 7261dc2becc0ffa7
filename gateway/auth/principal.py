"""The authenticated caller, whatever credential it presented."""

from __future__ import annotations

import msgspec

__all__ = ["DEFAULT_SCOPES", "Principal", "Scope"]


class Scope:
    """Scope names carried by keys and OAuth tokens (ARCHITECTURE.md, Scopes)."""

    INFERENCE = "lattice:compute:inference"
    CATALOG_READ = "lattice:compute:catalog:read"
    WORKSPACE_ONLY = "lattice:compute:workspace_only"
    MARKETPLACE = "lattice:compute:marketplace"
    RUNTIME_MANAGE = "lattice:compute:personal_runtime:manage"
    USAGE_READ = "lattice:compute:usage:read"
    #: Operator scope: authorises the admin API. Only keys of the reserved ``_admin``
    #: workspace carry it (``gateway.auth.apikeys.create_admin_key``).
    ADMIN = "lattice:admin"


DEFAULT_SCOPES: tuple[str, ...] = (Scope.INFERENCE, Scope.CATALOG_READ)


class Principal(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Who is calling: the same shape for an ``sk_`` key and a JWT access token.

    ``key_id`` is set for API keys, ``client_id`` for OAuth tokens (the third-party app).
    """

    workspace: str
    subject: str
    scopes: tuple[str, ...]
    kind: str  # "api_key" | "jwt"
    key_id: str | None = None
    client_id: str | None = None

    def has(self, scope: str) -> bool:
        return scope in self.scopes
