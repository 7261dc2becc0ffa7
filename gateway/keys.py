"""Every Redis key (and TTL) the gateway reads or writes is built here.

Billing's own keys (the usage outbox, the ledger) live in ``billing/keys.py``.
"""

from __future__ import annotations

__all__ = [
    "APIKEYS_INDEX",
    "BOOTSTRAP_TOKEN_TTL_S",
    "CATALOG_CURRENT",
    "CATALOG_HISTORY_KEEP",
    "CATALOG_VERSION",
    "DEVICE_CODE_LIFETIME_S",
    "DEVICE_GRANT_KEEP_S",
    "DEVICE_LOOKUP_WINDOW_S",
    "DISPATCH_JWKS",
    "DISPATCH_JWK_GRACE_S",
    "DISPATCH_QUEUE_MAXLEN",
    "DISPATCH_QUEUE_TTL_MS",
    "DISPATCH_REPLY_GRACE_MS",
    "EVENTS_CHANNEL",
    "GATEWAY_CONTROL_TTL_MS",
    "GATEWAY_WAKE_TTL_MS",
    "HOLDERS_GROUP",
    "IDEMPOTENCY_TTL_S",
    "TUNNEL_PRESENCE_TTL_MS",
    "WORKSPACES_INDEX",
    "apikey",
    "catalog_history",
    "device_code_attempts",
    "device_grant",
    "device_lookup_failures",
    "device_user_code",
    "dispatch_cancelled",
    "dispatch_reply",
    "gateway_alive",
    "gateway_control",
    "gateway_wake",
    "idempotency",
    "runtime",
    "runtime_holder",
    "runtime_queue",
    "workspace",
    "workspace_apikeys",
    "workspace_runtimes",
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

#: Sorted set of the live public keys that sign dispatch tokens (gateway/tunnel/tokens.py):
#: members are public JWKs (JSON), scores their expiry in Redis-server milliseconds. Each
#: gateway process refreshes its own member; a member lives ``DISPATCH_JWK_GRACE_S`` plus
#: the token lifetime past its last refresh, so a key outlives every token it signed.
DISPATCH_JWKS = PREFIX + "dispatch:jwks"
DISPATCH_JWK_GRACE_S = 60

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


# -- personal runtimes and pairing (gateway/runtimes/) -----------------------------------------

#: A one-time bootstrap token (``POST /v1/personal-runtimes``) is redeemable this long.
BOOTSTRAP_TOKEN_TTL_S = 3600
#: Lifetime of a device code and its user code (RFC 8628 §3.2 ``expires_in``).
DEVICE_CODE_LIFETIME_S = 600
#: How long an expired device grant is kept, so that a late poll reads ``expired_token``
#: (RFC 8628 §3.5) rather than ``invalid_grant``.
DEVICE_GRANT_KEEP_S = 600
#: Fixed window of the per-address counter of failed user-code lookups.
DEVICE_LOOKUP_WINDOW_S = 60


def runtime(runtime_id: str) -> str:
    """Hash of one personal runtime (``lat_…``): record fields and credential hashes."""
    return f"{PREFIX}rt:{runtime_id}"


def runtime_holder(runtime_id: str) -> str:
    """Presence key SET (with a TTL) by the gateway process holding the runtime's tunnel."""
    return f"{PREFIX}rt:{runtime_id}:holder"


# -- dispatch across gateway processes (gateway/tunnel/registry.py, bus.py, remote.py) ---------

#: TTL of ``runtime_holder`` and ``gateway_alive`` (refreshed about every second).
TUNNEL_PRESENCE_TTL_MS = 5000
#: Consumer group of the holders on every ``runtime_queue`` stream.
HOLDERS_GROUP = "holders"
#: Approximate cap of a ``runtime_queue`` stream (entries are deleted once handled).
DISPATCH_QUEUE_MAXLEN = 10_000
#: A runtime's queue outlives its last holder refresh by this long (then its group goes too).
DISPATCH_QUEUE_TTL_MS = 3600_000
#: A reply stream lives until its dispatch's deadline plus this margin.
DISPATCH_REPLY_GRACE_MS = 30_000
#: A process's control stream lives this long past its last message.
GATEWAY_CONTROL_TTL_MS = 60_000
#: A consumer's wake-up stream lives this long past its last wake-up.
GATEWAY_WAKE_TTL_MS = 3600_000


def runtime_queue(runtime_id: str) -> str:
    """Stream of the dispatches for one runtime, read by its holder (group ``HOLDERS_GROUP``)."""
    return f"{PREFIX}rt:{runtime_id}:q"


def dispatch_reply(dispatch_id: str) -> str:
    """Stream of one remote dispatch's events, written by the holder, read by the requester."""
    return f"{PREFIX}dsp:{dispatch_id}:r"


def dispatch_cancelled(dispatch_id: str) -> str:
    """Marker: the requester gave up on this dispatch (a reclaiming holder drops it)."""
    return f"{PREFIX}dsp:{dispatch_id}:cancel"


def gateway_alive(process_id: str) -> str:
    """Liveness key of one gateway process (``gw_<hex>``), refreshed while it runs."""
    return f"{PREFIX}gw:{process_id}:alive"


def gateway_control(process_id: str) -> str:
    """Stream of credit and cancel messages for the dispatches one process pumps."""
    return f"{PREFIX}gw:{process_id}:ctl"


def gateway_wake(process_id: str, shard: int) -> str:
    """Stream that wakes one of a process's blocked queue readers (its runtimes changed)."""
    return f"{PREFIX}gw:{process_id}:wake:{shard}"


def workspace_runtimes(name: str) -> str:
    """Set of the runtime ids of one workspace."""
    return f"{PREFIX}ws:{name}:runtimes"


def device_grant(device_key: str) -> str:
    """Hash of one pending device authorization, by ``sha256(device_code)`` (RFC 8628)."""
    return f"{PREFIX}oauth:device:{device_key}"


def device_user_code(user_code: str) -> str:
    """User code (normalised, 8 letters) -> device key; lives as long as the code."""
    return f"{PREFIX}oauth:user_code:{user_code}"


def device_lookup_failures(address: str) -> str:
    """Counter of failed user-code lookups from one client address (fixed window)."""
    return f"{PREFIX}rl:user_code:addr:{address}"


def device_code_attempts(user_code: str) -> str:
    """Counter of approve/deny attempts on one user code (burned past a limit)."""
    return f"{PREFIX}rl:user_code:code:{user_code}"
