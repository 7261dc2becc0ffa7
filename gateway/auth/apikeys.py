"""Workspace API keys: ``sk_<key_id>_<secret>``, stored hashed, verified with one Redis read.

Format: ``sk_`` + key id + ``_`` + secret, for example ``sk_ltq4xv7mza2kpd_Yk3…`` where

- the key id is ``lt`` + 12 characters of lower-case base32 (60 random bits; no ``_``). It is
  public: it names the key in listings, logs and the admin API, and it is the Redis lookup key;
- the secret is ``secrets.token_urlsafe(32)`` (256 bits). It may contain ``_`` and ``-``, so a
  token is split on its first two underscores only.

Only ``sha256(secret)`` is stored, in the hash at ``keys.apikey(key_id)``. A fast unsalted hash is
the right tool here: the secret is 256 random bits, so there is nothing to brute-force or look up
in a table, and a slow KDF (bcrypt, argon2) would only add milliseconds to every request.

Every rejection (malformed token, unknown key id, wrong secret, revoked key) raises the same
:class:`AuthenticationFailed` with the same message and code, never echoing the token; an unknown
id still hashes and compares against a dummy digest so that it costs what a wrong secret costs.

Admin keys (scope ``lattice:admin``) live in the reserved workspace ``_admin``, which is not a
valid workspace name (see :mod:`gateway.auth.workspaces`) and so can never be created or claimed by
a tenant; only :meth:`ApiKeyStore.create_admin_key` makes them.

Revocation reaches every process within ``cache_ttl_s`` (0.5 s) through the cache TTL alone;
:meth:`ApiKeyStore.revoke` also publishes ``key-revoked:<id>`` on ``keys.EVENTS_CHANNEL`` so a
listener can call :meth:`ApiKeyStore.invalidate` (or :meth:`ApiKeyStore.handle_event`) at once.
While such a listener is subscribed it may lengthen the TTL of *found* keys
(:meth:`ApiKeyStore.set_cache_ttl`), since revocations then arrive as events; lookups that found
nothing always keep the short TTL, so a new key works within it.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping

import msgspec
import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from gateway import keys
from gateway.auth.principal import DEFAULT_SCOPES, Principal, Scope
from gateway.auth.workspaces import WORKSPACE_NAME_RE
from gateway.errors import AuthenticationFailed, InvalidRequest, NotFound

__all__ = [
    "ADMIN_WORKSPACE",
    "INVALID_KEY_MESSAGE",
    "KEY_REVOKED_EVENT",
    "KNOWN_SCOPES",
    "ApiKeyRecord",
    "ApiKeyStore",
    "parse_api_key",
]

#: Reserved workspace of operator keys; ``_`` makes it an invalid tenant workspace name.
ADMIN_WORKSPACE = "_admin"
#: Prefix of the pub/sub message :meth:`ApiKeyStore.revoke` publishes on ``EVENTS_CHANNEL``.
KEY_REVOKED_EVENT = "key-revoked:"
INVALID_KEY_MESSAGE = (
    "Incorrect API key provided. You can find your API keys in your Lattice workspace settings."
)
KNOWN_SCOPES: frozenset[str] = frozenset(
    value for name, value in vars(Scope).items() if name.isupper() and isinstance(value, str)
)

_KEY_ID_PREFIX = "lt"
_KEY_ID_RE = re.compile(r"lt[a-z2-7]{12}")
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{32,128}")
_MAX_TOKEN_LEN = 200
_SECRET_BYTES = 32
_DUMMY_DIGEST = hashlib.sha256(b"lattice-dummy-secret").hexdigest().encode()
_CACHE_MAX = 100_000


class ApiKeyRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The public view of one API key: no secret, no hash. Times are Unix seconds."""

    id: str
    workspace: str
    scopes: tuple[str, ...]
    created: int
    name: str | None = None
    subject: str | None = None
    revoked_at: int | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


class _CacheEntry(msgspec.Struct, frozen=True):
    record: ApiKeyRecord | None
    digest: bytes  # hex sha256 of the secret, or the dummy digest for unknown ids
    principal: Principal | None
    fetched_at: float


def parse_api_key(token: str) -> tuple[str, str] | None:
    """Split ``sk_<key_id>_<secret>`` into ``(key_id, secret)``; ``None`` if malformed."""
    if len(token) > _MAX_TOKEN_LEN or not token.startswith("sk_"):
        return None
    key_id, sep, secret = token[3:].partition("_")  # first two underscores only
    if not sep or not _KEY_ID_RE.fullmatch(key_id) or not _SECRET_RE.fullmatch(secret):
        return None
    return key_id, secret


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).hexdigest().encode()


def _new_key_id() -> str:
    return _KEY_ID_PREFIX + base64.b32encode(secrets.token_bytes(10)).decode().lower()[:12]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode(raw: Mapping[bytes | str, bytes | str]) -> tuple[ApiKeyRecord, bytes] | None:
    """Record and stored digest from an HGETALL reply; ``None`` if empty or incomplete."""
    h = {_text(k): _text(v) for k, v in raw.items()}
    try:
        record = ApiKeyRecord(
            id=h["id"],
            workspace=h["workspace"],
            scopes=tuple(h["scopes"].split()),
            created=int(h["created"]),
            name=h.get("name"),
            subject=h.get("subject"),
            revoked_at=int(h["revoked_at"]) if "revoked_at" in h else None,
        )
        return record, h["secret_sha256"].encode()
    except (KeyError, ValueError):
        return None


def _invalid() -> AuthenticationFailed:
    return AuthenticationFailed(INVALID_KEY_MESSAGE, code="invalid_api_key")


class ApiKeyStore:
    """Create, list, revoke and verify API keys held in Redis.

    :meth:`verify` is the request hot path: one HGETALL per key id per ``cache_ttl_s``, then
    in-process hits. Failed lookups are cached no longer than successful ones.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        cache_ttl_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._ttl = cache_ttl_s
        self._short_ttl = cache_ttl_s
        self._clock = clock
        self._cache: dict[str, _CacheEntry] = {}

    # -- admin side ------------------------------------------------------------------------

    async def create(
        self,
        workspace: str,
        *,
        name: str | None = None,
        scopes: Iterable[str] = DEFAULT_SCOPES,
        subject: str | None = None,
    ) -> tuple[str, ApiKeyRecord]:
        """Make a key for an existing workspace; returns ``(plaintext, record)``.

        The plaintext is returned here once and never stored. Raises :class:`InvalidRequest`
        for a bad workspace name or unknown scopes (``lattice:admin`` included: see
        :meth:`create_admin_key`), :class:`NotFound` if the workspace does not exist.
        """
        if not WORKSPACE_NAME_RE.fullmatch(workspace):
            raise InvalidRequest("Invalid workspace name.", param="workspace")
        if name is not None and len(name) > 128:
            raise InvalidRequest("Key name is longer than 128 characters.", param="name")
        scope_tuple = tuple(dict.fromkeys(scopes))
        rejected = (set(scope_tuple) - KNOWN_SCOPES) | ({Scope.ADMIN} & set(scope_tuple))
        if rejected:
            raise InvalidRequest(
                f"Unknown or forbidden scope(s): {', '.join(sorted(rejected))}.", param="scopes"
            )
        if not await self._redis.exists(keys.workspace(workspace)):
            raise NotFound(f"Workspace {workspace!r} not found.", code="workspace_not_found")
        return await self._create(workspace, scope_tuple, name, subject)

    async def create_admin_key(
        self, *, name: str | None = None, subject: str | None = None
    ) -> tuple[str, ApiKeyRecord]:
        """Make an operator key: workspace ``_admin``, scopes ``(lattice:admin,)``."""
        return await self._create(ADMIN_WORKSPACE, (Scope.ADMIN,), name, subject)

    async def _create(
        self, workspace: str, scopes: tuple[str, ...], name: str | None, subject: str | None
    ) -> tuple[str, ApiKeyRecord]:
        secret = secrets.token_urlsafe(_SECRET_BYTES)
        created = int(time.time())
        while True:
            key_id = _new_key_id()
            # HSETNX claims the id atomically: a (60-bit, so theoretical) collision retries
            # instead of overwriting another workspace's key.
            if await self._redis.hsetnx(keys.apikey(key_id), "id", key_id):
                break
        record = ApiKeyRecord(
            id=key_id,
            workspace=workspace,
            scopes=scopes,
            created=created,
            name=name,
            subject=subject,
        )
        fields: dict[FieldT, EncodableT] = {
            "workspace": workspace,
            "scopes": " ".join(scopes),
            "created": str(created),
            "secret_sha256": _digest(secret).decode(),
        }
        if name is not None:
            fields["name"] = name
        if subject is not None:
            fields["subject"] = subject
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.apikey(key_id), mapping=fields)
            pipe.sadd(keys.APIKEYS_INDEX, key_id)
            pipe.sadd(keys.workspace_apikeys(workspace), key_id)
            await pipe.execute()
        self.invalidate(key_id)
        return f"sk_{key_id}_{secret}", record

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        """One key's public record (read from Redis, not the cache)."""
        if not _KEY_ID_RE.fullmatch(key_id):
            return None
        decoded = _decode(await self._redis.hgetall(keys.apikey(key_id)))
        return None if decoded is None else decoded[0]

    async def list(self, workspace: str | None = None) -> builtins.list[ApiKeyRecord]:
        """Public records (revoked ones included), oldest first; every key if no workspace."""
        index = keys.APIKEYS_INDEX if workspace is None else keys.workspace_apikeys(workspace)
        ids = sorted(_text(i) for i in await self._redis.smembers(index))
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(keys.apikey(key_id))
            replies = await pipe.execute()
        records = [d[0] for d in map(_decode, replies) if d is not None]
        return sorted(records, key=lambda r: (r.created, r.id))

    async def revoke(self, key_id: str) -> bool:
        """Revoke a key; ``False`` if there is no such key. Revoking twice keeps the first time.

        Publishes ``key-revoked:<id>`` on ``keys.EVENTS_CHANNEL``.
        """
        key = keys.apikey(key_id)
        if not _KEY_ID_RE.fullmatch(key_id) or not await self._redis.hexists(key, "secret_sha256"):
            return False
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, "revoked_at", str(int(time.time())))
            pipe.publish(keys.EVENTS_CHANNEL, KEY_REVOKED_EVENT + key_id)
            await pipe.execute()
        self.invalidate(key_id)
        return True

    # -- request side ----------------------------------------------------------------------

    async def verify(self, token: str) -> Principal:
        """The :class:`Principal` of a valid, unrevoked key, else :class:`AuthenticationFailed`."""
        parsed = parse_api_key(token)
        if parsed is None:
            raise _invalid()
        key_id, secret = parsed
        entry = await self._lookup(key_id)
        # Compare even for unknown ids (against the dummy digest) so they cost the same.
        if not hmac.compare_digest(_digest(secret), entry.digest) or entry.principal is None:
            raise _invalid()
        return entry.principal

    def invalidate(self, key_id: str) -> None:
        """Drop this process's cached copy of one key (on ``key-revoked:<id>``)."""
        self._cache.pop(key_id, None)

    def set_cache_ttl(self, ttl_s: float | None) -> None:
        """Keep found keys ``ttl_s`` seconds (``None``: back to the constructor's TTL) and
        forget everything cached: called when revocation events start or stop arriving."""
        self._ttl = self._short_ttl if ttl_s is None else ttl_s
        self._cache.clear()

    def handle_event(self, message: bytes | str) -> bool:
        """Apply one ``EVENTS_CHANNEL`` message; ``True`` if it was a key revocation."""
        text = _text(message)
        if not text.startswith(KEY_REVOKED_EVENT):
            return False
        self.invalidate(text[len(KEY_REVOKED_EVENT) :])
        return True

    async def _lookup(self, key_id: str) -> _CacheEntry:
        now = self._clock()
        entry = self._cache.get(key_id)
        if entry is not None and now - entry.fetched_at < (
            self._ttl if entry.record is not None else self._short_ttl
        ):
            return entry
        decoded = _decode(await self._redis.hgetall(keys.apikey(key_id)))
        if decoded is None:
            entry = _CacheEntry(None, _DUMMY_DIGEST, None, now)
        else:
            record, digest = decoded
            principal = None
            if record.revoked_at is None:
                principal = Principal(
                    workspace=record.workspace,
                    subject=record.subject or f"apikey:{record.id}",
                    scopes=record.scopes,
                    kind="api_key",
                    key_id=record.id,
                )
            entry = _CacheEntry(record, digest, principal, now)
        if len(self._cache) >= _CACHE_MAX:
            # A flood of random key ids must not grow memory without bound.
            self._cache.clear()
        self._cache[key_id] = entry
        return entry
