"""Latency added by dispatch across gateway processes (not collected by pytest).

Two OS processes share one loopback Redis: the holder (registry + queue consumer + an
in-memory tunnel session that answers at once) and the requester (registry + dispatcher),
each on uvloop with redis-py asyncio + hiredis, at concurrency 1. Measured per dispatch, from
``open()`` to the terminal event:

- ``direct``: the in-memory session itself (the baseline: "calling the backend directly");
- ``local``: ``RuntimeDispatcher.open`` when this process holds the tunnel (fast path);
- ``remote``: ``RuntimeDispatcher.open`` when the other process holds it (through Redis).

Run: ``python tests/integration/bench_tunnel_bus.py [--n 3000] [--chunks 1] [--no-uvloop]``
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis

from gateway.redis_server import RedisServer
from gateway.tunnel.bus import QueueConsumer
from gateway.tunnel.bus_protocol import now_ms
from gateway.tunnel.registry import TunnelRegistry
from gateway.tunnel.remote import RuntimeDispatcher
from gateway.tunnel.types import (
    Chunk,
    DispatchEvent,
    DispatchHandle,
    DispatchRequest,
    Finished,
)

PAYLOAD = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0}]}' * 4


class InstantHandle:
    def __init__(self, chunks: int) -> None:
        self._events: list[DispatchEvent] = [Chunk(data=PAYLOAD)] * chunks
        self._events.append(Finished(status=200))

    def __aiter__(self) -> AsyncIterator[DispatchEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[DispatchEvent]:
        for event in self._events:
            yield event

    async def cancel(self) -> None:
        return None


class InstantSession:
    def __init__(self, runtime_id: str, chunks: int) -> None:
        self.runtime_id = runtime_id
        self.chunks = chunks

    @property
    def accepting(self) -> bool:
        return True

    async def open(self, request: DispatchRequest) -> DispatchHandle:
        return InstantHandle(self.chunks)

    async def close(self, reason: str) -> None:
        return None


def request(runtime_id: str) -> DispatchRequest:
    return DispatchRequest(
        dispatch_id=f"dsp_{secrets.token_hex(8)}",
        runtime_id=runtime_id,
        task="chat-completion",
        model="lovelace:bench",
        body=b'{"messages":[{"role":"user","content":"hi"}]}',
        stream=True,
        token="t" * 400,  # about the size of a real ES256 dispatch token
        deadline_ms=now_ms() + 30_000,
    )


def _use_uvloop(enabled: bool) -> None:
    if enabled:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _hold(
    url: str, chunks: int, ready: mp.synchronize.Event, stop: mp.synchronize.Event
) -> None:
    redis = aioredis.Redis.from_url(url)
    registry = TunnelRegistry(redis)
    consumer = QueueConsumer(redis, registry)
    await registry.start()
    await consumer.start()
    await registry.register(InstantSession("lat_remote", chunks))
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.1)
    await consumer.stop()
    await registry.stop()
    await redis.aclose()


def holder_main(
    url: str, chunks: int, uvloop: bool, ready: mp.synchronize.Event, stop: mp.synchronize.Event
) -> None:
    _use_uvloop(uvloop)
    asyncio.run(_hold(url, chunks, ready, stop))


async def _measure(
    n: int, open_: Callable[[DispatchRequest], Awaitable[DispatchHandle]], runtime_id: str
) -> list[float]:
    samples = []
    for i in range(n + n // 10):
        req = request(runtime_id)
        started = time.perf_counter()
        handle = await open_(req)
        async for event in handle:
            if not isinstance(event, Chunk):
                break
        if i >= n // 10:  # the first tenth warms up
            samples.append((time.perf_counter() - started) * 1000)
    return samples


def _summary(name: str, samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=100)
    return f"{name:>8}: p50 {q[49]:.3f} ms  p90 {q[89]:.3f} ms  p99 {q[98]:.3f} ms"


async def _request(url: str, n: int, chunks: int) -> None:
    redis = aioredis.Redis.from_url(url)
    registry = TunnelRegistry(redis)
    await registry.start()
    local = InstantSession("lat_local", chunks)
    await registry.register(local)
    dispatcher = RuntimeDispatcher(redis, registry)
    direct = await _measure(n, local.open, "lat_local")
    fast = await _measure(n, dispatcher.open, "lat_local")
    remote = await _measure(n, dispatcher.open, "lat_remote")
    print(f"n={n} chunks={chunks} (time from open() to the terminal event)")
    for name, samples in (("direct", direct), ("local", fast), ("remote", remote)):
        print(_summary(name, samples))
    qd = statistics.quantiles(direct, n=100)
    for name, samples in (("local", fast), ("remote", remote)):
        q = statistics.quantiles(samples, n=100)
        print(f"added {name:>6}: p50 {q[49] - qd[49]:.3f} ms  p99 {q[98] - qd[98]:.3f} ms")
    await dispatcher.aclose()
    await registry.stop()
    await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--chunks", type=int, default=1)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    uvloop = not args.no_uvloop and sys.platform != "win32"
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), appendonly=False)
        server.start()
        ctx = mp.get_context("spawn")
        ready, stop = ctx.Event(), ctx.Event()
        holder = ctx.Process(
            target=holder_main, args=(server.url, args.chunks, uvloop, ready, stop)
        )
        holder.start()
        try:
            if not ready.wait(20):
                raise SystemExit("the holder process did not start")
            _use_uvloop(uvloop)
            asyncio.run(_request(server.url, args.n, args.chunks))
        finally:
            stop.set()
            holder.join(10)
            server.stop()


if __name__ == "__main__":
    main()
