"""The usage outbox against a real Redis: one stream entry per record, batched under load,
written even when the caller is cancelled."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from billing.keys import USAGE_STREAM
from billing.usage import RedisUsageOutbox, UsageRecord, decode_record


def record(i: int) -> UsageRecord:
    return UsageRecord(
        dispatch_id=f"dsp_{i}",
        request_id=f"req_{i}",
        workspace="w",
        task="chat-completion",
        model="lovelace:m",
        offering="o",
        provider="hosted",
        units={"prompt_tokens": i, "completion_tokens": 1},
        prices={"prompt_tokens": 1, "completion_tokens": 1},
        price_per=1_000_000,
        cost_picousd=i + 1,
        cost_microusd=0,
        started_ms=1,
        finished_ms=2,
    )


async def test_concurrent_appends_each_land_once(aredis: aioredis.Redis) -> None:
    outbox = RedisUsageOutbox(aredis, max_batch=16)
    ids = await asyncio.gather(*(outbox.append(record(i)) for i in range(200)))
    assert len(set(ids)) == 200
    entries = await aredis.xrange(USAGE_STREAM)
    assert sorted(decode_record(f[b"r"]).dispatch_id for _, f in entries) == sorted(
        f"dsp_{i}" for i in range(200)
    )


async def test_cancelled_caller_still_writes(aredis: aioredis.Redis) -> None:
    outbox = RedisUsageOutbox(aredis)
    task = asyncio.create_task(outbox.append(record(1)))
    await asyncio.sleep(0)
    task.cancel()
    for _ in range(100):
        if await aredis.xlen(USAGE_STREAM) == 1:
            break
        await asyncio.sleep(0.01)
    assert await aredis.xlen(USAGE_STREAM) == 1


async def test_redis_failure_reaches_the_caller() -> None:
    broken = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    outbox = RedisUsageOutbox(broken)
    try:
        await outbox.append(record(1))
    except aioredis.ConnectionError:
        pass
    else:
        raise AssertionError("expected a connection error")
    finally:
        await broken.aclose()
