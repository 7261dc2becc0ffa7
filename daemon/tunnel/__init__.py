"""The tunnel between a daemon and a gateway: a pure, sans-I/O protocol (issue 3).

A leaf package (stdlib + msgspec only): ``frames`` (the wire), ``protocol`` (the state
machine: :class:`Connection`), ``receive`` (the rules for received frames), ``flow``
(per-dispatch credit), ``events`` and ``errors``. The asyncio drivers live elsewhere:
``gateway/tunnel/session.py`` and ``daemon/runner.py``.
"""

from daemon.tunnel.errors import (
    ConcurrencyExceeded,
    ConnectionClosed,
    FlowControlError,
    FrameTooLarge,
    InvalidState,
    NotAccepting,
    TunnelUsageError,
    UnknownDispatch,
)
from daemon.tunnel.frames import PROTOCOL_VERSION, SUPPORTED_VERSIONS, CloseCode
from daemon.tunnel.protocol import Connection
from daemon.tunnel.states import Role, State

__all__ = [
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "CloseCode",
    "ConcurrencyExceeded",
    "Connection",
    "ConnectionClosed",
    "FlowControlError",
    "FrameTooLarge",
    "InvalidState",
    "NotAccepting",
    "Role",
    "State",
    "TunnelUsageError",
    "UnknownDispatch",
]
