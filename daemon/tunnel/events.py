"""Events a :class:`~daemon.tunnel.protocol.Connection` reports from what it received.

The I/O layer drains them with ``events_received()`` after every ``receive_message()`` and
``tick()``. Which role sees which::

    gateway   HelloReceived, DataReceived, DispatchEnded, DispatchFailed, PeerDraining
    daemon    Welcomed, DispatchReceived, CreditAvailable, CancelRequested, GoAwayReceived,
              DrainAcknowledged
    both      PeerClosed, PeerDead, ProtocolError   (each one is the connection's last event)
"""

from __future__ import annotations

import msgspec

from daemon.tunnel.frames import Dispatch, Hello, Welcome

__all__ = [
    "CancelRequested",
    "CreditAvailable",
    "DataReceived",
    "DispatchEnded",
    "DispatchFailed",
    "DispatchReceived",
    "DrainAcknowledged",
    "Event",
    "GoAwayReceived",
    "HelloReceived",
    "PeerClosed",
    "PeerDead",
    "PeerDraining",
    "ProtocolError",
    "Welcomed",
]


class _Event(msgspec.Struct, frozen=True):
    """Base of events (not a wire type)."""


class HelloReceived(_Event, frozen=True):
    """gateway: the daemon said hello; the connection already queued the Welcome."""

    hello: Hello
    version: int


class Welcomed(_Event, frozen=True):
    """daemon: the gateway accepted the hello; dispatches may arrive from now on."""

    welcome: Welcome


class DispatchReceived(_Event, frozen=True):
    """daemon: work to do (it holds ``welcome.window`` bytes of credit to start with)."""

    dispatch: Dispatch


class DataReceived(_Event, frozen=True):
    """gateway: result bytes of a live dispatch. Call ``consumed(id, len(payload))`` once
    the consumer has taken them: that is what grants the daemon more credit."""

    id: str
    payload: bytes


class DispatchEnded(_Event, frozen=True):
    """gateway: the daemon finished the dispatch (``cancelled``: after we cancelled it)."""

    id: str
    status: int
    cancelled: bool


class DispatchFailed(_Event, frozen=True):
    """gateway: the daemon failed the dispatch (``cancelled``: after we cancelled it)."""

    id: str
    status: int
    code: str
    message: str
    cancelled: bool


class CreditAvailable(_Event, frozen=True):
    """daemon: the dispatch may now send up to ``credit`` bytes of payload."""

    id: str
    credit: int


class CancelRequested(_Event, frozen=True):
    """daemon: the gateway cancelled the dispatch; stop and answer End or Fail."""

    id: str


class PeerDraining(_Event, frozen=True):
    """gateway: the daemon takes no new dispatch; in-flight ones continue."""


class GoAwayReceived(_Event, frozen=True):
    """daemon: connect again for new work; finish in-flight work on this connection."""

    reason: str


class DrainAcknowledged(_Event, frozen=True):
    """daemon: the gateway has read our Drain: no Dispatch will follow on this tunnel."""


class PeerClosed(_Event, frozen=True):
    """either: the peer sent Close. The connection is closed."""

    code: int
    reason: str


class PeerDead(_Event, frozen=True):
    """either: nothing received for ``silence_s`` ≥ ``dead_after_s``. The connection is
    closed (a Close frame is queued, in case the peer is merely slow)."""

    silence_s: float


class ProtocolError(_Event, frozen=True):
    """either: the peer broke the protocol. The connection is closed and a Close frame with
    ``code`` and ``reason`` is queued; later input is ignored."""

    code: int
    reason: str


Event = (
    HelloReceived
    | Welcomed
    | DispatchReceived
    | DataReceived
    | DispatchEnded
    | DispatchFailed
    | CreditAvailable
    | CancelRequested
    | PeerDraining
    | GoAwayReceived
    | DrainAcknowledged
    | PeerClosed
    | PeerDead
    | ProtocolError
)
