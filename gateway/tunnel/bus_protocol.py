"""The wire format of dispatch across gateway processes (:mod:`gateway.tunnel.bus`,
:mod:`gateway.tunnel.remote`): what goes into each Redis stream, msgpack-encoded.

Streams (every key is built in :mod:`gateway.keys`)::

    runtime_queue(id)     lat:rt:<id>:q        {m: QueuedDispatch}     requesters -> holder
    dispatch_reply(dsp)   lat:dsp:<dsp>:r      {e: [DispatchEvent]}    holder -> requester
    gateway_control(p)    lat:gw:<p>:ctl       {m: Control}            requesters -> holder p
    gateway_wake(p, n)    lat:gw:<p>:wake:<n>  wakes p's n-th blocked queue reader

Flow control is counted in :func:`chunk_cost` units on both sides: a requester's
:class:`CreditGrant` carries the cumulative cost its caller consumed; the holder runs at most
``window_bytes`` (chosen by the requester, carried in :class:`QueuedDispatch`) ahead of it.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from gateway.tunnel.types import Chunk, DispatchEvent, DispatchRequest, Failed

__all__ = [
    "CHUNK_OVERHEAD",
    "DEFAULT_WINDOW_BYTES",
    "CancelDispatch",
    "Control",
    "CreditGrant",
    "Entry",
    "QueuedDispatch",
    "ReclaimRequest",
    "chunk_cost",
    "decode_control",
    "decode_entry",
    "decode_events",
    "decode_queued",
    "encode",
    "now_ms",
    "stream_entries",
    "timeout_failure",
    "tunnel_closed_failure",
]

#: Bytes a requester lets a holder run ahead of what its caller consumed.
DEFAULT_WINDOW_BYTES = 256 * 1024
#: Flow-control cost of a chunk beyond its data, so that empty chunks are bounded too.
CHUNK_OVERHEAD = 32


class QueuedDispatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A queue entry: the request, where to answer, who asks, and the requester's window."""

    request: DispatchRequest
    reply_to: str
    requester: str
    window_bytes: int


class CreditGrant(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="credit"):
    dispatch_id: str
    consumed: int  # cumulative chunk_cost of what the caller consumed


class CancelDispatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="cancel"):
    dispatch_id: str


class ReclaimRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="reclaim"):
    """A requester saw the old holder die: look for its pending entries now."""

    runtime_id: str


Control = CreditGrant | CancelDispatch | ReclaimRequest

encode = msgspec.msgpack.Encoder().encode
decode_queued = msgspec.msgpack.Decoder(QueuedDispatch).decode
decode_events = msgspec.msgpack.Decoder(list[DispatchEvent]).decode
decode_control = msgspec.msgpack.Decoder(Control).decode

#: One stream entry as redis-py returns it: ``(id, {field: value})``.
Entry = tuple[bytes, dict[bytes, bytes]]


def chunk_cost(chunk: Chunk) -> int:
    return len(chunk.data) + CHUNK_OVERHEAD


def now_ms() -> int:
    """Unix time in ms, the clock of ``DispatchRequest.deadline_ms``."""
    return int(time.time() * 1000)


def tunnel_closed_failure(message: str = "The runtime's tunnel closed.") -> Failed:
    return Failed(status=502, code="tunnel_closed", message=message)


def timeout_failure() -> Failed:
    return Failed(
        status=504,
        code="personal_lattice_execution_timeout",
        message="The personal runtime did not finish the request before its deadline.",
    )


def stream_entries(reply: Any) -> list[tuple[str, list[Entry]]]:
    """XREAD/XREADGROUP replies (RESP2 lists or RESP3 maps) as ``(stream, entries)``."""
    if not reply:
        return []
    items = reply.items() if isinstance(reply, dict) else reply
    return [(name.decode(), list(entries)) for name, entries in items]


def decode_entry(fields: Any) -> QueuedDispatch | None:
    """The dispatch of one queue entry, or None when it is malformed."""
    try:
        return decode_queued(fields[b"m"])
    except (KeyError, TypeError, msgspec.DecodeError):
        return None
