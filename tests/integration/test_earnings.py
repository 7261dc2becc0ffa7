"""The earnings ledger (billing/earnings.py) against a real Redis: every usage record's
earnings accrue to its serving party exactly once, through redelivery to another consumer,
a dead consumer's reclaimed entries, duplicate entries of one dispatch, two consumers at
once, and records from before the earnings split."""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import redis.asyncio as aioredis

from billing.earnings import DayLine, EarningsConsumer, EarningsLedger, StepResult, utc_day
from billing.keys import EARNINGS_GROUP, USAGE_STREAM
from billing.usage import UsageRecord, encode_record
from tests.usage_records import record

DAY1_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
DAY2_MS = DAY1_MS + 86_400_000


def earning(i: int, party: str, pico: int, finished_ms: int = DAY1_MS) -> UsageRecord:
    return msgspec.structs.replace(
        record(i),
        serving_kind="marketplace",
        serving_id=party,
        provider=party,
        provider_earnings_picousd=pico,
        cost_picousd=pico + 1,
        platform_picousd=1,
        finished_ms=finished_ms,
    )


async def append(aredis: aioredis.Redis, *records: UsageRecord) -> None:
    for r in records:
        await aredis.xadd(USAGE_STREAM, {"r": encode_record(r)})


async def pending(aredis: aioredis.Redis) -> int:
    info = await aredis.xpending(USAGE_STREAM, EARNINGS_GROUP)
    return int(info["pending"])


def test_utc_day() -> None:
    assert utc_day(DAY1_MS) == "2025-01-01"
    assert utc_day(DAY2_MS - 1) == "2025-01-01"
    assert utc_day(DAY2_MS) == "2025-01-02"


async def test_accrues_per_party_and_day(aredis: aioredis.Redis) -> None:
    await append(
        aredis,
        earning(1, "acme", 10**12),
        earning(2, "acme", 5, DAY2_MS),
        earning(3, "acme", 7, DAY2_MS),
        earning(4, "bolt", 3),
    )
    consumer = EarningsConsumer(aredis, consumer="c1")
    assert (await consumer.run_once()).accrued == 4
    ledger = EarningsLedger(aredis)
    assert await ledger.parties() == ["acme", "bolt"]
    assert await ledger.lines("acme") == [
        DayLine(day="2025-01-01", earned_picousd=10**12, dispatches=1),
        DayLine(day="2025-01-02", earned_picousd=12, dispatches=2),
    ]
    assert await ledger.lines("acme", since="2025-01-02") == [
        DayLine(day="2025-01-02", earned_picousd=12, dispatches=2)
    ]
    assert await ledger.earned_picousd("acme") == 10**12 + 12
    assert await ledger.earned_picousd("nobody") == 0
    assert await pending(aredis) == 0
    assert (await consumer.run_once()).entries == 0


async def test_group_starts_at_zero_and_coexists(aredis: aioredis.Redis) -> None:
    # Records already in the stream before the group existed are accrued; a second
    # ensure_group (another process starting) is harmless.
    await append(aredis, earning(1, "acme", 4))
    consumer = EarningsConsumer(aredis)
    await consumer.ensure_group()
    await EarningsConsumer(aredis).ensure_group()
    assert (await consumer.run_once()).accrued == 1


async def test_big_amounts_stay_exact(aredis: aioredis.Redis) -> None:
    # Far past a double's 2**53: HINCRBY adds strings as 64-bit integers.
    big = 2**62 // 4 + 12_345
    await append(aredis, earning(1, "acme", big), earning(2, "acme", big, DAY2_MS))
    await EarningsConsumer(aredis).run_once()
    assert await EarningsLedger(aredis).earned_picousd("acme") == 2 * big


async def test_dead_consumers_entries_are_reclaimed_once(aredis: aioredis.Redis) -> None:
    await append(aredis, *(earning(i, "acme", 100) for i in range(10)))
    dead = EarningsConsumer(aredis, consumer="dead", min_idle_ms=0)
    await dead.ensure_group()
    # The dead consumer read everything and died before accruing it.
    await aredis.xreadgroup(EARNINGS_GROUP, "dead", {USAGE_STREAM: ">"}, count=100)
    assert await pending(aredis) == 10
    # A consumer that reclaims only long-idle entries leaves them alone...
    patient = EarningsConsumer(aredis, consumer="patient", min_idle_ms=60_000)
    assert (await patient.run_once()).entries == 0
    # ... one with a short idle time takes them over and accrues each once.
    alive = EarningsConsumer(aredis, consumer="alive", min_idle_ms=0, batch=4)
    total = StepResult()
    for _ in range(5):
        total += await alive.run_once()
    assert total.accrued == 10
    assert await EarningsLedger(aredis).earned_picousd("acme") == 1000
    assert await pending(aredis) == 0


async def test_redelivered_batch_counts_once(aredis: aioredis.Redis) -> None:
    # The same entries reach two consumers (one stalled, the other reclaimed them): whichever
    # accrues first counts, the other finds them acknowledged.
    await append(aredis, *(earning(i, "acme", 7) for i in range(5)))
    slow = EarningsConsumer(aredis, consumer="slow", min_idle_ms=0)
    await slow.ensure_group()
    read = await aredis.xreadgroup(EARNINGS_GROUP, "slow", {USAGE_STREAM: ">"}, count=100)
    entries = read[0][1]
    fast = EarningsConsumer(aredis, consumer="fast", min_idle_ms=0)
    assert (await fast.run_once()).accrued == 5
    late = await slow._process(entries)  # the stalled consumer wakes up
    assert late == StepResult(stale=5)
    assert await EarningsLedger(aredis).earned_picousd("acme") == 35


async def test_duplicate_entries_of_a_dispatch_count_once(aredis: aioredis.Redis) -> None:
    await append(aredis, earning(1, "acme", 9), earning(1, "acme", 9), earning(2, "acme", 1))
    result = await EarningsConsumer(aredis).run_once()
    assert result == StepResult(accrued=2, duplicates=1)
    assert await EarningsLedger(aredis).lines("acme") == [
        DayLine(day="2025-01-01", earned_picousd=10, dispatches=2)
    ]
    assert await pending(aredis) == 0


async def test_two_consumers_at_once(aredis: aioredis.Redis) -> None:
    await append(aredis, *(earning(i, f"p{i % 3}", i) for i in range(300)))
    a = EarningsConsumer(aredis, consumer="a", batch=7, min_idle_ms=0)
    b = EarningsConsumer(aredis, consumer="b", batch=11, min_idle_ms=0)

    async def drain(c: EarningsConsumer) -> None:
        while (await c.run_once()).entries:
            pass

    await asyncio.gather(drain(a), drain(b))
    assert a.totals.accrued + b.totals.accrued == 300
    ledger = EarningsLedger(aredis)
    for p in range(3):
        assert await ledger.earned_picousd(f"p{p}") == sum(i for i in range(300) if i % 3 == p)


async def test_old_records_and_undecodable_entries(aredis: aioredis.Redis) -> None:
    # A record from before the split names its party by `provider` and earned nothing.
    await append(aredis, record(1))
    await aredis.xadd(USAGE_STREAM, {"r": b"\xc1not msgpack"})
    await aredis.xadd(USAGE_STREAM, {"x": b"no record field"})
    result = await EarningsConsumer(aredis).run_once()
    assert result == StepResult(accrued=1, undecodable=2)
    assert await EarningsLedger(aredis).lines("hosted") == [
        DayLine(day="1970-01-01", earned_picousd=0, dispatches=1)
    ]
    assert await pending(aredis) == 0


async def test_run_loop_accrues_until_cancelled(aredis: aioredis.Redis) -> None:
    consumer = EarningsConsumer(aredis)
    task = asyncio.create_task(consumer.run(block_ms=50, idle_s=0.01))
    await append(aredis, earning(1, "acme", 5))
    ledger = EarningsLedger(aredis)
    for _ in range(200):
        if await ledger.earned_picousd("acme") == 5:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert await ledger.earned_picousd("acme") == 5
