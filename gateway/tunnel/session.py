"""The gateway's end of one tunnel: asyncio I/O around the sans-I/O :mod:`daemon.tunnel`.

:func:`serve_tunnel` is a raw ASGI WebSocket handler for ``GET /v1/tunnel`` (RFC 6455
upgrade). It authenticates the daemon from ``Authorization: Bearer lrt_…`` *before* accepting
(a refused credential gets ``websocket.close`` 4401, which ASGI servers send as HTTP 403),
waits for the Hello (the protocol queues the Welcome), hands the
:class:`GatewayTunnelSession` to ``on_hello`` (the lead registers it), then pumps frames and
ticks heartbeats with the event loop's clock until the tunnel ends, and calls ``on_closed``.

The session implements :class:`~gateway.tunnel.types.TunnelSession`: :meth:`open` sends a
Dispatch (waiting for a concurrency slot if the daemon's advertised concurrency is in use)
and returns a :class:`SessionHandle`. Each handle queues what arrives for it; the protocol's
per-dispatch credit bounds that queue to one window (256 KiB by default), and taking a chunk
from the handle is what returns credit to the daemon — a slow HTTP client stops the daemon,
never grows a buffer here. Deadlines are the caller's (``DispatchRequest.deadline_ms`` is sent
as the Dispatch's relative ``timeout_ms``; the caller cancels the handle when it passes).

Whatever ends the tunnel — Close from the daemon, a protocol error, no frame for
``dead_after_s`` (a killed daemon), the socket closing, :meth:`close` — every in-flight handle
ends with ``Failed(502, "tunnel_closed")`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from daemon.tunnel import CloseCode, Connection, FrameTooLarge, TunnelUsageError, UnknownDispatch
from daemon.tunnel import events as ev
from daemon.tunnel.frames import (
    DEFAULT_GATEWAY_MAX_FRAME,
    DEFAULT_WINDOW,
    Hello,
    websocket_close_code,
)
from gateway.tunnel.ticker import SessionTicker
from gateway.tunnel.types import (
    Chunk,
    DispatchEvent,
    DispatchRequest,
    Failed,
    Finished,
    TunnelClosed,
)

__all__ = ["GatewayTunnelSession", "RuntimeInfo", "SessionHandle", "serve_tunnel", "tick_interval"]

log = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
_CLOSE_FLUSH_S = 0.5  # how long the final Close frame may take to go out


class RuntimeInfo(Protocol):
    """What ``authenticate`` returns for a valid credential (``RuntimeRecord`` fits)."""

    @property
    def id(self) -> str: ...


def _tunnel_closed(message: str) -> Failed:
    return Failed(status=502, code="tunnel_closed", message=message)


class SessionHandle:
    """One dispatch in flight on a local tunnel (a :class:`~gateway.tunnel.types.DispatchHandle`).

    Iterating yields ``Chunk*`` then exactly one ``Finished`` or ``Failed``. Taking a chunk
    grants its bytes back to the daemon. :meth:`cancel` (or :meth:`aclose`) sends Cancel; a
    caller that stops iterating must call it, else the dispatch holds a slot until it ends.
    """

    def __init__(self, session: GatewayTunnelSession, request: DispatchRequest) -> None:
        self._session = session
        self.request = request
        self.dispatch_id = request.dispatch_id
        self._queue: deque[DispatchEvent] = deque()
        self._ready = asyncio.Event()
        self._terminal = False  # a terminal event is queued
        self._done = False  # the terminal event was taken

    def push(self, event: DispatchEvent) -> None:
        """Queue an event (the session's side); nothing after the terminal one."""
        if self._terminal:
            return
        self._terminal = not isinstance(event, Chunk)
        self._queue.append(event)
        self._ready.set()

    def __aiter__(self) -> SessionHandle:
        return self

    async def __anext__(self) -> DispatchEvent:
        if self._done:
            raise StopAsyncIteration
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        event = self._queue.popleft()
        if isinstance(event, Chunk):
            self._session._consumed(self.dispatch_id, len(event.data))
        else:
            self._done = True
        return event

    async def cancel(self) -> None:
        """Cancel the dispatch (idempotent; a no-op once it ended). Iterating afterwards
        yields ``Failed(499, "dispatch_cancelled")``."""
        if self._terminal:
            return
        self._session._cancel(self.dispatch_id)
        self._queue.clear()
        self.push(Failed(status=499, code="dispatch_cancelled", message="Cancelled."))

    async def aclose(self) -> None:
        await self.cancel()


class GatewayTunnelSession:
    """A tunnel held by this process (:class:`~gateway.tunnel.types.TunnelSession`)."""

    def __init__(self, conn: Connection, send: Send, runtime: RuntimeInfo) -> None:
        self.runtime = runtime
        self.runtime_id = runtime.id
        self.hello: Hello | None = None
        self._conn = conn
        self._send = send
        self._handles: dict[str, SessionHandle] = {}
        self._slot_freed = asyncio.Event()
        self._output = asyncio.Event()
        self._opened = asyncio.Event()  # the Hello arrived, or the tunnel is over
        self._ended = asyncio.Event()  # the tunnel is over (any reason)
        self._finished = asyncio.Event()  # serve_tunnel has cleaned up
        self._end_reason = ""
        self._main: asyncio.Task[Any] | None = None

    # -- TunnelSession -------------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """False once the daemon drains, a GoAway was sent, or the tunnel is closing."""
        return self._conn.accepting and not self._ended.is_set()

    @property
    def in_flight(self) -> int:
        """Dispatches the daemon is working on (cancelled ones count until they end)."""
        return self._conn.in_flight

    @property
    def concurrency(self) -> int:
        """What the daemon advertised."""
        return self._conn.concurrency

    async def open(self, request: DispatchRequest) -> SessionHandle:
        """Send ``request`` to the daemon; raises :class:`TunnelClosed` when the tunnel takes
        no new work. Waits (without bound: the caller's deadline applies) while the daemon's
        concurrency is in use. A request past its deadline, or too large for the daemon's
        ``max_frame``, gives a handle that yields ``Failed`` (504 / 413) at once."""
        conn = self._conn
        while self.accepting and conn.in_flight >= conn.concurrency:
            self._slot_freed.clear()
            await self._slot_freed.wait()
        if not self.accepting:
            raise TunnelClosed(self._end_reason or "the runtime is draining")
        handle = SessionHandle(self, request)
        timeout_ms = request.deadline_ms - int(time.time() * 1000)
        if timeout_ms <= 0:
            handle.push(_timeout())
            return handle
        try:
            conn.send_dispatch(
                dispatch_id=request.dispatch_id,
                token=request.token,
                task=request.task,
                model=request.model,
                stream=request.stream,
                body=request.body,
                timeout_ms=timeout_ms,
            )
        except FrameTooLarge:
            message = "The request is too large for the personal runtime."
            handle.push(Failed(status=413, code="request_too_large", message=message))
            return handle
        except UnknownDispatch:  # the same dispatch delivered twice (at-least-once queues)
            message = "This dispatch is already running on the runtime."
            handle.push(Failed(status=409, code="duplicate_dispatch", message=message))
            return handle
        except TunnelUsageError as exc:
            raise TunnelClosed(str(exc)) from None
        self._handles[request.dispatch_id] = handle
        self._output.set()
        return handle

    async def close(self, reason: str, *, code: int = CloseCode.GOING_AWAY) -> None:
        """Send Close (``code``: GOING_AWAY by default, REVOKED on revocation: the daemon
        then stops instead of reconnecting) and end every in-flight dispatch with
        ``Failed(502, "tunnel_closed")`` now; returns once the socket is closed (≤ ~1 s)."""
        self._conn.close(code, reason)
        self._end(f"The runtime's tunnel closed ({reason}).")
        if self._main is not None and asyncio.current_task() is not self._main:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._finished.wait()

    async def goaway(self, reason: str = "") -> None:
        """Ask the daemon to reconnect elsewhere for new work (gateway shutdown); in-flight
        dispatches finish here and the daemon closes when they are done."""
        with contextlib.suppress(TunnelUsageError):
            self._conn.send_goaway(reason)
            self._output.set()

    # -- handles' side ---------------------------------------------------------------------

    def _consumed(self, dispatch_id: str, nbytes: int) -> None:
        with contextlib.suppress(TunnelUsageError):
            self._conn.consumed(dispatch_id, nbytes)
            if self._conn.wants_write:  # credit goes back in batches, not per chunk
                self._output.set()

    def _cancel(self, dispatch_id: str) -> None:
        self._handles.pop(dispatch_id, None)
        self._conn.cancel(dispatch_id)
        self._output.set()

    # -- the pumps (serve_tunnel) ---------------------------------------------------------------

    def _end(self, message: str) -> None:
        """The tunnel is over: fail every in-flight dispatch and wake everyone."""
        if not self._ended.is_set():
            self._end_reason = message
            self._ended.set()
            self._opened.set()
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.push(_tunnel_closed(message))
        self._slot_freed.set()
        self._output.set()

    def _on_events(self, events: list[ev.Event]) -> None:
        for event in events:
            if isinstance(event, ev.DataReceived):  # the hot path first
                handle = self._handles.get(event.id)
                if handle is not None:
                    handle.push(Chunk(data=event.payload))
            elif isinstance(event, ev.HelloReceived):
                self._opened.set()
            elif isinstance(event, (ev.DispatchEnded, ev.DispatchFailed)):
                handle = self._handles.pop(event.id, None)
                if handle is not None:
                    handle.push(_result(event))
                self._slot_freed.set()
            elif isinstance(event, ev.PeerDraining):
                self._slot_freed.set()  # waiters in open() see accepting == False
            elif isinstance(event, ev.PeerClosed):
                self._end(f"The runtime closed its tunnel ({event.reason or event.code}).")
            elif isinstance(event, ev.PeerDead):
                self._end(f"The runtime stopped responding ({event.silence_s:.1f} s).")
            elif isinstance(event, ev.ProtocolError):
                log.warning(
                    "tunnel protocol error",
                    extra={"runtime_id": self.runtime_id, "reason": event.reason},
                )
                self._end("The runtime's tunnel failed (protocol error).")
        if self._conn.closed:
            self._end(self._end_reason or "The runtime's tunnel closed.")
        if self._conn.wants_write:
            self._output.set()

    async def _read(self, receive: Receive) -> None:
        while not self._ended.is_set():
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self._end("The runtime's connection closed.")
                return
            data = message.get("bytes")
            if data is None:  # the tunnel is binary-only
                self._conn.fail("a text message")
            else:
                self._conn.receive_message(data)
            self._on_events(self._conn.events_received())

    async def _write(self) -> None:
        # OSError covers uvicorn's ClientDisconnected; RuntimeError is what ASGI servers raise
        # for a send after the socket closed.
        with contextlib.suppress(OSError, RuntimeError):
            while True:
                await self._output.wait()
                self._output.clear()
                for data in self._conn.data_to_send():
                    await self._send({"type": "websocket.send", "bytes": data})

    def tick(self, now: float) -> None:
        """Advance the protocol's clock (the process's :class:`SessionTicker` calls this)."""
        if self._ended.is_set():
            return
        self._conn.tick(now)
        self._on_events(self._conn.events_received())


def tick_interval(heartbeat_s: float, dead_after_s: float) -> float:
    """How often a session must be ticked for these heartbeat terms (see serve_tunnel)."""
    return min(heartbeat_s / 2, dead_after_s / 8, 1.0)


def _result(event: ev.DispatchEnded | ev.DispatchFailed) -> DispatchEvent:
    if isinstance(event, ev.DispatchEnded):
        return Finished(status=event.status)
    return Failed(status=event.status, code=event.code, message=event.message)


def _timeout() -> Failed:
    return Failed(
        status=504,
        code="personal_lattice_execution_timeout",
        message="The personal runtime did not finish the request before its deadline.",
    )


def _bearer(scope: Message) -> str | None:
    for name, value in scope.get("headers", []):
        if bytes(name).lower() == b"authorization":
            scheme, _, credential = bytes(value).decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credential.strip():
                return credential.strip()
    return None


async def serve_tunnel(
    scope: Message,
    receive: Receive,
    send: Send,
    *,
    authenticate: Callable[[str], Awaitable[RuntimeInfo | None]],
    on_hello: Callable[[GatewayTunnelSession, Hello], Awaitable[None]],
    on_closed: Callable[[GatewayTunnelSession], Awaitable[None]],
    heartbeat_s: float = 5.0,
    dead_after_s: float = 12.0,
    window: int = DEFAULT_WINDOW,
    max_frame: int = DEFAULT_GATEWAY_MAX_FRAME,
    hello_timeout_s: float = 10.0,
    ticker: SessionTicker | None = None,
) -> None:
    """Serve one daemon's tunnel on an ASGI ``websocket`` scope (see the module docstring).

    ``authenticate`` may raise (e.g. Redis down): the upgrade then fails with HTTP 500 and the
    daemon retries later, whereas a ``None`` (bad or revoked credential) is a 403 that makes
    it stop. ``on_closed`` runs only for a session that reached ``on_hello``.

    Heartbeats tick every ``min(heartbeat_s / 2, dead_after_s / 8, 1 s)`` (``ticker``: the
    process's shared :class:`SessionTicker`, which should tick at that interval; without one
    the session gets a ticker of its own), and the protocol
    dates a receipt by the tick after it, so a silent daemon is declared dead at most
    ``dead_after_s`` + two ticks after its last frame: 14 s with the defaults (issue 3 asks
    for 15). A daemon whose process dies is noticed at once: its OS closes the socket.
    """
    if (await receive())["type"] != "websocket.connect":
        return
    credential = _bearer(scope)
    runtime = await authenticate(credential) if credential else None
    if runtime is None:
        await send({"type": "websocket.close", "code": CloseCode.UNAUTHORIZED})
        return
    await send({"type": "websocket.accept"})
    conn = Connection(
        "gateway",
        runtime_id=runtime.id,
        window=window,
        max_frame=max_frame,
        heartbeat_s=heartbeat_s,
        dead_after_s=dead_after_s,
    )
    session = GatewayTunnelSession(conn, send, runtime)
    session._main = asyncio.current_task()
    own_ticker = ticker is None
    if ticker is None:
        ticker = SessionTicker(tick_interval(heartbeat_s, dead_after_s), slots=1)
    tasks = [
        asyncio.create_task(session._read(receive)),
        asyncio.create_task(session._write()),
    ]
    for task in tasks:  # a pump that stops (socket gone) ends the tunnel
        task.add_done_callback(lambda _: session._end("The runtime's connection closed."))
    ticker.add(session)
    greeted = False
    try:
        async with asyncio.timeout(hello_timeout_s):
            await session._opened.wait()
        if conn.hello is not None and not session._ended.is_set():
            session.hello = conn.hello
            greeted = True
            try:
                await on_hello(session, conn.hello)
            except Exception:  # e.g. Redis down: the daemon retries later
                log.exception("tunnel registration failed", extra={"runtime_id": runtime.id})
                await session.close("gateway unavailable")
            await session._ended.wait()
    except TimeoutError:
        conn.close(CloseCode.PROTOCOL_ERROR, "no hello")
        session._end("no hello")
    finally:
        ticker.discard(session)
        if own_ticker:
            await ticker.aclose()
        session._end(session._end_reason or "The runtime's tunnel closed.")
        await _shut(session, conn, send, tasks)
        session._finished.set()
        if greeted:
            await on_closed(session)


async def _shut(
    session: GatewayTunnelSession, conn: Connection, send: Send, tasks: list[asyncio.Task[None]]
) -> None:
    """Stop the pumps, send what is left (the Close frame) and close the WebSocket."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if not conn.closed:
        conn.close(CloseCode.GOING_AWAY, "gateway closing")
    code = websocket_close_code(conn.close_frame.code if conn.close_frame else CloseCode.NORMAL)
    with contextlib.suppress(TimeoutError, OSError, RuntimeError):
        async with asyncio.timeout(_CLOSE_FLUSH_S):
            for data in conn.data_to_send():
                await send({"type": "websocket.send", "bytes": data})
            await send({"type": "websocket.close", "code": code})
