"""Workspaces: the tenant every key, token, runtime and usage record belongs to.

A workspace is one msgpack-encoded :class:`Workspace` at ``keys.workspace(name)``; its name is
also a member of ``keys.WORKSPACES_INDEX``. Names are lower-case slugs
(``^[a-z0-9][a-z0-9._-]{0,63}$``); anything starting with ``_`` is reserved (the admin keys live
in ``_admin``, see :mod:`gateway.auth.apikeys`) and can never be created here.

The request path reads the workspace on every call, so :class:`WorkspaceStore` keeps a small
in-process cache of what it read for ``cache_ttl_s`` (0.5 s): a change made by another process
is seen within that time, a change made through the same store at once.
"""

from __future__ import annotations

import builtins
import re
import time
from collections.abc import Callable
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import WatchError

from gateway import keys
from gateway.errors import InvalidRequest, NotFound

__all__ = ["WORKSPACE_NAME_RE", "Workspace", "WorkspaceStore", "validate_workspace_name"]

WORKSPACE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

#: Fields a caller may set through ``create(**settings)`` / ``update(**fields)``.
_SETTABLE = frozenset({"default_model", "drop_params", "log_bodies", "allow_marketplace"})
_CACHE_MAX = 10_000


class Workspace(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One workspace and its request-path settings.

    ``drop_params``: silently drop parameters the chosen offering does not support (else 400).
    ``log_bodies``: keep request/response bodies in logs. ``allow_marketplace``: requests may
    fall back to marketplace providers when the workspace's own runtimes cannot serve them.
    """

    name: str
    created: int
    default_model: str | None = None
    drop_params: bool = True
    log_bodies: bool = False
    allow_marketplace: bool = False


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Workspace)


def _decode(raw: bytes | str) -> Workspace:
    if not isinstance(raw, bytes):
        raise TypeError("WorkspaceStore needs a Redis client with decode_responses=False")
    return _decoder.decode(raw)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def validate_workspace_name(name: str) -> str:
    """Return ``name`` if it is a valid workspace name, else raise :class:`InvalidRequest`."""
    if not isinstance(name, str) or not WORKSPACE_NAME_RE.fullmatch(name):
        raise InvalidRequest(
            "Invalid workspace name: use 1-64 characters a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit.",
            param="name",
        )
    return name


def _build(base: dict[str, Any], fields: dict[str, Any]) -> Workspace:
    unknown = set(fields) - _SETTABLE
    if unknown:
        raise InvalidRequest(
            f"Unknown workspace setting(s): {', '.join(sorted(unknown))}.",
            param=sorted(unknown)[0],
        )
    try:
        return msgspec.convert({**base, **fields}, Workspace, strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"Invalid workspace setting: {exc}") from None


class WorkspaceStore:
    """Workspaces in Redis, with a short-lived per-process read cache."""

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
        self._cache: dict[str, tuple[Workspace | None, float]] = {}

    async def create(self, name: str, /, **settings: Any) -> Workspace:
        """Create the workspace; if it exists already, return it unchanged (idempotent)."""
        validate_workspace_name(name)
        ws = _build({"name": name, "created": int(time.time())}, settings)
        key = keys.workspace(name)
        # SET NX: two concurrent creates cannot overwrite each other; the loser reads back.
        created = await self._redis.set(key, _encoder.encode(ws), nx=True)
        await self._redis.sadd(keys.WORKSPACES_INDEX, name)
        self.invalidate(name)
        if created:
            return ws
        existing = await self._fetch(name)
        assert existing is not None  # workspaces are never deleted
        return existing

    async def get(self, name: str) -> Workspace | None:
        """The workspace, or ``None``; may be up to ``cache_ttl_s`` old."""
        hit = self._cache.get(name)
        now = self._clock()
        if hit is not None:
            ttl = self._ttl if hit[0] is not None else self._short_ttl
            if now - hit[1] < ttl:
                return hit[0]
        if not WORKSPACE_NAME_RE.fullmatch(name):
            return None
        ws = await self._fetch(name)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[name] = (ws, now)
        return ws

    async def list(self) -> builtins.list[Workspace]:
        """Every workspace, sorted by name (always read from Redis)."""
        names = sorted(_text(n) for n in await self._redis.smembers(keys.WORKSPACES_INDEX))
        if not names:
            return []
        raws = await self._redis.mget([keys.workspace(n) for n in names])
        return [_decode(raw) for raw in raws if raw is not None]

    async def update(self, name: str, /, **fields: Any) -> Workspace:
        """Change settings of an existing workspace; unknown fields -> :class:`InvalidRequest`.

        Raises :class:`NotFound` when the workspace does not exist.
        """
        validate_workspace_name(name)
        key = keys.workspace(name)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    # Optimistic transaction: a concurrent update of the same workspace
                    # makes EXEC fail and this read-modify-write runs again.
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        raise NotFound(f"Workspace {name!r} not found.", code="workspace_not_found")
                    ws = _build(msgspec.structs.asdict(_decode(raw)), fields)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(key, _encoder.encode(ws))
                    await pipe.execute()
                    break
                except WatchError:
                    continue
        self.invalidate(name)
        return ws

    def set_cache_ttl(self, ttl_s: float | None) -> None:
        """Keep found workspaces ``ttl_s`` seconds (``None``: the constructor's TTL) and forget
        everything cached: called when change events start or stop arriving."""
        self._ttl = self._short_ttl if ttl_s is None else ttl_s
        self._cache.clear()

    def invalidate(self, name: str) -> None:
        """Forget this process's cached copy of the workspace."""
        self._cache.pop(name, None)

    async def _fetch(self, name: str) -> Workspace | None:
        raw = await self._redis.get(keys.workspace(name))
        return None if raw is None else _decode(raw)
