"""Real parts for the tunnel tests: ``serve_tunnel`` under uvicorn on a loopback port, a
stub backend implementing :class:`daemon.backends.base.Backend`, a stub dispatch verifier,
and a raw daemon (a bare WebSocket client speaking frames) for misbehaviour."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection
from typing import Any

import msgspec
import uvicorn
from websockets.asyncio.client import ClientConnection, connect

from daemon.backends.base import Advertisement, BackendReply
from daemon.backends.errors import BackendError, BackendUnavailable
from daemon.reconnect import Backoff
from daemon.runner import DaemonRunner
from daemon.tokens import DispatchRefused
from daemon.tunnel.frames import Frame, Hello, Welcome, decode_frame, encode_frame
from gateway.redis_server import free_port
from gateway.tunnel.session import GatewayTunnelSession, serve_tunnel
from gateway.tunnel.types import Chunk, DispatchEvent, DispatchHandle, DispatchRequest

RUNTIME = "lat_test1"
CREDENTIAL = "lrt_test1_secret"
TASK = "chat-completion"
MODEL = "llama-3.2-3b-instruct"


class Runtime(msgspec.Struct, frozen=True):
    id: str


class TunnelGateway:
    """One gateway process's tunnel endpoint: ``serve_tunnel`` on uvicorn."""

    def __init__(self, *, heartbeat_s: float = 0.5, dead_after_s: float = 3.0, **kw: Any) -> None:
        self.credentials = {CREDENTIAL: RUNTIME}
        self.heartbeat_s, self.dead_after_s = heartbeat_s, dead_after_s
        self.options = kw
        self.sessions: dict[str, GatewayTunnelSession] = {}
        self.hellos: asyncio.Queue[GatewayTunnelSession] = asyncio.Queue()
        self.closed: asyncio.Queue[GatewayTunnelSession] = asyncio.Queue()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def authenticate(self, credential: str) -> Runtime | None:
        runtime_id = self.credentials.get(credential)
        return Runtime(runtime_id) if runtime_id else None

    async def on_hello(self, session: GatewayTunnelSession, hello: Hello) -> None:
        self.sessions[session.runtime_id] = session
        self.hellos.put_nowait(session)

    async def on_closed(self, session: GatewayTunnelSession) -> None:
        if self.sessions.get(session.runtime_id) is session:
            del self.sessions[session.runtime_id]
        self.closed.put_nowait(session)

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket" and scope["path"] == "/v1/tunnel"
        await serve_tunnel(
            scope,
            receive,
            send,
            authenticate=self.authenticate,
            on_hello=self.on_hello,
            on_closed=self.on_closed,
            heartbeat_s=self.heartbeat_s,
            dead_after_s=self.dead_after_s,
            **self.options,
        )

    async def start(self) -> None:
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            lifespan="off",
            interface="asgi3",
            log_level="warning",
            ws="websockets-sansio",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            for session in list(self.sessions.values()):
                await session.close("test over")
            self._server.should_exit = True
            await self._task

    async def session(self, timeout: float = 5.0) -> GatewayTunnelSession:
        """The next session that says hello."""
        async with asyncio.timeout(timeout):
            return await self.hellos.get()


@contextlib.asynccontextmanager
async def gateways(n: int = 1, **kw: Any) -> AsyncIterator[list[TunnelGateway]]:
    gws = [TunnelGateway(**kw) for _ in range(n)]
    for gw in gws:
        await gw.start()
    try:
        yield gws
    finally:
        for gw in gws:
            await gw.stop()


class StubBackend:
    """A :class:`~daemon.backends.base.Backend` driven by the request body (JSON):
    ``{"chunks": n, "size": bytes, "delay": s, "fail": status}``; counts what was pulled."""

    def __init__(self, *, concurrency: int = 512) -> None:
        self.concurrency = concurrency
        self.pulled_bytes = 0
        self.open_streams = 0
        self.finalized = 0
        self.calls = 0

    async def describe(self) -> Advertisement:
        return Advertisement(
            task_classes=(TASK,), models=(MODEL,), default_model=MODEL, concurrency=self.concurrency
        )

    async def call(self, task: str, model: str, body: bytes) -> BackendReply:
        self.calls += 1
        spec = msgspec.json.decode(body) if body else {}
        await asyncio.sleep(spec.get("delay", 0))
        if "fail" in spec:
            raise BackendError("the backend broke", status=spec["fail"], code="backend_error")
        return BackendReply(status=200, body=b"r" * spec.get("size", 10))

    async def stream(self, task: str, model: str, body: bytes) -> AsyncGenerator[bytes, None]:
        spec = msgspec.json.decode(body) if body else {}
        if "fail" in spec:
            raise BackendUnavailable("the backend is down")
        self.open_streams += 1
        try:
            for i in range(spec.get("chunks", 3)):
                if spec.get("delay"):
                    await asyncio.sleep(spec["delay"])
                payload = (b"%d:" % i).ljust(spec.get("size", 16), b".")
                self.pulled_bytes += len(payload)
                yield payload
        finally:
            self.open_streams -= 1
            self.finalized += 1

    async def aclose(self) -> None:
        pass


class StubVerifier:
    """Accepts tokens ``ok``; refuses ``refuse:<reason>`` with that reason."""

    def __init__(self) -> None:
        self.verified = 0

    async def verify(
        self,
        token: str,
        *,
        runtime_id: str,
        dispatch_id: str,
        task: str,
        model: str,
        advertised_tasks: Collection[str],
        advertised_models: Collection[str],
    ) -> object:
        self.verified += 1
        if token.startswith("refuse:"):
            raise DispatchRefused(token.removeprefix("refuse:"))  # type: ignore[arg-type]
        assert runtime_id == RUNTIME and task in advertised_tasks and model in advertised_models
        return None


def make_runner(
    urls: list[str], backend: StubBackend | None = None, credential: str = CREDENTIAL, **kw: Any
) -> tuple[DaemonRunner, StubBackend, StubVerifier]:
    backend = backend or StubBackend()
    verifier = StubVerifier()
    kw.setdefault("backoff", Backoff(base_s=0.05, cap_s=0.2))
    runner = DaemonRunner(
        urls, credential, backend, lambda base: verifier, runtime_id=RUNTIME, **kw
    )
    return runner, backend, verifier


@contextlib.asynccontextmanager
async def running(runner: DaemonRunner) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``runner`` in a task; drain it (or cancel it) on the way out."""
    task = asyncio.create_task(runner.run())
    try:
        yield task
    finally:
        if not task.done():
            runner.drain()
            try:
                async with asyncio.timeout(5):
                    await task
            except TimeoutError:
                task.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await task


_ids = iter(range(10**9))


def request(
    spec: dict[str, Any] | None = None,
    *,
    stream: bool = True,
    token: str = "ok",
    deadline_s: float = 30.0,
) -> DispatchRequest:
    return DispatchRequest(
        dispatch_id=f"dsp_{next(_ids):08x}",
        runtime_id=RUNTIME,
        task=TASK,
        model=MODEL,
        body=msgspec.json.encode(spec or {}),
        stream=stream,
        token=token,
        deadline_ms=int((time.time() + deadline_s) * 1000),
    )


async def collect(handle: DispatchHandle, timeout: float = 10.0) -> list[DispatchEvent]:
    events: list[DispatchEvent] = []
    async with asyncio.timeout(timeout):
        async for event in handle:
            events.append(event)
    return events


async def until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def body_of(events: list[DispatchEvent]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Chunk))


class RawDaemon:
    """A bare WebSocket client speaking frames by hand (to misbehave on purpose)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, gw: TunnelGateway, credential: str = CREDENTIAL
    ) -> AsyncIterator[RawDaemon]:
        url = gw.url.replace("http://", "ws://") + "/v1/tunnel"
        headers = {"Authorization": f"Bearer {credential}"}
        async with connect(url, additional_headers=headers, compression=None) as ws:
            yield cls(ws)

    async def send(self, frame: Frame) -> None:
        await self.ws.send(encode_frame(frame))

    async def recv(self, timeout: float = 5.0) -> Frame:
        async with asyncio.timeout(timeout):
            message = await self.ws.recv()
        assert isinstance(message, bytes)
        return decode_frame(message)

    async def hello(self, concurrency: int = 8) -> Welcome:
        await self.send(Hello((1,), "raw", (TASK,), (MODEL,), MODEL, concurrency, 1 << 20))
        welcome = await self.recv()
        assert isinstance(welcome, Welcome)
        return welcome
