"""The Redis-backed catalog (gateway/catalog_store.py) against a real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import msgspec
import pytest
import redis.asyncio as aioredis

from catalog.errors import CatalogError
from catalog.loader import load_seed, merge_catalog, seed_offerings
from catalog.model import Catalog, Offering
from gateway import keys
from gateway.catalog_store import CatalogStore, CatalogVersionConflict, LiveCatalog

LLAMA = "lovelace:llama-3.2-3b-instruct"


@pytest.fixture
def seed() -> Catalog:
    return load_seed()


def with_offering(cat: Catalog, offering_id: str, **changes: object) -> Catalog:
    offering = msgspec.structs.replace(Offering(id=offering_id, model=LLAMA), **changes)
    return merge_catalog(cat, Catalog(offerings=(offering,)))


async def test_empty_store(aredis: aioredis.Redis) -> None:
    store = CatalogStore(aredis)
    assert await store.get() == Catalog()
    assert await store.version() == 0


async def test_seed_apply_and_history(aredis: aioredis.Redis, seed: Catalog) -> None:
    store = CatalogStore(aredis)
    first = await store.seed_if_empty(seed)
    assert first.version == 1
    assert first == msgspec.structs.replace(seed, version=1)
    assert await store.get() == first

    # a second seed (next start-up, or a newer seed) leaves the stored catalog alone
    assert await store.seed_if_empty(Catalog(task_classes=seed.task_classes)) == first

    updated = merge_catalog(first, Catalog(offerings=seed_offerings("http://127.0.0.1:1/v1")))
    second = await store.apply(updated)
    assert second.version == 2
    assert len(second.offerings) == 3
    assert await store.get() == second
    assert await store.version() == 2
    assert await store.history(1) == first
    assert await store.history(2) == second
    assert await store.history(3) is None


async def test_apply_publishes_the_version(redis_url: str, seed: Catalog) -> None:
    listener = aioredis.Redis.from_url(redis_url)
    writer = aioredis.Redis.from_url(redis_url)
    pubsub = listener.pubsub()
    try:
        await pubsub.subscribe(keys.EVENTS_CHANNEL)
        await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
        await CatalogStore(writer).apply(seed)
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        assert message is not None
        assert message["data"] == b"catalog:1"
    finally:
        await pubsub.aclose()
        await listener.aclose()
        await writer.aclose()


async def test_invalid_write_is_rejected_and_old_catalog_kept(
    aredis: aioredis.Redis, seed: Catalog
) -> None:
    store = CatalogStore(aredis)
    good = await store.apply(seed)
    bad = with_offering(good, "neg", prices={"prompt_tokens": -5, "completion_tokens": 1})
    with pytest.raises(CatalogError) as info:
        await store.apply(bad)
    assert info.value.field == "offerings[0].prices.prompt_tokens"
    assert "offerings[0].prices.prompt_tokens" in str(info.value)
    assert await store.get() == good
    assert await store.version() == 1


async def test_expected_version(aredis: aioredis.Redis, seed: Catalog) -> None:
    store = CatalogStore(aredis)
    await store.apply(seed)
    v2 = await store.apply(with_offering(seed, "a"), expected_version=1)
    assert v2.version == 2
    with pytest.raises(CatalogVersionConflict) as info:
        await store.apply(with_offering(seed, "b"), expected_version=1)
    assert (info.value.expected, info.value.current) == (1, 2)
    assert info.value.status == 409
    assert await store.get() == v2


async def test_history_is_bounded(
    aredis: aioredis.Redis, seed: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keys, "CATALOG_HISTORY_KEEP", 2)
    store = CatalogStore(aredis)
    for _ in range(4):
        await store.apply(seed)
    assert [await store.history(v) is not None for v in (1, 2, 3, 4)] == [
        False, False, True, True,
    ]  # fmt: skip


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[list[aioredis.Redis]]:
    """Three separate connections: as if three processes."""
    made = [aioredis.Redis.from_url(redis_url) for _ in range(3)]
    yield made
    for client in made:
        await client.aclose()


async def test_seed_if_empty_race(clients: list[aioredis.Redis], seed: Catalog) -> None:
    results = await asyncio.gather(*(CatalogStore(c).seed_if_empty(seed) for c in clients))
    assert [r.version for r in results] == [1, 1, 1]
    store = CatalogStore(clients[0])
    assert await store.version() == 1
    assert await store.history(2) is None


async def test_concurrent_unconditional_applies_all_land(
    clients: list[aioredis.Redis], seed: Catalog
) -> None:
    catalogs = [with_offering(seed, f"o{i}") for i in range(3)]
    results = await asyncio.gather(
        *(CatalogStore(c).apply(cat) for c, cat in zip(clients, catalogs, strict=True))
    )
    assert sorted(r.version for r in results) == [1, 2, 3]
    last = max(results, key=lambda r: r.version)
    assert await CatalogStore(clients[0]).get() == last


async def test_two_processes_see_a_change_within_a_second(
    clients: list[aioredis.Redis], seed: Catalog
) -> None:
    writer = CatalogStore(clients[0])
    await writer.seed_if_empty(seed)
    lives = [LiveCatalog(CatalogStore(c), poll_interval=0.05) for c in clients[1:]]
    for live in lives:
        await live.start()
    try:
        assert [live.version for live in lives] == [1, 1]
        started = time.monotonic()
        written = await writer.apply(with_offering(seed, "fresh"))
        async with asyncio.timeout(1.0):
            seen = await asyncio.gather(*(live.wait_for_version(written.version) for live in lives))
        assert time.monotonic() - started < 1.0
        assert all(cat == written for cat in seen)
        assert all(live.current.offerings[0].id == "fresh" for live in lives)
    finally:
        for live in lives:
            await live.stop()


async def test_run_once(aredis: aioredis.Redis, seed: Catalog) -> None:
    store = CatalogStore(aredis)
    await store.apply(seed)
    live = LiveCatalog(store)  # not started: the test drives it
    assert live.version == 0
    assert await live.run_once() is True
    assert live.version == 1
    assert await live.run_once() is False
    await store.apply(with_offering(seed, "x"))
    assert live.version == 1
    assert await live.run_once() is True
    assert live.version == 2
    assert live.current.offerings[0].id == "x"


async def test_stop_right_after_start(aredis: aioredis.Redis, seed: Catalog) -> None:
    store = CatalogStore(aredis)
    await store.apply(seed)
    for _ in range(5):
        live = LiveCatalog(store, poll_interval=3600)
        await live.start()
        await live.run_once()
        async with asyncio.timeout(2):
            await live.stop()


async def test_live_catalog_survives_a_failing_redis(
    redis_url: str, seed: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    good = aioredis.Redis.from_url(redis_url)
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.1)
    try:
        store = CatalogStore(good)
        await store.apply(seed)
        live = LiveCatalog(store, poll_interval=0.02, poll_timeout=0.2)
        await live.start()
        # Swap the connection for one that cannot connect: the loop logs and keeps serving.
        live._store = CatalogStore(dead)
        await asyncio.sleep(0.5)
        assert "catalog poll failed" in caplog.text
        assert live._task is not None
        assert not live._task.done()
        assert live.version == 1
        assert live.current == await store.get()
        # Back to a working Redis: changes flow again.
        live._store = store
        written = await store.apply(with_offering(seed, "after"))
        async with asyncio.timeout(1.0):
            await live.wait_for_version(written.version)
        await live.stop()
    finally:
        await good.aclose()
        await dead.aclose()


async def test_flushed_redis_keeps_the_last_catalog(aredis: aioredis.Redis, seed: Catalog) -> None:
    store = CatalogStore(aredis)
    await store.apply(seed)
    live = LiveCatalog(store, poll_interval=3600)
    await live.start()
    try:
        await aredis.flushdb()
        assert await live.run_once() is False
        assert live.version == 1
    finally:
        async with asyncio.timeout(2):
            await live.stop()
