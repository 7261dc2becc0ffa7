"""The tunnel protocol as a sans-I/O state machine: bytes in, events and bytes out.

Modelled on python-websockets' ``Protocol``: no socket, clock or event loop in here. The I/O
layer (``gateway/tunnel/session.py``, ``daemon/runner.py``) feeds each WebSocket binary
message to :meth:`Connection.receive_message`, then handles :meth:`Connection.events_received`
and writes :meth:`Connection.data_to_send`, one WebSocket message per item; it calls the
``send_*`` methods for its own frames, and :meth:`Connection.tick` with its clock.

Phases: ``OPENING`` (the daemon sends Hello, the gateway answers Welcome) → ``OPEN`` →
``CLOSED``. A peer that breaks the protocol — undecodable bytes, an oversize frame, a frame in
the wrong direction or phase, an unknown version, a duplicate dispatch id, data beyond its
credit, a frame for a dispatch that is not open — closes the connection: a ProtocolError
event, a Close frame to send, and every later input is ignored. Nothing raises out of
:meth:`Connection.receive_message` or :meth:`Connection.tick`, whatever the input. Misuse of a
send method by the local caller raises a :class:`~daemon.tunnel.errors.TunnelUsageError`.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final

import msgspec

from daemon.tunnel import events as ev
from daemon.tunnel import frames as fr
from daemon.tunnel.errors import (
    ConcurrencyExceeded,
    ConnectionClosed,
    FlowControlError,
    FrameTooLarge,
    InvalidState,
    NotAccepting,
    UnknownDispatch,
)
from daemon.tunnel.flow import InboundFlow, OutboundFlow
from daemon.tunnel.frames import Close, CloseCode, Frame, Hello, Welcome, decode_frame, encode_frame
from daemon.tunnel.heartbeat import Beat, Heartbeat
from daemon.tunnel.receive import Violation, handle_frame
from daemon.tunnel.states import Role, State

__all__ = ["Connection", "Role", "State"]

_MAX_REASON: Final = 512
_MAX_ID: Final = 128
_MAX_NAME: Final = 256


class Connection:
    """One end of one tunnel.

    ``role="gateway"`` needs the ``runtime_id`` the credential authenticated; it answers the
    daemon's Hello with a Welcome carrying ``window``, ``max_frame`` (the largest frame it
    accepts), ``heartbeat_s`` and ``dead_after_s``. ``role="daemon"`` calls :meth:`send_hello`
    first and adopts the Welcome's heartbeat terms; its ``max_frame`` is advertised in the
    Hello. Either end sends a Ping after ``heartbeat_s`` without sending, and declares the peer
    dead after ``dead_after_s`` without receiving (default 15 s: issue 3's bound).
    """

    def __init__(
        self,
        role: Role,
        *,
        runtime_id: str = "",
        window: int = fr.DEFAULT_WINDOW,
        max_frame: int | None = None,
        heartbeat_s: float = 5.0,
        dead_after_s: float = 15.0,
        versions: Collection[int] = fr.SUPPORTED_VERSIONS,
    ) -> None:
        if role == "gateway" and not runtime_id:
            raise ValueError("the gateway end needs the authenticated runtime_id")
        default_frame = (
            fr.DEFAULT_GATEWAY_MAX_FRAME if role == "gateway" else fr.DEFAULT_DAEMON_MAX_FRAME
        )
        self.role: Role = role
        self.runtime_id = runtime_id
        self.max_frame = default_frame if max_frame is None else max_frame
        if self.max_frame < fr.MIN_MAX_FRAME or window < fr.MIN_WINDOW or not versions:
            raise ValueError("max_frame, window or versions below the protocol's minimum")
        if not 0 < heartbeat_s < dead_after_s:
            raise ValueError("need 0 < heartbeat_s < dead_after_s")
        self.window = window
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s
        self.versions = tuple(sorted(set(versions)))
        self.state = State.OPENING
        self.version: int | None = None
        #: gateway: the Hello received; daemon: the Hello sent.
        self.hello: Hello | None = None
        #: gateway: the Welcome sent; daemon: the Welcome received.
        self.welcome: Welcome | None = None
        #: The peer's largest accepted frame (unknown until Hello/Welcome).
        self.peer_max_frame = fr.MIN_MAX_FRAME
        #: The Close frame sent or received, once closed.
        self.close_frame: Close | None = None
        self.peer_draining = False  # gateway: the daemon sent Drain
        self.goaway_sent = False  # gateway
        self.draining = False  # daemon: we sent Drain
        self.drain_acknowledged = False  # daemon: the gateway read our Drain
        self.drain_nonce: int | None = None
        self.goaway_received = False  # daemon
        #: daemon: the largest Data payload (0 before the Welcome; see flow.max_payload).
        self.max_data = 0
        self.inbound: dict[str, InboundFlow] = {}  # gateway, by dispatch id
        self.outbound: dict[str, OutboundFlow] = {}  # daemon, by dispatch id
        #: daemon: ids ended lately, whose late Credit/Cancel are harmless (see receive.py).
        self.recent: dict[str, None] = {}
        #: The frame classes the peer may send.
        self.receivable = frozenset(fr.DAEMON_FRAMES if role == "gateway" else fr.GATEWAY_FRAMES)
        self._events: list[ev.Event] = []
        self._out: list[bytes] = []
        self.beat = Heartbeat(heartbeat_s, dead_after_s)
        self._nonce = 0

    # -- I/O side ---------------------------------------------------------------------------

    def receive_message(self, data: bytes | bytearray | memoryview) -> None:
        """Feed one WebSocket message. Never raises; a bad one closes the connection."""
        if self.state is State.CLOSED:
            return
        self.beat.received()
        try:
            if len(data) > self.max_frame:
                raise Violation(CloseCode.TOO_BIG, f"frame of {len(data)} bytes > {self.max_frame}")
            try:
                frame = decode_frame(data)  # type: ignore[arg-type]  # any buffer works
            except (msgspec.DecodeError, RecursionError) as exc:
                raise Violation(CloseCode.PROTOCOL_ERROR, f"undecodable frame: {exc}") from None
            handle_frame(self, frame)
        except Violation as violation:
            self._fail(violation.code, violation.reason)
        except Exception as exc:  # a bug here must still not take the process down
            self._fail(CloseCode.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")

    def events_received(self) -> list[ev.Event]:
        """The events since the last call (call after every receive_message and tick)."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[bytes]:
        """The messages to write, in order (call after every method of this class)."""
        out, self._out = self._out, []
        return out

    @property
    def wants_write(self) -> bool:
        """Whether :meth:`data_to_send` has something (so the I/O side wakes its writer only
        when there is work for it)."""
        return bool(self._out)

    def tick(self, now: float) -> None:
        """Advance time to ``now`` (any monotonic clock, in seconds): send a Ping after
        ``heartbeat_s`` of send-silence, declare the peer dead (PeerDead, CLOSED) after
        ``dead_after_s`` of receive-silence (see heartbeat.py for the precision)."""
        if self.state is State.CLOSED:
            return
        beat = self.beat.tick(now, may_ping=self.state is State.OPEN)
        if beat is Beat.DEAD:
            silence = self.beat.silence
            self._close(Close(CloseCode.PEER_DEAD, f"nothing received for {silence:.1f} s"))
            self._events.append(ev.PeerDead(silence))
        elif beat is Beat.PING:  # already dated as a send by the beat: bypass _queue
            self._nonce += 1
            self._out.append(encode_frame(fr.Ping(self._nonce)))

    def fail(self, reason: str, code: int = CloseCode.PROTOCOL_ERROR) -> None:
        """The I/O layer saw the peer break the protocol (e.g. a text message)."""
        self._fail(code, reason)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Queue a Close frame and stop; a no-op once closed."""
        if self.state is not State.CLOSED:
            self._close(Close(code, reason[:_MAX_REASON]))

    # -- state -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def concurrency(self) -> int:
        """The daemon's advertised concurrency (0 before the Hello)."""
        return self.hello.concurrency if self.hello is not None else 0

    @property
    def in_flight(self) -> int:
        """Dispatches opened and not ended yet (including cancelled ones awaiting End/Fail:
        the daemon still counts them against its concurrency)."""
        return len(self.inbound) if self.role == "gateway" else len(self.outbound)

    @property
    def accepting(self) -> bool:
        """gateway: whether a new dispatch may be sent (open, no Drain, no GoAway)."""
        return self.state is State.OPEN and not (self.peer_draining or self.goaway_sent)

    def credit(self, dispatch_id: str) -> int:
        """daemon: bytes this dispatch may send now (0 if it is not live)."""
        flow = self.outbound.get(dispatch_id)
        return flow.credit if flow is not None else 0

    # -- daemon sends --------------------------------------------------------------------------

    def send_hello(
        self,
        *,
        daemon_version: str,
        task_classes: Collection[str],
        models: Collection[str],
        default_model: str | None,
        concurrency: int,
    ) -> Hello:
        """daemon, first: advertise what it serves. Raises InvalidState if out of turn and
        ValueError if a field breaks the Hello's constraints."""
        self._require("daemon", State.OPENING)
        if self.hello is not None:
            raise InvalidState("hello already sent")
        hello = Hello(
            versions=self.versions,
            daemon_version=daemon_version,
            task_classes=tuple(task_classes),
            models=tuple(models),
            default_model=default_model,
            concurrency=concurrency,
            max_frame=self.max_frame,
        )
        try:  # validate exactly as the gateway will (once per connection: cheap)
            decode_frame(encode_frame(hello))
        except (msgspec.DecodeError, RecursionError) as exc:
            raise ValueError(f"invalid hello: {exc}") from None
        self.hello = hello
        self._send(hello)
        return hello

    def send_data(self, dispatch_id: str, payload: bytes) -> None:
        """daemon: result bytes; ``len(payload)`` must be ≤ :meth:`credit` (else
        FlowControlError: wait for CreditAvailable) and ≤ :attr:`max_data` (else
        FrameTooLarge). An empty payload sends nothing."""
        flow = self._live_outbound(dispatch_id)
        if not payload:
            return
        if len(payload) > self.max_data:
            raise FrameTooLarge(f"payload of {len(payload)} bytes > max_data {self.max_data}")
        if not flow.spend(len(payload)):
            raise FlowControlError(f"payload of {len(payload)} bytes > credit {flow.credit}")
        self._send(fr.Data(dispatch_id, payload))

    def send_end(self, dispatch_id: str, status: int = 200) -> None:
        """daemon: the dispatch finished with the backend's HTTP ``status``."""
        self._check_status(status)
        self._live_outbound(dispatch_id)
        self._finish(dispatch_id)
        self._send(fr.End(dispatch_id, status))

    @property
    def results(self) -> bool:
        """daemon: whether :meth:`send_result` may be used (the agreed version has Result)."""
        return self.version is not None and self.version >= fr.RESULT_VERSION

    def send_result(self, dispatch_id: str, status: int, payload: bytes) -> None:
        """daemon, version ≥ 2: the whole result in one frame (Data then End). The rules of
        :meth:`send_data` apply to ``payload`` (credit, :attr:`max_data`); InvalidState if
        the agreed version has no Result frame (see :attr:`results`)."""
        self._check_status(status)
        flow = self._live_outbound(dispatch_id)
        if not self.results:
            raise InvalidState(f"no Result frame in protocol version {self.version}")
        if len(payload) > self.max_data:
            raise FrameTooLarge(f"payload of {len(payload)} bytes > max_data {self.max_data}")
        if not flow.spend(len(payload)):
            raise FlowControlError(f"payload of {len(payload)} bytes > credit {flow.credit}")
        self._finish(dispatch_id)
        self._send(fr.Result(dispatch_id, status, payload))

    def send_fail(self, dispatch_id: str, status: int, code: str, message: str) -> None:
        """daemon: the dispatch failed; ``message`` is truncated to fit the frame."""
        self._check_status(status)
        self._live_outbound(dispatch_id)
        self._finish(dispatch_id)
        self._send(fr.Fail(dispatch_id, status, code[:_MAX_NAME], message[:_MAX_REASON]))

    def send_drain(self) -> None:
        """daemon: take no new work (idempotent). Dispatches that crossed the Drain on the
        wire still arrive (they were in flight for the gateway: serve them). A Ping follows
        the Drain; its Pong, which the gateway sends after it read the Drain, acknowledges
        it (DrainAcknowledged): from then on no Dispatch can arrive, and once nothing is in
        flight the daemon may close."""
        self._require("daemon", State.OPEN)
        if not self.draining:
            self.draining = True
            self._send(fr.Drain())
            self._nonce += 1
            self.drain_nonce = self._nonce
            self._send(fr.Ping(self._nonce))

    # -- gateway sends ----------------------------------------------------------------------

    def send_dispatch(
        self,
        *,
        dispatch_id: str,
        token: str,
        task: str,
        model: str,
        stream: bool,
        body: bytes,
        timeout_ms: int,
    ) -> None:
        """gateway: open a dispatch. Raises NotAccepting (draining/GoAway),
        ConcurrencyExceeded, UnknownDispatch (duplicate id), FrameTooLarge (over the
        daemon's ``max_frame``: answer 413), ValueError (a field out of range)."""
        self._require("gateway", State.OPEN)
        if not self.accepting:
            raise NotAccepting("the daemon is draining" if self.peer_draining else "goaway sent")
        if dispatch_id in self.inbound:
            raise UnknownDispatch(f"dispatch {dispatch_id!r} is already open")
        if self.in_flight >= self.concurrency:
            raise ConcurrencyExceeded(f"{self.in_flight} dispatches in flight")
        ok_names = 0 < len(dispatch_id) <= _MAX_ID and max(len(task), len(model)) <= _MAX_NAME
        if not (ok_names and 0 < timeout_ms <= 2**62 and len(token) <= 4096):
            raise ValueError("dispatch id, task, model, token or timeout_ms out of range")
        message = encode_frame(
            fr.Dispatch(dispatch_id, token, task, model, stream, body, timeout_ms)
        )
        if len(message) > self.peer_max_frame:
            raise FrameTooLarge(f"dispatch of {len(message)} bytes > {self.peer_max_frame}")
        self.inbound[dispatch_id] = InboundFlow(self.window)
        self._queue(message)

    def consumed(self, dispatch_id: str, nbytes: int) -> None:
        """gateway: the consumer took ``nbytes`` of this dispatch's data; grants Credit in
        batches of ≥ window/2. A no-op for a dispatch that ended or was cancelled."""
        flow = self.inbound.get(dispatch_id)
        if flow is None or flow.cancelled or self.state is State.CLOSED:
            return
        try:
            grant = flow.consume(nbytes)
        except ValueError as exc:
            raise FlowControlError(str(exc)) from None
        if grant:
            self._send(fr.Credit(dispatch_id, grant))

    def cancel(self, dispatch_id: str) -> None:
        """gateway: cancel a dispatch (idempotent; a no-op once it ended or the tunnel
        closed). Its Data is dropped until the daemon's End/Fail, which still arrives as an
        event with ``cancelled=True`` and frees its concurrency slot."""
        flow = self.inbound.get(dispatch_id)
        if flow is None or flow.cancelled or self.state is State.CLOSED:
            return
        flow.cancel()
        self._send(fr.Cancel(dispatch_id))

    def send_goaway(self, reason: str = "") -> None:
        """gateway: ask the daemon to reconnect (elsewhere) for new work (idempotent)."""
        self._require("gateway", State.OPEN)
        if not self.goaway_sent:
            self.goaway_sent = True
            self._send(fr.GoAway(reason[:_MAX_REASON]))

    # -- internals --------------------------------------------------------------------------

    def _require(self, role: Role, state: State) -> None:
        if self.role != role:
            raise InvalidState(f"only the {role} end may do this")
        if self.state is State.CLOSED:
            raise ConnectionClosed("the tunnel is closed")
        if self.state is not state:
            raise InvalidState(f"not allowed while {self.state.value}")

    def _live_outbound(self, dispatch_id: str) -> OutboundFlow:
        self._require("daemon", State.OPEN)
        flow = self.outbound.get(dispatch_id)
        if flow is None:
            raise UnknownDispatch(f"no live dispatch {dispatch_id!r}")
        return flow

    @staticmethod
    def _check_status(status: int) -> None:
        if not 100 <= status <= 599:
            raise ValueError(f"HTTP status {status} out of range")

    def _finish(self, dispatch_id: str) -> None:
        """daemon: forget a dispatch, remembering its id for a while (see receive.py)."""
        del self.outbound[dispatch_id]
        self.recent[dispatch_id] = None
        while len(self.recent) > 2 * self.concurrency + 64:
            del self.recent[next(iter(self.recent))]

    def _send(self, frame: Frame) -> None:
        self._queue(encode_frame(frame))

    def _queue(self, message: bytes) -> None:
        self._out.append(message)
        self.beat.sent()

    def _close(self, frame: Close) -> None:
        self._send(frame)
        self.state = State.CLOSED
        self.close_frame = frame

    def _fail(self, code: int, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        reason = reason[:_MAX_REASON]
        self._close(Close(code, reason))
        self._events.append(ev.ProtocolError(code, reason))

    def _emit(self, event: ev.Event) -> None:
        """For the receive handlers (receive.py)."""
        self._events.append(event)
