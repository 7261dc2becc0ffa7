"""WorkspaceStore against a real Redis."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from gateway import keys
from gateway.auth.workspaces import Workspace, WorkspaceStore
from gateway.errors import InvalidRequest, NotFound


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_create_get_list(aredis: aioredis.Redis) -> None:
    store = WorkspaceStore(aredis)
    ws = await store.create("acme", default_model="lovelace:llama-3.2-3b")
    assert ws == Workspace(name="acme", created=ws.created, default_model="lovelace:llama-3.2-3b")
    assert (ws.drop_params, ws.log_bodies, ws.allow_marketplace) == (True, False, False)
    await store.create("beta", allow_marketplace=True)
    assert await store.get("acme") == ws
    assert await store.get("missing") is None
    assert await store.get("_admin") is None
    assert [w.name for w in await store.list()] == ["acme", "beta"]
    assert await aredis.sismember(keys.WORKSPACES_INDEX, "acme")


async def test_create_is_idempotent(aredis: aioredis.Redis) -> None:
    store = WorkspaceStore(aredis)
    first = await store.create("acme", log_bodies=True)
    again = await store.create("acme", log_bodies=False)
    assert again == first


@pytest.mark.parametrize("name", ["_admin", "Acme", "", "a/b"])
async def test_create_rejects_bad_names(aredis: aioredis.Redis, name: str) -> None:
    with pytest.raises(InvalidRequest):
        await WorkspaceStore(aredis).create(name)


async def test_create_rejects_unknown_or_mistyped_settings(aredis: aioredis.Redis) -> None:
    store = WorkspaceStore(aredis)
    with pytest.raises(InvalidRequest):
        await store.create("acme", colour="blue")
    with pytest.raises(InvalidRequest):
        await store.create("acme", drop_params="yes")
    with pytest.raises(InvalidRequest):
        await store.create("acme", created=5)
    assert await store.get("acme") is None


async def test_update(aredis: aioredis.Redis) -> None:
    store = WorkspaceStore(aredis)
    ws = await store.create("acme")
    updated = await store.update("acme", allow_marketplace=True, default_model=None)
    assert updated.allow_marketplace and updated.created == ws.created
    assert await store.get("acme") == updated
    with pytest.raises(InvalidRequest):
        await store.update("acme", name="other")
    with pytest.raises(InvalidRequest):
        await store.update("acme", log_bodies=3)
    with pytest.raises(NotFound):
        await store.update("missing", log_bodies=True)


async def test_other_process_sees_update_after_cache_ttl(aredis: aioredis.Redis) -> None:
    clock = FakeClock()
    writer = WorkspaceStore(aredis)
    reader = WorkspaceStore(aredis, clock=clock)
    await writer.create("acme")
    assert (await reader.get("acme")) is not None
    await writer.update("acme", log_bodies=True)
    cached = await reader.get("acme")
    assert cached is not None and not cached.log_bodies  # within the TTL: the cached copy
    clock.now += 0.5
    fresh = await reader.get("acme")
    assert fresh is not None and fresh.log_bodies
    await writer.update("acme", log_bodies=False)
    reader.invalidate("acme")
    again = await reader.get("acme")
    assert again is not None and not again.log_bodies


async def test_negative_lookups_are_not_cached_beyond_ttl(aredis: aioredis.Redis) -> None:
    clock = FakeClock()
    reader = WorkspaceStore(aredis, clock=clock)
    assert await reader.get("late") is None
    await WorkspaceStore(aredis).create("late")
    clock.now += 0.5
    assert await reader.get("late") is not None
