"""Heartbeat bookkeeping without a clock: the caller's ticks date what happened between them.

Each end sends a Ping after ``heartbeat_s`` without sending anything, and gives up on the
peer after ``dead_after_s`` without receiving anything. Receipts and sends are marked as they
happen and dated by the tick that follows, so a peer is never declared dead early, and at most
one tick late (two after its last frame was sent, counting the tick that dates it).
"""

from __future__ import annotations

import enum

__all__ = ["Beat", "Heartbeat"]


class Beat(enum.Enum):
    """What a tick calls for."""

    NOTHING = "nothing"
    PING = "ping"
    DEAD = "dead"


class Heartbeat:
    """Send/receive silence, measured in the caller's clock."""

    __slots__ = ("_last_rx", "_last_tx", "_rx", "_tx", "dead_after_s", "heartbeat_s", "silence")

    def __init__(self, heartbeat_s: float, dead_after_s: float) -> None:
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s
        #: Receive-silence as of the last tick.
        self.silence = 0.0
        self._rx = self._tx = False
        self._last_rx: float | None = None
        self._last_tx: float | None = None

    def received(self) -> None:
        self._rx = True

    def sent(self) -> None:
        self._tx = True

    def tick(self, now: float, *, may_ping: bool) -> Beat:
        """Advance to ``now``; a PING means the caller sends one now (counted as sent)."""
        if self._last_rx is None or self._rx:
            self._last_rx, self._rx = now, False
        if self._last_tx is None or self._tx:
            self._last_tx, self._tx = now, False
        self.silence = now - self._last_rx
        if self.silence >= self.dead_after_s:
            return Beat.DEAD
        if may_ping and now - self._last_tx >= self.heartbeat_s:
            self._last_tx = now
            return Beat.PING
        return Beat.NOTHING
