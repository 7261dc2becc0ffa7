"""The gateway's tunnel session over real loopback WebSockets (uvicorn + serve_tunnel), driven
by the real daemon runner or, to misbehave, by a raw frame-speaking client."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from daemon.tunnel import CloseCode
from daemon.tunnel.frames import (
    DEFAULT_WINDOW,
    Close,
    Data,
    Dispatch,
    End,
    Ping,
    Pong,
)
from gateway.tunnel.types import Chunk, Failed, Finished, TunnelClosed
from tests.integration.tunnel_harness import (
    MODEL,
    RUNTIME,
    TASK,
    RawDaemon,
    body_of,
    collect,
    gateways,
    make_runner,
    request,
    running,
)


async def test_stream_and_call_round_trip() -> None:
    async with gateways() as (gw,):
        runner, _, verifier = make_runner([gw.url])
        async with running(runner):
            session = await gw.session()
            assert session.runtime_id == RUNTIME and session.accepting
            assert session.hello is not None and session.hello.models == (MODEL,)
            events = await collect(await session.open(request({"chunks": 3, "size": 5})))
            assert events == [Chunk(b"0:..."), Chunk(b"1:..."), Chunk(b"2:..."), Finished(200)]
            big = 300_000  # split into Data frames of at most window/2
            events = await collect(await session.open(request({"size": big}, stream=False)))
            assert body_of(events) == b"r" * big and events[-1] == Finished(200)
            assert max(len(e.data) for e in events if isinstance(e, Chunk)) <= DEFAULT_WINDOW // 2
            assert verifier.verified == 2


async def test_300_concurrent_streams_are_multiplexed() -> None:
    async with gateways() as (gw,):
        runner, backend, _ = make_runner([gw.url])
        async with running(runner):
            session = await gw.session()
            spec = {"chunks": 20, "size": 64, "delay": 0.001}
            handles = [await session.open(request(spec)) for _ in range(300)]
            results = await asyncio.gather(*(collect(h, timeout=30) for h in handles))
            for events in results:
                assert len(events) == 21 and events[-1] == Finished(200)
                assert [e.data[:3] for e in events[:3]] == [b"0:.", b"1:.", b"2:."]  # type: ignore[union-attr]
            assert session.in_flight == 0 and backend.open_streams == 0


async def test_a_slow_consumer_bounds_what_the_daemon_pulls() -> None:
    window = 16 * 1024
    async with gateways(window=window) as (gw,):
        runner, backend, _ = make_runner([gw.url])
        async with running(runner):
            session = await gw.session()
            handle = await session.open(request({"chunks": 400, "size": 1000}))
            first = await anext(aiter(handle))
            assert isinstance(first, Chunk)
            await asyncio.sleep(0.3)  # the consumer stalls; the daemon must stop
            # Credited: the window, plus the one chunk we took (not yet returned: < half a
            # window), plus at most one chunk pulled and waiting for credit.
            assert backend.pulled_bytes <= window + 2 * 1000
            stalled = backend.pulled_bytes
            await asyncio.sleep(0.2)
            assert backend.pulled_bytes == stalled
            rest = await collect(handle)
            assert len(rest) == 400 and rest[-1] == Finished(200)
            assert backend.pulled_bytes == 400 * 1000


async def test_cancel_stops_the_backend() -> None:
    async with gateways() as (gw,):
        runner, backend, _ = make_runner([gw.url])
        async with running(runner):
            session = await gw.session()
            handle = await session.open(request({"chunks": 10_000, "delay": 0.01}))
            assert isinstance(await anext(aiter(handle)), Chunk)
            await handle.cancel()
            assert [e async for e in handle] == [Failed(499, "dispatch_cancelled", "Cancelled.")]
            async with asyncio.timeout(3):
                while backend.finalized < 1 or session.in_flight:
                    await asyncio.sleep(0.01)
            assert backend.open_streams == 0 and backend.pulled_bytes < 10_000 * 16


@pytest.mark.parametrize("how", ["silent", "abort"])
async def test_a_dead_daemon_fails_in_flight_dispatches(how: str) -> None:
    async with gateways(heartbeat_s=0.2, dead_after_s=1.0) as (gw,), RawDaemon.connect(gw) as raw:
        await raw.hello()
        session = await gw.session()
        handles = [await session.open(request()) for _ in range(3)]
        assert isinstance(await raw.recv(), Dispatch)
        started = time.monotonic()
        if how == "abort":
            raw.ws.transport.abort()  # the process died: the socket just goes
        # else: stop reading and writing (kill -STOP, a hung machine)
        for handle in handles:
            (event,) = await collect(handle, timeout=3)
            assert isinstance(event, Failed) and event.status == 502
            assert event.code == "tunnel_closed"
        assert time.monotonic() - started < (1.6 if how == "silent" else 0.5)
        closed = await asyncio.wait_for(gw.closed.get(), 3)
        assert closed is session and not session.accepting
        with pytest.raises(TunnelClosed):
            await session.open(request())


async def test_heartbeats_keep_a_quiet_tunnel_alive() -> None:
    async with gateways(heartbeat_s=0.1, dead_after_s=0.5) as (gw,), RawDaemon.connect(gw) as raw:
        welcome = await raw.hello()
        assert (welcome.heartbeat_ms, welcome.dead_after_ms) == (100, 500)
        session = await gw.session()
        deadline = time.monotonic() + 1.2
        pings = 0
        while time.monotonic() < deadline:  # answer pings, send nothing else
            frame = await raw.recv(timeout=0.5)
            if isinstance(frame, Ping):
                pings += 1
                await raw.send(Pong(frame.nonce))
                await raw.send(Ping(frame.nonce))  # our own heartbeat
            else:
                assert frame == Pong(frame.nonce)  # type: ignore[union-attr]
        assert session.accepting and pings >= 5


async def test_data_for_a_foreign_dispatch_is_a_protocol_error() -> None:
    async with gateways() as (gw,), RawDaemon.connect(gw) as raw:
        await raw.hello()
        session = await gw.session()
        handle = await session.open(request())
        dispatch = await raw.recv()
        assert isinstance(dispatch, Dispatch)
        await raw.send(Data("dsp_someone_else", b"stolen"))
        close = await raw.recv()
        assert isinstance(close, Close) and close.code == CloseCode.PROTOCOL_ERROR
        assert "not open on this tunnel" in close.reason
        with pytest.raises(ConnectionClosed) as info:
            await raw.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1002
        (event,) = await collect(handle)
        assert isinstance(event, Failed) and event.code == "tunnel_closed"


async def test_data_beyond_the_credit_is_a_protocol_error() -> None:
    async with gateways(window=4096) as (gw,), RawDaemon.connect(gw) as raw:
        welcome = await raw.hello()
        assert welcome.window == 4096
        session = await gw.session()
        await session.open(request())
        dispatch = await raw.recv()
        assert isinstance(dispatch, Dispatch)
        for _ in range(3):
            await raw.send(Data(dispatch.id, b"x" * 2000))
        close = await raw.recv()
        assert isinstance(close, Close) and "flow control" in close.reason


async def test_text_messages_and_garbage_close_the_tunnel() -> None:
    async with gateways() as (gw,):
        async with RawDaemon.connect(gw) as raw:
            await raw.hello()
            await raw.ws.send("hello?")
            close = await raw.recv()
            assert isinstance(close, Close) and close.reason == "a text message"
        async with RawDaemon.connect(gw) as raw:
            await raw.ws.send(b"\x93garbage")
            close = await raw.recv()
            assert isinstance(close, Close) and close.code == CloseCode.PROTOCOL_ERROR


async def test_unknown_credentials_are_refused_before_the_upgrade() -> None:
    async with gateways() as (gw,):
        for credential in ("lrt_wrong", ""):
            with pytest.raises(InvalidStatus) as info:
                async with RawDaemon.connect(gw, credential=credential):
                    pass
            assert info.value.response.status_code == 403
        assert gw.hellos.empty()


async def test_no_hello_in_time() -> None:
    async with gateways(hello_timeout_s=0.3) as (gw,):
        async with RawDaemon.connect(gw) as raw:
            close = await raw.recv()
            assert isinstance(close, Close) and close.reason == "no hello"
        assert gw.hellos.empty() and gw.closed.empty()  # on_closed only after on_hello


async def test_close_ends_in_flight_dispatches_within_the_second() -> None:
    async with gateways() as (gw,), RawDaemon.connect(gw) as raw:
        await raw.hello()
        session = await gw.session()
        handle = await session.open(request())
        await raw.recv()
        started = time.monotonic()
        await session.close("revoked", code=CloseCode.REVOKED)
        assert time.monotonic() - started < 1.0
        (event,) = await collect(handle, timeout=1)
        assert isinstance(event, Failed) and event.code == "tunnel_closed"
        assert "revoked" in event.message
        close = await raw.recv()
        assert close == Close(CloseCode.REVOKED, "revoked")
        assert not session.accepting
        with pytest.raises(TunnelClosed):
            await session.open(request())


async def test_open_waits_for_a_concurrency_slot() -> None:
    async with gateways() as (gw,), RawDaemon.connect(gw) as raw:
        await raw.hello(concurrency=1)
        session = await gw.session()
        first = await session.open(request())
        second = asyncio.create_task(session.open(request()))
        d1 = await raw.recv()
        assert isinstance(d1, Dispatch)
        await asyncio.sleep(0.05)
        assert not second.done()
        await raw.send(End(d1.id, 200))
        assert await collect(first) == [Finished(200)]
        handle = await asyncio.wait_for(second, 2)
        d2 = await raw.recv()
        assert isinstance(d2, Dispatch) and d2.id == handle.dispatch_id
        assert 0 < d2.timeout_ms <= 30_000 and d2.token == "ok" and d2.task == TASK


async def test_requests_past_their_deadline_or_too_large() -> None:
    async with gateways() as (gw,), RawDaemon.connect(gw) as raw:
        await raw.hello()
        session = await gw.session()
        late = await session.open(request(deadline_s=-1))
        (event,) = await collect(late)
        assert isinstance(event, Failed) and event.status == 504
        assert event.code == "personal_lattice_execution_timeout"
        huge = msgspec.structs.replace(request(), body=b"x" * (2 << 20))
        (event,) = await collect(await session.open(huge))
        assert isinstance(event, Failed) and event.status == 413
        assert session.in_flight == 0


async def test_goaway_lets_in_flight_work_finish() -> None:
    async with gateways() as (gw,):
        runner, _, _ = make_runner([gw.url])
        async with running(runner):
            session = await gw.session()
            handle = await session.open(request({"chunks": 5, "delay": 0.05}))
            await session.goaway("moving")
            assert not session.accepting
            events = await collect(handle)
            assert len(events) == 6 and events[-1] == Finished(200)
            # The daemon dialled again (the only URL) and the old tunnel closed when done.
            new = await gw.session()
            assert new is not session and new.accepting
            assert await asyncio.wait_for(gw.closed.get(), 3) is session
            assert isinstance(new.hello, type(session.hello))
