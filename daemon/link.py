"""One tunnel of the daemon: one WebSocket to one gateway, its pumps, one task per dispatch.

:class:`Tunnel` drives the sans-I/O :class:`daemon.tunnel.Connection` over a ``websockets``
client connection that :class:`~daemon.runner.DaemonRunner` dialled (see the runner's module
docstring for what a dispatch goes through): a reader and a writer task move frames, a tick
task owns the heartbeat clock, and each Dispatch runs in its own task — verified first, then
served by the runner's backend with the tunnel's per-dispatch credit as backpressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Protocol

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from daemon.backends.base import Advertisement
from daemon.backends.errors import BackendError
from daemon.tokens import DispatchRefused
from daemon.tunnel import CloseCode, Connection, TunnelUsageError
from daemon.tunnel import events as ev
from daemon.tunnel.frames import Dispatch, websocket_close_code

if TYPE_CHECKING:
    from daemon.runner import DaemonRunner

__all__ = ["Tunnel", "Verifier"]

log = logging.getLogger("daemon.runner")

#: Close codes after which the runner stops instead of dialling again.
_FATAL_CLOSE: dict[int, str] = {
    CloseCode.UNAUTHORIZED: "the gateway refused the runtime credential",
    CloseCode.REVOKED: "the runtime was revoked",
    CloseCode.UNSUPPORTED_VERSION: "the gateway speaks no tunnel protocol version this daemon does",
}


class Verifier(Protocol):
    """What the runner needs of :class:`daemon.tokens.DispatchVerifier`."""

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
    ) -> object: ...


class _Gone(Exception):
    """The tunnel ended while a dispatch waited for credit."""


class Tunnel:
    """One WebSocket to one gateway: the pumps, and one task per dispatch."""

    def __init__(
        self,
        runner: DaemonRunner,
        url: str,
        ws: ClientConnection,
        conn: Connection,
        advert: Advertisement,
        verifier: Verifier,
    ) -> None:
        self.runner, self.url, self.ws, self.conn = runner, url, ws, conn
        self.advert, self.verifier = advert, verifier
        self.welcomed = asyncio.Event()
        self.primary_over = asyncio.Event()  # ended, or GoAway: the runner dials anew
        self.ended = asyncio.Event()
        self.finished = asyncio.Event()  # the socket is closed and every task is done
        self.fatal: str | None = None
        self.end_reason = ""
        self._output = asyncio.Event()
        self._credit: dict[str, asyncio.Event] = {}
        self._work: dict[str, asyncio.Task[None]] = {}
        self._cancelled: set[str] = set()
        self._pumps: list[asyncio.Task[None]] = []
        self._closer: asyncio.Task[None] | None = None
        self._on_finished: list[Callable[[], object]] = []

    def finished_callback(self, callback: Callable[[], object]) -> None:
        self._on_finished.append(callback)

    async def start(self) -> None:
        """Send the Hello, start the pumps, wait for the Welcome (or the end)."""
        a = self.advert
        self.conn.send_hello(
            daemon_version=self.runner.daemon_version,
            task_classes=a.task_classes,
            models=a.servable_models,
            default_model=a.default_model,
            concurrency=a.concurrency,
        )
        self._pumps = [
            asyncio.create_task(self._read()),
            asyncio.create_task(self._write()),
            asyncio.create_task(self._tick()),
        ]
        self._closer = asyncio.create_task(self._close_when_ended())
        self._output.set()
        await self.welcomed.wait()
        welcome = self.conn.welcome
        if welcome is not None and welcome.runtime_id != self.runner.runtime_id:
            self.fatal = f"the credential belongs to runtime {welcome.runtime_id}"
            self._end(self.fatal, CloseCode.NORMAL)

    def drain(self) -> None:
        """Send Drain (take no new work); close once in-flight work is done."""
        if self.conn.welcome is None:
            return  # not open yet: the runner drains it once welcomed (see _dial)
        with contextlib.suppress(TunnelUsageError):  # closed meanwhile
            self.conn.send_drain()
        self._after_change()

    async def shut(self) -> None:
        """End now (no waiting for in-flight work) and wait until everything stopped."""
        self._end("shut down", CloseCode.GOING_AWAY)
        if self._closer is None:
            await self._close_socket()
        await self.finished.wait()

    # -- events -----------------------------------------------------------------------------

    def _on_events(self, events: list[ev.Event]) -> None:
        for event in events:
            if isinstance(event, ev.Welcomed):
                self.welcomed.set()
            elif isinstance(event, ev.DispatchReceived):
                self._start(event.dispatch)
            elif isinstance(event, ev.CreditAvailable):
                waiter = self._credit.get(event.id)
                if waiter is not None:
                    waiter.set()
            elif isinstance(event, ev.CancelRequested):
                task = self._work.get(event.id)
                if task is not None:
                    self._cancelled.add(event.id)
                    task.cancel()
            elif isinstance(event, ev.GoAwayReceived):
                log.info("gateway sent goaway", extra={"url": self.url, "reason": event.reason})
                self.primary_over.set()
            elif isinstance(event, ev.PeerClosed):
                self.fatal = _FATAL_CLOSE.get(event.code)
                self._end(f"closed by the gateway: {event.code} {event.reason}")
            elif isinstance(event, ev.PeerDead):
                self._end(f"the gateway stopped responding ({event.silence_s:.1f} s)")
            elif isinstance(event, ev.ProtocolError):
                log.warning("tunnel protocol error", extra={"reason": event.reason})
                self._end(f"protocol error: {event.reason}")
        self._after_change()

    def _after_change(self) -> None:
        conn = self.conn
        # After GoAway, or once the gateway read our Drain, no Dispatch can arrive any more.
        idle = conn.in_flight == 0 and (conn.drain_acknowledged or conn.goaway_received)
        if idle and not conn.closed:
            conn.close(CloseCode.NORMAL, "drained" if conn.draining else "goaway done")
            self._end("work done")
        elif conn.closed:
            self._end(self.end_reason or "closed")
        self._output.set()

    def _end(self, reason: str, code: int = CloseCode.GOING_AWAY) -> None:
        if self.ended.is_set():
            return
        self.conn.close(code, reason)
        self.end_reason = reason
        self.ended.set()
        self.primary_over.set()
        self.welcomed.set()
        for task in self._work.values():
            task.cancel()
        for waiter in self._credit.values():
            waiter.set()
        self._output.set()

    # -- pumps --------------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                message = await self.ws.recv()
                if isinstance(message, str):  # the tunnel is binary-only
                    self.conn.fail("a text message")
                else:
                    self.conn.receive_message(message)
                self._on_events(self.conn.events_received())
        except ConnectionClosed:
            self._end("the connection closed")

    async def _write(self) -> None:
        try:
            while True:
                await self._output.wait()
                self._output.clear()
                for data in self.conn.data_to_send():
                    await self.ws.send(data)
        except ConnectionClosed:
            self._end("the connection closed")

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.conn.tick(loop.time())
            self._on_events(self.conn.events_received())
            await asyncio.sleep(min(self.conn.heartbeat_s / 2, self.conn.dead_after_s / 8, 1.0))

    async def _close_when_ended(self) -> None:
        await self.ended.wait()
        await self._close_socket()

    async def _close_socket(self) -> None:
        """Stop the pumps, flush the Close frame, close the WebSocket."""
        try:
            await asyncio.gather(*self._work.values(), return_exceptions=True)
            for task in self._pumps:
                task.cancel()
            await asyncio.gather(*self._pumps, return_exceptions=True)
            with contextlib.suppress(ConnectionClosed, OSError, TimeoutError):
                async with asyncio.timeout(2.0):
                    for data in self.conn.data_to_send():
                        await self.ws.send(data)
            close = self.conn.close_frame
            code = websocket_close_code(close.code if close else CloseCode.GOING_AWAY)
            # A WebSocket close reason fits in 123 bytes (RFC 6455 §5.5: control frames ≤ 125);
            # the full reason went in our Close frame.
            reason = (close.reason if close else "").encode()[:123].decode(errors="ignore")
            await self.ws.close(code, reason)
        finally:
            self.finished.set()
            for callback in self._on_finished:
                callback()

    # -- dispatches --------------------------------------------------------------------------

    def _start(self, dispatch: Dispatch) -> None:
        # Served even after our Drain: one that crossed it was in flight for the gateway.
        self._credit[dispatch.id] = asyncio.Event()
        task = asyncio.create_task(self._serve(dispatch))
        self._work[dispatch.id] = task
        task.add_done_callback(lambda _: self._forget(dispatch.id))

    def _forget(self, dispatch_id: str) -> None:
        self._work.pop(dispatch_id, None)
        self._credit.pop(dispatch_id, None)
        self._cancelled.discard(dispatch_id)
        self._after_change()

    def _answer(self, send: Callable[..., None], *args: object) -> None:
        with contextlib.suppress(TunnelUsageError):  # the tunnel closed meanwhile
            send(*args)
        self._after_change()

    async def _serve(self, d: Dispatch) -> None:
        fail = self.conn.send_fail
        try:
            async with asyncio.timeout(d.timeout_ms / 1000):
                await self.verifier.verify(
                    d.token,
                    runtime_id=self.runner.runtime_id,
                    dispatch_id=d.id,
                    task=d.task,
                    model=d.model,
                    advertised_tasks=self.advert.task_classes,
                    advertised_models=self.advert.servable_models,
                )
                status = await (self._stream(d) if d.stream else self._call(d))
            if status is not None:
                self._answer(self.conn.send_end, d.id, status)
        except DispatchRefused as exc:
            self._answer(fail, d.id, 403, "dispatch_refused", exc.reason)
        except TimeoutError:
            message = "The personal runtime did not finish the request in time."
            self._answer(fail, d.id, 504, "personal_lattice_execution_timeout", message)
        except BackendError as exc:
            self._answer(fail, d.id, exc.status, exc.code, exc.message)
        except _Gone:
            pass
        except asyncio.CancelledError:
            if d.id not in self._cancelled or self.ended.is_set():
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            self._answer(fail, d.id, 499, "dispatch_cancelled", "Cancelled by the gateway.")
        except Exception:  # a backend bug must fail one dispatch, not the daemon
            log.exception("backend failure", extra={"dispatch_id": d.id})
            self._answer(fail, d.id, 502, "backend_error", "The local backend failed.")

    async def _stream(self, d: Dispatch) -> int:
        payloads = self.runner.backend.stream(d.task, d.model, d.body)
        try:
            while True:
                await self._credit_for(d.id, 1)  # pull only with credit: backpressure
                try:
                    payload = await anext(payloads)
                except StopAsyncIteration:
                    return 200
                if len(payload) > self.conn.max_data:
                    raise BackendError(
                        f"A streamed event of {len(payload)} bytes exceeds the tunnel's "
                        f"{self.conn.max_data}-byte frame payload.",
                        code="chunk_too_large",
                    )
                await self._send(d.id, payload)
        finally:
            await payloads.aclose()

    async def _call(self, d: Dispatch) -> int | None:
        """Relay a whole result: one Result frame when it fits (protocol version 2), else
        Data frames then the status for End. ``None``: already ended."""
        reply = await self.runner.backend.call(d.task, d.model, d.body)
        conn = self.conn
        if conn.results and len(reply.body) <= min(conn.max_data, conn.credit(d.id)):
            self._answer(conn.send_result, d.id, reply.status, reply.body)
            return None
        body, step = memoryview(reply.body), conn.max_data
        for start in range(0, len(body), step):
            await self._send(d.id, bytes(body[start : start + step]))
        return reply.status

    async def _send(self, dispatch_id: str, payload: bytes) -> None:
        await self._credit_for(dispatch_id, len(payload))
        self.conn.send_data(dispatch_id, payload)
        self._output.set()

    async def _credit_for(self, dispatch_id: str, nbytes: int) -> None:
        """Wait until the dispatch may send ``nbytes`` (raises _Gone if the tunnel ends)."""
        waiter = self._credit[dispatch_id]
        while self.conn.credit(dispatch_id) < nbytes:
            if self.conn.closed:
                raise _Gone
            waiter.clear()
            await waiter.wait()
        if self.conn.closed:
            raise _Gone
