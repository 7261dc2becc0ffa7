"""The tunnels this gateway process holds, and their presence in Redis.

One :class:`TunnelRegistry` per gateway process, named ``gw_<16 hex>`` (:attr:`process_id`).

Contract:

- :meth:`register` makes a session the one this process uses for its runtime. The newest
  tunnel wins: an older session of the same runtime in this process is closed
  (``"replaced"``), and the presence key ``keys.runtime_holder(id)`` is overwritten with this
  process id whoever held it. ``holder_claim.lua`` creates the runtime queue's consumer group
  in the same script, before the holder becomes visible, so no dispatch is enqueued for a
  group that does not exist yet.
- A refresher (:meth:`run_once`, every ``refresh_interval_s``) keeps ``keys.gateway_alive``
  and every held runtime's presence alive (TTL ``presence_ttl_ms``). When a runtime's presence
  names another process, a newer tunnel of that runtime registered there: the local one is
  closed (``"replaced"``) and forgotten.
- :meth:`unregister` forgets a session only while it is still the current one, and deletes the
  presence only while it still names this process (compare-and-delete, ``holder_release.lua``).
- Listeners (:meth:`add_listener`) hear ``(runtime_id, held)`` after every change; the queue
  consumer (:mod:`gateway.tunnel.bus`) uses it to read the right streams.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import secrets
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import keys
from gateway.tunnel.types import TunnelSession

__all__ = ["RegistryListener", "TunnelRegistry", "cancel_tasks", "new_process_id"]

log = logging.getLogger(__name__)

#: Called with ``(runtime_id, held)`` after this process starts or stops holding a runtime.
RegistryListener = Callable[[str, bool], None]


def _lua(name: str) -> str:
    return importlib.resources.files("gateway.tunnel").joinpath(name).read_text()


_CLAIM_LUA = _lua("holder_claim.lua")
_REFRESH_LUA = _lua("holder_refresh.lua")
_RELEASE_LUA = _lua("holder_release.lua")
#: Runtimes per presence-refresh script call (``holder_refresh.lua``).
_REFRESH_BATCH = 500


async def cancel_tasks(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until all have ended. Cancels again while any runs on:
    redis-py (8.1) can swallow a cancellation that lands while it opens a connection."""
    while pending := [t for t in tasks if not t.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.1)
    for task in tasks:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background task failed", exc_info=exc)


def new_process_id() -> str:
    """A fresh gateway process id, ``gw_<16 hex>``."""
    return f"gw_{secrets.token_hex(8)}"


class TunnelRegistry:
    """The tunnels held by this process, by runtime id, and their presence keys."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        process_id: str | None = None,
        presence_ttl_ms: int = keys.TUNNEL_PRESENCE_TTL_MS,
        refresh_interval_s: float = 1.0,
    ) -> None:
        if refresh_interval_s * 1000 >= presence_ttl_ms:
            raise ValueError("the presence must be refreshed well within its TTL")
        self._redis = redis
        self.process_id = process_id or new_process_id()
        self.presence_ttl_ms = presence_ttl_ms
        self.refresh_interval_s = refresh_interval_s
        self._sessions: dict[str, TunnelSession] = {}
        self._listeners: list[RegistryListener] = []
        self._claim = redis.register_script(_CLAIM_LUA)
        self._refresh = redis.register_script(_REFRESH_LUA)
        self._release = redis.register_script(_RELEASE_LUA)
        self._task: asyncio.Task[None] | None = None

    # -- lookups (no I/O) ---------------------------------------------------------------------

    def local(self, runtime_id: str) -> TunnelSession | None:
        """The session this process holds for ``runtime_id``, if any (it may be draining:
        check ``accepting``)."""
        return self._sessions.get(runtime_id)

    def held(self) -> list[str]:
        """The runtime ids whose tunnel this process holds."""
        return list(self._sessions)

    def add_listener(self, listener: RegistryListener) -> None:
        self._listeners.append(listener)

    # -- changes ------------------------------------------------------------------------------

    async def register(self, session: TunnelSession) -> None:
        """Hold ``session``'s runtime here; an older tunnel of the same runtime is closed."""
        runtime_id = session.runtime_id
        old = self._sessions.get(runtime_id)
        self._sessions[runtime_id] = session
        await self._claim(
            keys=[keys.runtime_holder(runtime_id), keys.runtime_queue(runtime_id)],
            args=[
                self.process_id,
                self.presence_ttl_ms,
                keys.HOLDERS_GROUP,
                keys.DISPATCH_QUEUE_TTL_MS,
            ],
        )
        self._notify(runtime_id, True)
        if old is not None and old is not session:
            await old.close("replaced")

    async def unregister(self, session: TunnelSession) -> None:
        """Forget ``session`` if it is still the current one for its runtime (a replaced
        session unregistering late changes nothing)."""
        runtime_id = session.runtime_id
        if self._sessions.get(runtime_id) is not session:
            return
        del self._sessions[runtime_id]
        self._notify(runtime_id, False)
        await self._release(keys=[keys.runtime_holder(runtime_id)], args=[self.process_id])

    async def evict(self, runtime_id: str) -> TunnelSession | None:
        """Forget the tunnel of ``runtime_id`` if this process holds it and return it; the
        caller closes it (revocation: ``runtime-revoked:<id>`` → close with the REVOKED
        close code, so that the daemon stops instead of reconnecting)."""
        session = self._sessions.get(runtime_id)
        if session is not None:
            await self.unregister(session)
        return session

    def _notify(self, runtime_id: str, held: bool) -> None:
        for listener in self._listeners:
            listener(runtime_id, held)

    # -- the refresher ------------------------------------------------------------------------

    async def run_once(self) -> None:
        """Refresh this process's liveness and the presence of every held runtime; close the
        tunnels that a newer tunnel on another process superseded."""
        held = list(self._sessions.items())
        await self._redis.set(
            keys.gateway_alive(self.process_id), self.process_id, px=self.presence_ttl_ms
        )
        lost: list[tuple[str, TunnelSession]] = []
        args: list[str | int] = [self.process_id, self.presence_ttl_ms, keys.DISPATCH_QUEUE_TTL_MS]
        for start in range(0, len(held), _REFRESH_BATCH):
            batch = held[start : start + _REFRESH_BATCH]
            batch_keys: list[str] = []
            for runtime_id, _ in batch:
                batch_keys += [keys.runtime_holder(runtime_id), keys.runtime_queue(runtime_id)]
            results = await self._refresh(keys=batch_keys, args=args)
            lost.extend(item for item, ok in zip(batch, results, strict=True) if not ok)
        for runtime_id, session in lost:
            if self._sessions.get(runtime_id) is session:
                del self._sessions[runtime_id]
                self._notify(runtime_id, False)
                log.info("tunnel superseded by another process", extra={"runtime": runtime_id})
                await session.close("replaced")

    async def start(self) -> None:
        """Publish liveness now, then keep refreshing in the background."""
        await self.run_once()
        self._task = asyncio.create_task(self._run(), name="lattice-tunnel-registry")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            try:
                await self.run_once()
            except (RedisError, OSError) as exc:
                # The keys outlive a few failed refreshes (TTL ≫ interval); keep trying.
                log.warning("tunnel presence refresh failed", extra={"error": str(exc)})

    async def stop(self, *, release: bool = True) -> None:
        """Stop refreshing; with ``release``, delete this process's liveness and presence keys
        at once (other processes then see the runtimes unavailable without waiting for TTLs).
        ``release=False`` imitates a crashed process (tests)."""
        if self._task is not None:
            await cancel_tasks([self._task])
            self._task = None
        if not release:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for runtime_id in self._sessions:
                await self._release(
                    keys=[keys.runtime_holder(runtime_id)], args=[self.process_id], client=pipe
                )
            pipe.delete(keys.gateway_alive(self.process_id))
            await pipe.execute()
