"""The requester side of dispatch to personal runtimes: :class:`RuntimeDispatcher`.

``RuntimeDispatcher.open(request)``:

1. this process holds the runtime's tunnel (and it accepts work) → ``session.open`` directly:
   the local fast path, no Redis at all;
2. else ``dispatch_enqueue.lua`` reads the presence key and, only if another process holds
   the runtime, appends the dispatch to its queue — one round trip. No holder →
   :class:`RuntimeUnavailable` at once (503 ``personal_lattice_relay_unavailable``);
3. the returned :class:`RemoteHandle` XREAD-BLOCKs the reply stream. Its first read is
   pipelined right behind the enqueue on the same connection (one write, one wake-up of
   Redis; without a holder the script ends that read with a marker entry), so ``open``
   returns with the first events in hand (or after one liveness interval without any); a
   caller cancelled meanwhile cancels the dispatch. While blocked it checks the holder's
   ``gateway_alive`` key about every ``liveness_interval_ms``: a holder that went away after
   relaying anything ends the dispatch with ``Failed(502, "tunnel_closed")``; one that went
   away before relaying anything is replaced by the runtime's new holder if there is one (it
   reclaims the entry, see :mod:`gateway.tunnel.reclaim`), else the same 502.

A finished reply stream is deleted off the response path, many at a time: one DEL per
``reap_interval_s`` (0.1 s) at most, whatever the request rate.

Both paths are wrapped by :func:`with_deadline`: at ``request.deadline_ms`` the dispatch is
cancelled and ends with ``Failed(504, "personal_lattice_execution_timeout")``.

Flow control (:mod:`gateway.tunnel.bus_protocol`): the handle tells the holder what its caller
consumed with a :class:`CreditGrant` every half window, piggybacked on its next read together
with an XTRIM of the reply entries already read, so Redis keeps at most about one window per
dispatch and the fast path pays no extra round trip.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
from collections import deque
from collections.abc import Coroutine
from typing import Any

import msgspec
import redis.asyncio as aioredis

from gateway import keys
from gateway.errors import RelayUnavailable
from gateway.tunnel.bus_protocol import (
    DEFAULT_WINDOW_BYTES,
    CancelDispatch,
    Control,
    CreditGrant,
    QueuedDispatch,
    ReclaimRequest,
    chunk_cost,
    decode_events,
    encode,
    now_ms,
    stream_entries,
    timeout_failure,
    tunnel_closed_failure,
)
from gateway.tunnel.deadline import DeadlineHandle, with_deadline
from gateway.tunnel.registry import TunnelRegistry
from gateway.tunnel.types import (
    Chunk,
    DispatchEvent,
    DispatchHandle,
    DispatchRequest,
    Failed,
    TunnelClosed,
)

__all__ = [
    "DeadlineHandle",
    "RemoteHandle",
    "RuntimeDispatcher",
    "RuntimeUnavailable",
    "with_deadline",
]

log = logging.getLogger(__name__)

_ENQUEUE_LUA = (
    importlib.resources.files("gateway.tunnel").joinpath("dispatch_enqueue.lua").read_text()
)
#: What ``dispatch_enqueue.lua`` writes to the reply stream when nobody holds the runtime
#: (only to end the read started with the enqueue; ``open`` raises RuntimeUnavailable).
_UNAVAILABLE = encode(
    [Failed(status=503, code="personal_lattice_relay_unavailable", message="Not connected.")]
)
_HOLDER_GONE = "The gateway process holding the runtime's tunnel went away."
#: Reply streams deleted by one DEL at most.
_REAP_BATCH = 256
_NOTHING: Any = object()


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class RuntimeUnavailable(RelayUnavailable):
    """No gateway process holds the runtime's tunnel (503, at once, not at a timeout)."""


class RemoteHandle:
    """One dispatch relayed by another gateway process, read from its reply stream."""

    def __init__(
        self,
        dispatcher: RuntimeDispatcher,
        request: DispatchRequest,
        holder: str,
    ) -> None:
        self._d = dispatcher
        self._redis = dispatcher.redis
        self.request = request
        self.holder = holder
        self._reply = self.reply_key = keys.dispatch_reply(request.dispatch_id)
        self._last: bytes = b"0-0"
        self._buffer: deque[DispatchEvent] = deque()
        self._consumed = 0
        self._credited = 0
        self._received = False
        self._done = False
        self._cancel_sent = False
        #: The answer of the read pipelined with the enqueue, until it is looked at.
        self._first_reply: Any = _NOTHING

    def __aiter__(self) -> RemoteHandle:
        return self

    async def __anext__(self) -> DispatchEvent:
        if self._done:
            raise StopAsyncIteration
        while not self._buffer:
            await self._fill()
        event = self._buffer.popleft()
        if isinstance(event, Chunk):
            self._consumed += chunk_cost(event)  # consumed: it reached the caller
        else:
            self._done = True
            self._d.discard_reply(self._reply)
        return event

    async def cancel(self) -> None:
        """Tell the holder to stop (its session cancels the dispatch on the daemon) and leave
        a marker so that a reclaiming holder drops the entry too."""
        if not self._done:
            self._done = True
            await self._send_cancel()

    async def _send_cancel(self) -> None:
        if self._cancel_sent:
            return
        self._cancel_sent = True
        ttl_ms = max(self.request.deadline_ms - now_ms(), 0) + keys.DISPATCH_REPLY_GRACE_MS
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.dispatch_cancelled(self.request.dispatch_id), b"1", px=ttl_ms)
            self._control(pipe, CancelDispatch(dispatch_id=self.request.dispatch_id))
            pipe.delete(self._reply)
            await pipe.execute()

    async def aclose(self) -> None:
        await self.cancel()

    def _control(self, pipe: Any, message: Control) -> None:
        control = keys.gateway_control(self.holder)
        pipe.xadd(control, {"m": encode(message)})
        pipe.pexpire(control, keys.GATEWAY_CONTROL_TTL_MS)

    def block_ms(self) -> int:
        """How long the next read may block (the liveness interval, or until the deadline)."""
        remaining = self.request.deadline_ms - now_ms()
        return max(1, min(self._d.liveness_interval_ms, remaining))

    def add_read(self, pipe: Any, block_ms: int) -> None:
        """Queue the next blocking read of the reply stream on ``pipe``."""
        streams: dict[Any, Any] = {self._reply: self._last}
        pipe.xread(streams, count=self._d.read_count, block=block_ms)

    def first_reply(self, reply: Any) -> None:
        """The answer of the read pipelined with the enqueue (see RuntimeDispatcher.open)."""
        self._first_reply = reply

    async def _fill(self) -> None:
        """Read the next entries (or find out the holder is gone, or the deadline passed)."""
        remaining = self.request.deadline_ms - now_ms()
        if remaining <= 0:
            await self._send_cancel()
            self._buffer.append(timeout_failure())
            return
        block = self.block_ms()
        streams: dict[Any, Any] = {self._reply: self._last}
        if self._first_reply is not _NOTHING:
            reply, self._first_reply = self._first_reply, _NOTHING
        elif self._consumed - self._credited >= self._d.window_bytes // 2:
            async with self._redis.pipeline(transaction=False) as pipe:
                grant = CreditGrant(dispatch_id=self.request.dispatch_id, consumed=self._consumed)
                self._control(pipe, grant)
                pipe.xtrim(self._reply, minid=self._last, approximate=False)
                pipe.xread(streams, count=self._d.read_count, block=block)
                reply = (await pipe.execute())[-1]
            self._credited = self._consumed
        else:
            reply = await self._redis.xread(streams, count=self._d.read_count, block=block)
        entries = [entry for _, stream in stream_entries(reply) for entry in stream]
        if not entries:
            await self._check_holder()
            return
        for entry_id, fields in entries:
            self._last = entry_id
            try:
                self._buffer.extend(decode_events(fields[b"e"]))
            except (KeyError, msgspec.DecodeError):
                self._buffer.append(tunnel_closed_failure("Malformed reply from the holder."))
        self._received = True

    async def _check_holder(self) -> None:
        if await self._redis.exists(keys.gateway_alive(self.holder)):
            return
        if not self._received:
            # Nothing reached the caller yet: the runtime's new holder (if its daemon already
            # reconnected elsewhere) reclaims the entry; ask it to look now.
            new = _text(await self._redis.get(keys.runtime_holder(self.request.runtime_id)))
            if new is not None and new != self.holder:
                self.holder = new
                async with self._redis.pipeline(transaction=False) as pipe:
                    self._control(pipe, ReclaimRequest(runtime_id=self.request.runtime_id))
                    await pipe.execute()
                return
        await self._send_cancel()  # the marker keeps a later holder from running it
        self._buffer.append(tunnel_closed_failure(_HOLDER_GONE))


class RuntimeDispatcher:
    """Opens dispatches on personal runtimes, wherever their tunnel is held."""

    def __init__(
        self,
        redis: aioredis.Redis,
        registry: TunnelRegistry,
        *,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        liveness_interval_ms: int = 1000,
        read_count: int = 64,
        queue_maxlen: int = keys.DISPATCH_QUEUE_MAXLEN,
        reap_interval_s: float = 0.1,
    ) -> None:
        self.redis = redis
        self.registry = registry
        self.process_id = registry.process_id
        self.window_bytes = window_bytes
        self.liveness_interval_ms = liveness_interval_ms
        self.read_count = read_count
        self.queue_maxlen = queue_maxlen
        self.reap_interval_s = reap_interval_s
        self._background: set[asyncio.Task[Any]] = set()
        self._doomed: list[str] = []  # finished reply streams, deleted in batches
        self._reap_timer: asyncio.TimerHandle | None = None

    async def open(self, request: DispatchRequest) -> DispatchHandle:
        """Start ``request`` on its runtime; raises :class:`RuntimeUnavailable` when no
        process holds the runtime's tunnel. The handle ends at ``request.deadline_ms``."""
        session = self.registry.local(request.runtime_id)
        if session is not None and session.accepting:
            try:
                return with_deadline(await session.open(request), request.deadline_ms)
            except TunnelClosed:
                pass  # closing under us: its successor may be held elsewhere
        entry = QueuedDispatch(
            request=request,
            reply_to=keys.dispatch_reply(request.dispatch_id),
            requester=self.process_id,
            window_bytes=self.window_bytes,
        )
        handle = RemoteHandle(self, request, "")
        async with self.redis.pipeline(transaction=False) as pipe:
            # EVAL, not EVALSHA: a script cache emptied under us (restart, SCRIPT FLUSH) would
            # otherwise leave the read behind it blocking for nothing. Redis caches the
            # compiled script by its digest all the same.
            pipe.eval(
                _ENQUEUE_LUA,
                3,
                keys.runtime_holder(request.runtime_id),
                keys.runtime_queue(request.runtime_id),
                entry.reply_to,
                self.process_id,
                self.queue_maxlen,
                encode(entry),
                _UNAVAILABLE,
            )
            handle.add_read(pipe, handle.block_ms())
            try:
                found, reply = await pipe.execute()
            except asyncio.CancelledError:
                # The caller left while the dispatch may be queued already: cancel it.
                self.spawn(self._abandon(request))
                raise
        holder = _text(found)
        if holder is None or holder == self.process_id:
            # The script answered the read with a marker, which ended it at once.
            self.discard_reply(entry.reply_to)
            raise RuntimeUnavailable(
                f"The personal runtime '{request.runtime_id}' is not connected right now."
            )
        handle.holder = holder
        handle.first_reply(reply)
        return with_deadline(handle, request.deadline_ms)

    async def _abandon(self, request: DispatchRequest) -> None:
        """Cancel a dispatch whose ``open`` was cancelled (its holder is whoever holds the
        runtime now; a reclaiming holder drops it thanks to the marker)."""
        holder = _text(await self.redis.get(keys.runtime_holder(request.runtime_id)))
        handle = RemoteHandle(self, request, holder or "")
        if holder is None:
            ttl_ms = max(request.deadline_ms - now_ms(), 0) + keys.DISPATCH_REPLY_GRACE_MS
            await self.redis.set(keys.dispatch_cancelled(request.dispatch_id), b"1", px=ttl_ms)
            self.discard_reply(handle.reply_key)
            return
        await handle.cancel()

    def discard_reply(self, reply_key: str) -> None:
        """Delete a finished reply stream soon, in one batch with the others (off the
        response path: at most one DEL per ``reap_interval_s``)."""
        self._doomed.append(reply_key)
        if len(self._doomed) >= _REAP_BATCH:
            self._delete_doomed()
        elif self._reap_timer is None:
            loop = asyncio.get_running_loop()
            self._reap_timer = loop.call_later(self.reap_interval_s, self._delete_doomed)

    def _delete_doomed(self) -> None:
        if self._reap_timer is not None:
            self._reap_timer.cancel()
            self._reap_timer = None
        doomed, self._doomed = self._doomed, []
        if doomed:
            self.spawn(self._delete(doomed))

    async def _delete(self, reply_keys: list[str]) -> None:
        await self.redis.delete(*reply_keys)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run housekeeping (reply-stream deletion) off the caller's path."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("dispatch housekeeping failed", extra={"error": str(exc)})

    async def aclose(self) -> None:
        """Delete the reply streams still waiting for their batch; wait for housekeeping."""
        self._delete_doomed()
        await asyncio.gather(*self._background, return_exceptions=True)
