"""Errors of the tunnel protocol's *local* API (what a send method raises when its caller
misuses it). A misbehaving *peer* never raises: it becomes a
:class:`~daemon.tunnel.events.ProtocolError` event. ::

    TunnelUsageError
    ├── InvalidState        wrong phase (before hello/welcome) or the wrong role
    ├── ConnectionClosed    the connection is closed; nothing more can be sent
    ├── NotAccepting        the peer is draining or we sent GoAway: no new dispatch
    ├── UnknownDispatch     no live dispatch with this id (or a duplicate id on open)
    ├── ConcurrencyExceeded the daemon's advertised concurrency is in use
    ├── FlowControlError    a Data payload larger than the dispatch's credit
    └── FrameTooLarge       the frame would exceed the peer's ``max_frame``
"""

from __future__ import annotations

__all__ = [
    "ConcurrencyExceeded",
    "ConnectionClosed",
    "FlowControlError",
    "FrameTooLarge",
    "InvalidState",
    "NotAccepting",
    "TunnelUsageError",
    "UnknownDispatch",
]


class TunnelUsageError(Exception):
    """The caller of a send method broke its contract; nothing was queued."""


class InvalidState(TunnelUsageError):
    """The method does not apply in this phase or for this role."""


class ConnectionClosed(InvalidState):
    """The connection is closed."""


class NotAccepting(TunnelUsageError):
    """The tunnel takes no new dispatch (the daemon drains, or the gateway sent GoAway)."""


class UnknownDispatch(TunnelUsageError):
    """No live dispatch has this id (or, when opening one, a live one already has it)."""


class ConcurrencyExceeded(TunnelUsageError):
    """As many dispatches are in flight as the daemon advertised."""


class FlowControlError(TunnelUsageError):
    """The payload is larger than the credit the gateway granted (wait for CreditAvailable)."""


class FrameTooLarge(TunnelUsageError):
    """The frame would exceed the largest frame the peer accepts."""
