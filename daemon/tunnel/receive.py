"""How each end of the tunnel handles a received frame (the rules of the protocol).

Split from ``protocol.py`` to keep both short; these functions are the only code that reads
a peer's frames, and each rule that closes the connection raises :class:`Violation`.

Dispatch ids. The gateway knows every dispatch it opened until the daemon's End/Fail, so any
Data/End/Fail naming another id is a protocol error: *a daemon can only answer dispatches
addressed to it* (issue 3). A cancelled dispatch stays known until its End/Fail, so Data that
crossed the Cancel on the wire is dropped, not an error.

The daemon forgets a dispatch when it sends End/Fail, yet the gateway may have sent Credit or
Cancel for it before that End arrived. It remembers the last ``2 * concurrency + 64`` ended
ids and drops late frames for them. That is enough: a frame the gateway sent for dispatch X
while X was live at the gateway can only be overtaken (on the ordered stream) by the End of
dispatches that were in flight at that moment, and at most ``concurrency`` ever are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.tunnel import events as ev
from daemon.tunnel.flow import InboundFlow, OutboundFlow, max_payload
from daemon.tunnel.frames import (
    FRAME_OVERHEAD,
    RESULT_VERSION,
    Cancel,
    Close,
    CloseCode,
    Credit,
    Data,
    Dispatch,
    Drain,
    End,
    Fail,
    Frame,
    GoAway,
    Hello,
    Ping,
    Pong,
    Result,
    Welcome,
)
from daemon.tunnel.states import State

if TYPE_CHECKING:
    from daemon.tunnel.protocol import Connection

__all__ = ["Violation", "handle_frame"]


class Violation(Exception):
    """The peer broke the protocol: close with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _error(reason: str) -> Violation:
    return Violation(CloseCode.PROTOCOL_ERROR, reason)


def handle_frame(conn: Connection, frame: Frame) -> None:
    """Apply one decoded frame from the peer (raises :class:`Violation`)."""
    # Frame classes have no subclasses: type identity is exact, and cheaper than isinstance
    # on the hot path (one Data frame per streamed token).
    kind = type(frame)
    if kind not in conn.receivable:
        peer = "daemon" if conn.role == "gateway" else "gateway"
        raise _error(f"a {peer} may not send {kind.__name__}")
    if kind is Data:
        handle_gateway_frame(conn, frame)
    elif isinstance(frame, Close):
        conn.state = State.CLOSED
        conn.close_frame = frame
        conn._emit(ev.PeerClosed(frame.code, frame.reason))
    elif isinstance(frame, Ping | Pong):
        if conn.state is not State.OPEN:
            raise _error(f"{kind.__name__} before the hello")
        if isinstance(frame, Ping):
            conn._send(Pong(frame.nonce))
        elif frame.nonce == conn.drain_nonce and not conn.drain_acknowledged:
            conn.drain_acknowledged = True  # see Connection.send_drain
            conn._emit(ev.DrainAcknowledged())
    elif conn.role == "gateway":
        handle_gateway_frame(conn, frame)
    else:
        handle_daemon_frame(conn, frame)


def handle_gateway_frame(conn: Connection, frame: Frame) -> None:
    """The gateway end receives Hello, Data, End, Result, Fail or Drain."""
    if type(frame) is Data and conn.state is State.OPEN:  # the hot path first
        flow = conn.inbound.get(frame.id)
        if flow is not None and flow.receive(len(frame.payload)):
            if not flow.cancelled:
                conn._emit(ev.DataReceived(frame.id, frame.payload))
            return
    if isinstance(frame, Hello):
        if conn.state is not State.OPENING:
            raise _error("a second hello")
        _welcome(conn, frame)
        return
    if conn.state is not State.OPEN:
        raise _error(f"{type(frame).__name__} before the hello")
    if isinstance(frame, Drain):
        if not conn.peer_draining:
            conn.peer_draining = True
            conn._emit(ev.PeerDraining())
        return
    assert isinstance(frame, (Data, End, Result, Fail))
    flow = conn.inbound.get(frame.id)
    if flow is None:
        kind = type(frame).__name__
        raise _error(f"{kind} for dispatch {frame.id[:64]!r}, which is not open on this tunnel")
    if isinstance(frame, Data):
        if not flow.receive(len(frame.payload)):
            raise _error(
                f"flow control: {len(frame.payload)} bytes for {frame.id[:64]!r} "
                f"with {flow.peer_credit} bytes of credit"
            )
        if not flow.cancelled:
            conn._emit(ev.DataReceived(frame.id, frame.payload))
        return
    if isinstance(frame, Result):
        _result(conn, frame, flow)
        return
    del conn.inbound[frame.id]
    if isinstance(frame, End):
        conn._emit(ev.DispatchEnded(frame.id, frame.status, flow.cancelled))
    else:
        conn._emit(
            ev.DispatchFailed(frame.id, frame.status, frame.code, frame.message, flow.cancelled)
        )


def _result(conn: Connection, frame: Result, flow: InboundFlow) -> None:
    """A Result is a Data (unless its payload is empty) and an End, with the same rules."""
    if conn.version is None or conn.version < RESULT_VERSION:
        raise _error(f"a Result frame in protocol version {conn.version}")
    size = len(frame.payload)
    if not flow.receive(size):
        raise _error(
            f"flow control: {size} bytes for {frame.id[:64]!r} "
            f"with {flow.peer_credit} bytes of credit"
        )
    del conn.inbound[frame.id]
    if size and not flow.cancelled:
        conn._emit(ev.DataReceived(frame.id, frame.payload))
    conn._emit(ev.DispatchEnded(frame.id, frame.status, flow.cancelled))


def _welcome(conn: Connection, hello: Hello) -> None:
    """Choose the highest version both speak and answer Welcome."""
    common = set(hello.versions) & set(conn.versions)
    if not common:
        raise Violation(
            CloseCode.UNSUPPORTED_VERSION,
            f"no common protocol version: daemon {list(hello.versions)[:8]}, "
            f"gateway {list(conn.versions)}",
        )
    version = max(common)
    welcome = Welcome(
        version=version,
        runtime_id=conn.runtime_id,
        heartbeat_ms=max(10, round(conn.heartbeat_s * 1000)),
        dead_after_ms=max(10, round(conn.dead_after_s * 1000)),
        max_frame=conn.max_frame,
        window=conn.window,
    )
    conn.hello, conn.welcome, conn.version = hello, welcome, version
    conn.peer_max_frame = hello.max_frame
    conn.state = State.OPEN
    conn._send(welcome)
    conn._emit(ev.HelloReceived(hello, version))


def handle_daemon_frame(conn: Connection, frame: Frame) -> None:
    """The daemon end receives Welcome, Dispatch, Credit, Cancel or GoAway."""
    if isinstance(frame, Welcome):
        if conn.state is not State.OPENING or conn.hello is None:
            raise _error("a welcome out of turn")
        if frame.version not in conn.hello.versions:
            raise Violation(CloseCode.UNSUPPORTED_VERSION, f"version {frame.version} not offered")
        conn.welcome, conn.version = frame, frame.version
        conn.peer_max_frame = frame.max_frame
        conn.heartbeat_s = frame.heartbeat_ms / 1000
        conn.dead_after_s = max(frame.dead_after_ms / 1000, conn.heartbeat_s * 2)
        conn.beat.heartbeat_s, conn.beat.dead_after_s = conn.heartbeat_s, conn.dead_after_s
        conn.window = frame.window
        conn.max_data = max_payload(frame.window, frame.max_frame, FRAME_OVERHEAD)
        conn.state = State.OPEN
        conn._emit(ev.Welcomed(frame))
        return
    if conn.state is not State.OPEN:
        raise _error(f"{type(frame).__name__} before the welcome")
    if isinstance(frame, GoAway):
        if not conn.goaway_received:
            conn.goaway_received = True
            conn._emit(ev.GoAwayReceived(frame.reason))
        return
    if isinstance(frame, Dispatch):
        _dispatch(conn, frame)
        return
    assert isinstance(frame, (Credit, Cancel))
    flow = conn.outbound.get(frame.id)
    if flow is None:
        if frame.id in conn.recent:
            return  # crossed our End/Fail on the wire: harmless
        kind = type(frame).__name__
        raise _error(f"{kind} for dispatch {frame.id[:64]!r}, which was never opened")
    if isinstance(frame, Credit):
        if not flow.grant(frame.nbytes):
            raise _error(f"credit for {frame.id[:64]!r} beyond the window of {flow.window}")
        conn._emit(ev.CreditAvailable(frame.id, flow.credit))
    elif not flow.cancelled:
        flow.cancelled = True
        conn._emit(ev.CancelRequested(frame.id))


def _dispatch(conn: Connection, frame: Dispatch) -> None:
    if conn.goaway_received:
        raise _error("a dispatch after goaway")
    if frame.id in conn.outbound or frame.id in conn.recent:
        raise _error(f"duplicate dispatch id {frame.id[:64]!r}")
    if len(conn.outbound) >= conn.concurrency:
        raise _error(f"more dispatches in flight than the advertised {conn.concurrency}")
    conn.outbound[frame.id] = OutboundFlow(conn.window)
    conn._emit(ev.DispatchReceived(frame))
