"""The fake Stripe over HTTP: an aiohttp server around ``api.FakeStripeApi``.

One server answers both Stripe bases: point stripe-python's ``api`` and ``meter_events``
base addresses at :attr:`FakeStripeServer.url`. The handler decodes the request, asks the
API layer (under one lock, so a test thread may read :attr:`FakeStripeServer.state`) and
writes the answer; injected failures (``failures.py``) are carried out here, on the socket:
a ``reset`` aborts the TCP connection with an RST, a ``timeout`` holds the request until the
client closes its connection (or ``hold_s`` passes, or the server stops) and then drops it.

Use :class:`FakeStripeServer` in tests and benchmarks (a background thread with its own
event loop, like ``daemon.sim.server.SimThread``), or ``python -m billing.fake_stripe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
from aiohttp import web

from billing.fake_stripe.api import FakeStripeApi, Request
from billing.fake_stripe.failures import FailureInjector, FailureMode, FailurePlan, failure_response
from billing.fake_stripe.state import FakeStripeState

__all__ = ["FakeStripeServer", "serve"]

#: Largest request body accepted (a v2 stream call of 100 events is ~30 kB).
MAX_BODY = 4 * 1024 * 1024
_POLL_S = 0.02


class _App:
    """The aiohttp side of one fake: request handling and failure effects."""

    def __init__(self, api: FakeStripeApi, lock: threading.Lock) -> None:
        self.api = api
        self.lock = lock
        self.stopping = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        with self.lock:
            plan = self.api.failures.take(request.path)
        if plan is not None and plan.mode != "reset_after":
            return await self._fail(request, plan)
        parsed = Request(
            method=request.method,
            path=request.path,
            query=request.query_string,
            body=await request.read(),
            authorization=request.headers.get("Authorization"),
            idempotency_key=request.headers.get("Idempotency-Key"),
        )
        with self.lock:
            answer = self.api.handle(parsed)
        if plan is not None:  # reset_after: done and saved, but the answer is lost
            _abort(request)
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers)

    async def _fail(self, request: web.Request, plan: FailurePlan) -> web.StreamResponse:
        if plan.mode in ("500", "429"):
            status, body, headers = failure_response(plan)
            headers["Content-Type"] = "application/json"
            return web.Response(status=status, body=msgspec.json.encode(body), headers=headers)
        if plan.mode == "timeout":
            await self._hold(request, plan.hold_s)
        _abort(request)
        return web.Response(status=500)  # never written: the connection is gone

    async def _hold(self, request: web.Request, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while loop.time() < deadline and not self.stopping.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                return  # the client gave up
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), _POLL_S)

    async def serve(self, sock: socket.socket, started: Callable[[], None]) -> None:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        try:
            await web.SockSite(runner, sock, backlog=1024).start()
            started()
            await self.stopping.wait()
        finally:
            await runner.cleanup()


def _abort(request: web.Request) -> None:
    """Abort the connection with an RST (SO_LINGER 0), so the client sees a reset."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not on Windows)
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class FakeStripeServer:
    """The fake Stripe on a background thread; ``port=0`` picks a free port.

    :attr:`url` (the ``api_base`` and ``meter_events_api_base``) is known once :meth:`start`
    returns. :attr:`state` is the live model; read it under :meth:`locked` when requests may
    be in flight. :meth:`fail` and :meth:`reset` do in-process what ``/_fake/fail`` and
    ``/_fake/reset`` do over HTTP.
    """

    def __init__(
        self, port: int = 0, host: str = "127.0.0.1", *, clock: Callable[[], float] = time.time
    ) -> None:
        self.host = host
        self.port = port
        self.state = FakeStripeState(clock)
        self.failures = FailureInjector()
        self.api = FakeStripeApi(self.state, self.failures, base_url=lambda: self.url)
        self._lock = threading.Lock()
        self._app: _App | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> FakeStripeServer:
        sock = _listen(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name="fake-stripe", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._started.wait(0.01):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError("the fake Stripe did not start")
        return self

    def _run(self, sock: socket.socket) -> None:
        loop = self._loop = _new_loop()
        try:
            loop.run_until_complete(self._main(sock))
        finally:
            loop.close()

    async def _main(self, sock: socket.socket) -> None:
        self._app = _App(self.api, self._lock)
        await self._app.serve(sock, self._started.set)

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._app is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self._loop.call_soon_threadsafe(self._app.stopping.set)
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> FakeStripeServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @contextlib.contextmanager
    def locked(self) -> Iterator[FakeStripeState]:
        """The state, with no request being handled meanwhile."""
        with self._lock:
            yield self.state

    def fail(
        self,
        mode: FailureMode,
        count: int = 1,
        *,
        retry_after: float | None = None,
        paths: str | None = None,
        hold_s: float = 30.0,
    ) -> None:
        """Fail the next ``count`` requests (under ``paths``) with ``mode``."""
        plan = FailurePlan(mode, count, retry_after, paths, hold_s)
        with self._lock:
            self.failures.arm(plan)

    def reset(self) -> None:
        with self._lock:
            self.state.reset()
            self.failures.clear()

    def snapshot(self) -> dict[str, Any]:
        """``GET /_fake/state`` as plain Python objects."""
        with self._lock:
            result: dict[str, Any] = msgspec.to_builtins(self.state.snapshot())
            return result


def serve(host: str = "127.0.0.1", port: int = 12111) -> None:
    """Serve a fake Stripe until interrupted (blocking); prints one line when listening."""
    sock = _listen(host, port)
    url = f"http://{host}:{sock.getsockname()[1]}"
    api = FakeStripeApi(FakeStripeState(), FailureInjector(), base_url=lambda: url)

    async def main() -> None:
        app = _App(api, threading.Lock())
        await app.serve(
            sock, lambda: print(f"fake Stripe (not Stripe) listening on {url}", flush=True)
        )

    loop = _new_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
