"""Fixed-window counters in Redis, for limits on guessing (user codes of the device flow).

A window starts at the first hit and lasts ``window_s``; ``hit`` counts and reports the count
and the time left, ``peek`` reads without counting. A fixed window lets a burst of up to twice
the limit straddle a window edge, which is harmless for limits of a few attempts per minute.
"""

from __future__ import annotations

import importlib.resources

import msgspec
import redis.asyncio as aioredis

__all__ = ["FixedWindow", "WindowCount"]

_LUA = importlib.resources.files("gateway.runtimes").joinpath("fixed_window.lua").read_text()


class WindowCount(msgspec.Struct, frozen=True):
    """Hits in the current window and seconds until it ends (0 when there is no window)."""

    count: int
    reset_s: float


class FixedWindow:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._hit = redis.register_script(_LUA)

    async def hit(self, key: str, window_s: float) -> WindowCount:
        """Count one hit on ``key`` (one round trip)."""
        count, ttl_ms = await self._hit(keys=[key], args=[max(1, int(window_s * 1000))])
        return WindowCount(int(count), max(0, int(ttl_ms)) / 1000)

    async def peek(self, key: str) -> WindowCount:
        """The current window's count without counting (one round trip)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            raw, ttl_ms = await pipe.execute()
        return WindowCount(int(raw or 0), max(0, int(ttl_ms)) / 1000)
