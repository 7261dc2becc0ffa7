"""One dispatch relayed by the holder: from the local tunnel session into its reply stream.

A :class:`Pump` opens the request on the session, reads the handle in one task and writes
batches in another: whatever events arrived while the previous write was in flight go out as
one stream entry (no per-chunk round trip when chunks are already there). It pulls from the
handle only while ``pulled - acknowledged <= window`` (:mod:`gateway.tunnel.bus_protocol`), so
a requester that stops consuming stops the pump, and the session stops granting the daemon
tunnel credit. The whole dispatch is bounded by its deadline.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from gateway import keys
from gateway.tunnel.bus_protocol import (
    QueuedDispatch,
    chunk_cost,
    now_ms,
    timeout_failure,
    tunnel_closed_failure,
)
from gateway.tunnel.types import (
    Chunk,
    DispatchEvent,
    DispatchHandle,
    TunnelClosed,
    TunnelSession,
)

__all__ = ["Pump", "ReplyWriter"]

log = logging.getLogger(__name__)


class ReplyWriter(Protocol):
    """Where a pump's events go (:class:`gateway.tunnel.bus.QueueConsumer`)."""

    async def write(self, reply_to: str, events: list[DispatchEvent], ttl_ms: int) -> None: ...

    async def finish(self, pump: Pump, final: list[DispatchEvent]) -> None:
        """Write ``final`` (unless the pump was cancelled) and acknowledge the queue entry."""


class Pump:
    """Relays one dispatch from the local tunnel into its reply stream, at most one window
    ahead of what the requester acknowledged."""

    def __init__(self, queued: QueuedDispatch, stream: str, entry_id: bytes) -> None:
        self.request = queued.request
        self.reply_to = queued.reply_to
        self.stream = stream
        self.entry_id = entry_id
        self._window = max(queued.window_bytes, 1)
        self.acked = 0
        self.pulled = 0
        self.cancelled = False
        self._terminal_seen = False
        self._pending: list[DispatchEvent] = []
        self._ready = asyncio.Event()
        self._credit = asyncio.Event()

    def grant(self, consumed: int) -> None:
        if consumed > self.acked:
            self.acked = consumed
            self._credit.set()

    def cancel(self) -> None:
        self.cancelled = True
        self._ready.set()
        self._credit.set()

    def reply_ttl_ms(self) -> int:
        return max(self.request.deadline_ms - now_ms(), 0) + keys.DISPATCH_REPLY_GRACE_MS

    async def run(self, session: TunnelSession | None, bus: ReplyWriter) -> None:
        """Open, relay, then write the final events with the entry's acknowledgement. A
        cancelled task (shutdown) leaves the entry pending for another holder."""
        final: list[DispatchEvent] = []
        handle: DispatchHandle | None = None
        reader: asyncio.Task[None] | None = None
        try:
            async with asyncio.timeout((self.request.deadline_ms - now_ms()) / 1000):
                if session is None or not session.accepting:
                    raise TunnelClosed(self.request.runtime_id)
                handle = await session.open(self.request)
                reader = asyncio.create_task(self._read(handle))
                reader.add_done_callback(lambda _: self._ready.set())
                final = await self._relay(reader, bus)
        except TunnelClosed:
            final = [tunnel_closed_failure()]
        except TimeoutError:
            final = [timeout_failure()]
        finally:
            if reader is not None:
                reader.cancel()
            if handle is not None and not self._terminal_seen:
                # Cancelled, timed out or shut down: the daemon stops working on it.
                await handle.cancel()
        await bus.finish(self, final)

    async def _relay(self, reader: asyncio.Task[None], bus: ReplyWriter) -> list[DispatchEvent]:
        """Write batches until the terminal one, which is returned (empty when cancelled)."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            if self.cancelled:
                return []
            batch, self._pending = self._pending, []
            if not batch:
                if reader.done():  # it raised: end the dispatch cleanly all the same
                    log.error("tunnel handle failed", exc_info=reader.exception())
                    return [tunnel_closed_failure()]
                continue
            if not isinstance(batch[-1], Chunk):
                return batch
            await bus.write(self.reply_to, batch, self.reply_ttl_ms())

    async def _read(self, handle: DispatchHandle) -> None:
        try:
            async for event in handle:
                self._pending.append(event)
                self._ready.set()
                if not isinstance(event, Chunk):
                    self._terminal_seen = True
                    return
                self.pulled += chunk_cost(event)
                # Flow control: pull no further than one window past the acknowledged cost.
                while self.pulled - self.acked > self._window and not self.cancelled:
                    self._credit.clear()
                    await self._credit.wait()
                if self.cancelled:
                    return
        except TunnelClosed:
            pass
        # The handle ended without its terminal event: still exactly one terminal event.
        self._pending.append(tunnel_closed_failure())
        self._ready.set()
