"""Dispatch keys across gateway processes: two signers on one real Redis (two processes), the
JWKS served over real loopback HTTP by the Litestar route, key rotation and expiry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import uvicorn
from litestar import Litestar
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from daemon.tokens import (
    DispatchRefused,
    DispatchVerifier,
    JwksFetchError,
    http_jwks_fetcher,
    jwks_url_for,
)
from gateway import keys
from gateway.redis_server import free_port
from gateway.tunnel.routes import JWKS_PATH, tunnel_routes
from gateway.tunnel.tokens import DispatchSigner

RUNTIME = "lat_0123456789abcdef"
TASK = "chat-completion"
MODEL = "lovelace:llama-3.2-3b-instruct"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Counting:
    def __init__(self, signer: DispatchSigner) -> None:
        self.signer = signer
        self.calls = 0

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        await asyncio.sleep(0.01)  # long enough for concurrent misses to pile up
        return await self.signer.jwks()


def mint(signer: DispatchSigner, dispatch_id: str = "dsp_1", now: float | None = None) -> str:
    return signer.mint(runtime_id=RUNTIME, task=TASK, model=MODEL, dispatch_id=dispatch_id, now=now)


async def verify(v: DispatchVerifier, token: str, dispatch_id: str = "dsp_1") -> None:
    await v.verify(
        token,
        runtime_id=RUNTIME,
        dispatch_id=dispatch_id,
        task=TASK,
        model=MODEL,
        advertised_tasks=(TASK,),
        advertised_models=(MODEL,),
    )


async def kids(signer: DispatchSigner) -> set[str]:
    return {k["kid"] for k in (await signer.jwks())["keys"]}


async def test_tokens_of_either_process_verify(aredis: aioredis.Redis) -> None:
    clock = Clock()
    a = DispatchSigner(aredis, clock=clock)
    b = DispatchSigner(aredis, clock=clock)
    await a.start()
    fetch = Counting(a)  # the daemon asks process A's endpoint
    verifier = DispatchVerifier(fetch, clock=clock, min_refetch_s=5.0)
    await verify(verifier, mint(a))
    assert fetch.calls == 1
    await b.start()  # process B comes up after the daemon fetched the JWKS
    from_b = mint(b, "dsp_2")
    with pytest.raises(DispatchRefused) as info:
        await verify(verifier, from_b, "dsp_2")
    assert info.value.reason == "unknown_key"
    assert fetch.calls == 1  # within the rate limit: not refetched
    clock.now += 5
    await verify(verifier, from_b, "dsp_2")
    assert fetch.calls == 2  # exactly one refetch, which found B's key
    await verify(verifier, mint(a, "dsp_3"), "dsp_3")
    await verify(verifier, mint(b, "dsp_4"), "dsp_4")
    assert fetch.calls == 2
    assert verifier.kids == {a.kid, b.kid}
    assert await kids(a) == await kids(b) == {a.kid, b.kid}


async def test_concurrent_misses_share_one_refetch(aredis: aioredis.Redis) -> None:
    clock = Clock()
    a, b = DispatchSigner(aredis, clock=clock), DispatchSigner(aredis, clock=clock)
    await a.start()
    fetch = Counting(a)
    verifier = DispatchVerifier(fetch, clock=clock)
    await verifier.refresh()
    await b.start()
    clock.now += 10
    tokens = [mint(b, f"dsp_{i}") for i in range(20)]
    await asyncio.gather(*(verify(verifier, t, f"dsp_{i}") for i, t in enumerate(tokens)))
    assert fetch.calls == 2


async def test_expired_key_leaves_the_jwks(aredis: aioredis.Redis) -> None:
    """A process that stops refreshing (it died) drops out after its key TTL; one that
    refreshes stays; the set itself is gone once nobody publishes."""
    gone = DispatchSigner(aredis, key_ttl_s=0.3)
    alive = DispatchSigner(aredis, key_ttl_s=0.3)
    await gone.start()
    await alive.start()
    token = mint(gone)
    assert await kids(alive) == {gone.kid, alive.kid}
    pttl = await aredis.pttl(keys.DISPATCH_JWKS)
    assert 0 < pttl <= 300
    await asyncio.sleep(0.2)
    await alive.refresh()
    await asyncio.sleep(0.2)
    assert await kids(alive) == {alive.kid}  # gone's TTL (0.3 s) has passed
    verifier = DispatchVerifier(alive.jwks)
    with pytest.raises(DispatchRefused) as info:
        await verify(verifier, token)
    assert info.value.reason == "unknown_key"
    assert await aredis.zcard(keys.DISPATCH_JWKS) == 2  # listed no more, not yet pruned
    await alive.refresh()
    assert await aredis.zcard(keys.DISPATCH_JWKS) == 1  # a refresh prunes dead members
    await asyncio.sleep(0.35)
    assert await aredis.exists(keys.DISPATCH_JWKS) == 0


async def test_default_key_ttl_outlives_tokens(aredis: aioredis.Redis) -> None:
    signer = DispatchSigner(aredis, ttl_s=30)
    assert signer.key_ttl_s == keys.DISPATCH_JWK_GRACE_S + 30
    await signer.start()
    ttl_ms = await aredis.pttl(keys.DISPATCH_JWKS)
    assert 85_000 < ttl_ms <= 90_000
    (score,) = [s for _, s in await aredis.zrange(keys.DISPATCH_JWKS, 0, -1, withscores=True)]
    seconds, micros = await aredis.time()
    assert 89_000 < score - (seconds * 1000 + micros // 1000) <= 90_000


async def test_jwks_without_redis_serves_own_key() -> None:
    dead = aioredis.Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    try:
        signer = DispatchSigner(dead)
        assert await kids(signer) == {signer.kid}
    finally:
        await dead.aclose()


# -- the route, over real HTTP -----------------------------------------------------------------


@dataclass
class Holder:
    dispatch_signer: DispatchSigner


@pytest.fixture
async def served(aredis: aioredis.Redis) -> AsyncIterator[tuple[str, DispatchSigner]]:
    signer = DispatchSigner(aredis)
    await signer.start()
    app = Litestar(route_handlers=tunnel_routes(Holder(signer)), openapi_config=None)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, lifespan="off", ws="none", log_level="warning"
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}", signer
    server.should_exit = True
    await task


async def test_jwks_route_over_http(
    served: tuple[str, DispatchSigner], aredis: aioredis.Redis
) -> None:
    base, signer = served
    other = DispatchSigner(aredis)  # another gateway process
    await other.start()
    async with aiohttp.ClientSession() as session, session.get(base + JWKS_PATH) as resp:
        assert resp.status == 200  # no credential needed
        assert resp.headers["content-type"].startswith("application/json")
        assert resp.headers["cache-control"] == "public, max-age=5"
        body = await resp.json()
    assert {k["kid"] for k in body["keys"]} == {signer.kid, other.kid}
    assert all("d" not in k for k in body["keys"])  # never the private part
    assert jwks_url_for(base.replace("http:", "ws:") + "/v1/tunnel") == base + JWKS_PATH
    verifier = DispatchVerifier(http_jwks_fetcher(jwks_url_for(base)))
    await verify(verifier, mint(other))
    await verify(verifier, mint(signer, "dsp_2"), "dsp_2")


async def test_http_fetcher_failures(served: tuple[str, DispatchSigner]) -> None:
    base, signer = served
    for url in [f"http://127.0.0.1:{free_port()}/jwks.json", base + "/v1/tunnel/nope.json"]:
        with pytest.raises(JwksFetchError):
            await http_jwks_fetcher(url, timeout_s=2.0)()
    # A verifier whose JWKS is unreachable refuses (unknown key) and does not crash.
    verifier = DispatchVerifier(http_jwks_fetcher(f"http://127.0.0.1:{free_port()}/j.json"))
    with pytest.raises(DispatchRefused) as info:
        await verify(verifier, mint(signer))
    assert info.value.reason == "unknown_key"
