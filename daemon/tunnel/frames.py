"""The tunnel's wire frames: a msgspec tagged union, one WebSocket binary message per frame.

Every frame is a msgpack array whose first element is the frame's tag (``array_like``
Structs: compact, and the fastest msgspec encoding), e.g. ``["data", "dsp_1f…", b"…"]``.
Who may send what (anything else is a protocol error)::

    daemon  → gateway   Hello, Data, End, Result (version 2), Fail, Drain, Ping, Pong, Close
    gateway → daemon    Welcome, Dispatch, Credit, Cancel, GoAway, Ping, Pong, Close

The daemon opens with :class:`Hello` (the protocol versions it speaks and what it serves);
the gateway answers :class:`Welcome` with the version it chose. Versioning rule: a new
version only *appends* fields, with defaults, so ``Hello`` and ``Welcome`` — the two frames
read before a version is agreed — tolerate trailing fields they do not know; every other
frame is strict (``forbid_unknown_fields``), because by then both ends speak one version.
Version 2 adds :class:`Result`: a whole non-streamed result in one frame (Data then End in
one message: one write, one read and one wake-up less per dispatch at each end).

Time in frames is relative only (``timeout_ms``, ``heartbeat_ms``): the two ends' clocks are
never compared. Field constraints (``Meta``) are part of the protocol: a frame that violates
one fails to decode, which is a protocol error.
"""

from __future__ import annotations

import enum
from typing import Annotated, Final

import msgspec
from msgspec import Meta

__all__ = [
    "DAEMON_FRAMES",
    "DEFAULT_DAEMON_MAX_FRAME",
    "DEFAULT_GATEWAY_MAX_FRAME",
    "DEFAULT_WINDOW",
    "FRAME_OVERHEAD",
    "GATEWAY_FRAMES",
    "MIN_MAX_FRAME",
    "MIN_WINDOW",
    "PROTOCOL_VERSION",
    "RESULT_VERSION",
    "SUPPORTED_VERSIONS",
    "Cancel",
    "Close",
    "CloseCode",
    "Credit",
    "Data",
    "Dispatch",
    "Drain",
    "End",
    "Fail",
    "Frame",
    "GoAway",
    "Hello",
    "Ping",
    "Pong",
    "Result",
    "Welcome",
    "decode_frame",
    "encode_frame",
    "websocket_close_code",
]

#: The protocol version this code speaks best; :data:`SUPPORTED_VERSIONS` lists all it speaks.
PROTOCOL_VERSION: Final = 2
SUPPORTED_VERSIONS: Final[tuple[int, ...]] = (1, 2)
#: The first version with :class:`Result` frames.
RESULT_VERSION: Final = 2

#: Per-dispatch flow-control window in bytes of ``Data`` payload (the gateway's default).
DEFAULT_WINDOW: Final = 256 * 1024
MIN_WINDOW: Final = 1024
#: Largest frame the gateway accepts by default (``Data`` payloads are ≤ window/2 anyway).
DEFAULT_GATEWAY_MAX_FRAME: Final = 1024 * 1024
#: Largest frame the daemon accepts by default: a ``Dispatch`` carries the request body, and the
#: gateway accepts bodies up to 16 MiB (``Settings.max_body_bytes``).
DEFAULT_DAEMON_MAX_FRAME: Final = 32 * 1024 * 1024
MIN_MAX_FRAME: Final = 64 * 1024
#: Upper bound of a frame's bytes beyond its payload (tag, id ≤ 128 bytes, msgpack headers):
#: a ``Data`` payload of ``max_frame - FRAME_OVERHEAD`` bytes always fits in ``max_frame``.
FRAME_OVERHEAD: Final = 256


def websocket_close_code(code: int) -> int:
    """The code to close the WebSocket with after a Close frame carrying ``code``: the same
    when it is one of ours, else 1000 (a peer's Close may carry any 1000-4999, not all of
    which may be sent on a WebSocket, e.g. 1005, RFC 6455 §7.4.1)."""
    return code if code in _CLOSE_CODES else int(CloseCode.NORMAL)


class CloseCode(enum.IntEnum):
    """Codes of :class:`Close` frames; the I/O layers close the WebSocket with the same code
    (RFC 6455 §7.4.1 for 1000-1011; 4000-4999 are reserved for applications, §7.4.2)."""

    NORMAL = 1000  #: work finished (drained, or in-flight work done after a GoAway)
    GOING_AWAY = 1001  #: the sender is shutting down or moving the tunnel; reconnect
    PROTOCOL_ERROR = 1002  #: the peer broke this protocol; the reason says how
    TOO_BIG = 1009  #: a frame exceeded the receiver's ``max_frame``
    INTERNAL_ERROR = 1011  #: a bug on the sender's side
    UNSUPPORTED_VERSION = 4400  #: no protocol version in common
    UNAUTHORIZED = 4401  #: the credential was not accepted: do not retry with it
    REVOKED = 4403  #: the runtime was revoked: do not retry with this credential
    PEER_DEAD = 4408  #: nothing received for ``dead_after`` seconds


_CLOSE_CODES = frozenset(int(code) for code in CloseCode)

# -- field types (constraints are part of the protocol) -----------------------------------------

DispatchId = Annotated[str, Meta(min_length=1, max_length=128)]
Status = Annotated[int, Meta(ge=100, le=599)]
Positive = Annotated[int, Meta(ge=1, le=2**62)]
Nonce = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Name = Annotated[str, Meta(max_length=256)]
Text = Annotated[str, Meta(max_length=4096)]
MaxFrame = Annotated[int, Meta(ge=MIN_MAX_FRAME, le=2**31)]
Payload = Annotated[bytes, Meta(min_length=1)]  # an empty Data frame would carry nothing


class _Frame(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """Base of strict frames."""


class _Opening(msgspec.Struct, frozen=True, array_like=True):
    """Base of the frames read before a version is agreed (tolerate appended fields)."""


class Hello(_Opening, frozen=True, tag="hello"):
    """daemon → gateway, first frame: what this daemon speaks and serves."""

    versions: Annotated[tuple[Annotated[int, Meta(ge=1)], ...], Meta(min_length=1, max_length=16)]
    daemon_version: Name
    task_classes: Annotated[tuple[Name, ...], Meta(max_length=1024)]
    models: Annotated[tuple[Name, ...], Meta(max_length=4096)]
    default_model: Name | None
    #: Dispatches this daemon runs at once; the gateway never has more in flight.
    concurrency: Annotated[int, Meta(ge=1, le=65536)]
    #: Largest frame this daemon accepts (the gateway fails larger dispatches with 413).
    max_frame: MaxFrame


class Welcome(_Opening, frozen=True, tag="welcome"):
    """gateway → daemon, answer to :class:`Hello`: the agreed version and the tunnel's terms."""

    version: Annotated[int, Meta(ge=1)]
    runtime_id: Name
    #: Each end sends a Ping after this long without sending anything.
    heartbeat_ms: Annotated[int, Meta(ge=10, le=3_600_000)]
    #: Each end gives up on the other after this long without receiving anything.
    dead_after_ms: Annotated[int, Meta(ge=10, le=3_600_000)]
    #: Largest frame the gateway accepts.
    max_frame: MaxFrame
    #: Bytes of ``Data`` payload each dispatch may send before its first :class:`Credit`.
    window: Annotated[int, Meta(ge=MIN_WINDOW, le=2**31)]


class Dispatch(_Frame, frozen=True, tag="dispatch"):
    """gateway → daemon: run one task; ``timeout_ms`` is relative to when it arrives."""

    id: DispatchId
    token: Annotated[str, Meta(max_length=4096)]
    task: Name
    model: Name
    stream: bool
    body: bytes
    timeout_ms: Positive


class Data(_Frame, frozen=True, tag="data"):
    """daemon → gateway: result bytes (one SSE data payload when streaming, else a piece of
    the body); counts ``len(payload)`` against the dispatch's credit."""

    id: DispatchId
    payload: Payload


class End(_Frame, frozen=True, tag="end"):
    """daemon → gateway: the dispatch finished; ``status`` is the backend's HTTP status."""

    id: DispatchId
    status: Status


class Result(_Frame, frozen=True, tag="result"):
    """daemon → gateway, version ≥ 2: the whole result of a dispatch — exactly what a Data
    frame with ``payload`` (none if empty) followed by ``End(status)`` says, in one message.
    ``len(payload)`` counts against the dispatch's credit like a Data payload's."""

    id: DispatchId
    status: Status
    payload: bytes


class Fail(_Frame, frozen=True, tag="fail"):
    """daemon → gateway: the dispatch failed; status and code are given to the caller."""

    id: DispatchId
    status: Status
    code: Name
    message: Text


class Credit(_Frame, frozen=True, tag="credit"):
    """gateway → daemon: the dispatch may send ``nbytes`` more bytes of ``Data`` payload."""

    id: DispatchId
    nbytes: Positive


class Cancel(_Frame, frozen=True, tag="cancel"):
    """gateway → daemon: stop this dispatch and answer End or Fail."""

    id: DispatchId


class Ping(_Frame, frozen=True, tag="ping"):
    """either way: a heartbeat; the receiver answers :class:`Pong` with the same nonce."""

    nonce: Nonce


class Pong(_Frame, frozen=True, tag="pong"):
    """either way: the answer to :class:`Ping`."""

    nonce: Nonce


class Drain(_Frame, frozen=True, tag="drain"):
    """daemon → gateway: send no new dispatch; in-flight ones finish."""


class GoAway(_Frame, frozen=True, tag="goaway"):
    """gateway → daemon: connect again (elsewhere) for new work; finish in-flight work here."""

    reason: Text = ""


class Close(_Frame, frozen=True, tag="close"):
    """either way, last frame: why the sender ends the tunnel (see :class:`CloseCode`)."""

    code: Annotated[int, Meta(ge=1000, le=4999)]
    reason: Text = ""


Frame = (
    Hello
    | Welcome
    | Dispatch
    | Data
    | End
    | Result
    | Fail
    | Credit
    | Cancel
    | Ping
    | Pong
    | Drain
    | GoAway
    | Close
)

#: Frames each role may *send* (what the other role may receive).
DAEMON_FRAMES: Final = (Hello, Data, End, Result, Fail, Drain, Ping, Pong, Close)
GATEWAY_FRAMES: Final = (Welcome, Dispatch, Credit, Cancel, GoAway, Ping, Pong, Close)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Frame] = msgspec.msgpack.Decoder(Frame)


def encode_frame(frame: Frame) -> bytes:
    """The bytes of one WebSocket binary message carrying ``frame``."""
    return _encoder.encode(frame)


def decode_frame(message: bytes) -> Frame:
    """The frame in ``message``; raises :class:`msgspec.DecodeError` (or its subclass
    :class:`msgspec.ValidationError`) for anything that is not exactly one valid frame."""
    try:
        return _decoder.decode(message)
    except UnicodeDecodeError as exc:
        # msgspec 0.19-0.22 lets this escape for invalid UTF-8 in a union's tag (found by
        # tests/unit/test_tunnel_properties.py); it is just another undecodable frame.
        raise msgspec.DecodeError(f"invalid UTF-8: {exc.reason}") from None
