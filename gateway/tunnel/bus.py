"""The holder side of dispatch across gateway processes: :class:`QueueConsumer`.

Wire format and stream names: :mod:`gateway.tunnel.bus_protocol`. The holder reads its
runtimes' queues in the consumer group ``keys.HOLDERS_GROUP`` (consumer name = its process
id), at most ``streams_per_read`` streams per blocking XREADGROUP (one reader task per shard of
runtimes; a shard whose set of runtimes changes is woken through its ``gateway_wake`` stream,
never by cancelling a read that may already have been served). Each entry is opened on the
local tunnel session and relayed by a :class:`~gateway.tunnel.pump.Pump`. An entry is
acknowledged (XACK + XDEL) only when its dispatch is over, so a holder that dies leaves it
pending; :meth:`QueueConsumer.reclaim` (on register, on a requester's ``ReclaimRequest``, and
every ``sweep_interval_s``) claims the pending entries of consumers whose ``gateway_alive`` key
is gone and drops the expired or cancelled ones (``dispatch_cancelled`` marker). Only dead
consumers are claimed from: an idle-time rule alone would steal a long stream still being
relayed by a live holder.

The control stream ``gateway_control(process)`` carries credits and cancels for the
dispatches this process pumps, and reclaim requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import time
from collections.abc import Coroutine, Iterable
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from gateway import keys
from gateway.tunnel.bus_protocol import (
    CreditGrant,
    QueuedDispatch,
    ReclaimRequest,
    decode_control,
    decode_entry,
    encode,
    now_ms,
    stream_entries,
)
from gateway.tunnel.pump import Pump
from gateway.tunnel.reclaim import claim_abandoned
from gateway.tunnel.registry import TunnelRegistry, cancel_tasks
from gateway.tunnel.types import DispatchEvent

__all__ = ["QueueConsumer"]

log = logging.getLogger(__name__)

_REPLY_WRITE_LUA = (
    importlib.resources.files("gateway.tunnel").joinpath("reply_write.lua").read_text()
)
#: A cancel that arrives before its dispatch is remembered this long.
_EARLY_CANCEL_KEEP_S = 120.0
#: Commands per pipeline when a pass touches every held runtime.
_PIPELINE_BATCH = 500


class _Shard:
    """Up to ``streams_per_read`` runtimes whose queues one reader task blocks on."""

    def __init__(self, process_id: str, index: int) -> None:
        self.index = index
        self.wake_key = keys.gateway_wake(process_id, index)
        self.runtimes: set[str] = set()
        self.wake_pending = False
        self.groups_ready = False
        self.task: asyncio.Task[None] | None = None


class QueueConsumer:
    """The holder side of the bus for one gateway process (see the module docstring).

    :meth:`start`/:meth:`stop` run the reader tasks (one per shard of held runtimes, one for
    the control stream, one periodic reclaim sweep); :meth:`run_once` does one non-blocking
    pass of the same work for tests. ``block_ms`` must stay below the Redis client's
    ``socket_timeout``.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        registry: TunnelRegistry,
        *,
        streams_per_read: int = 128,
        read_count: int = 16,
        block_ms: int = 2000,
        reclaim_idle_ms: int = 1000,
        sweep_interval_s: float = 5.0,
    ) -> None:
        self._redis = redis
        self._registry = registry
        self.process_id = registry.process_id
        self.streams_per_read = streams_per_read
        self.read_count = read_count
        self.block_ms = block_ms
        self.reclaim_idle_ms = reclaim_idle_ms
        self.sweep_interval_s = sweep_interval_s
        self._control_key = keys.gateway_control(self.process_id)
        self._control_last = b"0-0"
        self._control_trim: bytes | None = None
        self._shards: list[_Shard] = []
        self._shard_of: dict[str, _Shard] = {}
        self._pumps: dict[str, Pump] = {}
        self._early_cancels: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._running = False
        self._reply_write = redis.register_script(_REPLY_WRITE_LUA)
        registry.add_listener(self._on_change)
        for runtime_id in registry.held():
            self._place(runtime_id)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._running = True
        for shard in self._shards:
            self._start_shard(shard)
        self._loops.append(asyncio.create_task(self._control_loop(), name="lattice-bus-ctl"))
        self._loops.append(asyncio.create_task(self._sweep_loop(), name="lattice-bus-sweep"))
        self._spawn(self.reclaim(self._registry.held()))

    async def stop(self) -> None:
        """Stop reading; dispatches still being pumped stay pending for another holder."""
        self._running = False
        await cancel_tasks([*self._loops, *(s.task for s in self._shards if s.task), *self._tasks])
        self._loops.clear()
        for shard in self._shards:
            shard.task = None
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(self._control_key, *(s.wake_key for s in self._shards))

    async def run_once(self) -> int:
        """One pass without blocking: control messages, then every shard's queues once.
        Returns how many dispatches were started."""
        await self._read_control(None)
        started = 0
        for shard in self._shards:
            started += await self._read_shard(shard, None)
        return started

    def pumping(self) -> int:
        """How many dispatches this process is relaying now."""
        return len(self._pumps)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("tunnel bus task failed", exc_info=exc)

    # -- shards -------------------------------------------------------------------------------

    def _on_change(self, runtime_id: str, held: bool) -> None:
        if held:
            shard = self._place(runtime_id)
            self._wake(shard)
            if self._running:
                self._spawn(self.reclaim([runtime_id]))
        elif (gone := self._shard_of.pop(runtime_id, None)) is not None:
            gone.runtimes.discard(runtime_id)
            self._wake(gone)

    def _place(self, runtime_id: str) -> _Shard:
        # The runtime's queue group exists already (``holder_claim.lua`` made it).
        if (shard := self._shard_of.get(runtime_id)) is not None:
            return shard
        shard = next((s for s in self._shards if len(s.runtimes) < self.streams_per_read), None)
        if shard is None:
            shard = _Shard(self.process_id, len(self._shards))
            self._shards.append(shard)
            if self._running:
                self._start_shard(shard)
        shard.runtimes.add(runtime_id)
        self._shard_of[runtime_id] = shard
        return shard

    def _start_shard(self, shard: _Shard) -> None:
        name = f"lattice-bus-shard-{shard.index}"
        shard.task = asyncio.create_task(self._shard_loop(shard), name=name)

    def _wake(self, shard: _Shard) -> None:
        """Make the shard's blocked read return so it reads its new set of streams."""
        if shard.task is None or shard.wake_pending:
            return
        shard.wake_pending = True
        self._spawn(self._send_wake(shard))

    async def _send_wake(self, shard: _Shard) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xadd(shard.wake_key, {"w": b"1"}, maxlen=16, approximate=True)
            pipe.pexpire(shard.wake_key, keys.GATEWAY_WAKE_TTL_MS)
            await pipe.execute()

    async def _shard_loop(self, shard: _Shard) -> None:
        while self._running:
            try:
                await self._read_shard(shard, self.block_ms)
            except ResponseError as exc:
                # NOGROUP: a stream lost its group (expired, flushed); recreate and go on.
                log.warning("queue read refused; recreating groups", extra={"error": str(exc)})
                shard.groups_ready = False
            except (RedisError, OSError) as exc:
                log.warning("queue read failed", extra={"error": str(exc)})
                await asyncio.sleep(0.5)

    async def _ensure_groups(self, shard: _Shard) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream in [shard.wake_key, *map(keys.runtime_queue, shard.runtimes)]:
                pipe.xgroup_create(stream, keys.HOLDERS_GROUP, id="0", mkstream=True)
            pipe.pexpire(shard.wake_key, keys.GATEWAY_WAKE_TTL_MS)
            await pipe.execute(raise_on_error=False)  # BUSYGROUP: it exists, as wanted
        shard.groups_ready = True

    async def _read_shard(self, shard: _Shard, block_ms: int | None) -> int:
        if not shard.groups_ready:
            await self._ensure_groups(shard)
        shard.wake_pending = False  # a change from here on sends a new wake-up
        runtime_of = {keys.runtime_queue(r): r for r in shard.runtimes}
        streams: dict[Any, Any] = {shard.wake_key: ">", **dict.fromkeys(runtime_of, ">")}
        reply = await self._redis.xreadgroup(
            keys.HOLDERS_GROUP, self.process_id, streams, count=self.read_count, block=block_ms
        )
        started = 0
        done: list[tuple[str, bytes]] = []
        for stream, entries in stream_entries(reply):
            runtime_id = runtime_of.get(stream)
            for entry_id, fields in entries:
                if runtime_id is not None and self._accept(runtime_id, stream, entry_id, fields):
                    started += 1
                else:
                    done.append((stream, entry_id))
        await self._ack(done)
        return started

    async def _ack(self, entries: Iterable[tuple[str, bytes]]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream, entry_id in entries:
                pipe.xack(stream, keys.HOLDERS_GROUP, entry_id)
                pipe.xdel(stream, entry_id)
            if pipe:
                await pipe.execute()

    def _accept(self, runtime_id: str, stream: str, entry_id: bytes, fields: Any) -> bool:
        """Start pumping one queue entry; False when it is to be dropped (acknowledged)."""
        queued = decode_entry(fields)
        if queued is None:
            log.error("malformed dispatch entry dropped", extra={"stream": stream})
            return False
        return self._accept_decoded(runtime_id, stream, entry_id, queued)

    def _accept_decoded(
        self, runtime_id: str, stream: str, entry_id: bytes, queued: QueuedDispatch
    ) -> bool:
        dispatch_id = queued.request.dispatch_id
        if (
            queued.request.deadline_ms <= now_ms()
            or self._early_cancels.pop(dispatch_id, None) is not None
            or dispatch_id in self._pumps
        ):
            return False
        pump = Pump(queued, stream, entry_id)
        self._pumps[dispatch_id] = pump
        self._spawn(self._run_pump(pump, runtime_id))
        return True

    async def _run_pump(self, pump: Pump, runtime_id: str) -> None:
        try:
            await pump.run(self._registry.local(runtime_id), self)
        finally:
            if self._pumps.get(pump.request.dispatch_id) is pump:
                del self._pumps[pump.request.dispatch_id]

    # -- writes (called by the pumps) ---------------------------------------------------------

    async def write(self, reply_to: str, events: list[DispatchEvent], ttl_ms: int) -> None:
        await self._reply_write(keys=[reply_to], args=[encode(events), ttl_ms])

    async def finish(self, pump: Pump, final: list[DispatchEvent]) -> None:
        """Write the final events (unless cancelled) and acknowledge the entry, in one call."""
        events = encode(final) if final and not pump.cancelled else b""
        await self._reply_write(
            keys=[pump.reply_to, pump.stream],
            args=[events, pump.reply_ttl_ms(), keys.HOLDERS_GROUP, pump.entry_id],
        )

    # -- the control stream -------------------------------------------------------------------

    async def _control_loop(self) -> None:
        while self._running:
            try:
                await self._read_control(self.block_ms)
            except (RedisError, OSError) as exc:
                log.warning("control read failed", extra={"error": str(exc)})
                await asyncio.sleep(0.5)

    async def _read_control(self, block_ms: int | None) -> None:
        streams: dict[Any, Any] = {self._control_key: self._control_last}
        if self._control_trim is None:
            reply = await self._redis.xread(streams, count=256, block=block_ms)
        else:
            async with self._redis.pipeline(transaction=False) as pipe:
                # What was read is handled: trim it in the same round trip as the next read.
                pipe.xtrim(self._control_key, minid=self._control_trim, approximate=False)
                pipe.xread(streams, count=256, block=block_ms)
                _, reply = await pipe.execute()
            self._control_trim = None
        for _, entries in stream_entries(reply):
            for entry_id, fields in entries:
                self._control_last = self._control_trim = entry_id
                self._on_control(fields.get(b"m", b""))

    def _on_control(self, raw: bytes) -> None:
        try:
            message = decode_control(raw)
        except msgspec.DecodeError:
            log.error("malformed control message dropped")
            return
        if isinstance(message, ReclaimRequest):
            if self._registry.local(message.runtime_id) is not None:
                self._spawn(self.reclaim([message.runtime_id]))
            return
        pump = self._pumps.get(message.dispatch_id)
        if isinstance(message, CreditGrant):
            if pump is not None:
                pump.grant(message.consumed)
        elif pump is not None:
            pump.cancel()
        else:  # the cancel overtook its dispatch: drop the dispatch when it comes
            self._early_cancels[message.dispatch_id] = time.monotonic() + _EARLY_CANCEL_KEEP_S

    # -- reclaim ------------------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        while self._running:
            await asyncio.sleep(self.sweep_interval_s)
            now = time.monotonic()
            self._early_cancels = {d: t for d, t in self._early_cancels.items() if t > now}
            try:
                await self.reclaim(self._registry.held())
            except (RedisError, OSError) as exc:
                log.warning("reclaim sweep failed", extra={"error": str(exc)})

    async def reclaim(self, runtime_ids: Iterable[str]) -> int:
        """Claim the entries that dead holders left pending in these (held) runtimes' queues
        and start them, dropping the expired and cancelled ones; forget dead consumers with
        nothing pending. Returns how many dispatches were started."""
        runtime_of = {
            keys.runtime_queue(r): r for r in runtime_ids if self._registry.local(r) is not None
        }
        streams = list(runtime_of)
        started = 0
        for start in range(0, len(streams), _PIPELINE_BATCH):
            claimed = await claim_abandoned(
                self._redis,
                self.process_id,
                streams[start : start + _PIPELINE_BATCH],
                idle_ms=self.reclaim_idle_ms,
            )
            drop = claimed.drop
            for stream, entry_id, queued in claimed.found:
                if self._accept_decoded(runtime_of[stream], stream, entry_id, queued):
                    started += 1
                else:
                    drop.append((stream, entry_id))
            await self._ack(drop)
        return started
