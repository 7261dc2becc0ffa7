"""Which personal runtimes a workspace has, and which are online: the dispatch planner's view
(:class:`gateway.dispatch.plan.RuntimeView`).

``find`` is one Redis round trip whatever the answer (a foreign runtime costs what a missing
one costs). ``online`` is on the path of every request for a canonical model, so each process
keeps a workspace's online runtimes for a second; a tunnel opening or closing anywhere
publishes ``runtime-presence:<workspace>`` and every process drops its copy at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from catalog.charges import effective_pricing, runtime_offering
from catalog.model import Catalog, Offering
from gateway.runtimes.records import RuntimeRecord
from gateway.runtimes.store import RuntimeStore

__all__ = ["PRESENCE_EVENT", "RuntimeDirectory"]

#: Pub/sub event (on ``keys.EVENTS_CHANNEL``) naming a workspace whose runtimes came or went.
PRESENCE_EVENT = "runtime-presence:"


class RuntimeDirectory:
    def __init__(
        self,
        store: RuntimeStore,
        catalog: Callable[[], Catalog],
        *,
        ttl_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        local: Callable[[str], RuntimeRecord | None] | None = None,
    ) -> None:
        self._store = store
        self._local = local
        self._catalog = catalog
        self._ttl = ttl_s
        self._clock = clock
        self._online: dict[str, tuple[float, tuple[RuntimeRecord, ...]]] = {}

    async def find(self, workspace: str, runtime_id: str) -> RuntimeRecord | None:
        # A runtime whose tunnel this process holds for this very workspace is known without
        # a Redis read (the local fast path). Any other id - foreign, unknown, held elsewhere -
        # takes the one read, so a foreign id still costs what an unknown one costs.
        if self._local is not None:
            held = self._local(runtime_id)
            if held is not None and held.workspace == workspace:
                return held
        record = await self._store.get(workspace, runtime_id)
        if record is None or record.revoked_ms is not None:
            return None
        return record

    async def online(self, workspace: str) -> tuple[RuntimeRecord, ...]:
        now = self._clock()
        cached = self._online.get(workspace)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = tuple(
            record
            for record, status in await self._store.list_with_status(workspace)
            if status == "reachable"
        )
        if len(self._online) > 10_000:  # bound the cache; it refills in a second
            self._online.clear()
        self._online[workspace] = (now + self._ttl, found)
        return found

    def invalidate(self, workspace: str) -> None:
        self._online.pop(workspace, None)

    def handle_event(self, text: str) -> bool:
        """Apply a ``runtime-presence:<ws>`` event; ``True`` if it was one."""
        if not text.startswith(PRESENCE_EVENT):
            return False
        self.invalidate(text[len(PRESENCE_EVENT) :])
        return True

    def offering(self, model: str, runtime_id: str) -> Offering:
        return runtime_offering(model, runtime_id, effective_pricing(self._catalog()))
