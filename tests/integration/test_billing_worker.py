"""The billing worker against a real Redis and an in-memory StripeApi (tests/memory_stripe.py),
driven step by step with an injected clock: every unit billed exactly once through Stripe
outages, 429s, redeliveries, duplicates, late records, dead workers and a second worker;
deleted customers go to the dead-letter stream; reconcile and status report it all."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import msgspec
import pytest
import redis.asyncio as aioredis

from billing.keys import USAGE_DEAD_STREAM, USAGE_GROUP, USAGE_STREAM
from billing.ledger import Ledger, decode_billed
from billing.reconcile import reconcile, render_reconcile, render_status, status
from billing.stripe_api import MeterEvent, MeterEventResult, StripePermanent
from billing.usage import UsageRecord
from billing.windows import COST_METER, WindowRef, meter_identifier, unit_meter, window_start
from billing.worker import BillingWorker, WorkerConfig
from catalog.pricing import picousd_to_microusd
from tests.billing_records import add_records, usage
from tests.memory_stripe import MemoryStripe, retryable

T0 = 1_700_000_040  # a minute boundary
CONFIG = WorkerConfig(window_s=60, grace_s=10, batch=200, dead_consumer_ms=50, lock_ms=200)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def records_over(
    n: int, workspaces: list[str], windows: int, *, first: int = 0
) -> list[UsageRecord]:
    """``n`` records spread over the workspaces and ``windows`` minutes from T0, with costs
    that are not whole micro-USD (so rounding per record would be wrong)."""
    return [
        usage(
            first + i,
            workspace=workspaces[i % len(workspaces)],
            finished_ms=(T0 + 60 * (i % windows)) * 1000 + (i * 37) % 60_000,
            cost_picousd=400_000 + (i * 7919) % 1_000_003,
        )
        for i in range(n)
    ]


def expected_microusd(records: list[UsageRecord], window_s: int = 60) -> dict[str, int]:
    """Per workspace: each window's exact sum converted once (one segment per window)."""
    sums: dict[tuple[str, int], int] = defaultdict(int)
    for r in records:
        sums[(r.workspace, window_start(r.finished_ms, window_s))] += r.cost_picousd
    out: dict[str, int] = defaultdict(int)
    for (ws, _), pico in sums.items():
        out[ws] += picousd_to_microusd(pico)
    return dict(out)


async def pending(redis: aioredis.Redis) -> int:
    return int((await redis.xpending(USAGE_STREAM, USAGE_GROUP))["pending"])


async def drain(
    redis: aioredis.Redis, *workers: BillingWorker, clock: Clock, steps: int = 400
) -> None:
    """Step the workers (advancing the clock a second a step) until every entry is read and
    acknowledged and no window is open."""
    ledger = Ledger(redis)
    for _ in range(steps):
        for w in workers:
            await w.run_once()
        clock.now += 1
        info = (await redis.xinfo_groups(USAGE_STREAM))[0]
        last = info["last-delivered-id"].decode()
        unread = await redis.xrange(USAGE_STREAM, f"({last}", "+", count=1)
        if not unread and await pending(redis) == 0 and not await ledger.open_windows():
            return
    raise AssertionError("the worker did not drain the stream")


def assert_billed_exactly(stripe: MemoryStripe, records: list[UsageRecord]) -> None:
    for ws, micro in expected_microusd(records).items():
        assert stripe.total(COST_METER, stripe.customer_of(ws)) == micro, ws


async def test_stripe_down_for_all_records_then_up_bills_every_unit_once(
    aredis: aioredis.Redis,
) -> None:
    clock = Clock(T0)
    stripe = MemoryStripe(clock)
    records = records_over(600, ["acme", "beta", "gamma"], windows=3)
    await add_records(aredis, records)
    stripe.down = retryable()
    worker = BillingWorker(aredis, stripe, CONFIG, clock=clock)
    clock.now = T0 + 3 * 60 + 11  # every window is past its end and grace
    for _ in range(60):  # two minutes of outage
        await worker.run_once()
        clock.now += 2
    assert stripe.events == {}
    assert await pending(aredis) == len(records)  # nothing acknowledged before acceptance
    failed = [c for c in stripe.calls if c[0] == "send_meter_events"]
    assert 3 <= len(failed) < 40  # backed off, not hammered

    stripe.down = None
    await drain(aredis, worker, clock=clock)
    assert_billed_exactly(stripe, records)
    assert stripe.duplicates == 0
    report = await reconcile(Ledger(aredis), stripe, T0 - 3600, T0 + 3600)
    assert report.ok and report.total_difference == 0, render_reconcile(report)
    assert {r.pending for r in report.rows} == {0}
    assert sum(r.records for r in report.rows) == len(records)
    assert "total difference: 0" in render_reconcile(report)


async def test_429_retry_after_is_honoured(aredis: aioredis.Redis) -> None:
    clock = Clock(T0 + 5)
    stripe = MemoryStripe(clock)
    records = records_over(50, ["acme"], windows=1)
    await add_records(aredis, records)
    stripe.fail_next("send_meter_events", retryable(retry_after_s=7.0))
    worker = BillingWorker(aredis, stripe, CONFIG, clock=clock)
    assert (await worker.run_once()).folded == len(records)

    clock.now = T0 + 71
    report = await worker.run_once()
    sends = lambda: [t for m, t in stripe.calls if m == "send_meter_events"]  # noqa: E731
    assert len(sends()) == 1 and report.retry_in is not None and report.retry_in >= 7.0
    clock.now += 6.9
    await worker.run_once()
    assert len(sends()) == 1  # not before Retry-After
    clock.now += 0.2
    report = await worker.run_once()
    assert len(sends()) == 2 and sends()[1] - sends()[0] >= 7.0
    assert report.segments_sent == 1 and report.acked == len(records)
    assert_billed_exactly(stripe, records)


async def test_redelivered_and_duplicate_entries_count_once(aredis: aioredis.Redis) -> None:
    clock = Clock(T0 + 5)  # inside the window: folded, not closed
    stripe = MemoryStripe(clock)
    records = records_over(300, ["acme", "beta"], windows=1)
    await add_records(aredis, records)
    first = BillingWorker(aredis, stripe, CONFIG, clock=clock)
    while (await first.run_once()).read:
        pass
    assert first.totals.folded == len(records)
    await asyncio.sleep(0.1)  # `first` now looks dead (idle > dead_consumer_ms)

    second = BillingWorker(aredis, stripe, CONFIG, clock=clock)
    report = await second.run_once()  # reclaims every pending entry and folds it again
    assert report.reclaimed == len(records) and report.redelivered == len(records)
    assert report.folded == 0
    # the same dispatch appended twice to the stream: billed once, the copy acknowledged
    await add_records(aredis, [records[0], records[1]])
    report = await second.run_once()
    assert (report.read, report.folded, report.duplicates) == (2, 0, 2)

    clock.now = T0 + 71
    await drain(aredis, second, clock=clock)
    assert_billed_exactly(stripe, records)


async def test_a_late_record_opens_the_next_segment(aredis: aioredis.Redis) -> None:
    clock = Clock(T0 + 71)
    stripe = MemoryStripe(clock)
    records = records_over(40, ["acme"], windows=1)
    await add_records(aredis, records)
    worker = BillingWorker(aredis, stripe, CONFIG, clock=clock)
    await drain(aredis, worker, clock=clock)
    late = usage(10_000, workspace="acme", finished_ms=T0 * 1000 + 500, cost_picousd=2_500_000)
    await add_records(aredis, [late])
    report = await worker.run_once()
    assert report.folded == 1 and report.segments_sent == 0  # waits `grace` after the fold
    clock.now += 11
    await drain(aredis, worker, clock=clock)

    ident0 = meter_identifier("acme", COST_METER, T0, 0)
    ident1 = meter_identifier("acme", COST_METER, T0, 1)
    assert set(stripe.events) == {ident0, ident1}
    assert stripe.events[ident0].value == expected_microusd(records)["acme"]
    assert stripe.events[ident1].value == 3
    state = (await Ledger(aredis).windows(T0, T0 + 60))[0]
    assert [(s.index, s.status, s.records) for s in state.segments] == [
        (0, "sent", 40),
        (1, "sent", 1),
    ]
    assert state.segments[1].identifiers == {COST_METER: ident1}


async def test_deleted_customer_goes_to_dead_letters_others_unaffected(
    aredis: aioredis.Redis,
) -> None:
    clock = Clock(T0 + 71)
    stripe = MemoryStripe(clock)
    first = records_over(100, ["alive", "gone"], windows=1)
    await add_records(aredis, first)
    worker = BillingWorker(aredis, stripe, CONFIG, clock=clock)
    await drain(aredis, worker, clock=clock)
    stripe.delete_customer(stripe.customer_of("gone"))

    later = [
        msgspec.structs.replace(r, finished_ms=r.finished_ms + 120_000)
        for r in records_over(100, ["alive", "gone"], windows=1, first=1000)
    ]
    await add_records(aredis, later)
    clock.now += 200
    await drain(aredis, worker, clock=clock)

    dead = await aredis.xrange(USAGE_DEAD_STREAM)
    gone_later = [r for r in later if r.workspace == "gone"]
    assert len(dead) == len(gone_later)
    assert {f[b"code"] for _, f in dead} == {b"resource_missing"}
    assert {f[b"window"].decode() for _, f in dead} == {WindowRef(T0 + 120, "gone").member}
    assert sorted(decode_billed(f[b"r"]).dispatch_id for _, f in dead) == sorted(
        r.dispatch_id for r in gone_later
    )
    assert await pending(aredis) == 0  # acknowledged: moved, not dropped
    alive = [r for r in first + later if r.workspace == "alive"]
    assert_billed_exactly(stripe, alive)
    assert (
        stripe.total(COST_METER, stripe.customer_of("gone"))
        == expected_microusd([r for r in first if r.workspace == "gone"])["gone"]
    )

    st = await status(Ledger(aredis))
    assert st.dead_letters == len(gone_later)
    assert [(g.workspace, g.code, g.records) for g in st.dead_letter_groups] == [
        ("gone", "resource_missing", len(gone_later))
    ]
    assert "resource_missing" in render_status(st)
    report = await reconcile(Ledger(aredis), stripe, T0 - 60, T0 + 600)
    assert report.ok and report.dead_letters == len(gone_later)
    gone_row = next(r for r in report.rows if r.workspaces == ["gone"])
    assert gone_row.dead == expected_microusd(gone_later)["gone"] > 0


async def test_two_workers_at_once_no_loss_no_double_count(aredis: aioredis.Redis) -> None:
    clock = Clock(T0)
    stripe = MemoryStripe(clock)
    records = records_over(3000, ["acme", "beta", "gamma", "delta"], windows=4)
    await add_records(aredis, records[:1500])
    config = msgspec.structs.replace(CONFIG, batch=100)
    a = BillingWorker(aredis, stripe, config, clock=clock)
    b = BillingWorker(aredis, stripe, config, clock=clock)

    async def loop(w: BillingWorker) -> None:
        for _ in range(40):
            await w.run_once()
            await asyncio.sleep(0)

    clock.now = T0 + 4 * 60 + 11
    await asyncio.gather(loop(a), loop(b), add_records(aredis, records[1500:]))
    await drain(aredis, a, b, clock=clock)
    assert a.totals.folded > 0 and b.totals.folded > 0
    assert a.totals.folded + b.totals.folded == len(records)
    assert_billed_exactly(stripe, records)


class CrashAfterSend(MemoryStripe):
    """Stripe takes the events, then the worker dies before it hears back (or settles)."""

    crash = True

    async def send_meter_events(self, events: list[MeterEvent]) -> list[MeterEventResult]:  # type: ignore[override]
        results = await super().send_meter_events(events)
        if self.crash:
            raise Killed
        return results


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs (not even `except Exception`)."""


async def test_a_worker_killed_between_read_fold_and_settle_loses_nothing(
    aredis: aioredis.Redis,
) -> None:
    clock = Clock(T0 + 5)
    stripe = CrashAfterSend(clock)
    records = records_over(500, ["acme", "beta"], windows=2)
    await add_records(aredis, records)
    ledger = Ledger(aredis)
    await ledger.ensure_group()
    # a worker read a batch and died before folding it
    assert len(await ledger.read("dead-reader", 100, None)) == 100
    # ... long enough ago (dead_consumer_ms) for the next worker to reclaim its batch first:
    # otherwise the batch is folded only at the later step, and the windows it lands in are
    # not due yet, so that step would send nothing
    await asyncio.sleep(0.1)
    # another folded everything else, sealed the windows, and died while Stripe answered
    victim = BillingWorker(aredis, stripe, config=CONFIG, clock=clock)
    while (await victim.run_once()).read:
        pass
    clock.now = T0 + 2 * 60 + 11
    with pytest.raises(Killed):
        await victim.run_once()
    assert stripe.events and await pending(aredis) == len(records)

    stripe.crash = False
    await asyncio.sleep(0.25)  # the victim's locks and liveness expire (lock_ms, dead_consumer_ms)
    survivor = BillingWorker(aredis, stripe, CONFIG, clock=clock)
    await drain(aredis, survivor, clock=clock)
    assert survivor.totals.reclaimed == len(records)
    assert stripe.duplicates > 0  # the victim's events were resent: Stripe de-duplicated them
    assert_billed_exactly(stripe, records)
    assert (await reconcile(ledger, stripe, T0 - 60, T0 + 600)).ok


async def test_zero_value_windows_are_settled_without_an_event(aredis: aioredis.Redis) -> None:
    clock = Clock(T0 + 71)
    stripe = MemoryStripe(clock)
    free = [
        usage(i, workspace="self", finished_ms=T0 * 1000 + i, cost_picousd=0) for i in range(30)
    ]
    await add_records(aredis, free)
    worker = BillingWorker(aredis, stripe, CONFIG, clock=clock)
    await drain(aredis, worker, clock=clock)
    assert stripe.events == {} and stripe.customers == {}
    assert worker.totals.segments_sent == 1 and worker.totals.acked == 30


async def test_undecodable_entries_are_dead_lettered(aredis: aioredis.Redis) -> None:
    clock = Clock(T0 + 71)
    stripe = MemoryStripe(clock)
    await aredis.xadd(USAGE_STREAM, {"r": b"\xc1 not msgpack"})
    await aredis.xadd(USAGE_STREAM, {"other": b"x"})
    good = records_over(10, ["acme"], windows=1)
    await add_records(aredis, good)
    worker = BillingWorker(aredis, stripe, CONFIG, clock=clock)
    await drain(aredis, worker, clock=clock)
    dead = await aredis.xrange(USAGE_DEAD_STREAM)
    assert [f[b"code"] for _, f in dead] == [b"undecodable_record", b"missing_record"]
    assert dead[0][1][b"r"] == b"\xc1 not msgpack"
    assert_billed_exactly(stripe, good)


async def test_unit_meters_bill_token_counts(aredis: aioredis.Redis) -> None:
    clock = Clock(T0 + 71)
    stripe = MemoryStripe(clock)
    records = records_over(120, ["acme"], windows=1)
    await add_records(aredis, records)
    config = msgspec.structs.replace(CONFIG, unit_meters=("prompt_tokens", "completion_tokens"))
    worker = BillingWorker(aredis, stripe, config, clock=clock)
    await drain(aredis, worker, clock=clock)
    cus = stripe.customer_of("acme")
    for unit in ("prompt_tokens", "completion_tokens"):
        assert stripe.total(unit_meter(unit), cus) == sum(r.units[unit] for r in records)
    assert_billed_exactly(stripe, records)
    report = await reconcile(Ledger(aredis), stripe, T0, T0 + 60, unit_meters=config.unit_meters)
    assert report.ok and len(report.rows) == 3


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_interleavings_bill_every_record_exactly_once(
    aredis: aioredis.Redis, seed: int
) -> None:
    """Workers stepping in random order, dying (and being replaced), Stripe failing at
    random, records arriving late: in the end every record is in exactly one settled
    segment, every segment's value is what Stripe holds under its identifier, all acked."""
    rng = random.Random(seed)
    clock = Clock(T0)
    stripe = MemoryStripe(clock)
    config = msgspec.structs.replace(CONFIG, batch=50, grace_s=3)
    workers = [BillingWorker(aredis, stripe, config, clock=clock, rng=rng) for _ in range(2)]
    records: list[UsageRecord] = []
    for step in range(120):
        action = rng.random()
        if action < 0.3:
            start = len(records)
            batch = [
                usage(
                    start + i,
                    workspace=rng.choice(["a", "b", "c"]),
                    finished_ms=int((clock.now - rng.uniform(0, 150)) * 1000),
                    cost_picousd=rng.randrange(0, 3_000_000),
                )
                for i in range(rng.randrange(1, 80))
            ]
            records += batch
            await add_records(aredis, batch)
        elif action < 0.35:
            k = rng.randrange(len(workers))  # killed: its state is gone, its locks stay
            workers[k] = BillingWorker(aredis, stripe, config, clock=clock, rng=rng)
        elif action < 0.45:
            stripe.fail_next("send_meter_events", retryable(rng.choice([None, 1.0, 4.0])))
        else:
            await rng.choice(workers).run_once()
        clock.now += rng.uniform(0, 4)
        if step % 30 == 0:
            await asyncio.sleep(0.06)  # let dead consumers and stale locks expire
    await asyncio.sleep(0.25)
    final = BillingWorker(aredis, stripe, config, clock=clock, rng=rng)
    clock.now += 200
    await drain(aredis, final, clock=clock)

    states = await Ledger(aredis).windows(0, 2**40)
    seen: dict[str, int] = defaultdict(int)
    ids = {}
    for state in states:
        keys = await aredis.hgetall(f"lat:bill:w:{state.ref.start}:{state.ref.workspace}:ids")
        ids.update({k.decode(): v.decode() for k, v in keys.items()})
    for r in records:
        seen[r.dispatch_id] += 1
    assert set(ids) == set(seen)  # every record folded, once
    ledger_sum: dict[str, int] = defaultdict(int)
    accepted_total = 0
    for state in states:
        for seg in state.segments:
            if seg.records:
                assert seg.status == "sent", (state.ref, seg)
            ledger_sum[state.ref.workspace] += seg.picousd
            if COST_METER in seg.accepted:
                ident = seg.identifiers[COST_METER]
                assert stripe.events[ident].value == seg.accepted[COST_METER]
                accepted_total += seg.accepted[COST_METER]
    exact: dict[str, int] = defaultdict(int)
    for r in records:
        exact[r.workspace] += r.cost_picousd
    assert ledger_sum == exact
    assert sum(e.value for e in stripe.events.values()) == accepted_total
    assert await pending(aredis) == 0
    assert (await reconcile(Ledger(aredis), stripe, 0, int(clock.now) + 60)).ok


async def test_reconcile_flags_rows_stripe_cannot_verify(aredis: aioredis.Redis) -> None:
    clock = Clock(T0 + 71)
    stripe = MemoryStripe(clock)
    await add_records(aredis, records_over(20, ["acme"], windows=1))
    await drain(aredis, BillingWorker(aredis, stripe, CONFIG, clock=clock), clock=clock)
    stripe.fail_next(
        "meter_total", StripePermanent("No such customer", code="resource_missing", http_status=404)
    )
    report = await reconcile(Ledger(aredis), stripe, T0, T0 + 60)
    assert not report.ok and report.unverified == 1 and report.total_difference == 0
    assert report.rows[0].stripe_error == "resource_missing"
    assert "unverified: " in render_reconcile(report)
