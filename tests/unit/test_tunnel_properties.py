"""Property tests of the tunnel protocol (hypothesis): whatever arrives, nothing raises; a bad
frame always ends the connection with a ProtocolError and a Close; valid interleavings keep
every dispatch's credit accounting exact."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.tunnel import CloseCode, Connection, State
from daemon.tunnel import events as ev
from daemon.tunnel.frames import (
    DAEMON_FRAMES,
    GATEWAY_FRAMES,
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
IDS = st.sampled_from(["dsp_0", "dsp_1", "dsp_2", "dsp_3"])
FAST = settings(
    max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None, database=None
)


def handshake(role: str, opened: bool) -> tuple[Connection, Connection]:
    """``(conn, peer)`` where ``conn`` has ``role``; both OPEN when ``opened``."""
    g = Connection("gateway", runtime_id="lat_1", window=WINDOW)
    d = Connection("daemon")
    d.send_hello(
        daemon_version="0",
        task_classes=["t"],
        models=["m"],
        default_model="m",
        concurrency=3,
    )
    if opened:
        for m in d.data_to_send():
            g.receive_message(m)
        for m in g.data_to_send():
            d.receive_message(m)
        g.events_received()
        d.events_received()
    else:
        d.data_to_send()
    return (g, d) if role == "gateway" else (d, g)


def check_closed_cleanly(conn: Connection, events: list[ev.Event], out: list[bytes]) -> None:
    """A ProtocolError is the last event, the connection is closed, a Close went out last."""
    errors = [e for e in events if isinstance(e, ev.ProtocolError)]
    for error in errors:
        assert error.code != CloseCode.INTERNAL_ERROR, error.reason
    if errors:
        assert len(errors) == 1 and events[-1] is errors[0]
        assert conn.state is State.CLOSED
        last = decode_frame(out[-1])
        assert isinstance(last, Close) and last.code == errors[0].code


text = st.text(max_size=20)
names = st.tuples(text).map(tuple) | st.just(())
frames_strategy: st.SearchStrategy[Frame] = st.one_of(
    st.builds(
        Hello,
        st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple),
        text,
        names,
        names,
        st.none() | text,
        st.integers(1, 5),
        st.integers(64 * 1024, 1 << 20),
    ),
    st.builds(
        Welcome,
        st.integers(1, 3),
        text,
        st.integers(10, 10_000),
        st.integers(10, 30_000),
        st.integers(64 * 1024, 1 << 20),
        st.integers(1024, 1 << 20),
    ),
    st.builds(
        Dispatch,
        IDS,
        text,
        text,
        text,
        st.booleans(),
        st.binary(max_size=64),
        st.integers(1, 10**6),
    ),
    st.builds(Data, IDS, st.binary(min_size=1, max_size=3000)),
    st.builds(End, IDS, st.integers(100, 599)),
    st.builds(Result, IDS, st.integers(100, 599), st.binary(max_size=3000)),
    st.builds(Fail, IDS, st.integers(100, 599), text, text),
    st.builds(Credit, IDS, st.integers(1, 2 * WINDOW)),
    st.builds(Cancel, IDS),
    st.builds(Ping, st.integers(0, 2**63 - 1)),
    st.builds(Pong, st.integers(0, 2**63 - 1)),
    st.just(Drain()),
    st.builds(GoAway, text),
    st.builds(Close, st.integers(1000, 4999), text),
)


@FAST
@given(
    role=st.sampled_from(["gateway", "daemon"]),
    opened=st.booleans(),
    messages=st.lists(st.binary(max_size=200), max_size=8),
)
def test_arbitrary_bytes_never_raise(role: str, opened: bool, messages: list[bytes]) -> None:
    conn, _ = handshake(role, opened)
    for message in messages:
        was_open = not conn.closed
        conn.receive_message(message)
        events, out = conn.events_received(), conn.data_to_send()
        check_closed_cleanly(conn, events, out)
        try:
            decode_frame(message)
        except msgspec.DecodeError:
            if was_open:  # undecodable: always the end of the connection
                assert isinstance(events[-1], ev.ProtocolError)
                assert conn.closed


@FAST
@given(
    role=st.sampled_from(["gateway", "daemon"]),
    opened=st.booleans(),
    frames=st.lists(frames_strategy, max_size=12),
)
def test_arbitrary_frames_never_raise(role: str, opened: bool, frames: list[Frame]) -> None:
    conn, _ = handshake(role, opened)
    receivable = DAEMON_FRAMES if role == "gateway" else GATEWAY_FRAMES
    for frame in frames:
        was_open = not conn.closed
        conn.receive_message(encode_frame(frame))
        conn.tick(0.0)
        events, out = conn.events_received(), conn.data_to_send()
        check_closed_cleanly(conn, events, out)
        if was_open and not isinstance(frame, receivable):
            assert isinstance(events[-1], ev.ProtocolError)
        if not was_open:
            assert events == [] and out == []


@FAST
@given(
    role=st.sampled_from(["gateway", "daemon"]),
    values=st.lists(
        st.one_of(
            st.integers(-(2**63), 2**64 - 1), st.binary(max_size=8), st.text(max_size=8), st.none()
        ),
        max_size=8,
    ),
    tag=st.sampled_from(
        ["hello", "welcome", "dispatch", "data", "end", "result", "fail", "credit", "ping"]
    ),
)
def test_frames_breaking_constraints_close(role: str, values: list[Any], tag: str) -> None:
    conn, _ = handshake(role, True)
    message = msgspec.msgpack.encode([tag, *values])
    conn.receive_message(message)
    events = conn.events_received()
    check_closed_cleanly(conn, events, conn.data_to_send())
    try:
        decode_frame(message)
    except msgspec.DecodeError:
        assert isinstance(events[-1], ev.ProtocolError)


# -- valid interleavings keep the accounting exact ---------------------------------------------


class Wire:
    """Both ends and the messages in transit each way (delivered in order, in bursts)."""

    def __init__(self) -> None:
        self.g, self.d = handshake("gateway", True)
        self.to_daemon: list[bytes] = []
        self.to_gateway: list[bytes] = []
        self.sent: dict[str, bytearray] = defaultdict(bytearray)  # by the daemon
        self.received: dict[str, bytearray] = defaultdict(bytearray)  # by the gateway
        self.unconsumed: dict[str, int] = defaultdict(int)
        self.next_id = 0
        self.cancelled: set[str] = set()

    def collect(self) -> None:
        self.to_daemon += self.g.data_to_send()
        self.to_gateway += self.d.data_to_send()

    def deliver(self, n: int, to_daemon: bool) -> None:
        queue = self.to_daemon if to_daemon else self.to_gateway
        dst = self.d if to_daemon else self.g
        batch, queue[:] = queue[:n], queue[n:]
        for message in batch:
            dst.receive_message(message)
        for event in dst.events_received():
            assert not isinstance(event, ev.ProtocolError | ev.PeerClosed), event
            if isinstance(event, ev.DataReceived):
                self.received[event.id] += event.payload
                self.unconsumed[event.id] += len(event.payload)
        self.collect()

    def in_transit(self, dispatch_id: str) -> int:
        """Credit granted plus data sent, on the wire, for one dispatch."""
        total = 0
        for message in self.to_daemon + self.to_gateway:
            frame = decode_frame(message)
            if isinstance(frame, Credit) and frame.id == dispatch_id:
                total += frame.nbytes
            elif isinstance(frame, Data | Result) and frame.id == dispatch_id:
                total += len(frame.payload)
        return total

    def check(self) -> None:
        assert self.g.state is State.OPEN and self.d.state is State.OPEN
        for did, flow in self.g.inbound.items():
            assert flow.peer_credit + flow.buffered + flow.unacked + flow.dropped == WINDOW
            assert 0 <= flow.buffered <= WINDOW
            if not flow.cancelled:
                assert flow.buffered == self.unconsumed[did]
                assert self.sent[did].startswith(self.received[did])
            out = self.d.outbound.get(did)
            if out is not None:
                # What the gateway believes the daemon may send, minus what is on the wire.
                assert flow.peer_credit - out.credit == self.in_transit(did)
                assert 0 <= out.credit <= WINDOW


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(data=st.data())
def test_valid_interleavings_keep_credit_consistent(data: st.DataObject) -> None:
    w = Wire()
    ops = ["open", "send", "send", "send", "consume", "consume", "end", "cancel", "to_d", "to_g"]
    for _ in range(data.draw(st.integers(10, 80))):
        op = data.draw(st.sampled_from(ops))
        if op == "open" and w.g.accepting and w.g.in_flight < w.g.concurrency:
            did = f"dsp_{w.next_id}"
            w.next_id += 1
            w.g.send_dispatch(
                dispatch_id=did,
                token="t",
                task="t",
                model="m",
                stream=True,
                body=b"",
                timeout_ms=1,
            )
        elif op == "send" and w.d.outbound:
            did = data.draw(st.sampled_from(sorted(w.d.outbound)))
            room = min(w.d.credit(did), w.d.max_data)
            if room:
                payload = data.draw(st.binary(min_size=1, max_size=room))
                w.d.send_data(did, payload)
                w.sent[did] += payload
        elif op == "consume":
            live = sorted(i for i, n in w.unconsumed.items() if n and i in w.g.inbound)
            if live:
                did = data.draw(st.sampled_from(live))
                if not w.g.inbound[did].cancelled:
                    n = data.draw(st.integers(1, w.unconsumed[did]))
                    w.g.consumed(did, n)
                    w.unconsumed[did] -= n
        elif op == "end" and w.d.outbound:
            did = data.draw(st.sampled_from(sorted(w.d.outbound)))
            how = data.draw(st.sampled_from(["end", "fail", "result"]))
            room = min(w.d.credit(did), w.d.max_data)
            if how == "result":  # the rest of the data and the end, in one frame
                payload = data.draw(st.binary(max_size=room))
                w.d.send_result(did, 200, payload)
                w.sent[did] += payload
            elif how == "end":
                w.d.send_end(did, 200)
            else:
                w.d.send_fail(did, 502, "x", "y")
        elif op == "cancel" and w.g.inbound:
            did = data.draw(st.sampled_from(sorted(w.g.inbound)))
            w.g.cancel(did)
            w.cancelled.add(did)
            w.unconsumed[did] = 0
        elif op in ("to_d", "to_g"):
            w.deliver(data.draw(st.integers(1, 5)), to_daemon=op == "to_d")
        w.collect()
        w.check()
    # Everything ends and arrives: both ends agree nothing is in flight.
    while w.to_daemon or w.to_gateway or w.d.outbound:
        w.deliver(len(w.to_daemon), to_daemon=True)
        for did in sorted(w.d.outbound):
            w.d.send_end(did, 200)
        w.collect()
        w.deliver(len(w.to_gateway), to_daemon=False)
    w.check()
    assert w.g.in_flight == 0 and w.d.in_flight == 0
    for did, sent in w.sent.items():
        if did not in w.cancelled:  # all of it arrived, in order
            assert w.received[did] == sent
