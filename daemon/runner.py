"""``lattice daemon run``: keep a tunnel to a gateway and serve its dispatches from a backend.

:class:`DaemonRunner` dials ``ws(s)://<gateway>/v1/tunnel`` with ``Authorization: Bearer
<credential>``, sends the Hello (what ``backend.describe()`` advertises), and serves each
Dispatch concurrently over the sans-I/O :class:`daemon.tunnel.Connection`:

- the dispatch token is verified first (``daemon/tokens.py``); a refused one is answered
  ``Fail(403, "dispatch_refused", <reason>)`` and the backend never sees the request;
- a stream sends one Data frame per SSE payload, pulling the next payload from the backend
  only while the dispatch holds credit: the gateway's slow consumer slows the local backend;
- a non-streamed result goes as one Result frame (protocol version 2) when it fits in one
  frame, else as Data frames of at most ``max_data`` bytes, then End;
- Cancel cancels the backend work; the dispatch's ``timeout_ms`` ends it with
  ``Fail(504, "personal_lattice_execution_timeout")``.

It redials with backoff and full jitter (``daemon/reconnect.py``), rotating over the gateway
URLs. A refused credential (HTTP 401/403 on the upgrade, Close 4401/4403) or an unsupported
protocol version stops it with :class:`RunnerStopped` instead of retrying forever. On GoAway it
dials the next URL at once while the old tunnel finishes its in-flight work. :meth:`drain`
(SIGTERM) sends Drain, finishes in-flight work, takes none, then closes and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import random
import signal
from collections.abc import Callable, Collection, Sequence
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from daemon.backends.base import Advertisement, Backend
from daemon.backends.errors import BackendError
from daemon.reconnect import Backoff, ReconnectPolicy
from daemon.tokens import DispatchRefused
from daemon.tunnel import CloseCode, Connection, TunnelUsageError
from daemon.tunnel import events as ev
from daemon.tunnel.frames import DEFAULT_DAEMON_MAX_FRAME, Dispatch, websocket_close_code

__all__ = ["DaemonRunner", "RunnerStopped", "Verifier", "gateway_base_url", "tunnel_url"]

log = logging.getLogger(__name__)

TUNNEL_PATH = "/v1/tunnel"
_FATAL_CLOSE: dict[int, str] = {
    CloseCode.UNAUTHORIZED: "the gateway refused the runtime credential",
    CloseCode.REVOKED: "the runtime was revoked",
    CloseCode.UNSUPPORTED_VERSION: "the gateway speaks no tunnel protocol version this daemon does",
}
#: What makes the runner dial again later (BackendError: the local server is not up yet).
_DIAL_ERRORS = (OSError, TimeoutError, WebSocketException, BackendError)


class RunnerStopped(Exception):
    """The runner cannot go on (credential refused or revoked, protocol mismatch)."""


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


def tunnel_url(gateway_url: str) -> str:
    """``http(s)://host[/prefix]`` (or ``ws(s)://…``) → ``ws(s)://host[/prefix]/v1/tunnel``."""
    parts = urlsplit(gateway_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"not a gateway URL: {gateway_url!r}")
    path = parts.path.rstrip("/")
    path = path if path.endswith(TUNNEL_PATH) else path + TUNNEL_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def gateway_base_url(gateway_url: str) -> str:
    """The gateway's ``http(s)://host[/prefix]`` (e.g. to fetch its dispatch JWKS)."""
    parts = urlsplit(tunnel_url(gateway_url))
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, parts.path.removesuffix(TUNNEL_PATH), "", ""))


def _daemon_version() -> str:
    try:
        return importlib.metadata.version("lattice")
    except importlib.metadata.PackageNotFoundError:
        return "0"


class DaemonRunner:
    """The daemon's connection loop (see the module docstring). ``verifier_factory`` gets a
    gateway's base URL (:func:`gateway_base_url`) and is called once per URL. The heartbeat
    terms are the gateway's (its Welcome); ``heartbeat_s``/``dead_after_s`` only apply until
    the Welcome arrives."""

    def __init__(
        self,
        gateway_urls: Sequence[str],
        credential: str,
        backend: Backend,
        verifier_factory: Callable[[str], Verifier],
        *,
        runtime_id: str,
        daemon_version: str | None = None,
        max_frame: int = DEFAULT_DAEMON_MAX_FRAME,
        backoff: Backoff | None = None,
        stable_after_s: float = 10.0,
        connect_timeout_s: float = 10.0,
        heartbeat_s: float = 5.0,
        dead_after_s: float = 12.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        for url in gateway_urls:
            tunnel_url(url)  # fail fast on a malformed URL
        self.runtime_id = runtime_id
        self.backend = backend
        self.daemon_version = daemon_version or _daemon_version()
        self.max_frame = max_frame
        self.heartbeat_s, self.dead_after_s = heartbeat_s, dead_after_s
        self.connect_timeout_s = connect_timeout_s
        self.policy = ReconnectPolicy(
            gateway_urls, backoff, rand=rand, stable_after_s=stable_after_s
        )
        self._credential = credential
        self._verifier_factory = verifier_factory
        self._verifiers: dict[str, Verifier] = {}
        self._tunnels: set[Tunnel] = set()
        self._draining = False
        self._wake = asyncio.Event()
        #: Each established tunnel's gateway URL, in order (for logs and tests).
        self.connected_urls: list[str] = []

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def in_flight(self) -> int:
        return sum(t.conn.in_flight for t in self._tunnels)

    async def run(self) -> None:
        """Serve until :meth:`drain` completes; raises :class:`RunnerStopped` when the
        gateway refuses this runtime for good."""
        loop = asyncio.get_running_loop()
        try:
            while not self._draining:
                url = self.policy.next_url()
                try:
                    tunnel = await self._dial(url)
                except _DIAL_ERRORS as exc:
                    log.warning("cannot reach the gateway", extra={"url": url, "error": repr(exc)})
                    await self._pause(self.policy.failed())
                    continue
                started = loop.time()
                await tunnel.primary_over.wait()
                if tunnel.fatal is not None:
                    raise RunnerStopped(tunnel.fatal)
                lasted = loop.time() - started
                if tunnel.conn.goaway_received and lasted >= 1.0:
                    continue  # dial anew at once; the old tunnel finishes in the background
                await self._pause(self.policy.lost(lasted))
        except asyncio.CancelledError:
            await asyncio.gather(*(t.shut() for t in list(self._tunnels)))
            raise
        finally:
            self.drain()
            await asyncio.gather(*(t.finished.wait() for t in list(self._tunnels)))

    def drain(self) -> None:
        """Take no new work, finish in-flight work, close: :meth:`run` returns when done.
        Returns at once (safe to call from a signal handler)."""
        self._draining = True
        self._wake.set()
        for tunnel in list(self._tunnels):
            tunnel.drain()

    def drain_on_signals(self, signals: Collection[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Drain on the first of ``signals``; a second one cancels the current task (exits
        without waiting for in-flight work)."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def handle() -> None:
            if self._draining and task is not None:
                task.cancel()
            else:
                self.drain()

        for signum in signals:
            loop.add_signal_handler(signum, handle)

    async def _pause(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()

    def _verifier(self, url: str) -> Verifier:
        base = gateway_base_url(url)
        verifier = self._verifiers.get(base)
        if verifier is None:
            verifier = self._verifiers[base] = self._verifier_factory(base)
        return verifier

    async def _dial(self, url: str) -> Tunnel:
        """Open a tunnel to ``url`` and wait for the Welcome (raises a dial error, or
        :class:`RunnerStopped` for a refused credential)."""
        advert = await self.backend.describe()
        try:
            ws = await connect(
                tunnel_url(url),
                additional_headers={"Authorization": f"Bearer {self._credential}"},
                user_agent_header=f"lattice-daemon/{self.daemon_version}",
                max_size=self.max_frame,
                compression=None,  # small JSON frames: deflate costs more CPU than it saves
                ping_interval=None,  # the tunnel has its own heartbeats (frames.Ping)
                open_timeout=self.connect_timeout_s,
                close_timeout=2.0,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise RunnerStopped(
                    f"the gateway refused the runtime credential (HTTP {status}): the runtime "
                    "was revoked or the credential is wrong; pair again (lattice daemon pair)"
                ) from None
            raise
        conn = Connection(
            "daemon",
            max_frame=self.max_frame,
            heartbeat_s=self.heartbeat_s,
            dead_after_s=self.dead_after_s,
        )
        tunnel = Tunnel(self, url, ws, conn, advert, self._verifier(url))
        self._tunnels.add(tunnel)
        tunnel.finished_callback(lambda: self._tunnels.discard(tunnel))
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await tunnel.start()
        except BaseException:
            await tunnel.shut()
            raise
        if tunnel.fatal is not None:
            raise RunnerStopped(tunnel.fatal)
        if tunnel.ended.is_set():
            raise ConnectionError(tunnel.end_reason)
        self.connected_urls.append(url)
        log.info("tunnel open", extra={"url": url, "runtime_id": self.runtime_id})
        if self._draining:
            tunnel.drain()
        return tunnel


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
