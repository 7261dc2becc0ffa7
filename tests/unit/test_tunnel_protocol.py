"""The tunnel protocol, bytes in and events out (no sockets, no clock, no loop)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from daemon.tunnel import (
    CloseCode,
    ConcurrencyExceeded,
    Connection,
    ConnectionClosed,
    FlowControlError,
    FrameTooLarge,
    InvalidState,
    NotAccepting,
    State,
    UnknownDispatch,
)
from daemon.tunnel import events as ev
from daemon.tunnel.frames import (
    Cancel,
    Close,
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
    decode_frame,
    encode_frame,
)

WINDOW = 4096
HALF = WINDOW // 2


def hello_frame(**changes: Any) -> Hello:
    fields: dict[str, Any] = {
        "versions": (1,),
        "daemon_version": "0.1.0",
        "task_classes": ("chat-completion",),
        "models": ("llama",),
        "default_model": "llama",
        "concurrency": 4,
        "max_frame": 1 << 20,
    }
    fields.update(changes)
    return Hello(**fields)


def welcome_frame(**changes: Any) -> Welcome:
    fields: dict[str, Any] = {
        "version": 1,
        "runtime_id": "lat_1",
        "heartbeat_ms": 5000,
        "dead_after_ms": 15000,
        "max_frame": 1 << 20,
        "window": WINDOW,
    }
    fields.update(changes)
    return Welcome(**fields)


def frames(conn: Connection) -> list[Frame]:
    return [decode_frame(m) for m in conn.data_to_send()]


def relay(src: Connection, dst: Connection) -> list[ev.Event]:
    """Move everything ``src`` has to send into ``dst``; ``dst``'s events."""
    for message in src.data_to_send():
        dst.receive_message(message)
    return dst.events_received()


def gateway(**kw: Any) -> Connection:
    return Connection("gateway", runtime_id="lat_1", window=WINDOW, **kw)


def daemon(concurrency: int = 4, **kw: Any) -> Connection:
    d = Connection("daemon", **kw)
    d.send_hello(
        daemon_version="0.1.0",
        task_classes=["chat-completion"],
        models=["llama"],
        default_model="llama",
        concurrency=concurrency,
    )
    return d


def pair(concurrency: int = 4) -> tuple[Connection, Connection]:
    g, d = gateway(), daemon(concurrency)
    relay(d, g)
    relay(g, d)
    assert g.state is d.state is State.OPEN
    return g, d


def dispatch(g: Connection, d: Connection, did: str = "dsp_1", *, stream: bool = True) -> None:
    g.send_dispatch(
        dispatch_id=did,
        token="tok",
        task="chat-completion",
        model="llama",
        stream=stream,
        body=b"{}",
        timeout_ms=30_000,
    )
    (event,) = relay(g, d)
    assert isinstance(event, ev.DispatchReceived)
    assert event.dispatch.id == did


def assert_protocol_error(conn: Connection, code: int = CloseCode.PROTOCOL_ERROR) -> str:
    """The connection closed with a protocol error and queued exactly one Close."""
    events = conn.events_received()
    assert len(events) == 1 and isinstance(events[-1], ev.ProtocolError), events
    assert events[-1].code == code
    assert frames(conn) == [Close(code, events[-1].reason)]
    assert conn.state is State.CLOSED
    # Later input is ignored, whatever it is.
    conn.receive_message(encode_frame(Ping(1)))
    conn.receive_message(b"junk")
    assert conn.events_received() == [] and conn.data_to_send() == []
    return events[-1].reason


def feed(conn: Connection, frame: Frame) -> list[ev.Event]:
    conn.receive_message(encode_frame(frame))
    return conn.events_received()


# -- the opening ---------------------------------------------------------------------------------


def test_hello_and_welcome() -> None:
    g, d = gateway(heartbeat_s=2.0, dead_after_s=7.0), daemon()
    (hello,) = frames(d)
    assert isinstance(hello, Hello)
    assert hello.versions == (1, 2) and hello.max_frame == d.max_frame
    g.receive_message(encode_frame(hello))
    (received,) = g.events_received()
    assert received == ev.HelloReceived(hello, 2)
    (welcome,) = frames(g)
    assert welcome == Welcome(2, "lat_1", 2000, 7000, g.max_frame, WINDOW)
    (welcomed,) = feed(d, welcome)
    assert welcomed == ev.Welcomed(welcome)
    assert d.heartbeat_s == 2.0 and d.dead_after_s == 7.0 and d.window == WINDOW
    assert d.max_data == HALF and g.concurrency == 4 and g.accepting


def test_highest_common_version_is_chosen() -> None:
    g = Connection("gateway", runtime_id="lat_1", versions=(1, 2))
    (event,) = feed(g, hello_frame(versions=(1, 2, 3)))
    assert isinstance(event, ev.HelloReceived) and event.version == 2
    assert g.version == 2


def test_no_common_version_is_refused() -> None:
    g = gateway()
    g.receive_message(encode_frame(hello_frame(versions=(7, 8))))
    assert "no common protocol version" in assert_protocol_error(g, CloseCode.UNSUPPORTED_VERSION)


def test_welcome_with_a_version_not_offered_is_refused() -> None:
    d = daemon()
    d.data_to_send()
    d.receive_message(encode_frame(welcome_frame(version=3)))
    assert_protocol_error(d, CloseCode.UNSUPPORTED_VERSION)


def test_hello_and_welcome_tolerate_appended_fields() -> None:
    g = gateway()
    raw = msgspec.msgpack.encode(["hello", [1], "9.0", [], ["m"], None, 1, 1 << 20, "future"])
    g.receive_message(raw)
    assert isinstance(g.events_received()[0], ev.HelloReceived)
    d = daemon()
    d.data_to_send()
    d.receive_message(msgspec.msgpack.encode([*msgspec.to_builtins(welcome_frame()), {"x": 1}]))
    assert isinstance(d.events_received()[0], ev.Welcomed)


def test_other_frames_are_strict() -> None:
    g, _ = pair()
    g.receive_message(msgspec.msgpack.encode(["drain", "extra"]))
    assert "undecodable" in assert_protocol_error(g)


@pytest.mark.parametrize("frame", [Data("dsp_1", b"x"), End("dsp_1", 200), Drain(), Ping(1)])
def test_gateway_frames_before_the_hello(frame: Frame) -> None:
    g = gateway()
    g.receive_message(encode_frame(frame))
    assert "before the hello" in assert_protocol_error(g)


@pytest.mark.parametrize(
    "frame",
    [
        Dispatch("dsp_1", "t", "chat-completion", "llama", True, b"", 1000),
        Credit("dsp_1", 1),
        GoAway(),
        Pong(1),
    ],
)
def test_daemon_frames_before_the_welcome(frame: Frame) -> None:
    d = daemon()
    d.data_to_send()
    d.receive_message(encode_frame(frame))
    assert "before the" in assert_protocol_error(d)


def test_welcome_before_hello_and_second_hello_or_welcome() -> None:
    d = Connection("daemon")
    d.receive_message(encode_frame(welcome_frame()))
    assert "out of turn" in assert_protocol_error(d)
    g, d = pair()
    g.receive_message(encode_frame(hello_frame()))
    assert "second hello" in assert_protocol_error(g)
    d.receive_message(encode_frame(welcome_frame()))
    assert "out of turn" in assert_protocol_error(d)


def test_close_is_accepted_before_the_welcome() -> None:
    d = daemon()
    d.data_to_send()
    assert feed(d, Close(CloseCode.UNAUTHORIZED, "no")) == [
        ev.PeerClosed(CloseCode.UNAUTHORIZED, "no")
    ]
    assert d.closed and d.close_frame == Close(4401, "no")


def test_send_methods_check_role_and_phase() -> None:
    d = Connection("daemon")
    with pytest.raises(InvalidState):
        d.send_drain()
    with pytest.raises(InvalidState):
        d.send_goaway()
    with pytest.raises(ValueError, match="invalid hello"):
        d.send_hello(
            daemon_version="x", task_classes=[], models=[], default_model=None, concurrency=0
        )
    g = gateway()
    with pytest.raises(InvalidState):
        g.send_hello(
            daemon_version="x", task_classes=[], models=[], default_model=None, concurrency=1
        )
    with pytest.raises(InvalidState):
        g.send_goaway()
    with pytest.raises(ValueError):
        Connection("gateway")
    with pytest.raises(ValueError):
        Connection("daemon", heartbeat_s=20, dead_after_s=10)


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        Hello((1,), "x", (), (), None, 1, 1 << 20),
        Data("dsp_1", b"x"),
        End("dsp_1", 200),
        Result("dsp_1", 200, b"x"),
        Fail("dsp_1", 500, "c", "m"),
        Drain(),
    ],
)
def test_daemon_frames_sent_by_a_gateway_are_refused(frame: Frame) -> None:
    _, d = pair()
    d.receive_message(encode_frame(frame))
    assert "a gateway may not send" in assert_protocol_error(d)


@pytest.mark.parametrize(
    "frame",
    [
        welcome_frame(),
        Dispatch("dsp_1", "t", "chat-completion", "llama", True, b"", 1000),
        Credit("dsp_1", 1),
        Cancel("dsp_1"),
        GoAway(),
    ],
)
def test_gateway_frames_sent_by_a_daemon_are_refused(frame: Frame) -> None:
    g, _ = pair()
    g.receive_message(encode_frame(frame))
    assert "a daemon may not send" in assert_protocol_error(g)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",
        b"not msgpack at all",
        msgspec.msgpack.encode({"t": "data"}),
        msgspec.msgpack.encode(["nope", 1]),
        msgspec.msgpack.encode(["data", "dsp_1", b""]),  # empty payload
        msgspec.msgpack.encode(["data", "", b"x"]),  # empty id
        msgspec.msgpack.encode(["end", "dsp_1", 700]),  # no such status
        msgspec.msgpack.encode(["ping", -1]),
        msgspec.msgpack.encode(["data", "dsp_1", "text, not bytes"]),
        msgspec.msgpack.encode(["close", 99, ""]),
        b"\x91" * 20_000 + b"\xc0",  # arrays nested past the decoder's depth (RecursionError)
        b"\x92\xa4data" + b"\x91" * 20_000 + b"\xc0",
    ],
)
def test_undecodable_messages_close_the_connection(raw: bytes) -> None:
    g, _ = pair()
    g.receive_message(raw)
    assert "undecodable" in assert_protocol_error(g)


def test_oversize_frames_are_refused_before_decoding() -> None:
    g, _ = pair()
    g.receive_message(b"\x00" * (g.max_frame + 1))
    assert "bytes >" in assert_protocol_error(g, CloseCode.TOO_BIG)


def test_local_failure_closes_like_a_protocol_error() -> None:
    g, _ = pair()
    g.fail("a text message")
    assert assert_protocol_error(g) == "a text message"


# -- dispatches, multiplexed -------------------------------------------------------------------


def test_many_dispatches_are_multiplexed_by_id() -> None:
    g, d = pair(concurrency=3)
    for i in range(3):
        dispatch(g, d, f"dsp_{i}")
    assert g.in_flight == d.in_flight == 3
    d.send_data("dsp_2", b"two")
    d.send_data("dsp_0", b"zero")
    d.send_end("dsp_2", 200)
    d.send_fail("dsp_1", 503, "backend_unavailable", "down")
    d.send_data("dsp_0", b"more")
    d.send_end("dsp_0", 201)
    assert relay(d, g) == [
        ev.DataReceived("dsp_2", b"two"),
        ev.DataReceived("dsp_0", b"zero"),
        ev.DispatchEnded("dsp_2", 200, False),
        ev.DispatchFailed("dsp_1", 503, "backend_unavailable", "down", False),
        ev.DataReceived("dsp_0", b"more"),
        ev.DispatchEnded("dsp_0", 201, False),
    ]
    assert g.in_flight == d.in_flight == 0


def test_gateway_concurrency_limit_and_duplicate_ids() -> None:
    g, d = pair(concurrency=2)
    dispatch(g, d, "dsp_a")
    with pytest.raises(UnknownDispatch):
        dispatch(g, d, "dsp_a")
    dispatch(g, d, "dsp_b")
    with pytest.raises(ConcurrencyExceeded):
        dispatch(g, d, "dsp_c")
    d.send_end("dsp_a")
    relay(d, g)
    dispatch(g, d, "dsp_c")  # a slot was freed


def test_daemon_refuses_more_than_its_concurrency() -> None:
    _, d = pair(concurrency=1)
    feed(d, Dispatch("dsp_1", "t", "chat-completion", "llama", True, b"", 1000))
    d.receive_message(
        encode_frame(Dispatch("dsp_2", "t", "chat-completion", "llama", True, b"", 1000))
    )
    assert "advertised 1" in assert_protocol_error(d)


@pytest.mark.parametrize("ended", [False, True])
def test_daemon_refuses_duplicate_dispatch_ids(ended: bool) -> None:
    g, d = pair()
    dispatch(g, d, "dsp_1")
    if ended:
        d.send_end("dsp_1")
        d.data_to_send()
    d.receive_message(
        encode_frame(Dispatch("dsp_1", "t", "chat-completion", "llama", True, b"", 1000))
    )
    assert "duplicate dispatch id" in assert_protocol_error(d)


@pytest.mark.parametrize(
    "frame", [Data("dsp_other", b"x"), End("dsp_other", 200), Fail("dsp_other", 500, "c", "m")]
)
def test_frames_for_a_dispatch_never_opened_are_a_protocol_error(frame: Frame) -> None:
    g, d = pair()
    dispatch(g, d, "dsp_1")
    g.receive_message(encode_frame(frame))
    assert "not open on this tunnel" in assert_protocol_error(g)


def test_frames_after_a_dispatch_ended_are_a_protocol_error() -> None:
    g, d = pair()
    dispatch(g, d, "dsp_1")
    d.send_end("dsp_1")
    relay(d, g)
    g.receive_message(encode_frame(Data("dsp_1", b"late")))
    assert "not open" in assert_protocol_error(g)


def test_daemon_cannot_send_for_unknown_dispatches() -> None:
    g, d = pair()
    with pytest.raises(UnknownDispatch):
        d.send_data("dsp_x", b"x")
    with pytest.raises(UnknownDispatch):
        d.send_end("dsp_x")
    dispatch(g, d, "dsp_1")
    d.send_end("dsp_1")
    with pytest.raises(UnknownDispatch):
        d.send_fail("dsp_1", 500, "x", "y")
    with pytest.raises(ValueError):
        d.send_end("dsp_1", 99)


def test_daemon_refuses_credit_or_cancel_for_ids_never_opened() -> None:
    _, d = pair()
    d.receive_message(encode_frame(Credit("dsp_never", 10)))
    assert "never opened" in assert_protocol_error(d)
    _, d = pair()
    d.receive_message(encode_frame(Cancel("dsp_never")))
    assert "never opened" in assert_protocol_error(d)


def test_fail_fields_are_truncated_to_fit() -> None:
    g, d = pair()
    dispatch(g, d)
    d.send_fail("dsp_1", 502, "c" * 1000, "m" * 100_000)
    (event,) = relay(d, g)
    assert isinstance(event, ev.DispatchFailed)
    assert len(event.code) == 256 and len(event.message) == 512


def test_a_dispatch_larger_than_the_daemons_max_frame_is_refused_locally() -> None:
    g, _ = pair()
    assert g.hello is not None
    with pytest.raises(FrameTooLarge):
        g.send_dispatch(
            dispatch_id="dsp_big",
            token="t",
            task="chat-completion",
            model="llama",
            stream=False,
            body=b"x" * g.hello.max_frame,
            timeout_ms=1000,
        )
    assert g.in_flight == 0 and g.data_to_send() == []
    with pytest.raises(ValueError):
        g.send_dispatch(
            dispatch_id="dsp_1",
            token="t",
            task="chat-completion",
            model="llama",
            stream=False,
            body=b"",
            timeout_ms=0,
        )


# -- flow control ------------------------------------------------------------------------------


def test_daemon_cannot_send_beyond_its_credit() -> None:
    g, d = pair()
    dispatch(g, d)
    assert d.credit("dsp_1") == WINDOW
    d.send_data("dsp_1", b"a" * HALF)
    d.send_data("dsp_1", b"b" * (HALF - 10))
    assert d.credit("dsp_1") == 10
    with pytest.raises(FlowControlError):
        d.send_data("dsp_1", b"c" * 11)
    with pytest.raises(FrameTooLarge):
        d.send_data("dsp_1", b"d" * (HALF + 1))
    d.send_data("dsp_1", b"")  # nothing to send
    assert d.credit("dsp_1") == 10
    assert len(relay(d, g)) == 2


def test_gateway_refuses_data_beyond_the_credit() -> None:
    g, d = pair()
    dispatch(g, d)
    feed(g, Data("dsp_1", b"x" * (WINDOW - 1)))
    g.receive_message(encode_frame(Data("dsp_1", b"yy")))
    assert "flow control" in assert_protocol_error(g)


def test_credit_is_returned_in_batches_of_half_a_window() -> None:
    g, d = pair()
    dispatch(g, d)
    for _ in range(4):
        d.send_data("dsp_1", b"x" * 1024)
    assert d.credit("dsp_1") == 0
    relay(d, g)
    g.consumed("dsp_1", 1024)
    assert g.data_to_send() == []  # under half a window: no Credit yet
    g.consumed("dsp_1", 1024)
    assert frames(g) == [Credit("dsp_1", HALF)]
    g.consumed("dsp_1", 1500)
    assert g.data_to_send() == []
    g.consumed("dsp_1", 548)
    (credit,) = frames(g)
    assert credit == Credit("dsp_1", 2048)
    assert feed(d, credit) == [ev.CreditAvailable("dsp_1", HALF)]
    with pytest.raises(FlowControlError):
        g.consumed("dsp_1", 1)  # nothing is buffered


def test_credit_beyond_the_window_is_a_protocol_error() -> None:
    g, d = pair()
    dispatch(g, d)
    d.receive_message(encode_frame(Credit("dsp_1", 1)))
    assert "beyond the window" in assert_protocol_error(d)


def test_consumed_is_a_noop_for_ended_dispatches() -> None:
    g, d = pair()
    dispatch(g, d)
    d.send_data("dsp_1", b"x" * 1500)
    d.send_data("dsp_1", b"x" * 1500)
    d.send_end("dsp_1")
    relay(d, g)
    g.consumed("dsp_1", 3000)
    assert g.data_to_send() == []


# -- cancel ------------------------------------------------------------------------------------


def test_cancel_round_trip_and_late_frames() -> None:
    g, d = pair(concurrency=1)
    dispatch(g, d)
    d.send_data("dsp_1", b"before")
    g.cancel("dsp_1")
    g.cancel("dsp_1")  # idempotent: one Cancel frame
    assert frames(g) == [Cancel("dsp_1")]
    # Data that crossed the Cancel is dropped, not an error; the slot stays taken until End.
    assert relay(d, g) == []
    with pytest.raises(ConcurrencyExceeded):
        dispatch(g, d, "dsp_2")
    assert feed(d, Cancel("dsp_1")) == [ev.CancelRequested("dsp_1")]
    assert feed(d, Cancel("dsp_1")) == []  # a second one is harmless
    d.send_data("dsp_1", b"after")  # still allowed: the gateway drops it
    d.send_fail("dsp_1", 499, "dispatch_cancelled", "cancelled")
    assert relay(d, g) == [ev.DispatchFailed("dsp_1", 499, "dispatch_cancelled", "cancelled", True)]
    assert g.in_flight == 0
    g.cancel("dsp_1")  # ended: a no-op
    assert g.data_to_send() == []
    # Credit or Cancel crossing the daemon's End is dropped too.
    assert feed(d, Credit("dsp_1", 5)) == [] and feed(d, Cancel("dsp_1")) == []
    assert d.state is State.OPEN


def test_cancelled_dispatch_still_counts_credit() -> None:
    g, d = pair()
    dispatch(g, d)
    g.cancel("dsp_1")
    g.data_to_send()
    feed(g, Data("dsp_1", b"x" * HALF))
    feed(g, Data("dsp_1", b"x" * HALF))
    g.receive_message(encode_frame(Data("dsp_1", b"y")))
    assert "flow control" in assert_protocol_error(g)


def test_cancelled_dispatch_ending_cleanly() -> None:
    g, d = pair()
    dispatch(g, d)
    g.cancel("dsp_1")
    g.consumed("dsp_1", 10)  # a no-op once cancelled
    relay(g, d)
    d.send_end("dsp_1", 200)
    assert relay(d, g) == [ev.DispatchEnded("dsp_1", 200, True)]


# -- drain, goaway, close ----------------------------------------------------------------------


def test_drain_stops_new_dispatches_and_lets_in_flight_ones_finish() -> None:
    g, d = pair()
    dispatch(g, d, "dsp_1")
    # A dispatch sent before the Drain arrives crosses it on the wire.
    g.send_dispatch(
        dispatch_id="dsp_2",
        token="t",
        task="chat-completion",
        model="llama",
        stream=False,
        body=b"",
        timeout_ms=5,
    )
    d.send_drain()
    d.send_drain()
    assert relay(d, g) == [ev.PeerDraining()]
    assert not g.accepting and d.draining
    with pytest.raises(NotAccepting):
        dispatch(g, d, "dsp_3")
    assert not d.drain_acknowledged
    # The Pong to the Ping that followed the Drain comes after every crossing Dispatch.
    event, ack = relay(g, d)
    assert isinstance(event, ev.DispatchReceived) and event.dispatch.id == "dsp_2"
    assert ack == ev.DrainAcknowledged() and d.drain_acknowledged
    d.send_data("dsp_1", b"still")
    d.send_end("dsp_1")
    d.send_fail("dsp_2", 503, "runtime_draining", "draining")
    assert len(relay(d, g)) == 3 and g.in_flight == 0


def test_goaway() -> None:
    g, d = pair()
    dispatch(g, d)
    g.send_goaway("moving")
    g.send_goaway("again")
    assert relay(g, d) == [ev.GoAwayReceived("moving")]
    assert not g.accepting
    with pytest.raises(NotAccepting):
        dispatch(g, d, "dsp_2")
    d.send_end("dsp_1")
    assert relay(d, g) == [ev.DispatchEnded("dsp_1", 200, False)]
    d.receive_message(
        encode_frame(Dispatch("dsp_2", "t", "chat-completion", "llama", True, b"", 1000))
    )
    assert "after goaway" in assert_protocol_error(d)


@pytest.mark.parametrize("closer", ["gateway", "daemon"])
def test_close(closer: str) -> None:
    g, d = pair()
    dispatch(g, d)
    a, b = (g, d) if closer == "gateway" else (d, g)
    a.close(CloseCode.GOING_AWAY, "bye")
    a.close()  # no-op
    assert a.closed and a.close_frame == Close(1001, "bye")
    assert relay(a, b) == [ev.PeerClosed(1001, "bye")]
    assert b.closed
    feed(b, Ping(1))
    assert b.data_to_send() == []
    with pytest.raises(ConnectionClosed):
        d.send_data("dsp_1", b"x")
    with pytest.raises(ConnectionClosed):
        g.send_goaway()
    g.cancel("dsp_1")
    g.consumed("dsp_1", 1)
    assert g.data_to_send() == []


# -- heartbeats --------------------------------------------------------------------------------


def test_ping_after_send_silence_and_pong() -> None:
    g, d = pair()
    g.tick(100.0)
    assert g.data_to_send() == []  # the first tick sets the baseline
    g.tick(104.9)
    assert g.data_to_send() == []
    g.tick(105.0)
    (ping,) = frames(g)
    assert isinstance(ping, Ping)
    d.receive_message(encode_frame(ping))
    assert frames(d) == [Pong(ping.nonce)]
    g.tick(106.0)
    assert g.data_to_send() == []
    g.tick(110.0)
    (ping2,) = frames(g)
    assert isinstance(ping2, Ping) and ping2.nonce != ping.nonce


def test_sending_postpones_the_ping() -> None:
    g, d = pair()
    g.tick(0.0)
    dispatch(g, d)
    g.tick(3.0)  # the dispatch is dated now
    g.tick(7.9)
    assert g.data_to_send() == []
    g.tick(8.0)
    assert isinstance(frames(g)[0], Ping)


def test_a_silent_peer_is_declared_dead_never_early() -> None:
    g, d = pair()
    g.tick(0.0)
    g.tick(10.0)
    g.data_to_send()
    d.send_drain()
    relay(d, g)  # a receipt, dated by the next tick
    g.tick(12.0)
    g.tick(26.9)
    assert not g.closed
    g.events_received()
    g.data_to_send()
    g.tick(27.0)
    (event,) = g.events_received()
    assert event == ev.PeerDead(15.0)
    (close,) = frames(g)
    assert isinstance(close, Close) and close.code == CloseCode.PEER_DEAD
    assert g.closed
    g.tick(100.0)
    assert g.events_received() == [] and g.data_to_send() == []


def test_no_hello_within_dead_after() -> None:
    g = gateway(dead_after_s=3.0, heartbeat_s=1.0)
    g.tick(0.0)
    g.tick(1.0)
    assert g.data_to_send() == []  # no Ping before the hello
    g.tick(3.0)
    assert isinstance(g.events_received()[0], ev.PeerDead)


def test_daemon_uses_the_welcomes_heartbeat() -> None:
    g, d = gateway(heartbeat_s=1.0, dead_after_s=3.0), daemon()
    relay(d, g)
    relay(g, d)
    d.tick(0.0)
    d.tick(1.0)
    assert isinstance(frames(d)[0], Ping)
    d.tick(3.0)
    assert isinstance(d.events_received()[0], ev.PeerDead)


# -- Result frames (protocol version 2) ----------------------------------------------------------


def test_a_result_is_data_then_end_in_one_frame() -> None:
    g, d = pair()
    assert g.version == d.version == 2 and d.results
    dispatch(g, d, stream=False)
    d.send_result("dsp_1", 200, b'{"ok": true}')
    assert frames(d) == [Result("dsp_1", 200, b'{"ok": true}')]
    dispatch(g, d, "dsp_2", stream=False)
    d.send_result("dsp_2", 201, b"body")
    events = relay(d, g)
    assert events == [ev.DataReceived("dsp_2", b"body"), ev.DispatchEnded("dsp_2", 201, False)]
    assert g.in_flight == 1 and d.in_flight == 0  # dsp_1's Result was taken, not delivered
    g.consumed("dsp_2", 4)  # after the end: a no-op, as after Data then End
    assert g.data_to_send() == []


def test_an_empty_result_is_just_the_end() -> None:
    g, d = pair()
    dispatch(g, d, stream=False)
    d.send_result("dsp_1", 204, b"")
    assert relay(d, g) == [ev.DispatchEnded("dsp_1", 204, False)]


def test_result_obeys_the_rules_of_data() -> None:
    g, d = pair()
    dispatch(g, d, stream=False)
    with pytest.raises(FrameTooLarge):
        d.send_result("dsp_1", 200, b"x" * (HALF + 1))
    d.send_data("dsp_1", b"x" * HALF)
    d.send_data("dsp_1", b"x" * (HALF - 1))
    with pytest.raises(FlowControlError):
        d.send_result("dsp_1", 200, b"yy")
    with pytest.raises(UnknownDispatch):
        d.send_result("dsp_x", 200, b"")
    with pytest.raises(ValueError):
        d.send_result("dsp_1", 99, b"")
    d.send_result("dsp_1", 200, b"y")  # within credit: fine, and it ends the dispatch
    assert d.in_flight == 0
    relay(d, g)
    assert g.in_flight == 0


def test_gateway_refuses_a_result_beyond_the_credit_or_for_unknown_ids() -> None:
    g, d = pair()
    dispatch(g, d, stream=False)
    feed(g, Data("dsp_1", b"x" * (WINDOW - 1)))
    g.receive_message(encode_frame(Result("dsp_1", 200, b"yy")))
    assert "flow control" in assert_protocol_error(g)
    g, d = pair()
    g.receive_message(encode_frame(Result("dsp_x", 200, b"")))
    assert "not open on this tunnel" in assert_protocol_error(g)


def test_result_frames_need_version_2() -> None:
    g = Connection("gateway", runtime_id="lat_1", window=WINDOW, versions=(1,))
    d = daemon()
    relay(d, g)
    relay(g, d)
    assert g.version == d.version == 1 and not d.results
    dispatch(g, d, stream=False)
    with pytest.raises(InvalidState):
        d.send_result("dsp_1", 200, b"x")
    assert d.in_flight == 1 and d.credit("dsp_1") == WINDOW  # nothing spent
    g.receive_message(encode_frame(Result("dsp_1", 200, b"x")))
    assert "version 1" in assert_protocol_error(g)
