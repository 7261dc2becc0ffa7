"""Cache lifetimes: found keys may be kept longer while revocation events arrive, lookups
that found nothing never are, and changing the TTL forgets what was cached."""

from __future__ import annotations

import redis.asyncio as aioredis

from gateway.auth.apikeys import ApiKeyStore
from gateway.auth.workspaces import WorkspaceStore


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_found_keys_follow_the_event_ttl(aredis: aioredis.Redis) -> None:
    clock = Clock()
    await WorkspaceStore(aredis).create("acme")
    store = ApiKeyStore(aredis, clock=clock)
    key, record = await store.create("acme")
    store.set_cache_ttl(30.0)
    await store.verify(key)
    # revoked behind the cache's back (no event delivered to this store)
    await ApiKeyStore(aredis).revoke(record.id)
    clock.now += 10
    assert (await store.verify(key)).key_id == record.id  # still cached: events would say
    store.handle_event(f"key-revoked:{record.id}")
    try:
        await store.verify(key)
    except Exception as exc:
        assert type(exc).__name__ == "AuthenticationFailed"
    else:
        raise AssertionError("revoked key accepted after the event")


async def test_unknown_keys_keep_the_short_ttl(aredis: aioredis.Redis) -> None:
    clock = Clock()
    await WorkspaceStore(aredis).create("acme")
    store = ApiKeyStore(aredis, clock=clock)
    store.set_cache_ttl(30.0)
    other = ApiKeyStore(aredis)
    key, _ = await other.create("acme")
    key_id = key.split("_")[1]
    name = f"lat:apikey:{key_id}"
    saved = await aredis.hgetall(name)
    await aredis.delete(name)  # as if the key did not exist yet
    assert (await store._lookup(key_id)).record is None
    await aredis.hset(name, mapping=saved)  # now it does
    clock.now += 0.6  # a miss is cached only for the short TTL
    assert (await store.verify(key)).workspace == "acme"


async def test_setting_the_ttl_clears_the_cache(aredis: aioredis.Redis) -> None:
    clock = Clock()
    workspaces = WorkspaceStore(aredis, clock=clock)
    await workspaces.create("acme")
    assert (await workspaces.get("acme")) is not None
    workspaces.set_cache_ttl(30.0)
    await aredis.flushall()
    assert await workspaces.get("acme") is None  # re-read, not served from before
