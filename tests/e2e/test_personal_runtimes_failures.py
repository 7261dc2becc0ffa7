"""Personal runtimes failing with real parts, each failure of issue 3 with its test: a
deadline passing, a daemon killed (``kill -9``), the gateway process holding the tunnel
killed, revocation, and a daemon breaking the tunnel protocol.

Requests are sent to one gateway process while the tunnel is held by another (the result is
relayed through Redis). The deadline and heartbeat tests use ``fast_stack`` (short windows);
the rest use the shared stack, plus one disposable gateway process to kill.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
from aiohttp import web
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from daemon.config import load_credentials
from daemon.runner import tunnel_url
from daemon.tunnel import CloseCode, Connection
from daemon.tunnel import events as ev
from daemon.tunnel.frames import Data, encode_frame
from gateway import keys
from gateway.cli.processes import Child, wait_http_ok
from gateway.redis_server import free_port
from tests.e2e.conftest import PairedRuntime, RuntimeFactory, Stack, start_gateway, wait_for

LLAMA = "lovelace:llama-3.2-3b-instruct"
MESSAGES: Any = [{"role": "user", "content": "Tell me about lattices."}]
#: Simulated decode steps are paced, so a dispatch is still running when the test strikes:
#: the simulator's answers are 8-24 tokens long (fewer if max_tokens says so), so one with
#: ``max_tokens=8`` takes 1.6 s, streamed or not.
PACED_SIM = ("--backend", "sim", "--sim-token-delay-ms", "200")
PACED_TOKENS = 8
#: 8 tokens at 0.5 s each: a dispatch stays in flight for 4 s, so that a loaded machine
#: cannot finish it before the test kills its holder (at 200 ms a token, a 1 s stall could).
SLOW_SIM = ("--backend", "sim", "--sim-token-delay-ms", "500")

_T = TypeVar("_T")


class HangingBackend:
    """A local OpenAI-compatible server (real HTTP on loopback) that lists the model ``hang``
    and never answers a completion; it records the requests and when each was abandoned."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[dict[str, Any]] = []
        self.abandoned: list[float] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10)

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._hang)
        # Cancel a handler whose client went away (aiohttp >= 3.9 does not by default).
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._ready.set()
        self._loop.run_forever()

    async def _models(self, request: web.Request) -> web.Response:
        card = {"id": "hang", "object": "model", "created": 0, "owned_by": "e2e"}
        return web.json_response({"object": "list", "data": [card]})

    async def _hang(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        try:
            await asyncio.Event().wait()  # never set: no answer, ever
        finally:  # aiohttp cancels the handler when the client goes away
            self.abandoned.append(time.monotonic())
        raise AssertionError("unreachable")


@dataclass
class Victim:
    """A gateway process of the shared fleet (the stack's Redis) that a test may kill."""

    url: str
    child: Child

    def kill(self) -> None:
        self.child.proc.kill()
        self.child.proc.wait(10)


@pytest.fixture(scope="module")
def hanging() -> Iterator[HangingBackend]:
    backend = HangingBackend()
    backend.start()
    yield backend
    backend.stop()


@pytest.fixture(scope="module")
def fast_runtime(fast_stack: Stack, runtimes: RuntimeFactory) -> Iterator[PairedRuntime]:
    """One runtime for the fast-window tests; each test runs its own daemon for it."""
    runtime = runtimes.pair(fast_stack, name="e2e-fast", gateway=1)
    yield runtime
    runtime.stop()


@pytest.fixture
def victim(stack: Stack, tmp_path: Path) -> Iterator[Victim]:
    port = free_port()
    child = start_gateway(port, stack.gateway_env, tmp_path / "victim.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(url + "/readyz", 60, child.proc)
        yield Victim(url, child)
    finally:
        child.stop()


def _in_thread(
    pool: ThreadPoolExecutor, call: Callable[[], _T]
) -> Future[tuple[_T | Exception, float]]:
    """Run ``call`` in ``pool``; the future gives its result (or the exception it raised)
    and when it ended (``time.monotonic()``)."""

    def run() -> tuple[_T | Exception, float]:
        try:
            result: _T | Exception = call()
        except Exception as exc:  # the test inspects it
            result = exc
        return result, time.monotonic()

    return pool.submit(run)


def _pending(stack: Stack, runtime: PairedRuntime) -> int:
    """Dispatches of ``runtime`` delivered to its holder and not finished (its queue's PEL)."""
    client = stack.sync_redis()
    try:
        info = client.xpending(keys.runtime_queue(runtime.id), keys.HOLDERS_GROUP)
    finally:
        client.close()
    return int(info["pending"])


def _drain(stream: Iterator[Any]) -> int:
    n = 0
    for _ in stream:
        n += 1
    return n


# -- 6. no result within the runtime's deadline --------------------------------------------------


def test_no_result_before_the_deadline_is_504(
    fast_stack: Stack, fast_runtime: PairedRuntime, hanging: HangingBackend
) -> None:
    backend = ("--backend", "openai", "--backend-url", hanging.base_url)
    fast_runtime.start([fast_stack.gateways[1]], *backend, "--model-map", f"{LLAMA}=hang")
    try:
        with fast_runtime.client(gateway=0) as client, ThreadPoolExecutor(2) as pool:
            started = time.monotonic()
            calls: list[Future[tuple[Any, float]]] = [
                _in_thread(
                    pool,
                    lambda: client.chat.completions.create(
                        model=fast_runtime.model, messages=MESSAGES
                    ),
                ),
                _in_thread(
                    pool,
                    lambda: client.chat.completions.create(
                        model=fast_runtime.model, messages=MESSAGES, stream=True
                    ),
                ),
            ]
            outcomes = [future.result(30) for future in calls]
        for error, ended in outcomes:
            assert isinstance(error, openai.APIStatusError), error
            assert error.status_code == 504, error.response.text
            assert error.code == "personal_lattice_execution_timeout"
            # LATTICE_RUNTIME_TIMEOUT_S=3 on these gateways
            assert 2.5 <= ended - started < 6.0, f"answered after {ended - started:.2f} s"
        assert len(hanging.received) == 2
        assert {r["model"] for r in hanging.received} == {"hang"}
        # At the deadline the work stops on the daemon too: it drops both backend requests.
        wait_for(lambda: len(hanging.abandoned) == 2, 5.0, "the daemon to abandon the requests")
        # Nothing is left in flight: SIGTERM drains at once and exits cleanly.
        stopping = time.monotonic()
        assert fast_runtime.stop() == 0
        assert time.monotonic() - stopping < 5.0
    finally:
        fast_runtime.stop()


# -- 7. the daemon killed mid-stream ----------------------------------------------------------


def test_daemon_killed_mid_stream_ends_with_a_clean_error(
    fast_stack: Stack, fast_runtime: PairedRuntime
) -> None:
    fast_runtime.start([fast_stack.gateways[1]], *PACED_SIM)
    with fast_runtime.client(gateway=0) as client, ThreadPoolExecutor(1) as pool:
        stream = client.chat.completions.create(
            model=fast_runtime.model, messages=MESSAGES, max_tokens=PACED_TOKENS, stream=True
        )
        chunks = iter(stream)
        assert next(chunks).choices and next(chunks).choices
        single = _in_thread(
            pool,
            lambda: client.chat.completions.create(
                model=fast_runtime.model, messages=MESSAGES, max_tokens=PACED_TOKENS
            ),
        )
        # Both dispatches reached the holder (gateway 1) before the kill.
        wait_for(lambda: _pending(fast_stack, fast_runtime) == 2, 2.0, "both dispatches")
        fast_runtime.kill()
        killed = time.monotonic()
        with pytest.raises(openai.APIError) as err:
            _drain(chunks)
        streamed_error_after = time.monotonic() - killed
        error, ended = single.result(10)
    # The stream's status line was sent: the error is an SSE event, then the stream closes.
    assert not isinstance(err.value, openai.APIStatusError)
    assert err.value.code == "tunnel_closed", err.value.body
    assert isinstance(error, openai.APIStatusError) and error.status_code == 502, error
    assert error.code == "tunnel_closed"
    # Within the heartbeat window (LATTICE_TUNNEL_DEAD_AFTER_S=2), well before the 3 s deadline.
    assert streamed_error_after < 2.0 and ended - killed < 2.0
    fast_runtime.wait_status("offline", timeout=5.0)


# -- 8. the gateway process holding the tunnel killed ----------------------------------------


def test_gateway_holding_the_tunnel_killed(
    stack: Stack, runtimes: RuntimeFactory, victim: Victim
) -> None:
    runtime = runtimes.pair(stack, name="e2e-failover")
    # The victim first: the daemon holds its tunnel there, and knows where else to go.
    runtime.start([victim.url, stack.gateways[0]], *SLOW_SIM)
    try:
        first_holder = runtime.holder()
        assert first_holder is not None
        with runtime.client(gateway=0) as client, ThreadPoolExecutor(1) as pool:
            stream = client.chat.completions.create(
                model=runtime.model, messages=MESSAGES, max_tokens=PACED_TOKENS, stream=True
            )
            chunks = iter(stream)
            assert next(chunks).choices and next(chunks).choices
            single = _in_thread(
                pool,
                lambda: client.chat.completions.create(
                    model=runtime.model, messages=MESSAGES, max_tokens=PACED_TOKENS
                ),
            )
            # Both in flight on the victim (each has seconds of tokens left: SLOW_SIM).
            wait_for(lambda: _pending(stack, runtime) == 2, 10.0, "both dispatches")
            victim.kill()
            killed = time.monotonic()
            # The daemon reconnects to the other process at once (backoff ≤ 0.5 s; the
            # bound leaves room for a loaded machine, and is still far below the TTLs).
            wait_for(
                lambda: runtime.holder() not in (None, first_holder), 10.0, "the daemon to move"
            )
            assert runtime.daemon is not None and runtime.daemon.alive()
            # The in-flight stream had received data from the dead holder: it ends with an
            # SSE error event once the holder's liveness key expires (5 s TTL, checked
            # every second), never hangs: well before its 120 s deadline.
            with pytest.raises(openai.APIError) as err:
                _drain(chunks)
            assert time.monotonic() - killed < keys.TUNNEL_PRESENCE_TTL_MS / 1000 + 10.0
            assert err.value.code == "tunnel_closed", err.value.body
            # Nothing of the non-streamed one had reached its caller: the new holder
            # reclaims it from the dead one's queue and runs it (ARCHITECTURE: crashed
            # consumers' work is reclaimed), so it completes instead of failing.
            result: Any
            result, _ = single.result(30)
            assert not isinstance(result, Exception), result
            assert result.choices[0].message.content
        # New requests succeed, through either process of the stack, streamed or not.
        for gateway in (0, 1):
            with runtime.client(gateway=gateway) as client:
                reply = client.chat.completions.create(
                    model=runtime.model, messages=MESSAGES, max_tokens=1
                )
                assert reply.choices[0].finish_reason == "length"
                streamed = list(
                    client.chat.completions.create(
                        model=runtime.model, messages=MESSAGES, max_tokens=1, stream=True
                    )
                )
                assert streamed[-1].choices[0].finish_reason == "length"
    finally:
        runtime.stop()


# -- 9. revocation ----------------------------------------------------------------------------


def test_revocation_closes_the_tunnel_and_the_credential_is_dead(
    stack: Stack, runtimes: RuntimeFactory
) -> None:
    runtime = runtimes.pair(stack, name="e2e-revoked")
    runtime.start([stack.gateways[1]], *PACED_SIM)
    credential = load_credentials(runtime.config_dir).credential
    with runtime.client(gateway=0) as client:
        stream = client.chat.completions.create(
            model=runtime.model, messages=MESSAGES, max_tokens=PACED_TOKENS, stream=True
        )
        chunks = iter(stream)
        assert next(chunks).choices and next(chunks).choices
        # Revoked through the process that does NOT hold the tunnel.
        revoked_at = time.monotonic()
        resp = runtime.api("DELETE", gateway=0)
        assert resp.status_code == 200 and resp.json()["status"] == "revoked"
        with pytest.raises(openai.APIError) as err:
            _drain(chunks)
        failed_after = time.monotonic() - revoked_at
        assert err.value.code == "tunnel_closed", err.value.body
    # The holder closed the tunnel (and dropped its presence) within a second...
    wait_for(lambda: runtime.holder() is None, 1.0, "the holder to close the tunnel")
    closed_after = time.monotonic() - revoked_at
    # ...with the REVOKED close code: the daemon stops for good (RunnerStopped, exit 2).
    assert runtime.wait_exit(5.0) == 2
    exited_after = time.monotonic() - revoked_at
    # Measured: ~0.05 s to fail the stream and close the tunnel, ~0.25 s to exit.
    assert failed_after < 1.0 and closed_after < 1.0 and exited_after < 2.0
    assert "revoked" in runtime.output()

    for gateway in (0, 1):
        with runtime.client(gateway=gateway) as client:
            for stream_it in (False, True):
                with pytest.raises(openai.NotFoundError) as missing:
                    client.chat.completions.create(
                        model=runtime.model, messages=MESSAGES, stream=stream_it
                    )
                assert missing.value.code == "personal_lattice_not_found"
        listed = stack.call("GET", "/v1/personal-runtimes", runtime.key, gateway=gateway).json()
        [entry] = [r for r in listed["data"] if r["id"] == runtime.id]
        assert entry["status"] == "revoked" and entry["revoked_at"] is not None

    # The credential can never connect again: the daemon gives up at once...
    runtime.start([stack.gateways[0], stack.gateways[1]], wait=False)
    assert runtime.wait_exit(30.0) == 2
    assert "refused the runtime credential" in runtime.output()
    assert runtime.status() == "revoked"

    # ...and so does a raw WebSocket upgrade with it, on either process.
    async def dial(url: str) -> int:
        headers = {"Authorization": f"Bearer {credential}"}
        with pytest.raises(InvalidStatus) as refused:
            async with connect(tunnel_url(url), additional_headers=headers):
                pass
        return refused.value.response.status_code

    for url in stack.gateways:
        assert asyncio.run(dial(url)) == 403


# -- 11. frames naming another dispatch are a protocol error ----------------------------------


def test_frame_for_a_dispatch_never_sent_closes_with_protocol_error(
    stack: Stack, runtimes: RuntimeFactory
) -> None:
    runtime = runtimes.pair(stack, name="e2e-raw")
    credential = load_credentials(runtime.config_dir).credential
    gateway = stack.gateways[1]

    async def misbehave() -> tuple[int | None, list[ev.Event]]:
        conn = Connection("daemon")
        headers = {"Authorization": f"Bearer {credential}"}
        async with connect(
            tunnel_url(gateway), additional_headers=headers, ping_interval=None, compression=None
        ) as ws:
            conn.send_hello(
                daemon_version="e2e-raw",
                task_classes=("chat-completion",),
                models=(LLAMA,),
                default_model=LLAMA,
                concurrency=4,
            )
            for data in conn.data_to_send():
                await ws.send(data)
            welcome = await asyncio.wait_for(ws.recv(), 10)
            assert isinstance(welcome, bytes)
            conn.receive_message(welcome)
            assert any(isinstance(e, ev.Welcomed) for e in conn.events_received())
            await asyncio.to_thread(runtime.wait_status, "reachable", 5.0)
            # Encoded by hand: the Connection itself refuses to send for an unknown id.
            await ws.send(encode_frame(Data(id="dsp_" + "0" * 32, payload=b'{"forged": 1}')))
            with pytest.raises(ConnectionClosed):
                while True:
                    message = await asyncio.wait_for(ws.recv(), 10)
                    assert isinstance(message, bytes)
                    conn.receive_message(message)
            return ws.close_code, conn.events_received()

    close_code, events = asyncio.run(misbehave())
    assert close_code == 1002
    closes = [e for e in events if isinstance(e, ev.PeerClosed)]
    assert closes and closes[0].code == CloseCode.PROTOCOL_ERROR
    # The gateway process keeps serving: the runtime went offline, nothing else did.
    assert stack.gateway_children[1].alive()
    runtime.wait_status("offline", timeout=5.0)
    assert httpx.get(gateway + "/readyz", timeout=5).status_code == 200
    with stack.client(base_url=gateway + "/v1") as client:
        assert client.chat.completions.create(model=LLAMA, messages=MESSAGES).choices
    assert json.loads(runtime.api().text)["status"] == "offline"
