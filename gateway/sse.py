"""Server-sent events for relayed streams, with the least work between an upstream chunk and
the caller's socket.

Litestar's :class:`~litestar.response.Stream` runs the iterator in a second task and listens
for the client's disconnect in the first, so every stream starts with a task-group set-up and a
task switch before its first byte. :class:`EventStream` iterates in the request's own task,
and a small watcher task cancels it when the client disconnects (the relay's ``finally`` then
closes the upstream connection and meters what was delivered).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import Receive, Send

__all__ = ["EventStream"]

_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class _EventStreamASGI(ASGIStreamingResponse):
    __slots__ = ()

    async def send_body(self, send: Send, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            task.cancel()

        watcher = asyncio.create_task(watch(), name="lattice-sse-disconnect")
        events = self.iterator
        try:
            async for chunk in events:
                body = chunk if isinstance(chunk, bytes) else chunk.encode()
                await send({"type": "http.response.body", "body": body, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone.is_set():
                raise
            task.uncancel()  # the client went away: the stream just ends
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if isinstance(events, AsyncGenerator):
                await events.aclose()


class EventStream(Stream):
    """``text/event-stream`` response over an async generator of ready-made SSE events."""

    def __init__(self, events: AsyncGenerator[bytes, None], headers: dict[str, str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={**_HEADERS, **headers})

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        base = super().to_asgi_response(*args, **kwargs)
        assert isinstance(base, ASGIStreamingResponse)
        base.__class__ = _EventStreamASGI  # same slots: only send_body differs
        return base


