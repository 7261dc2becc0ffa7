"""The planner's view of a workspace's online runtimes: fresh for a second, then served stale
while one background read replaces it, dropped at once by a presence event."""

from __future__ import annotations

import asyncio
from typing import Any

from catalog.model import Catalog
from gateway.runtimes.records import RuntimeRecord
from gateway.tunnel.directory import RuntimeDirectory


class Store:
    """Counts reads; ``gate`` (when set) holds each read until released."""

    def __init__(self) -> None:
        self.gets = 0
        self.reads = 0
        self.online: list[RuntimeRecord] = []
        self.gate: asyncio.Event | None = None
        self.fail = False

    async def get(self, workspace: str, runtime_id: str) -> RuntimeRecord | None:
        self.gets += 1
        return next(
            (r for r in self.online if r.workspace == workspace and r.id == runtime_id), None
        )

    async def list_with_status(self, workspace: str) -> list[tuple[RuntimeRecord, str]]:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ConnectionError("redis away")
        return [(r, "reachable") for r in self.online if r.workspace == workspace]


def record(rid: str) -> RuntimeRecord:
    return RuntimeRecord(id=rid, workspace="ws", name=rid, created_ms=0, paired_ms=1)


def directory(store: Store, now: list[float]) -> RuntimeDirectory:
    fake: Any = store
    return RuntimeDirectory(fake, Catalog, ttl_s=1.0, stale_s=10.0, clock=lambda: now[0])


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_fresh_copy_costs_no_read() -> None:
    store, now = Store(), [100.0]
    store.online = [record("lat_a")]
    d = directory(store, now)
    assert [r.id for r in await d.online("ws")] == ["lat_a"]
    now[0] += 0.5
    assert [r.id for r in await d.online("ws")] == ["lat_a"]
    assert store.reads == 1


async def test_stale_copy_is_served_while_one_background_read_replaces_it() -> None:
    store, now = Store(), [100.0]
    store.online = [record("lat_a")]
    d = directory(store, now)
    await d.online("ws")
    store.online = [record("lat_a"), record("lat_b")]
    store.gate = asyncio.Event()
    now[0] += 3.0
    # served at once, from the copy, however many callers: one read under way
    assert [r.id for r in await d.online("ws")] == ["lat_a"]
    assert [r.id for r in await d.online("ws")] == ["lat_a"]
    await settle()
    assert store.reads == 2
    store.gate.set()
    await settle()
    assert [r.id for r in await d.online("ws")] == ["lat_a", "lat_b"]
    assert store.reads == 2


async def test_a_copy_past_the_stale_bound_is_read_on_the_request_path() -> None:
    store, now = Store(), [100.0]
    store.online = [record("lat_a")]
    d = directory(store, now)
    await d.online("ws")
    store.online = []
    now[0] += 11.0
    assert await d.online("ws") == ()
    assert store.reads == 2


async def test_presence_event_drops_the_copy_and_an_older_read_is_not_kept() -> None:
    store, now = Store(), [100.0]
    store.online = [record("lat_a")]
    d = directory(store, now)
    await d.online("ws")
    now[0] += 2.0
    store.gate = asyncio.Event()
    await d.online("ws")  # starts a background read, which sees lat_a
    await settle()
    assert d.handle_event("runtime-presence:ws")  # the runtime went away meanwhile
    store.online = []
    store.gate.set()
    await settle()  # the older read finishes but is not stored
    assert await d.online("ws") == ()
    assert store.reads == 3


async def test_failed_background_read_keeps_the_copy_and_logs() -> None:
    store, now = Store(), [100.0]
    store.online = [record("lat_a")]
    d = directory(store, now)
    await d.online("ws")
    store.fail = True
    now[0] += 2.0
    assert [r.id for r in await d.online("ws")] == ["lat_a"]
    await settle()
    assert [r.id for r in await d.online("ws")] == ["lat_a"]
    await d.aclose()


async def test_find_keeps_own_runtimes_for_a_second_and_never_foreign_ones() -> None:
    store, now = Store(), [100.0]
    store.online = [record("lat_a")]
    d = directory(store, now)
    assert (await d.find("ws", "lat_a")) is not None
    assert (await d.find("ws", "lat_a")) is not None
    assert store.gets == 1
    for _ in range(2):  # another workspace's id, or an unknown one: one read every time
        assert await d.find("other", "lat_a") is None
        assert await d.find("ws", "lat_zz") is None
    assert store.gets == 5
    now[0] += 1.5
    await d.find("ws", "lat_a")
    assert store.gets == 6


async def test_find_forgets_on_revocation_and_presence_events() -> None:
    store, now = Store(), [100.0]
    store.online = [record("lat_a")]
    d = directory(store, now)
    await d.find("ws", "lat_a")
    store.online = []  # revoked (the store no longer answers it)
    d.forget_runtime("lat_a")
    assert await d.find("ws", "lat_a") is None
    store.online = [record("lat_a")]
    await d.find("ws", "lat_a")
    d.handle_event("runtime-presence:ws")
    await d.find("ws", "lat_a")
    assert store.gets == 4
