"""Every Redis key (and TTL) the gateway reads or writes is built here.

Billing's own keys (the usage outbox, the ledger) live in ``billing/keys.py``.
"""

from __future__ import annotations

__all__ = [
    "APIKEYS_INDEX",
    "CATALOG_CURRENT",
    "CATALOG_HISTORY_KEEP",
    "CATALOG_VERSION",
    "EVENTS_CHANNEL",
    "IDEMPOTENCY_TTL_S",
    "WORKSPACES_INDEX",
    "apikey",
    "catalog_history",
    "idempotency",
    "workspace",
    "workspace_apikeys",
]

PREFIX = "lat:"

#: Hash per API key: workspace, subject, scopes, secret hash, created/revoked timestamps.
APIKEYS_INDEX = PREFIX + "apikeys"
WORKSPACES_INDEX = PREFIX + "workspaces"

#: The live catalog document (msgpack) and its monotonically increasing version number.
CATALOG_CURRENT = PREFIX + "catalog:current"
CATALOG_VERSION = PREFIX + "catalog:version"
#: How many past catalog versions keep their ``catalog_history(v)`` copy.
CATALOG_HISTORY_KEEP = 100

#: Pub/sub channel that tells every process to look again (catalog changed, key revoked).
EVENTS_CHANNEL = PREFIX + "events"

#: How long an Idempotency-Key is remembered (Stripe keeps them 24 hours).
IDEMPOTENCY_TTL_S = 24 * 3600


def apikey(key_id: str) -> str:
    return f"{PREFIX}apikey:{key_id}"


def workspace(name: str) -> str:
    return f"{PREFIX}ws:{name}"


def workspace_apikeys(name: str) -> str:
    """Set of the key ids of one workspace (``APIKEYS_INDEX`` holds every key id)."""
    return f"{PREFIX}ws:{name}:apikeys"


def catalog_history(version: int) -> str:
    return f"{PREFIX}catalog:v:{version}"


def idempotency(workspace_name: str, key: str) -> str:
    return f"{PREFIX}idem:{workspace_name}:{key}"
