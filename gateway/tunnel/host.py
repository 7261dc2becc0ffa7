"""This process's side of personal runtimes, assembled: accepting tunnels, holding them,
reaching runtimes held by other processes, minting dispatch tokens, and the planner's view of
which runtimes a workspace has online.

- ``serve`` accepts ``/v1/tunnel`` (:func:`~gateway.tunnel.session.serve_tunnel`): the daemon's
  credential is checked against :class:`~gateway.runtimes.store.RuntimeStore`; on its hello the
  advertisement is recorded, the tunnel registered (presence key, queue consumer) and
  ``runtime-presence:<workspace>`` published so every process's planner sees it at once.
- ``caller`` is what the dispatch service uses: a minted dispatch opened through
  :class:`~gateway.tunnel.remote.RuntimeDispatcher` (locally when this process holds the
  tunnel, through Redis otherwise).
- ``handle_event`` applies ``runtime-revoked:<id>`` (the holder closes the tunnel with the
  REVOKED code, so the daemon stops) and ``runtime-presence:<ws>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, cast

import msgspec
import redis.asyncio as aioredis
from litestar.types import Receive, Scope, Send

from catalog.model import Catalog
from daemon.tunnel.frames import CloseCode, Hello
from gateway import keys
from gateway.dispatch.runtime_target import RuntimeCaller
from gateway.runtimes.records import RuntimeRecord
from gateway.runtimes.store import RUNTIME_REVOKED_EVENT, RuntimeStore
from gateway.settings import Settings
from gateway.tunnel.bus import QueueConsumer
from gateway.tunnel.directory import PRESENCE_EVENT, RuntimeDirectory
from gateway.tunnel.registry import TunnelRegistry
from gateway.tunnel.remote import RuntimeDispatcher
from gateway.tunnel.session import GatewayTunnelSession, serve_tunnel, tick_interval
from gateway.tunnel.ticker import SessionTicker
from gateway.tunnel.tokens import DispatchSigner

__all__ = ["TUNNEL_PATH", "TunnelHost"]

log = logging.getLogger("lattice.tunnel")

TUNNEL_PATH = "/v1/tunnel"
#: How often held runtimes get their ``last_seen`` refreshed.
TOUCH_INTERVAL_S = 10.0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class TunnelHost:
    def __init__(
        self,
        redis: aioredis.Redis,
        runtimes: RuntimeStore,
        catalog: Any,
        settings: Settings,
    ) -> None:
        self._redis = redis
        self._runtimes = runtimes
        self._settings = settings
        self.signer = self.dispatch_signer = DispatchSigner(redis)
        self.registry = TunnelRegistry(redis)
        self.dispatcher = RuntimeDispatcher(redis, self.registry)
        self.consumer = QueueConsumer(redis, self.registry)

        def current() -> Catalog:
            return catalog.current  # type: ignore[no-any-return]

        self.directory = RuntimeDirectory(runtimes, current, local=self._held_runtime)
        self.caller = RuntimeCaller(self.dispatcher.open, self.signer, settings.runtime_timeout_s)
        self._sessions: set[GatewayTunnelSession] = set()
        self._tasks: list[asyncio.Task[None]] = []
        #: One clock for every tunnel held here (a timer task per tunnel costs a core at 5,000).
        self.ticker = SessionTicker(
            tick_interval(settings.tunnel_heartbeat_s, settings.tunnel_dead_after_s)
        )

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self.signer.start()
        await self.registry.start()
        await self.consumer.start()
        self._tasks = [
            asyncio.create_task(self.signer.run(10.0), name="lattice-dispatch-jwk"),
            asyncio.create_task(self._touch_loop(), name="lattice-runtime-touch"),
        ]

    async def stop(self) -> None:
        """Tell every daemon to move to another process (GoAway), give in-flight work a
        moment, then stop holding anything."""
        sessions = list(self._sessions)
        for session in sessions:
            with contextlib.suppress(Exception):
                await session.goaway("gateway shutting down")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.consumer.stop()
        for session in sessions:
            with contextlib.suppress(Exception):
                await session.close("gateway shutting down")
        await self.registry.stop()
        await self.ticker.aclose()
        await self.directory.aclose()
        await self.dispatcher.aclose()  # lets queued reply-stream deletions finish

    # -- the dispatch side ------------------------------------------------------------------

    def _held_runtime(self, runtime_id: str) -> RuntimeRecord | None:
        """The record of a runtime whose tunnel this process holds and which takes work, with
        what its daemon advertised in its hello; ``None`` otherwise."""
        session = self.registry.local(runtime_id)
        if not isinstance(session, GatewayTunnelSession) or not session.accepting:
            return None
        runtime, hello = session.runtime, session.hello
        if not isinstance(runtime, RuntimeRecord) or hello is None:
            return None
        return msgspec.structs.replace(
            runtime,
            models=tuple(hello.models),
            task_classes=tuple(hello.task_classes),
            default_model=hello.default_model,
        )

    # -- the tunnel side --------------------------------------------------------------------

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Litestar's ASGI types are unions of typed dicts; the session speaks plain mappings.
        await serve_tunnel(
            dict(scope),
            cast(Any, receive),
            cast(Any, send),
            authenticate=self._runtimes.authenticate,
            on_hello=self._on_hello,
            on_closed=self._on_closed,
            heartbeat_s=self._settings.tunnel_heartbeat_s,
            dead_after_s=self._settings.tunnel_dead_after_s,
            ticker=self.ticker,
        )

    async def _on_hello(self, session: GatewayTunnelSession, hello: Hello) -> None:
        await self._runtimes.record_hello(
            session.runtime_id,
            models=hello.models,
            task_classes=hello.task_classes,
            default_model=hello.default_model,
            daemon_version=hello.daemon_version,
            concurrency=hello.concurrency,
            now_ms=_now_ms(),
        )
        self._sessions.add(session)
        await self.registry.register(session)
        await self._presence(session)
        log.info("runtime connected", extra={"runtime_id": session.runtime_id})

    async def _on_closed(self, session: GatewayTunnelSession) -> None:
        self._sessions.discard(session)
        try:
            await self.registry.unregister(session)
            await self._presence(session)
        except (aioredis.RedisError, OSError) as exc:  # the presence key expires anyway
            log.warning("runtime unregistration failed", extra={"error": repr(exc)})
        log.info("runtime disconnected", extra={"runtime_id": session.runtime_id})

    async def _presence(self, session: GatewayTunnelSession) -> None:
        runtime = session.runtime
        workspace = runtime.workspace if isinstance(runtime, RuntimeRecord) else None
        if workspace:
            self.directory.invalidate(workspace)
            await self._redis.publish(keys.EVENTS_CHANNEL, PRESENCE_EVENT + workspace)

    async def _touch_loop(self) -> None:
        while True:
            await asyncio.sleep(TOUCH_INTERVAL_S)
            try:
                await self._runtimes.touch_many(self.registry.held(), _now_ms())
            except (aioredis.RedisError, OSError) as exc:
                log.warning("runtime last-seen refresh failed", extra={"error": repr(exc)})

    # -- events -----------------------------------------------------------------------------

    def handle_event(self, text: str) -> bool:
        """Apply a tunnel-related event from ``keys.EVENTS_CHANNEL``; ``True`` if it was one."""
        if self.directory.handle_event(text):
            return True
        if not text.startswith(RUNTIME_REVOKED_EVENT):
            return False
        runtime_id = text[len(RUNTIME_REVOKED_EVENT) :]
        self.directory.forget_runtime(runtime_id)
        session = self.registry.local(runtime_id)
        if isinstance(session, GatewayTunnelSession):
            task = asyncio.create_task(session.close("revoked", code=CloseCode.REVOKED))
            self._tasks.append(task)
        return True
