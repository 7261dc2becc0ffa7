"""The parts one gateway process runs with, built and torn down together.

:class:`Gateway` owns the Redis connection pool, the live catalog, the credential stores, the
upstream HTTP pool and the dispatch service; the app factory starts it in the ASGI lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from billing.spend import SpendGuard
from billing.spool import SpoolOutbox
from billing.usage import DiscardingOutbox, UsageOutbox
from billing.usage_ledger import UsageLedger
from catalog.loader import load_seed
from gateway import keys
from gateway.auth.apikeys import ApiKeyStore
from gateway.auth.authenticator import Authenticator
from gateway.auth.jwt import JwtVerifier
from gateway.auth.workspaces import WorkspaceStore
from gateway.catalog_store import CatalogStore, LiveCatalog
from gateway.dispatch.service import DispatchService
from gateway.dispatch.upstream import UpstreamClient
from gateway.idempotency import IdempotencyStore
from gateway.metrics import Metrics
from gateway.runtimes.store import RuntimeStore
from gateway.settings import Settings, spool_path
from gateway.tunnel.host import TunnelHost

__all__ = ["Gateway"]

log = logging.getLogger("lattice.gateway")

#: How long found keys and workspaces stay cached while change events are being received.
EVENT_CACHE_TTL_S = 30.0
#: The catalog's backstop poll while catalog events arrive by pub/sub (a write is then seen
#: at once through its event; the poll only covers an event lost in a silent disconnect).
SUBSCRIBED_CATALOG_POLL_S = 1.0


class Gateway:
    def __init__(self, settings: Settings, redis: aioredis.Redis | None = None) -> None:
        self.settings = settings
        self.redis = redis or aioredis.Redis.from_url(
            settings.redis_url,
            max_connections=4096,
            health_check_interval=30,
            socket_connect_timeout=2.0,
            socket_timeout=5.0,
        )
        self.metrics = Metrics()
        self.catalog_store = CatalogStore(self.redis)
        self.catalog = LiveCatalog(self.catalog_store, poll_interval=settings.catalog_poll_s)
        self.apikeys = ApiKeyStore(self.redis)
        self.workspaces = WorkspaceStore(self.redis)
        self.runtimes = RuntimeStore(self.redis)
        self.jwt = JwtVerifier(settings.jwt_issuers) if settings.jwt_issuers else None
        self.authenticator = Authenticator(self.apikeys, self.jwt)
        self.upstreams = UpstreamClient()
        self.idempotency = IdempotencyStore(self.redis)
        #: Usage records go to a local spool, shipped to Redis in the background.
        self.spool = SpoolOutbox(spool_path(settings), self.redis) if settings.metering else None
        outbox: UsageOutbox = self.spool or DiscardingOutbox()
        self.spend = SpendGuard(self.redis)
        self.ledger = UsageLedger(self.redis)
        #: Personal runtimes: tunnels held here, dispatch to tunnels held anywhere.
        self.tunnels = TunnelHost(self.redis, self.runtimes, self.catalog, settings)
        self.service = DispatchService(
            runtimes=self.tunnels.directory,
            runtime_caller=self.tunnels.caller,
            spend=self.spend,
            catalog=self.catalog,
            workspaces=self.workspaces,
            upstreams=self.upstreams,
            outbox=outbox,
            idempotency=self.idempotency,
            metrics=self.metrics,
            drop_params_default=settings.drop_params,
        )
        self._events_task: asyncio.Task[None] | None = None
        self.started = False

    async def start(self) -> None:
        if self.settings.seed_catalog:
            await self.catalog_store.seed_if_empty(load_seed())
        await self.catalog.start()
        if self.spool is not None:
            await self.spool.start()
        await self.ledger.start()
        await self.tunnels.start()
        self._events_task = asyncio.create_task(self._listen_events(), name="lattice-events")
        self.started = True

    async def stop(self) -> None:
        """Stop every part, in order. A part that cannot reach Redis on the way out (it is
        gone, or going) is logged and the next part still stops: usage records not shipped
        stay in the spool for the next process, presence keys expire by themselves."""
        self.started = False
        await self._stop_step("tunnels", self.tunnels.stop)
        if self._events_task is not None:
            self._events_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._events_task
        await self._stop_step("catalog", self.catalog.stop)
        await self._stop_step("upstreams", self.upstreams.close)
        if self.jwt is not None:
            await self._stop_step("jwt", self.jwt.close)
        await self._stop_step("spend", self.spend.drain)
        await self._stop_step("ledger", self.ledger.stop)
        if self.spool is not None:
            # ships what it can while Redis is still open
            await self._stop_step("spool", self.spool.stop)
        await self._stop_step("redis", self.redis.aclose)

    @staticmethod
    async def _stop_step(name: str, step: Callable[[], Awaitable[object]]) -> None:
        try:
            await step()
        except (aioredis.RedisError, OSError) as exc:
            log.warning("part stopped without Redis", extra={"part": name, "error": repr(exc)})

    async def ready(self) -> bool:
        try:
            await self.redis.ping()
        except (aioredis.RedisError, OSError):
            return False
        return self.started and self.catalog.current.version > 0

    async def _listen_events(self) -> None:
        """Apply other processes' changes the moment they happen: revoked keys, changed
        workspaces, new catalog versions.

        While subscribed, revocations arrive as events, so found keys and workspaces may be
        cached longer (:data:`EVENT_CACHE_TTL_S`); the caches are cleared whenever the
        subscription starts or stops, and without it they fall back to their short TTL, which
        alone keeps revocation within a second.
        """
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(keys.EVENTS_CHANNEL)
                async for message in pubsub.listen():
                    kind = message.get("type")
                    if kind == "subscribe":
                        # From here on no event can be missed: drop what was cached before.
                        self._set_cache_ttl(EVENT_CACHE_TTL_S)
                        continue
                    data = message.get("data")
                    if kind == "message" and isinstance(data, (bytes, str)):
                        await self._apply_event(data.decode() if isinstance(data, bytes) else data)
            except asyncio.CancelledError:
                raise
            except (aioredis.RedisError, OSError) as exc:
                self._set_cache_ttl(None)
                log.warning("event subscription lost; retrying", extra={"error": str(exc)})
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _set_cache_ttl(self, ttl_s: float | None) -> None:
        self.apikeys.set_cache_ttl(ttl_s)
        self.workspaces.set_cache_ttl(ttl_s)
        self.spend.set_cache_ttl(ttl_s)
        subscribed = ttl_s is not None
        self.catalog.set_poll_interval(
            max(SUBSCRIBED_CATALOG_POLL_S, self.settings.catalog_poll_s)
            if subscribed
            else self.settings.catalog_poll_s
        )

    async def _apply_event(self, text: str) -> None:
        if self.apikeys.handle_event(text) or self.tunnels.handle_event(text):
            return
        if text.startswith("workspace-changed:"):
            name = text.split(":", 1)[1]
            self.workspaces.invalidate(name)
            self.spend.invalidate(name)
        elif text.startswith("catalog:"):
            await self.catalog.run_once()
