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

One tunnel's I/O (its pumps, heartbeats, one task per dispatch) is :class:`daemon.link.Tunnel`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import random
import signal
from collections.abc import Callable, Collection, Sequence
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, WebSocketException

from daemon.backends.base import Backend
from daemon.backends.errors import BackendError
from daemon.link import Tunnel, Verifier
from daemon.reconnect import Backoff, ReconnectPolicy
from daemon.tunnel import Connection
from daemon.tunnel.frames import DEFAULT_DAEMON_MAX_FRAME

__all__ = ["DaemonRunner", "RunnerStopped", "Verifier", "gateway_base_url", "tunnel_url"]

log = logging.getLogger(__name__)

TUNNEL_PATH = "/v1/tunnel"
#: What makes the runner dial again later (BackendError: the local server is not up yet).
_DIAL_ERRORS = (OSError, TimeoutError, WebSocketException, BackendError)


class RunnerStopped(Exception):
    """The runner cannot go on (credential refused or revoked, protocol mismatch)."""


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
