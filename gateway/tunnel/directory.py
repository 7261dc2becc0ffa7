"""Which personal runtimes a workspace has, and which are online: the dispatch planner's view
(:class:`gateway.dispatch.plan.RuntimeView`).

``find`` is one Redis round trip whatever the answer (a foreign runtime costs what a missing
one costs), except for a runtime of the caller's own workspace that this process holds, or
found within the last second (dropped at once by ``runtime-presence:<workspace>`` and
``runtime-revoked:<id>``).

``online`` is on the path of every request for a canonical model, so it never waits for
Redis when it has a recent answer: each process keeps a workspace's online runtimes, serves
them fresh for ``ttl_s`` (1 s), and for up to ``stale_s`` (10 s) serves the copy it has while
one background read replaces it (stale-while-revalidate). A sparse caller - one request every
few seconds, each one a stream - thus pays no round trip, and a busy one sees a change within
about a second. A tunnel opening or closing anywhere publishes ``runtime-presence:<workspace>``
and every process drops its copy at once, so the next request reads afresh; a read that was
already under way when the copy was dropped is not kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from catalog.charges import effective_pricing, runtime_offering
from catalog.model import Catalog, Offering
from gateway.runtimes.records import RuntimeRecord
from gateway.runtimes.store import RuntimeStore

__all__ = ["PRESENCE_EVENT", "RuntimeDirectory"]

log = logging.getLogger("lattice.tunnel")

#: Pub/sub event (on ``keys.EVENTS_CHANNEL``) naming a workspace whose runtimes came or went.
PRESENCE_EVENT = "runtime-presence:"


class RuntimeDirectory:
    def __init__(
        self,
        store: RuntimeStore,
        catalog: Callable[[], Catalog],
        *,
        ttl_s: float = 1.0,
        stale_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        local: Callable[[str], RuntimeRecord | None] | None = None,
    ) -> None:
        self._store = store
        self._local = local
        self._catalog = catalog
        self._ttl = ttl_s
        self._stale = max(stale_s, ttl_s)
        self._clock = clock
        #: workspace -> (read at, online runtimes)
        self._online: dict[str, tuple[float, tuple[RuntimeRecord, ...]]] = {}
        #: bumped by :meth:`invalidate`: a read started before any invalidation does not
        #: store what it found (one counter for all workspaces; such a read is merely not kept)
        self._generation = 0
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        #: (workspace, runtime id) -> (read at, record) of runtimes found in Redis
        self._found: dict[tuple[str, str], tuple[float, RuntimeRecord]] = {}

    async def find(self, workspace: str, runtime_id: str) -> RuntimeRecord | None:
        # A runtime whose tunnel this process holds for this very workspace is known without
        # a Redis read (the local fast path). A runtime of this workspace held elsewhere that
        # was found within ``ttl_s`` is known too (dropped at once by a presence or revocation
        # event). Any other id - foreign, unknown - takes the one read every time, so a
        # foreign id still costs what an unknown one costs.
        if self._local is not None:
            held = self._local(runtime_id)
            if held is not None and held.workspace == workspace:
                return held
        key = (workspace, runtime_id)
        hit = self._found.get(key)
        if hit is not None and self._clock() - hit[0] < self._ttl:
            return hit[1]
        generation = self._generation
        read_at = self._clock()
        record = await self._store.get(workspace, runtime_id)
        if record is None or record.revoked_ms is not None:
            return None
        if self._generation == generation:  # no presence or revocation event meanwhile
            if len(self._found) > 10_000:
                self._found.clear()
            self._found[key] = (read_at, record)
        return record

    async def online(self, workspace: str) -> tuple[RuntimeRecord, ...]:
        cached = self._online.get(workspace)
        if cached is not None:
            age = self._clock() - cached[0]
            if age < self._ttl:
                return cached[1]
            if age < self._stale:
                if workspace not in self._refreshing:
                    self._refreshing[workspace] = asyncio.create_task(
                        self._refresh(workspace), name="lattice-runtimes-online"
                    )
                return cached[1]
        return await self._read(workspace)

    async def _read(self, workspace: str) -> tuple[RuntimeRecord, ...]:
        generation = self._generation
        read_at = self._clock()
        found = tuple(
            record
            for record, status in await self._store.list_with_status(workspace)
            if status == "reachable"
        )
        if self._generation == generation:
            if len(self._online) > 10_000:  # bound the cache; it refills in a second
                self._online.clear()
            self._online[workspace] = (read_at, found)
        return found

    async def _refresh(self, workspace: str) -> None:
        try:
            await self._read(workspace)
        except Exception as exc:  # Redis away: the next request past stale_s reads (and fails)
            log.warning("online runtimes refresh failed", extra={"error": type(exc).__name__})
        finally:
            self._refreshing.pop(workspace, None)

    def invalidate(self, workspace: str) -> None:
        self._online.pop(workspace, None)
        self._generation += 1
        for key in [k for k in self._found if k[0] == workspace]:
            del self._found[key]

    def forget_runtime(self, runtime_id: str) -> None:
        """A runtime was revoked: never answer from a copy of its record again."""
        self._generation += 1
        for key in [k for k in self._found if k[1] == runtime_id]:
            del self._found[key]

    async def aclose(self) -> None:
        """Cancel background reads still under way."""
        tasks = list(self._refreshing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def handle_event(self, text: str) -> bool:
        """Apply a ``runtime-presence:<ws>`` event; ``True`` if it was one."""
        if not text.startswith(PRESENCE_EVENT):
            return False
        self.invalidate(text[len(PRESENCE_EVENT) :])
        return True

    def offering(self, model: str, runtime_id: str) -> Offering:
        return runtime_offering(model, runtime_id, effective_pricing(self._catalog()))
