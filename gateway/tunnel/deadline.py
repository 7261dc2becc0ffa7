"""Deadlines of dispatches: :class:`DeadlineHandle` and :func:`with_deadline`.

Both dispatch paths of :class:`~gateway.tunnel.remote.RuntimeDispatcher` (the local tunnel,
and the reply stream of another process) are wrapped this way: at ``request.deadline_ms`` the
dispatch is cancelled and ends with ``Failed(504, "personal_lattice_execution_timeout")``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.tunnel.bus_protocol import now_ms, timeout_failure, tunnel_closed_failure
from gateway.tunnel.types import Chunk, DispatchEvent, DispatchHandle

__all__ = ["DeadlineHandle", "with_deadline"]


class DeadlineHandle:
    """A handle that ends at ``deadline_ms`` (unix ms) with ``Failed(504)`` and cancels the
    dispatch it wraps. Yields Chunk* then exactly one Finished or Failed.

    One timer serves the whole dispatch (``asyncio.timeout`` around every event would cost a
    timer per chunk of a long stream): when it fires while the caller waits for an event, the
    waiting task is interrupted (and un-cancelled again, as ``asyncio.timeout`` does)."""

    def __init__(self, inner: DispatchHandle, deadline_ms: int) -> None:
        self._inner = inner
        self._events = inner.__aiter__()
        self.deadline_ms = deadline_ms
        self._done = False
        self._expired = False
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Task[Any] | None = None
        self._interrupted = False

    def __aiter__(self) -> DeadlineHandle:
        return self

    async def __anext__(self) -> DispatchEvent:
        if self._done:
            raise StopAsyncIteration
        if self._timer is None and not self._expired:
            delay = (self.deadline_ms - now_ms()) / 1000
            self._timer = asyncio.get_running_loop().call_later(delay, self._expire)
        if self._expired:
            return await self._time_out()
        task = asyncio.current_task()
        assert task is not None
        self._waiter = task
        try:
            event = await anext(self._events)
        except asyncio.CancelledError:
            if self._interrupted and task.uncancel() == 0:
                return await self._time_out()
            raise
        except StopAsyncIteration:  # the inner handle broke its contract: still one terminal
            event = tunnel_closed_failure()
        finally:
            self._waiter = None
        if self._interrupted:  # the interruption was swallowed below us: undo it
            self._interrupted = False
            task.uncancel()
        if not isinstance(event, Chunk):
            self._finish()
        return event

    def _expire(self) -> None:
        self._timer = None
        self._expired = True
        if self._waiter is not None and not self._interrupted:
            self._interrupted = True
            self._waiter.cancel()

    async def _time_out(self) -> DispatchEvent:
        self._interrupted = False
        await self.cancel()
        return timeout_failure()

    def _finish(self) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def cancel(self) -> None:
        if not self._done:
            self._finish()
            await self._inner.cancel()

    async def aclose(self) -> None:
        await self.cancel()


def with_deadline(handle: DispatchHandle, deadline_ms: int) -> DeadlineHandle:
    """``handle``, ending with ``Failed(504, "personal_lattice_execution_timeout")`` at
    ``deadline_ms`` (the dispatch is then cancelled: the daemon stops)."""
    return DeadlineHandle(handle, deadline_ms)
