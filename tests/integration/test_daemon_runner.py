"""The daemon runner against real loopback gateways (uvicorn + serve_tunnel): reconnects,
refusals, deadlines, backend errors, drain."""

from __future__ import annotations

import asyncio
import time

import pytest

from daemon.runner import RunnerStopped
from daemon.tunnel import CloseCode
from daemon.tunnel.frames import DEFAULT_WINDOW, decode_frame
from gateway.redis_server import free_port
from gateway.tunnel.types import Chunk, Failed, Finished, TunnelClosed
from tests.integration.tunnel_harness import (
    RUNTIME,
    body_of,
    collect,
    gateways,
    make_runner,
    request,
    running,
    until,
)


async def test_gateway_closes_and_the_daemon_moves_to_the_second_url() -> None:
    async with gateways(2) as (gw1, gw2):
        runner, _, _ = make_runner([gw1.url, gw2.url])
        async with running(runner):
            first = await gw1.session()
            await first.close("restarting")
            second = await gw2.session()
            assert second.runtime_id == RUNTIME
            await until(lambda: runner.connected_urls == [gw1.url, gw2.url])
            events = await collect(await second.open(request({"chunks": 2})))
            assert events[-1] == Finished(200)


async def test_a_gateway_that_goes_away_is_replaced() -> None:
    async with gateways(2) as (gw1, gw2):
        runner, _, _ = make_runner([gw1.url, gw2.url])
        async with running(runner):
            session = await gw1.session()
            handle = await session.open(request({"chunks": 1000, "delay": 0.01}))
            await gw1.stop()  # the process holding the tunnel exits
            events = await collect(handle)
            assert isinstance(events[-1], Failed) and events[-1].code == "tunnel_closed"
            await gw2.session()


async def test_an_unreachable_url_is_skipped_with_backoff() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with gateways() as (gw,):
        runner, _, _ = make_runner([dead, gw.url])
        async with running(runner):
            await gw.session()
            await until(lambda: runner.connected_urls == [gw.url])
            assert runner.policy.attempt == 1


@pytest.mark.parametrize("credential", ["lrt_wrong", ""])
async def test_a_refused_credential_stops_the_runner(credential: str) -> None:
    async with gateways() as (gw,):
        runner, _, _ = make_runner([gw.url, gw.url], credential=credential)
        started = time.monotonic()
        with pytest.raises(RunnerStopped, match="HTTP 403"):
            await asyncio.wait_for(runner.run(), 5)
        assert time.monotonic() - started < 1 and gw.hellos.empty()


@pytest.mark.parametrize("reason", ["revoked", "revoked " + "é" * 300])
async def test_revocation_stops_the_runner(reason: str) -> None:
    async with gateways() as (gw,):
        runner, _, _ = make_runner([gw.url])
        task = asyncio.create_task(runner.run())
        session = await gw.session()
        handle = await session.open(request({"chunks": 1000, "delay": 0.01}))
        await session.close(reason, code=CloseCode.REVOKED)
        with pytest.raises(RunnerStopped, match="revoked"):
            await asyncio.wait_for(task, 5)
        (*_, last) = await collect(handle)
        assert isinstance(last, Failed) and last.code == "tunnel_closed"
        assert gw.hellos.empty()  # it did not dial again


async def test_a_runtime_id_mismatch_stops_the_runner() -> None:
    async with gateways() as (gw,):
        gw.credentials["lrt_other"] = "lat_other"
        runner, _, _ = make_runner([gw.url], credential="lrt_other")
        with pytest.raises(RunnerStopped, match="lat_other"):
            await asyncio.wait_for(runner.run(), 5)


async def test_a_refused_token_never_reaches_the_backend() -> None:
    async with gateways() as (gw,):
        runner, backend, _ = make_runner([gw.url])
        async with running(runner):
            session = await gw.session()
            for stream in (True, False):
                handle = await session.open(request(stream=stream, token="refuse:expired"))
                assert await collect(handle) == [Failed(403, "dispatch_refused", "expired")]
            assert backend.calls == 0 and backend.finalized == 0


async def test_the_dispatch_timeout_is_enforced_by_the_daemon() -> None:
    async with gateways() as (gw,):
        runner, backend, _ = make_runner([gw.url])
        async with running(runner):
            session = await gw.session()
            handle = await session.open(request({"chunks": 5, "delay": 5}, deadline_s=0.3))
            (event,) = await collect(handle, timeout=3)
            assert isinstance(event, Failed) and event.status == 504
            assert event.code == "personal_lattice_execution_timeout"
            handle = await session.open(request({"delay": 5}, stream=False, deadline_s=0.3))
            (event,) = await collect(handle, timeout=3)
            assert isinstance(event, Failed) and event.status == 504
            assert backend.open_streams == 0


async def test_backend_errors_are_relayed() -> None:
    async with gateways() as (gw,):
        runner, _, _ = make_runner([gw.url])
        async with running(runner):
            session = await gw.session()
            (event,) = await collect(await session.open(request({"fail": 1})))
            assert event == Failed(502, "backend_unavailable", "the backend is down")
            handle = await session.open(request({"fail": 503}, stream=False))
            assert await collect(handle) == [Failed(503, "backend_error", "the backend broke")]
            assert session.accepting


async def test_drain_finishes_in_flight_work_and_takes_none() -> None:
    async with gateways() as (gw,):
        runner, backend, _ = make_runner([gw.url])
        task = asyncio.create_task(runner.run())
        session = await gw.session()
        handles = [await session.open(request({"chunks": 10, "delay": 0.02})) for _ in range(5)]
        runner.drain()
        await until(lambda: not session.accepting)
        with pytest.raises(TunnelClosed):
            await session.open(request())
        for handle in handles:
            events = await collect(handle)
            assert [type(e) for e in events] == [Chunk] * 10 + [Finished]
        await asyncio.wait_for(task, 3)  # run() returns once the work is done
        assert await asyncio.wait_for(gw.closed.get(), 3) is session
        assert backend.open_streams == 0 and runner.in_flight == 0
        assert gw.hellos.empty()


async def test_a_non_streamed_result_travels_in_one_frame_when_it_fits() -> None:
    async with gateways() as (gw,):
        runner, _, _ = make_runner([gw.url])
        async with running(runner):
            session = await gw.session()
            conn = session._conn
            assert conn.version == 2  # the version with Result frames
            kinds: list[str] = []
            receive = conn.receive_message

            def recording(message: bytes | bytearray | memoryview) -> None:
                kinds.append(type(decode_frame(bytes(message))).__name__)
                receive(message)

            conn.receive_message = recording  # type: ignore[method-assign]
            small = await collect(await session.open(request({"size": 1000}, stream=False)))
            assert small == [Chunk(b"r" * 1000), Finished(200)]
            assert kinds == ["Result"]
            kinds.clear()
            size = DEFAULT_WINDOW  # more than one frame's payload (window / 2): in pieces
            big = await collect(await session.open(request({"size": size}, stream=False)))
            assert body_of(big) == b"r" * size and big[-1] == Finished(200)
            assert kinds == ["Data", "Data", "End"]
