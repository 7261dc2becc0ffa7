"""The usage ledger against a real Redis: records from the usage stream become exact daily
aggregates per workspace, once per dispatch however they are delivered (a dead consumer's
entries reclaimed, the same entry applied by two consumers, a dispatch in the stream twice),
with each record's spend settled exactly once alongside."""

from __future__ import annotations

import calendar
import datetime as dt

import msgspec
import redis.asyncio as aioredis

from billing import keys
from billing.spend import SpendGuard
from billing.usage import UsageRecord, encode_record
from billing.usage_ledger import UsageLedger, aggregate_fields, build_batch, day_of
from billing.usage_query import UsageQuery, UsageRow, render_csv

PICO = 10**6
DAY1 = calendar.timegm((2025, 3, 1, 10, 0, 0)) * 1000
DAY2 = calendar.timegm((2025, 3, 2, 23, 59, 59)) * 1000
D1, D2 = dt.date(2025, 3, 1), dt.date(2025, 3, 2)


def rec(
    i: int,
    *,
    ws: str = "acme",
    model: str = "lovelace:m",
    key_id: str | None = "key_a",
    client_id: str | None = None,
    tags: dict[str, str] | None = None,
    at: int = DAY1,
    cost: int = 1000,
) -> UsageRecord:
    return UsageRecord(
        dispatch_id=f"dsp_{ws}_{i}",
        request_id=f"req_{i}",
        workspace=ws,
        task="chat-completion",
        model=model,
        offering="o",
        provider="hosted",
        units={"prompt_tokens": 10, "completion_tokens": 5},
        prices={"prompt_tokens": 1, "completion_tokens": 1},
        price_per=1_000_000,
        cost_picousd=cost,
        cost_microusd=0,
        started_ms=at - 100,
        finished_ms=at,
        key_id=key_id,
        client_id=client_id,
        tags=tags or {},
    )


async def add(aredis: aioredis.Redis, *records: UsageRecord) -> list[bytes]:
    return [await aredis.xadd(keys.USAGE_STREAM, {"r": encode_record(r)}) for r in records]


async def query(aredis: aioredis.Redis, ws: str, group_by: str) -> list[UsageRow]:
    return await UsageQuery(aredis).usage(ws, start_day=D1, end_day=D2, group_by=group_by)  # type: ignore[arg-type]


def test_fields_and_batch_are_pure_and_exact() -> None:
    r = rec(1, tags={"team": "x"}, cost=10**20)  # beyond 2^64 pico: strings stay exact
    fields = aggregate_fields(r)
    assert fields['["m","lovelace:m","","cost",""]'] == 10**20
    assert fields['["t","team","x","units","prompt_tokens"]'] == 10
    assert fields['["k","key","key_a","requests",""]'] == 1
    assert len(fields) == 4 * (2 + 2)
    script_keys, payload = build_batch([r, rec(2)], ["1-0", "2-0"])
    assert script_keys[0] == keys.USAGE_STREAM and len(set(script_keys)) == len(script_keys)
    batch = msgspec.json.decode(payload)
    assert batch["ack"] == ["1-0", "2-0"] and len(batch["records"]) == 2
    assert batch["records"][0][7] == str(10**20)  # the cost, for settlement
    incr = dict(zip(batch["incr"][1::3], batch["incr"][2::3], strict=True))
    assert incr['["d","","","requests",""]'] == "2"  # summed over the batch
    assert incr['["d","","","cost",""]'] == str(10**20 + 1000)
    assert day_of(DAY2) == "2025-03-02"


async def test_aggregates_by_day_model_key_and_tag(aredis: aioredis.Redis) -> None:
    await add(
        aredis,
        rec(1, tags={"team": "search", "env": "prod"}),
        rec(2, model="lovelace:other", key_id=None, client_id="app_1", tags={"team": "ads"}),
        rec(3, at=DAY2, cost=7),
        rec(1, ws="other", tags={"team": "search"}),
    )
    ledger = UsageLedger(aredis)
    assert await ledger.run_once() == 4
    assert (ledger.counted, ledger.duplicates) == (4, 0)

    by_day = await query(aredis, "acme", "day")
    assert [(r.day, r.requests, r.cost_picousd) for r in by_day] == [
        ("2025-03-01", 2, 2000),
        ("2025-03-02", 1, 7),
    ]
    assert by_day[0].units == {"completion_tokens": 10, "prompt_tokens": 20}
    by_model = await query(aredis, "acme", "model")
    assert [(r.day, r.model, r.requests) for r in by_model] == [
        ("2025-03-01", "lovelace:m", 1),
        ("2025-03-01", "lovelace:other", 1),
        ("2025-03-02", "lovelace:m", 1),
    ]
    by_key = await query(aredis, "acme", "key")
    assert [(r.day, r.key_id, r.client_id) for r in by_key] == [
        ("2025-03-01", None, "app_1"),
        ("2025-03-01", "key_a", None),
        ("2025-03-02", "key_a", None),
    ]
    by_tag = await query(aredis, "acme", "tag")
    assert [(r.tag_key, r.tag_value, r.requests) for r in by_tag] == [
        ("env", "prod", 1),
        ("team", "ads", 1),
        ("team", "search", 1),
    ]
    # the other workspace sees only its own record, with the same key id and tag
    other = await query(aredis, "other", "tag")
    assert [(r.tag_key, r.tag_value, r.requests, r.cost_picousd) for r in other] == [
        ("team", "search", 1, 1000)
    ]
    # day hashes expire; the dedupe sets sooner
    assert 0 < await aredis.ttl(keys.ledger_day("acme", "2025-03-01")) <= keys.LEDGER_DAY_TTL_S
    assert 0 < await aredis.ttl(keys.ledger_ids("acme", "2025-03-01")) <= keys.LEDGER_DEDUP_TTL_S
    # everything was acknowledged
    assert (await aredis.xpending(keys.USAGE_STREAM, keys.LEDGER_GROUP))["pending"] == 0


async def test_group_starts_at_zero_and_csv_shape(aredis: aioredis.Redis) -> None:
    await add(aredis, rec(1, tags={"note": "=HYPERLINK(1)"}))  # added before the group exists
    await UsageLedger(aredis).run_once()
    rows = await query(aredis, "acme", "tag")
    text = render_csv(rows, "tag")
    lines = text.split("\r\n")
    assert lines[0] == (
        "day,tag_key,tag_value,requests,cost_usd,cost_picousd,"
        "units.completion_tokens,units.prompt_tokens"
    )
    assert lines[1] == "2025-03-01,note,'=HYPERLINK(1),1,0.000000,1000,5,10"
    assert lines[2] == ""
    model_csv = render_csv(await query(aredis, "acme", "model"), "model").split("\r\n")
    assert model_csv[0].startswith("day,model,requests,cost_usd")
    assert model_csv[1].startswith("2025-03-01,lovelace:m,1,")


async def test_dead_consumer_entries_are_reclaimed_and_counted_once(
    aredis: aioredis.Redis,
) -> None:
    await add(aredis, *(rec(i) for i in range(10)))
    dead = UsageLedger(aredis, consumer="dead", claim_idle_ms=0)
    await dead.ensure_group()
    taken = await dead._read(">", None)  # read, then "killed" before applying
    assert len(taken) == 10
    alive = UsageLedger(aredis, consumer="alive", claim_idle_ms=0)
    assert await alive.run_once() == 10
    assert alive.reclaimed == 10 and alive.counted == 10
    # the dead consumer comes back and applies what it had read: nothing counts twice
    await dead._apply(taken)
    assert (dead.counted, dead.duplicates) == (0, 10)
    (row,) = await query(aredis, "acme", "day")
    assert (row.requests, row.cost_picousd) == (10, 10_000)
    # the same dispatch reaching the stream twice counts once
    await add(aredis, rec(3))
    await alive.run_once()
    assert alive.duplicates == 1
    assert (await query(aredis, "acme", "day"))[0].requests == 10
    # the dead consumer holds nothing now and is pruned once idle
    alive._prune_idle_ms = 0
    assert await alive.prune_consumers() == 1


async def test_own_pending_entries_are_applied_after_a_restart(aredis: aioredis.Redis) -> None:
    await add(aredis, rec(1), rec(2))
    first = UsageLedger(aredis, consumer="gw-1", claim_idle_ms=3_600_000)
    await first.ensure_group()
    await first._read(">", None)  # the process stops before applying them
    again = UsageLedger(aredis, consumer="gw-1", claim_idle_ms=3_600_000)
    assert await again.run_once() == 2
    assert (await query(aredis, "acme", "day"))[0].requests == 2


async def test_corrupt_entries_are_acknowledged_and_skipped(aredis: aioredis.Redis) -> None:
    await aredis.xadd(keys.USAGE_STREAM, {"r": b"\xc1 not msgpack"})
    await aredis.xadd(keys.USAGE_STREAM, {"x": b"no record"})
    await add(aredis, rec(1))
    ledger = UsageLedger(aredis)
    assert await ledger.run_once() == 3
    assert (ledger.corrupt, ledger.counted) == (2, 1)
    assert (await aredis.xpending(keys.USAGE_STREAM, keys.LEDGER_GROUP))["pending"] == 0


async def test_ledger_settles_spend_exactly_once(aredis: aioredis.Redis) -> None:
    guard = SpendGuard(aredis)
    await guard.set_limit("acme", 1_000)
    est = 100 * PICO
    # settled early by its gateway: the ledger only drops the marker
    early = rec(1, cost=40 * PICO)
    await guard.admit("acme", reservation_id=early.dispatch_id, estimate_picousd=est, now_ms=DAY1)
    assert await guard.settle_record(early)
    # its gateway died: the ledger counts it and drops the reservation before its deadline
    crashed = rec(2, cost=60 * PICO)
    await guard.admit("acme", reservation_id=crashed.dispatch_id, estimate_picousd=est, now_ms=DAY1)
    # the ledger got there before the gateway's settlement: that one becomes a no-op
    raced = rec(3, cost=5 * PICO)
    await guard.admit("acme", reservation_id=raced.dispatch_id, estimate_picousd=est, now_ms=DAY1)
    # a workspace without limits: its month is counted too
    await add(aredis, early, crashed, raced, rec(4, ws="free", cost=9))
    await UsageLedger(aredis).run_once()
    assert not await guard.settle_record(raced)

    state = await guard.state("acme", now_ms=DAY1)
    assert (state.spent_picousd, state.reserved_picousd) == (105 * PICO, 0)
    assert await aredis.zcard(keys.spend_settled("acme")) == 0
    assert (await guard.state("free", now_ms=DAY1)).spent_picousd == 9
    # delivered again (another consumer, a second entry): still counted once
    await add(aredis, early, crashed)
    await UsageLedger(aredis).run_once()
    assert (await guard.state("acme", now_ms=DAY1)).spent_picousd == 105 * PICO


async def test_ledger_charges_credit(aredis: aioredis.Redis) -> None:
    guard = SpendGuard(aredis)
    await guard.add_credit("acme", 10, grant_id="g")
    await add(aredis, rec(1, cost=4 * PICO), rec(2, cost=PICO // 2))
    await UsageLedger(aredis).run_once()
    state = await guard.state("acme", now_ms=DAY1)
    assert state.credit_picousd == 10 * PICO - 4 * PICO - PICO // 2
    assert state.spent_picousd == 4 * PICO + PICO // 2


async def test_a_batch_mixing_counted_and_new_records(aredis: aioredis.Redis) -> None:
    await add(aredis, rec(1), rec(2))
    ledger = UsageLedger(aredis)
    await ledger.run_once()
    # one batch: two counted before, one new, and the new one twice
    await add(aredis, rec(1), rec(3, cost=5), rec(2), rec(3, cost=5))
    assert await ledger.run_once() == 4
    assert (ledger.counted, ledger.duplicates) == (3, 3)
    (row,) = await query(aredis, "acme", "day")
    assert (row.requests, row.cost_picousd) == (3, 2005)
    assert (await aredis.xpending(keys.USAGE_STREAM, keys.LEDGER_GROUP))["pending"] == 0
