"""The shared types of the tunnel seams (issue 3): dispatch requests, events, handles, sessions.

``gateway/tunnel/session.py`` (a tunnel held by this process), ``gateway/tunnel/remote.py``
(a tunnel held by another gateway process, reached through Redis) and the dispatch service
all speak these types. ``Chunk | Finished | Failed`` is a msgspec tagged union so the
cross-process bus can carry events as msgpack.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import msgspec

__all__ = [
    "Chunk",
    "DispatchEvent",
    "DispatchHandle",
    "DispatchRequest",
    "Failed",
    "Finished",
    "TunnelClosed",
    "TunnelSession",
]


class DispatchRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dispatch_id: str  # "dsp_<hex>"
    runtime_id: str  # "lat_<...>"
    task: str  # task class
    model: str  # canonical catalog model id (or the runtime's default local model)
    body: bytes  # JSON request body prepared for the backend
    stream: bool
    token: str  # minted dispatch JWT (ES256)
    deadline_ms: int  # absolute unix ms by which the result must be complete


class Chunk(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="chunk"):
    data: bytes  # stream: one SSE data payload (JSON); non-stream: a piece of the body


class Finished(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="finished"):
    status: int  # backend HTTP status of the result (200 normally)


class Failed(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="failed"):
    status: int  # HTTP status to give the caller (502, 503, 504, 4xx passthrough)
    # e.g. "backend_unavailable", "personal_lattice_execution_timeout", "tunnel_closed",
    # "dispatch_refused"
    code: str
    message: str


DispatchEvent = Chunk | Finished | Failed


class DispatchHandle(Protocol):
    """One dispatch in flight. Iterating yields Chunk* then exactly one Finished or Failed.
    Consuming a Chunk is what grants flow-control credit upstream (a caller that stops iterating
    stops the daemon within one window). aclose()/cancel() cancels the dispatch (sends Cancel)."""

    def __aiter__(self) -> AsyncIterator[DispatchEvent]: ...
    async def cancel(self) -> None: ...


class TunnelSession(Protocol):
    """A tunnel held by THIS process."""

    runtime_id: str

    @property
    def accepting(self) -> bool: ...  # False once draining/closing

    # Raises TunnelClosed.
    async def open(self, request: DispatchRequest) -> DispatchHandle: ...

    # Ends in-flight dispatches with Failed(502, "tunnel_closed").
    async def close(self, reason: str) -> None: ...


class TunnelClosed(Exception):
    """The tunnel is closing or closed: it takes no new dispatch."""
