"""Dispatch across gateway processes through a real Redis (gateway/tunnel/registry.py, bus.py,
remote.py): two registry + consumer + dispatcher sets in one test process act as two gateway
processes sharing one Redis; an in-memory TunnelSession stands in for a daemon's tunnel."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis

from gateway import keys
from gateway.tunnel.bus import QueueConsumer
from gateway.tunnel.bus_protocol import QueuedDispatch, encode, now_ms
from gateway.tunnel.reclaim import Claimed, claim_abandoned
from gateway.tunnel.registry import TunnelRegistry
from gateway.tunnel.remote import RuntimeDispatcher, RuntimeUnavailable, with_deadline
from gateway.tunnel.types import (
    Chunk,
    DispatchEvent,
    DispatchHandle,
    DispatchRequest,
    Failed,
    Finished,
    TunnelClosed,
)

RUNTIME = "lat_bus_test"
#: Presence TTL and refresh of the test "processes" (production: 5 s and 1 s).
PRESENCE_TTL_MS = 600
REFRESH_S = 0.15
WINDOW = 64 * 1024

#: A script is (delay before the event in seconds, event) pairs; it may be endless.
Script = Callable[[DispatchRequest], Iterator[tuple[float, DispatchEvent]]]


class ScriptedHandle:
    """A dispatch on the in-memory tunnel: yields its script, records pulls and cancels."""

    def __init__(self, script: Iterator[tuple[float, DispatchEvent]]) -> None:
        self._script = script
        self._stop = asyncio.Event()
        self.pulled_bytes = 0
        self.cancelled = False
        self.closed = False
        self._done = False

    def __aiter__(self) -> ScriptedHandle:
        return self

    async def __anext__(self) -> DispatchEvent:
        if self._done or self.cancelled:
            raise StopAsyncIteration
        delay, event = next(self._script)
        if delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
        if self.closed:
            self._done = True
            return Failed(status=502, code="tunnel_closed", message="closed")
        if self.cancelled:
            raise StopAsyncIteration
        if isinstance(event, Chunk):
            self.pulled_bytes += len(event.data)
        else:
            self._done = True
        return event

    async def cancel(self) -> None:
        self.cancelled = True
        self._stop.set()


@dataclass
class MemorySession:
    """A TunnelSession held by a test process."""

    runtime_id: str
    script: Script
    opened: list[DispatchRequest] = field(default_factory=list)
    handles: list[ScriptedHandle] = field(default_factory=list)
    closed_reason: str | None = None

    @property
    def accepting(self) -> bool:
        return self.closed_reason is None

    async def open(self, request: DispatchRequest) -> DispatchHandle:
        if self.closed_reason is not None:
            raise TunnelClosed(self.runtime_id)
        self.opened.append(request)
        handle = ScriptedHandle(self.script(request))
        self.handles.append(handle)
        return handle

    async def close(self, reason: str) -> None:
        self.closed_reason = reason
        for handle in self.handles:
            handle.closed = True
            handle._stop.set()


def answer(*events: DispatchEvent, delay: float = 0.0) -> Script:
    def script(_: DispatchRequest) -> Iterator[tuple[float, DispatchEvent]]:
        return iter([(delay, e) for e in events])

    return script


def endless(size: int, delay: float = 0.0) -> Script:
    def script(_: DispatchRequest) -> Iterator[tuple[float, DispatchEvent]]:
        while True:
            yield delay, Chunk(data=b"x" * size)

    return script


class Proc:
    """One gateway process: registry, queue consumer and dispatcher on its own client."""

    def __init__(self, url: str) -> None:
        self.redis = aioredis.Redis.from_url(url)
        self.registry = TunnelRegistry(
            self.redis, presence_ttl_ms=PRESENCE_TTL_MS, refresh_interval_s=REFRESH_S
        )
        self.consumer = QueueConsumer(
            self.redis, self.registry, block_ms=500, reclaim_idle_ms=50, sweep_interval_s=0.5
        )
        self.dispatcher = RuntimeDispatcher(
            self.redis, self.registry, window_bytes=WINDOW, liveness_interval_ms=200
        )
        self.stopped = False

    async def start(self) -> Proc:
        await self.registry.start()
        await self.consumer.start()
        return self

    async def hold(self, script: Script, runtime_id: str = RUNTIME) -> MemorySession:
        session = MemorySession(runtime_id, script)
        await self.registry.register(session)
        return session

    async def stop(self, *, crash: bool = False) -> None:
        if not self.stopped:
            self.stopped = True
            await self.consumer.stop()
            await self.registry.stop(release=not crash)
            await self.dispatcher.aclose()

    async def close(self) -> None:
        await self.stop()
        await self.redis.aclose()


@pytest.fixture
async def procs(redis_url: str) -> AsyncIterator[Callable[[], Awaitable[Proc]]]:
    started: list[Proc] = []

    async def make() -> Proc:
        proc = await Proc(redis_url).start()
        started.append(proc)
        return proc

    yield make
    for proc in started:
        await proc.close()


def request(*, stream: bool = True, deadline_in_ms: int = 10_000) -> DispatchRequest:
    return DispatchRequest(
        dispatch_id=f"dsp_{secrets.token_hex(8)}",
        runtime_id=RUNTIME,
        task="chat-completion",
        model="lovelace:test",
        body=b'{"messages":[]}',
        stream=stream,
        token="token",
        deadline_ms=now_ms() + deadline_in_ms,
    )


async def collect(handle: DispatchHandle) -> list[DispatchEvent]:
    return [event async for event in handle]


async def eventually(check: Callable[[], bool], timeout: float = 2.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_remote_dispatch_not_streamed(procs: Callable[[], Awaitable[Proc]]) -> None:
    a, b = await procs(), await procs()
    session = await b.hold(answer(Chunk(data=b'{"id":"x"}'), Finished(status=200)))
    req = request(stream=False)
    events = await collect(await a.dispatcher.open(req))
    assert events == [Chunk(data=b'{"id":"x"}'), Finished(status=200)]
    assert session.opened == [req]
    queue = keys.runtime_queue(RUNTIME)
    await eventually(lambda: b.consumer.pumping() == 0)
    assert await a.redis.xlen(queue) == 0
    assert (await a.redis.xpending(queue, keys.HOLDERS_GROUP))["pending"] == 0
    await a.dispatcher.aclose()
    assert not await a.redis.exists(keys.dispatch_reply(req.dispatch_id))


async def test_remote_dispatch_streamed(procs: Callable[[], Awaitable[Proc]]) -> None:
    a, b = await procs(), await procs()
    chunks = [Chunk(data=f'{{"n":{i}}}'.encode()) for i in range(50)]
    await b.hold(answer(*chunks, Finished(status=200), delay=0.002))
    events = await collect(await a.dispatcher.open(request()))
    assert events == [*chunks, Finished(status=200)]


async def test_local_fast_path_skips_redis(procs: Callable[[], Awaitable[Proc]]) -> None:
    a = await procs()
    session = await a.hold(answer(Chunk(data=b"hi"), Finished(status=200)))
    req = request()
    events = await collect(await a.dispatcher.open(req))
    assert events == [Chunk(data=b"hi"), Finished(status=200)]
    assert session.opened == [req]
    assert not await a.redis.exists(keys.dispatch_reply(req.dispatch_id))
    assert await a.redis.xlen(keys.runtime_queue(RUNTIME)) == 0


async def test_no_holder_is_unavailable_at_once(procs: Callable[[], Awaitable[Proc]]) -> None:
    a = await procs()
    started = time.monotonic()
    with pytest.raises(RuntimeUnavailable) as raised:
        await a.dispatcher.open(request())
    assert time.monotonic() - started < 0.5
    assert raised.value.status == 503
    assert raised.value.code == "personal_lattice_relay_unavailable"
    assert not await a.redis.exists(keys.runtime_queue(RUNTIME))


async def test_holder_death_fails_in_flight(procs: Callable[[], Awaitable[Proc]]) -> None:
    a, b = await procs(), await procs()
    await b.hold(endless(100, delay=0.05))
    handle = await a.dispatcher.open(request())
    events = handle.__aiter__()
    assert isinstance(await anext(events), Chunk)
    await b.stop(crash=True)  # no more refreshes, consumer gone, keys left to expire
    died = time.monotonic()
    rest = [event async for event in events]
    assert rest[-1] == Failed(
        status=502,
        code="tunnel_closed",
        message="The gateway process holding the runtime's tunnel went away.",
    )
    assert time.monotonic() - died < 2.0


async def test_holder_death_before_any_event_fails_without_new_holder(
    procs: Callable[[], Awaitable[Proc]],
) -> None:
    a, b = await procs(), await procs()
    await b.hold(answer(Finished(status=200), delay=30))
    handle = await a.dispatcher.open(request())
    await b.stop(crash=True)
    events = await asyncio.wait_for(collect(handle), 3.0)
    assert [e.code for e in events if isinstance(e, Failed)] == ["tunnel_closed"]


async def test_remote_deadline_fails_504_and_cancels(procs: Callable[[], Awaitable[Proc]]) -> None:
    a, b = await procs(), await procs()
    session = await b.hold(endless(10, delay=0.1))
    events = await collect(await a.dispatcher.open(request(deadline_in_ms=400)))
    assert isinstance(events[-1], Failed)
    assert (events[-1].status, events[-1].code) == (504, "personal_lattice_execution_timeout")
    await eventually(lambda: session.handles[0].cancelled)
    await eventually(lambda: b.consumer.pumping() == 0)


async def test_local_deadline_fails_504_and_cancels(procs: Callable[[], Awaitable[Proc]]) -> None:
    a = await procs()
    session = await a.hold(answer(Finished(status=200), delay=5))
    events = await collect(await a.dispatcher.open(request(deadline_in_ms=200)))
    assert isinstance(events[-1], Failed) and events[-1].status == 504
    assert session.handles[0].cancelled


async def test_with_deadline_wraps_any_handle() -> None:
    handle = ScriptedHandle(iter([(0.0, Chunk(data=b"a")), (5.0, Finished(status=200))]))
    wrapped = with_deadline(handle, now_ms() + 150)
    events = await collect(wrapped)
    assert events[0] == Chunk(data=b"a") and isinstance(events[1], Failed)
    assert events[1].code == "personal_lattice_execution_timeout"
    assert handle.cancelled


async def test_deadline_passing_between_events() -> None:
    handle = ScriptedHandle(iter([(0.0, Chunk(data=b"a")), (0.0, Finished(status=200))]))
    wrapped = with_deadline(handle, now_ms() + 100)
    assert await anext(wrapped) == Chunk(data=b"a")
    await asyncio.sleep(0.2)  # a slow caller: the deadline passes while it is not waiting
    event = await anext(wrapped)
    assert isinstance(event, Failed) and event.status == 504
    assert handle.cancelled
    with pytest.raises(StopAsyncIteration):
        await anext(wrapped)


async def test_outside_cancellation_is_not_a_timeout() -> None:
    handle = ScriptedHandle(iter([(5.0, Finished(status=200))]))
    wrapped = with_deadline(handle, now_ms() + 10_000)
    waiting = asyncio.create_task(anext(wrapped))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await wrapped.cancel()
    assert handle.cancelled


async def test_slow_reader_bounds_the_holder(procs: Callable[[], Awaitable[Proc]]) -> None:
    a, b = await procs(), await procs()
    size = 8 * 1024
    session = await b.hold(endless(size))
    handle = await a.dispatcher.open(request())
    events = handle.__aiter__()
    assert isinstance(await anext(events), Chunk)
    await asyncio.sleep(0.5)  # the caller stops reading; the holder must stop pulling
    pulled = session.handles[0].pulled_bytes
    assert pulled <= WINDOW + 2 * size
    await asyncio.sleep(0.2)
    assert session.handles[0].pulled_bytes == pulled
    for _ in range(200):  # credits flow again once the caller reads
        assert isinstance(await anext(events), Chunk)
    assert session.handles[0].pulled_bytes >= 200 * size
    await handle.cancel()
    await eventually(lambda: session.handles[0].cancelled)


async def test_cancel_reaches_the_holder(procs: Callable[[], Awaitable[Proc]]) -> None:
    a, b = await procs(), await procs()
    session = await b.hold(endless(100, delay=0.02))
    handle = await a.dispatcher.open(request())
    assert isinstance(await anext(handle.__aiter__()), Chunk)
    await handle.cancel()
    await eventually(lambda: session.handles[0].cancelled, timeout=1.0)
    await eventually(lambda: b.consumer.pumping() == 0)
    pending = await a.redis.xpending(keys.runtime_queue(RUNTIME), keys.HOLDERS_GROUP)
    assert pending["pending"] == 0


async def test_caller_leaving_during_open_cancels_the_dispatch(
    procs: Callable[[], Awaitable[Proc]],
) -> None:
    # open() returns with the first events (its read is pipelined behind the enqueue): a
    # caller that leaves before then must still stop the dispatch on the holder.
    a, b = await procs(), await procs()
    session = await b.hold(answer(Chunk(data=b"late"), Finished(status=200), delay=5.0))
    opening = asyncio.create_task(a.dispatcher.open(request(stream=False)))
    await eventually(lambda: len(session.handles) == 1)
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    await eventually(lambda: session.handles[0].cancelled)
    await eventually(lambda: b.consumer.pumping() == 0)
    pending = await a.redis.xpending(keys.runtime_queue(RUNTIME), keys.HOLDERS_GROUP)
    assert pending["pending"] == 0


async def test_finished_reply_streams_are_deleted_in_batches(
    procs: Callable[[], Awaitable[Proc]],
) -> None:
    a, b = await procs(), await procs()
    await b.hold(answer(Chunk(data=b"x"), Finished(status=200)))
    a.dispatcher.reap_interval_s = 0.5
    reqs = [request(stream=False) for _ in range(3)]
    for req in reqs:
        assert (await collect(await a.dispatcher.open(req)))[-1] == Finished(status=200)
    replies = [keys.dispatch_reply(req.dispatch_id) for req in reqs]
    assert await a.redis.exists(*replies) == 3  # not yet: one DEL per reap interval
    end = time.monotonic() + 3.0
    while await a.redis.exists(*replies):
        assert time.monotonic() < end, "reply streams not deleted"
        await asyncio.sleep(0.05)


async def test_closed_tunnel_fails_remote_dispatch(procs: Callable[[], Awaitable[Proc]]) -> None:
    a, b = await procs(), await procs()
    session = await b.hold(endless(100, delay=0.05))
    handle = await a.dispatcher.open(request())
    events = handle.__aiter__()
    assert isinstance(await anext(events), Chunk)
    evicted = await b.registry.evict(RUNTIME)  # revocation: forget, then close
    assert evicted is session and b.registry.local(RUNTIME) is None
    await session.close("revoked")
    rest = await asyncio.wait_for(collect(events), 2.0)
    assert isinstance(rest[-1], Failed) and rest[-1].code == "tunnel_closed"
    with pytest.raises(RuntimeUnavailable):
        await a.dispatcher.open(request())


async def test_new_holder_reclaims_pending_entries(
    procs: Callable[[], Awaitable[Proc]], redis_url: str
) -> None:
    a, b = await procs(), await procs()
    await b.consumer.stop()  # B holds the tunnel but will die with entries it has read
    await b.hold(answer(Finished(status=200)))
    live, short, cancelled = request(), request(deadline_in_ms=300), request()
    handles = {r.dispatch_id: await a.dispatcher.open(r) for r in (live, short, cancelled)}
    queue = keys.runtime_queue(RUNTIME)
    read = await a.redis.xreadgroup(keys.HOLDERS_GROUP, b.registry.process_id, {queue: ">"})
    assert len(read[0][1]) == 3  # delivered to B, never acknowledged
    await handles[cancelled.dispatch_id].cancel()
    await b.stop(crash=True)
    await asyncio.sleep(PRESENCE_TTL_MS / 1000 + 0.2)  # B's keys expired, `short` too
    c = await procs()
    session = await c.hold(answer(Chunk(data=b"again"), Finished(status=200)))
    events = await asyncio.wait_for(collect(handles[live.dispatch_id]), 3.0)
    assert events == [Chunk(data=b"again"), Finished(status=200)]
    await eventually(lambda: c.consumer.pumping() == 0)
    assert [r.dispatch_id for r in session.opened] == [live.dispatch_id]
    assert (await a.redis.xpending(queue, keys.HOLDERS_GROUP))["pending"] == 0
    assert await a.redis.xlen(queue) == 0


async def test_a_dispatch_partly_relayed_by_a_dead_holder_is_not_run_again(
    procs: Callable[[], Awaitable[Proc]],
) -> None:
    # A second run would append a second answer to the part the requester already has.
    a, b = await procs(), await procs()
    await b.hold(endless(100, delay=0.05))
    handle = await a.dispatcher.open(request())
    events = handle.__aiter__()
    assert isinstance(await anext(events), Chunk)
    await b.stop(crash=True)
    await asyncio.sleep(PRESENCE_TTL_MS / 1000 + 0.2)  # B's keys expired
    c = await procs()
    session = await c.hold(answer(Chunk(data=b"again"), Finished(status=200)))
    assert await c.consumer.reclaim([RUNTIME]) == 0  # dropped, not started
    rest = await asyncio.wait_for(collect(events), 3.0)
    assert Chunk(data=b"again") not in rest
    assert isinstance(rest[-1], Failed) and rest[-1].code == "tunnel_closed"
    assert session.opened == []
    queue = keys.runtime_queue(RUNTIME)
    assert (await a.redis.xpending(queue, keys.HOLDERS_GROUP))["pending"] == 0


async def test_reclaim_takes_only_from_dead_holders(aredis: aioredis.Redis) -> None:
    queue = keys.runtime_queue(RUNTIME)
    await aredis.xgroup_create(queue, keys.HOLDERS_GROUP, id="0", mkstream=True)
    entry = QueuedDispatch(request=request(), reply_to="r", requester="gw_a", window_bytes=1)
    await aredis.xadd(queue, {"m": encode(entry)})
    await aredis.xreadgroup(keys.HOLDERS_GROUP, "gw_b", {queue: ">"})
    await aredis.set(keys.gateway_alive("gw_b"), "gw_b")
    await asyncio.sleep(0.06)
    claimed = await claim_abandoned(aredis, "gw_c", [queue], idle_ms=50)
    assert claimed == Claimed(found=[], drop=[])  # gw_b is alive: a long stream, not lost
    await aredis.delete(keys.gateway_alive("gw_b"))
    claimed = await claim_abandoned(aredis, "gw_c", [queue], idle_ms=50)
    assert [queued for _, _, queued in claimed.found] == [entry]
    infos = await aredis.xinfo_consumers(queue, keys.HOLDERS_GROUP)
    assert {i["name"]: i["pending"] for i in infos} == {b"gw_b": 0, b"gw_c": 1}
    await claim_abandoned(aredis, "gw_c", [queue], idle_ms=50)  # forgets the dead, empty gw_b
    infos = await aredis.xinfo_consumers(queue, keys.HOLDERS_GROUP)
    assert [i["name"] for i in infos] == [b"gw_c"]


async def test_reclaim_scans_many_queues_in_one_call(aredis: aioredis.Redis) -> None:
    """One script call looks at every queue of the batch (reclaim_scan.lua): queues without a
    stream or a group are skipped, and only the dead consumer's entries are claimed."""
    queues = [keys.runtime_queue(f"lat_{c * 16}") for c in "bcdefg"]
    for queue in queues[1:]:  # queues[0] does not exist at all
        await aredis.xgroup_create(queue, keys.HOLDERS_GROUP, id="0", mkstream=True)
    await aredis.delete(queues[1])  # ... and queues[1] lost its stream (and group)
    entry = QueuedDispatch(request=request(), reply_to="r", requester="gw_a", window_bytes=1)
    await aredis.xadd(queues[3], {"m": encode(entry)})
    await aredis.xreadgroup(keys.HOLDERS_GROUP, "gw_dead", {queues[3]: ">"})
    await aredis.xadd(queues[4], {"m": encode(entry)})
    await aredis.xreadgroup(keys.HOLDERS_GROUP, "gw_c", {queues[4]: ">"})  # the caller's own
    await asyncio.sleep(0.06)
    claimed = await claim_abandoned(aredis, "gw_c", queues, idle_ms=50)
    assert [(stream, queued) for stream, _, queued in claimed.found] == [(queues[3], entry)]
    assert await claim_abandoned(aredis, "gw_c", queues[4:], idle_ms=50) == Claimed([], [])
    assert await claim_abandoned(aredis, "gw_c", [], idle_ms=50) == Claimed([], [])


async def test_replaced_tunnel_closes_the_old_one(procs: Callable[[], Awaitable[Proc]]) -> None:
    b = await procs()
    old = await b.hold(answer(Finished(status=200)))
    new = await b.hold(answer(Finished(status=200)))
    assert old.closed_reason == "replaced" and new.closed_reason is None
    assert b.registry.local(RUNTIME) is new
    await b.registry.unregister(old)  # late unregister of the replaced one changes nothing
    assert b.registry.local(RUNTIME) is new
    holder = await b.redis.get(keys.runtime_holder(RUNTIME))
    assert holder == b.registry.process_id.encode()


async def test_tunnel_taken_over_by_another_process(
    procs: Callable[[], Awaitable[Proc]],
) -> None:
    b, c = await procs(), await procs()
    old = await b.hold(answer(Finished(status=200)))
    await c.hold(answer(Chunk(data=b"c"), Finished(status=200)))
    await b.registry.run_once()  # B's refresh finds the presence taken: closes its tunnel
    assert old.closed_reason == "replaced" and b.registry.local(RUNTIME) is None
    await b.registry.unregister(old)  # compare-and-delete: C's presence stays
    assert await c.redis.get(keys.runtime_holder(RUNTIME)) == c.registry.process_id.encode()
    events = await collect(await b.dispatcher.open(request()))
    assert events == [Chunk(data=b"c"), Finished(status=200)]


async def test_expired_and_malformed_entries_are_dropped(
    procs: Callable[[], Awaitable[Proc]],
) -> None:
    b = await procs()
    await b.consumer.stop()
    session = await b.hold(answer(Finished(status=200)))
    queue = keys.runtime_queue(RUNTIME)
    expired = QueuedDispatch(
        request=request(deadline_in_ms=-1), reply_to="r", requester="gw_x", window_bytes=1
    )
    await b.redis.xadd(queue, {"m": encode(expired)})
    await b.redis.xadd(queue, {"m": b"\x00garbage"})
    assert await b.consumer.run_once() == 0
    assert session.opened == []
    assert await b.redis.xlen(queue) == 0
