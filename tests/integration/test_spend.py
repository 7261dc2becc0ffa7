"""Spend limits and prepaid credit against a real Redis: atomic admission across clients,
idempotent settlement and grants, expiry of a dead process's reservations, month rollover,
and the zero-round-trip path of workspaces without limits."""

from __future__ import annotations

import asyncio
import calendar

import pytest
import redis.asyncio as aioredis

from billing import keys
from billing.spend import GrantConflict, QuotaExceeded, SpendGuard, month_of

PICO = 10**6  # pico-USD per micro-USD
JAN = calendar.timegm((2025, 1, 15, 12, 0, 0)) * 1000
FEB = calendar.timegm((2025, 2, 1, 0, 0, 0)) * 1000


@pytest.fixture
def guard(aredis: aioredis.Redis) -> SpendGuard:
    return SpendGuard(aredis)


def test_month_of_is_the_utc_calendar_month() -> None:
    assert month_of(JAN) == "2025-01"
    assert month_of(FEB - 1) == "2025-01"
    assert month_of(FEB) == "2025-02"


async def test_unlimited_workspace_costs_no_round_trip_once_known(guard: SpendGuard) -> None:
    assert not guard.known_unlimited("free")
    assert await guard.admit("free", reservation_id="d1", estimate_picousd=5, now_ms=JAN) is False
    assert guard.known_unlimited("free")  # the dispatch skips even computing its estimate
    for i in range(100):
        assert not await guard.admit("free", reservation_id=f"d{i}", estimate_picousd=5)
    assert guard.round_trips == 1
    # a change (here through this guard; elsewhere through the workspace-changed event)
    await guard.set_limit("free", 1)
    with pytest.raises(QuotaExceeded) as err:
        await guard.admit("free", reservation_id="dx", estimate_picousd=2 * PICO, now_ms=JAN)
    assert err.value.reason == "monthly_limit"
    assert guard.round_trips == 2
    assert not guard.known_unlimited("free")


async def test_cached_fact_expires_and_invalidation_wins_over_an_old_answer(
    aredis: aioredis.Redis,
) -> None:
    now = [0.0]
    guard = SpendGuard(aredis, cache_ttl_s=0.5, clock=lambda: now[0])
    other = SpendGuard(aredis)
    await guard.admit("w", reservation_id="a", estimate_picousd=1)
    await other.set_limit("w", 0)  # another process: this guard has not heard yet
    assert not await guard.admit("w", reservation_id="b", estimate_picousd=1)
    now[0] = 0.6
    with pytest.raises(QuotaExceeded):
        await guard.admit("w", reservation_id="c", estimate_picousd=1)
    await other.set_limit("w", None)
    guard.set_cache_ttl(30.0)  # subscribed: longer TTL, cache forgotten
    assert not await guard.admit("w", reservation_id="d", estimate_picousd=1)
    await other.set_limit("w", 0)
    guard.invalidate("w")  # the workspace-changed event
    with pytest.raises(QuotaExceeded):
        await guard.admit("w", reservation_id="e", estimate_picousd=1)


async def test_limit_admits_reserves_settles_and_refuses(guard: SpendGuard) -> None:
    await guard.set_limit("w", 10)  # $0.00001
    assert await guard.admit("w", reservation_id="d1", estimate_picousd=6 * PICO, now_ms=JAN)
    with pytest.raises(QuotaExceeded):  # 6 + 6 > 10
        await guard.admit("w", reservation_id="d2", estimate_picousd=6 * PICO, now_ms=JAN)
    state = await guard.state("w", now_ms=JAN)
    assert (state.monthly_limit_microusd, state.spent_picousd, state.reserved_picousd) == (
        10,
        0,
        6 * PICO,
    )
    assert await guard.settle(
        "w", reservation_id="d1", actual_picousd=3 * PICO, dispatch_id="d1", now_ms=JAN
    )
    assert await guard.admit("w", reservation_id="d2", estimate_picousd=6 * PICO, now_ms=JAN)
    state = await guard.state("w", now_ms=JAN)
    assert (state.spent_picousd, state.reserved_picousd) == (3 * PICO, 6 * PICO)
    assert state.spent_microusd == 3 and state.month == "2025-01"
    # admitting the same reservation again is a no-op
    assert await guard.admit("w", reservation_id="d2", estimate_picousd=6 * PICO, now_ms=JAN)
    assert (await guard.state("w", now_ms=JAN)).reserved_picousd == 6 * PICO


async def test_settle_is_idempotent_and_release_frees(guard: SpendGuard) -> None:
    await guard.set_limit("w", 100)
    await guard.admit("w", reservation_id="d1", estimate_picousd=50 * PICO, now_ms=JAN)
    await guard.admit("w", reservation_id="d2", estimate_picousd=50 * PICO, now_ms=JAN)
    for expected in (True, False, False):
        assert (
            await guard.settle(
                "w", reservation_id="d1", actual_picousd=7, dispatch_id="d1", now_ms=JAN
            )
            is expected
        )
    assert await guard.release("w", reservation_id="d2") is True
    assert await guard.release("w", reservation_id="d2") is False
    state = await guard.state("w", now_ms=JAN)
    assert (state.spent_picousd, state.reserved_picousd) == (7, 0)
    # the early settlement left a marker for the usage ledger, nothing else
    assert await guard._redis.zscore(keys.spend_settled("w"), "d1") is not None


async def test_concurrent_admits_from_two_clients_never_overshoot(redis_url: str) -> None:
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    guards = [SpendGuard(c) for c in clients]
    try:
        await guards[0].set_limit("w", 1_000)  # room for exactly 33 reservations of 30
        estimate = 30 * PICO

        async def one(i: int) -> bool:
            try:
                return await guards[i % 2].admit(
                    "w", reservation_id=f"d{i}", estimate_picousd=estimate, now_ms=JAN
                )
            except QuotaExceeded:
                return False

        admitted = [i for i, ok in enumerate(await asyncio.gather(*map(one, range(200)))) if ok]
        assert len(admitted) == 33
        state = await guards[1].state("w", now_ms=JAN)
        assert state.reserved_picousd == 33 * estimate <= 1_000 * PICO

        # settle half at a higher actual cost, concurrently, twice each: counted once each
        async def settle(i: int) -> bool:
            return await guards[i % 2].settle(
                "w",
                reservation_id=f"d{i}",
                actual_picousd=40 * PICO,
                dispatch_id=f"d{i}",
                now_ms=JAN,
            )

        half = admitted[:10]
        results = await asyncio.gather(*(settle(i) for i in half + half))
        assert sum(results) == 10
        state = await guards[0].state("w", now_ms=JAN)
        assert state.spent_picousd == 400 * PICO
        assert state.reserved_picousd == 23 * estimate
    finally:
        for c in clients:
            await c.aclose()


async def test_a_crashed_process_reservations_expire(aredis: aioredis.Redis) -> None:
    crashed = SpendGuard(aredis, reservation_ttl_s=60)
    alive = SpendGuard(aredis)
    await alive.set_limit("w", 100)
    for i in range(3):
        await crashed.admit("w", reservation_id=f"c{i}", estimate_picousd=30 * PICO, now_ms=JAN)
    with pytest.raises(QuotaExceeded):
        await alive.admit("w", reservation_id="a", estimate_picousd=30 * PICO, now_ms=JAN)
    # past the deadline the next script of the workspace drops them
    later = JAN + 61_000
    assert await alive.admit("w", reservation_id="a", estimate_picousd=30 * PICO, now_ms=later)
    state = await alive.state("w", now_ms=later)
    assert state.reserved_picousd == 30 * PICO
    assert await aredis.hlen(keys.spend_reservations("w")) == 1
    assert await aredis.zcard(keys.spend_deadlines("w")) == 1
    # a late settle of an expired reservation changes nothing (the ledger counts it)
    assert not await crashed.settle(
        "w", reservation_id="c0", actual_picousd=5, dispatch_id="c0", now_ms=later
    )


async def test_credit_grants_are_idempotent_and_gate_admission(guard: SpendGuard) -> None:
    assert await guard.add_credit("w", 20, grant_id="g1") is True
    assert await guard.add_credit("w", 20, grant_id="g1") is False
    with pytest.raises(GrantConflict):
        await guard.add_credit("w", 25, grant_id="g1")
    state = await guard.state("w", now_ms=JAN)
    assert state.credit_enabled and state.credit_picousd == 20 * PICO
    assert state.monthly_limit_microusd is None

    assert await guard.admit("w", reservation_id="d1", estimate_picousd=15 * PICO, now_ms=JAN)
    with pytest.raises(QuotaExceeded) as err:  # 20 - 15 < 10
        await guard.admit("w", reservation_id="d2", estimate_picousd=10 * PICO, now_ms=JAN)
    assert err.value.reason == "credit"
    await guard.settle(
        "w", reservation_id="d1", actual_picousd=19 * PICO, dispatch_id="d1", now_ms=JAN
    )
    state = await guard.state("w", now_ms=JAN)
    assert (state.credit_picousd, state.spent_picousd, state.reserved_picousd) == (
        PICO,
        19 * PICO,
        0,
    )
    assert state.credit_microusd == 1
    # the remaining credit covers a 1 micro-USD estimate; a free request needs some left
    assert await guard.admit("w", reservation_id="d3", estimate_picousd=PICO, now_ms=JAN)
    with pytest.raises(QuotaExceeded):
        await guard.admit("w", reservation_id="d4", estimate_picousd=0, now_ms=JAN)
    await guard.add_credit("w", 5, grant_id="g2")
    assert await guard.admit("w", reservation_id="d4", estimate_picousd=0, now_ms=JAN)
    assert (await guard.state("w", now_ms=JAN)).credit_picousd == 6 * PICO


async def test_month_rollover(guard: SpendGuard) -> None:
    await guard.set_limit("w", 10)
    await guard.admit("w", reservation_id="d1", estimate_picousd=10 * PICO, now_ms=JAN)
    await guard.settle(
        "w", reservation_id="d1", actual_picousd=10 * PICO, dispatch_id="d1", now_ms=JAN
    )
    with pytest.raises(QuotaExceeded):
        await guard.admit("w", reservation_id="d2", estimate_picousd=1, now_ms=JAN)
    assert await guard.admit("w", reservation_id="d2", estimate_picousd=10 * PICO, now_ms=FEB)
    jan, feb = await guard.state("w", now_ms=JAN), await guard.state("w", now_ms=FEB)
    assert (jan.spent_picousd, feb.spent_picousd) == (10 * PICO, 0)
    ttl = await guard._redis.ttl(keys.spend_month("w", "2025-01"))
    assert 0 < ttl <= keys.SPEND_MONTH_TTL_S


async def test_invalid_amounts_are_refused(guard: SpendGuard) -> None:
    with pytest.raises(ValueError):
        await guard.admit("w", reservation_id="d", estimate_picousd=-1)
    with pytest.raises(ValueError):
        await guard.set_limit("w", -5)
    with pytest.raises(ValueError):
        await guard.add_credit("w", 5, grant_id="")
