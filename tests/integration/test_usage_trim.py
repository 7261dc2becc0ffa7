"""The usage stream trimmer (billing/usage_trim.py) against a real Redis: exactly the entries every
group acknowledged and older than the retention floor go; a missing group stops it; entries a
consumer reads between the trimmer's reads and its XTRIM are kept, also with consumers, a
producer and the trimmer all running at once; and the billing worker runs it beside its loop."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from billing.keys import EARNINGS_GROUP, LEDGER_GROUP, USAGE_GROUP, USAGE_STREAM
from billing.usage_trim import GroupState, StreamId, UsageTrimmer
from billing.windows import COST_METER
from billing.worker import BillingWorker, WorkerConfig
from tests.billing_records import add_records, usage
from tests.memory_stripe import MemoryStripe

GROUPS = (USAGE_GROUP, LEDGER_GROUP, EARNINGS_GROUP)
# Entry ids cross 9999 → 10000 ms, where comparing them as strings would go wrong.
IDS = [f"{9_995 + i}-{i}" for i in range(20)]
NOW_S = 20.0  # the trimmer's clock: 20000 ms, past every entry above


async def fill(redis: aioredis.Redis, ids: list[str] = IDS) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for i in ids:
            pipe.xadd(USAGE_STREAM, {"r": b"x"}, id=i)
        await pipe.execute()


async def make_groups(redis: aioredis.Redis, *names: str) -> None:
    for name in names:
        await redis.xgroup_create(USAGE_STREAM, name, id="0", mkstream=True)


async def read(redis: aioredis.Redis, name: str, count: int, consumer: str = "c") -> list[str]:
    reply = await redis.xreadgroup(name, consumer, {USAGE_STREAM: ">"}, count=count)
    return [e[0].decode() for _, entries in reply for e in entries] if reply else []


async def stream_ids(redis: aioredis.Redis) -> list[str]:
    return [e[0].decode() for e in await redis.xrange(USAGE_STREAM)]


def trimmer(redis: aioredis.Redis, retain_s: float = 0, now: float = NOW_S) -> UsageTrimmer:
    return UsageTrimmer(redis, groups=GROUPS, retain_s=retain_s, clock=lambda: now)


async def test_only_what_every_group_acknowledged_goes(aredis: aioredis.Redis) -> None:
    await fill(aredis)
    await make_groups(aredis, *GROUPS)
    billing = await read(aredis, USAGE_GROUP, 10)
    await aredis.xack(USAGE_STREAM, USAGE_GROUP, *billing[:6])  # 6..9 stay pending
    await aredis.xack(USAGE_STREAM, LEDGER_GROUP, *await read(aredis, LEDGER_GROUP, 15))
    earnings = await read(aredis, EARNINGS_GROUP, 20)
    await aredis.xack(USAGE_STREAM, EARNINGS_GROUP, *[e for e in earnings if e != IDS[3]])

    t = trimmer(aredis)
    report = await t.run_once()
    assert (report.trimmed, report.decision.bound) == (3, EARNINGS_GROUP)
    assert report.decision.minid == StreamId.parse(IDS[3])
    assert await stream_ids(aredis) == IDS[3:]
    assert (await t.run_once()).trimmed == 0  # nothing more until earnings acknowledges

    await aredis.xack(USAGE_STREAM, EARNINGS_GROUP, IDS[3])
    report = await t.run_once()
    assert (report.trimmed, report.decision.bound) == (3, USAGE_GROUP)
    assert await stream_ids(aredis) == IDS[6:]  # billing's pending entries and beyond

    await aredis.xack(USAGE_STREAM, USAGE_GROUP, *billing[6:])
    report = await t.run_once()
    assert (report.trimmed, report.decision.bound) == (4, USAGE_GROUP)
    assert await stream_ids(aredis) == IDS[10:]  # never read by billing: kept
    assert t.trimmed == 10


async def test_the_retention_floor_keeps_recent_entries(aredis: aioredis.Redis) -> None:
    await fill(aredis)
    await make_groups(aredis, *GROUPS)
    for name in GROUPS:
        await aredis.xack(USAGE_STREAM, name, *await read(aredis, name, 100))
    # 20000 ms - 10 s = 10000-0: the entries of 9995..9999 ms go (a string compare keeps them)
    report = await trimmer(aredis, retain_s=10).run_once()
    assert (report.trimmed, report.decision.bound) == (5, "retention")
    assert await stream_ids(aredis) == IDS[5:]
    report = await trimmer(aredis, retain_s=10).run_once()
    assert (report.trimmed, report.decision.reason) == (0, "nothing to trim")
    assert (await trimmer(aredis, retain_s=0).run_once()).trimmed == 15
    assert await aredis.xlen(USAGE_STREAM) == 0


async def test_a_missing_group_stops_trimming(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    t = trimmer(aredis)
    assert (await t.run_once()).decision.reason == "nothing to trim (empty stream)"  # no stream
    await fill(aredis)
    await make_groups(aredis, USAGE_GROUP, LEDGER_GROUP)
    for name in (USAGE_GROUP, LEDGER_GROUP):
        await aredis.xack(USAGE_STREAM, name, *await read(aredis, name, 100))
    with caplog.at_level(logging.WARNING, logger="billing.usage_trim"):
        for _ in range(3):
            report = await t.run_once()
            assert (report.trimmed, report.decision.missing) == (0, (EARNINGS_GROUP,))
    assert [getattr(r, "reason", None) for r in caplog.records] == ["group earnings missing"]
    assert await aredis.xlen(USAGE_STREAM) == len(IDS)

    # created later, the group reads from the start: still nothing goes until it acknowledges
    await make_groups(aredis, EARNINGS_GROUP)
    report = await t.run_once()
    assert (report.trimmed, report.decision.bound) == (0, EARNINGS_GROUP)
    await aredis.xack(USAGE_STREAM, EARNINGS_GROUP, *await read(aredis, EARNINGS_GROUP, 100))
    assert (await t.run_once()).trimmed == len(IDS)


class ReadingMidPass(UsageTrimmer):
    """A trimmer during whose pass a consumer reads: after the groups were read, before the
    XTRIM (the race the module doc explains)."""

    def __init__(self, redis: aioredis.Redis, reader: str, count: int) -> None:
        super().__init__(redis, groups=GROUPS, retain_s=0, clock=lambda: NOW_S)
        self.redis, self.reader, self.count = redis, reader, count
        self.read: list[str] = []

    async def _states(self) -> list[GroupState]:
        states = await super()._states()
        self.read = await read(self.redis, self.reader, self.count, consumer="racer")
        return states


async def test_a_consumer_reading_during_a_pass_keeps_its_entries(
    aredis: aioredis.Redis,
) -> None:
    await fill(aredis)
    await make_groups(aredis, *GROUPS)
    for name in GROUPS:
        await aredis.xack(USAGE_STREAM, name, *await read(aredis, name, 8))
    t = ReadingMidPass(aredis, LEDGER_GROUP, 5)
    report = await t.run_once()
    assert t.read == IDS[8:13]  # pending now, but delivered after the XINFO
    assert report.trimmed == 8
    assert await stream_ids(aredis) == IDS[8:]
    pending = await aredis.xpending_range(USAGE_STREAM, LEDGER_GROUP, "-", "+", 100)
    assert [p["message_id"].decode() for p in pending] == IDS[8:13]

    # between passes: the other groups move on, the ledger's entries stay until acknowledged
    for name in (USAGE_GROUP, EARNINGS_GROUP):
        await aredis.xack(USAGE_STREAM, name, *await read(aredis, name, 100))
    assert (await trimmer(aredis).run_once()).trimmed == 0
    await aredis.xack(USAGE_STREAM, LEDGER_GROUP, *IDS[8:11])
    assert (await trimmer(aredis).run_once()).trimmed == 3
    assert await stream_ids(aredis) == IDS[11:]


async def test_concurrent_consumers_never_lose_an_entry(
    aredis: aioredis.Redis, redis_url: str
) -> None:
    """A producer, one consumer per group (reading random batches, acknowledging late, and
    reading each entry back before acknowledging it, as the billing scripts do) and two
    trimmers with no retention, all at once: every group sees every entry."""
    rng = random.Random(7)
    await make_groups(aredis, *GROUPS)
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(6)]
    produced: list[str] = []
    seen: dict[str, list[str]] = {g: [] for g in GROUPS}
    done = asyncio.Event()
    total = 400

    async def produce(r: aioredis.Redis) -> None:
        for _ in range(total // 10):
            async with r.pipeline(transaction=False) as pipe:
                for _ in range(10):
                    pipe.xadd(USAGE_STREAM, {"r": b"x"})
                produced.extend(i.decode() for i in await pipe.execute())
            await asyncio.sleep(0.002)
        done.set()

    async def consume(r: aioredis.Redis, name: str) -> None:
        held: list[str] = []
        while not (done.is_set() and len(seen[name]) == total and not held):
            got = await read(r, name, rng.randint(1, 25))
            seen[name] += got
            held += got
            if held and rng.random() < 0.5:
                k = rng.randint(1, len(held))
                for entry_id in held[:k]:
                    assert await r.xrange(USAGE_STREAM, entry_id, entry_id), entry_id
                await r.xack(USAGE_STREAM, name, *held[:k])
                del held[:k]
            await asyncio.sleep(rng.random() / 500)

    trimmers: list[UsageTrimmer] = []

    async def trim(r: aioredis.Redis) -> None:
        t = UsageTrimmer(r, groups=GROUPS, retain_s=0)
        trimmers.append(t)
        while not all(len(s) == total for s in seen.values()):
            await t.run_once()
            await asyncio.sleep(0.001)

    try:
        await asyncio.wait_for(
            asyncio.gather(
                produce(clients[0]),
                *(consume(c, g) for c, g in zip(clients[1:4], GROUPS, strict=True)),
                trim(clients[4]),
                trim(clients[5]),
            ),
            timeout=60,
        )
    finally:
        for c in clients:
            await c.aclose()
    for name in GROUPS:
        assert seen[name] == produced, name
    assert sum(t.trimmed for t in trimmers) > total // 2  # it did trim while they worked
    await trimmer(aredis, now=time.time()).run_once()
    assert await aredis.xlen(USAGE_STREAM) == 0


async def test_redis_errors_are_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = aioredis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))
    stop = asyncio.Event()
    try:
        with caplog.at_level(logging.WARNING, logger="billing.usage_trim"):
            task = asyncio.create_task(UsageTrimmer(client).run(stop, 0.01))
            deadline = time.monotonic() + 10
            while len(caplog.records) < 2:  # a warning per pass: the loop goes on
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.01)
            stop.set()
            await asyncio.wait_for(task, 5)  # returned, not raised
    finally:
        await client.aclose()
    assert {r.getMessage() for r in caplog.records} == {
        "Redis error while trimming the usage stream"
    }


async def test_the_billing_worker_runs_the_trimmer(aredis: aioredis.Redis) -> None:
    config = WorkerConfig(
        window_s=60,
        grace_s=0.05,
        block_ms=50,
        usage_retain_s=0,
        trim_interval_s=0.05,
    )
    assert (
        BillingWorker(
            aredis, MemoryStripe(), msgspec.structs.replace(config, trim_usage=False)
        ).trimmer
        is None
    )
    finished_ms = int(time.time() * 1000) - 300_000  # windows long closed
    records = [
        usage(i, workspace="ws_a", finished_ms=finished_ms, cost_picousd=10**6) for i in range(30)
    ]
    await add_records(aredis, records)
    await make_groups(aredis, LEDGER_GROUP, EARNINGS_GROUP)
    for name in (LEDGER_GROUP, EARNINGS_GROUP):
        await aredis.xack(USAGE_STREAM, name, *await read(aredis, name, 100))
    stripe = MemoryStripe()
    worker = BillingWorker(aredis, stripe, config)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop, handle_signals=False))
    try:
        deadline = time.monotonic() + 20
        while await aredis.xlen(USAGE_STREAM):
            assert time.monotonic() < deadline, "the worker's trimmer did not trim"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert worker.trimmer is not None and worker.trimmer.trimmed == len(records)
    assert stripe.total(COST_METER, stripe.customer_of("ws_a")) == 30
