"""Authentication: workspaces, ``sk_`` API keys and JWT access tokens, all yielding a Principal.

- :mod:`.principal`: :class:`Principal`, :class:`Scope`.
- :mod:`.workspaces`: :class:`Workspace`, :class:`WorkspaceStore`.
- :mod:`.apikeys`: :class:`ApiKeyStore` (create, list, revoke, verify), :class:`ApiKeyRecord`.
- :mod:`.jwt`: :class:`JwtIssuer`, :class:`JwtVerifier` (JWKS over HTTP, joserfc).
- :mod:`.authenticator`: :class:`Authenticator`, the request path's single entry point.
"""

from __future__ import annotations

from gateway.auth.apikeys import ADMIN_WORKSPACE, ApiKeyRecord, ApiKeyStore
from gateway.auth.authenticator import Authenticator
from gateway.auth.jwt import JwtIssuer, JwtVerifier
from gateway.auth.principal import DEFAULT_SCOPES, Principal, Scope
from gateway.auth.workspaces import Workspace, WorkspaceStore

__all__ = [
    "ADMIN_WORKSPACE",
    "DEFAULT_SCOPES",
    "ApiKeyRecord",
    "ApiKeyStore",
    "Authenticator",
    "JwtIssuer",
    "JwtVerifier",
    "Principal",
    "Scope",
    "Workspace",
    "WorkspaceStore",
]
