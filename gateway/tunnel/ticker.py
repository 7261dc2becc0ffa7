"""One clock for every tunnel a gateway process holds: :class:`SessionTicker`.

The tunnel protocol owns no clock (``daemon.tunnel.Connection.tick(now)``): its I/O owner ticks
it so that Pings go out and a silent peer is declared dead. A task per tunnel sleeping on its
own timer costs one wake-up per tunnel per tick — at 5,000 idle tunnels that alone kept a core
busy. The ticker is one task for all of them: it wakes ``slots`` times per ``interval_s`` and
ticks one slot's sessions each time, so every session is ticked once per interval and the Pings
of many tunnels never leave in one burst (a burst would delay the requests sharing the loop).

Tick precision is what the protocol asks for: a session is ticked every ``interval_s`` (give
or take one slot period while sessions come and go), and heartbeat.py dates what happened
between ticks by the tick after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

__all__ = ["SessionTicker", "Tickable"]

log = logging.getLogger(__name__)


class Tickable(Protocol):
    def tick(self, now: float) -> None:
        """Advance the session's protocol to ``now`` (the loop's monotonic clock)."""


class SessionTicker:
    """Ticks every added session once per ``interval_s``, a ``1/slots`` share at a time. The
    task runs only while there are sessions; :meth:`aclose` stops it."""

    def __init__(self, interval_s: float, *, slots: int = 10) -> None:
        if interval_s <= 0 or slots < 1:
            raise ValueError("interval_s must be > 0 and slots >= 1")
        self.interval_s = interval_s
        self._slots: list[dict[Tickable, None]] = [{} for _ in range(slots)]
        self._slot_of: dict[Tickable, int] = {}
        self._next_slot = 0
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._slot_of)

    def add(self, session: Tickable) -> None:
        if session in self._slot_of:
            return
        # The emptiest slot, so that slots stay even as tunnels come and go.
        index = min(range(len(self._slots)), key=lambda i: len(self._slots[i]))
        self._slots[index][session] = None
        self._slot_of[session] = index
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="lattice-tunnel-ticker"
            )

    def discard(self, session: Tickable) -> None:
        index = self._slot_of.pop(session, None)
        if index is not None:
            self._slots[index].pop(session, None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        period = self.interval_s / len(self._slots)
        while self._slot_of:
            await asyncio.sleep(period)
            slot = self._slots[self._next_slot]
            self._next_slot = (self._next_slot + 1) % len(self._slots)
            now = loop.time()
            for session in list(slot):
                try:
                    session.tick(now)
                except Exception:  # one broken session must not stop every tunnel's clock
                    log.exception("tunnel tick failed")
        self._task = None

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
