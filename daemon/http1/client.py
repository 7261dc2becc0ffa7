"""The connection pool and the request function: :class:`Http1Client`.

A keep-alive pool per (scheme, host, port): LIFO, at most ``max_idle_per_origin`` idle
connections per origin; idle connections the peer closed are dropped. ``https`` goes through an
:mod:`ssl` context (``ssl.create_default_context()`` by default). When a *reused* idle
connection turns out to be dead before any byte of the response arrived (the peer closed it
while it sat in the pool), the request is retried once on a new connection.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Final

from daemon.http1.connection import IDLE, Connection
from daemon.http1.errors import (
    ClosedBeforeResponse,
    ConnectError,
    ConnectTimeout,
    HttpClientError,
)
from daemon.http1.request import HeaderInput, Origin, serialize_request
from daemon.http1.response import Response

__all__ = ["Http1Client"]

_DEFAULT_BUFFER_LIMIT: Final = 256 * 1024
_DEFAULT_MAX_IDLE: Final = 256
_ORIGIN_CACHE_MAX: Final = 1024


class Http1Client:
    """Connection pool + request function. Create it inside the event loop that uses it;
    :meth:`close` it when done."""

    def __init__(
        self,
        *,
        max_idle_per_origin: int = _DEFAULT_MAX_IDLE,
        buffer_limit: int = _DEFAULT_BUFFER_LIMIT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._max_idle = max_idle_per_origin
        self._buffer_limit = buffer_limit
        self._ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], deque[Connection]] = {}
        self._all: set[Connection] = set()
        self._origins: dict[str, Origin] = {}
        self._closed = False

    # -- pool --------------------------------------------------------------------------

    def _get(self, key: tuple[str, str, int]) -> Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def _put(self, conn: Connection) -> None:
        if self._closed:
            conn.close()
            return
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = deque()
        idle.append(conn)
        if len(idle) > self._max_idle:
            idle.popleft().close()

    def _forget(self, conn: Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn.state == IDLE and conn in idle:
            idle.remove(conn)

    def idle_count(self, scheme: str, host: str, port: int) -> int:
        """Idle pooled connections to an origin (for tests and metrics)."""
        return len(self._idle.get((scheme, host.lower(), port), ()))

    async def close(self) -> None:
        """Close every connection, idle or busy."""
        self._closed = True
        conns = list(self._all)
        self._idle.clear()
        for conn in conns:
            conn.close()
        if conns:
            await asyncio.sleep(0)  # let the transports run connection_lost

    # -- requests ----------------------------------------------------------------------

    def _origin(self, url: str) -> Origin:
        origin = self._origins.get(url)
        if origin is None:
            origin = Origin(url)
            if len(self._origins) >= _ORIGIN_CACHE_MAX:
                self._origins.clear()
            self._origins[url] = origin
        return origin

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    async def _connect(
        self,
        origin: Origin,
        loop: asyncio.AbstractEventLoop,
        timeout_connect: float | None,
        deadline: float | None,
    ) -> Connection:
        if self._closed:
            raise HttpClientError("the client is closed")
        timeout = timeout_connect
        if deadline is not None:
            left = deadline - loop.time()
            timeout = left if timeout is None else min(timeout, left)
        conn = Connection(self, origin.key, loop)
        try:
            async with asyncio.timeout(timeout):
                if origin.tls:
                    await loop.create_connection(
                        lambda: conn,
                        origin.host,
                        origin.port,
                        ssl=self._ssl(),
                        server_hostname=origin.host,
                    )
                else:
                    await loop.create_connection(lambda: conn, origin.host, origin.port)
        except TimeoutError as exc:
            conn.close()
            raise ConnectTimeout(f"connecting to {origin.host}:{origin.port} timed out") from exc
        except OSError as exc:  # refused, unreachable, DNS failure, TLS handshake failure
            conn.close()
            raise ConnectError(f"cannot connect to {origin.host}:{origin.port}: {exc}") from exc
        self._all.add(conn)
        return conn

    async def request(
        self,
        method: str,
        url: str,
        body: bytes = b"",
        headers: HeaderInput | None = None,
        *,
        timeout_total: float | None = None,
        timeout_connect: float | None = 10.0,
        timeout_read: float | None = None,
    ) -> Response:
        """Send one request and return once the response head arrived.

        ``timeout_total`` bounds everything (connect, head and body); ``timeout_read`` bounds
        each wait for the head or the next part of the body.
        """
        loop = asyncio.get_running_loop()
        origin = self._origin(url)
        payload = serialize_request(method, origin, body, headers)
        head = method == "HEAD"
        deadline = loop.time() + timeout_total if timeout_total is not None else None
        conn = self._get(origin.key)
        reused = conn is not None
        if conn is None:
            conn = await self._connect(origin, loop, timeout_connect, deadline)
        while True:
            conn.start(payload, head)
            try:
                await conn.response_head(deadline, timeout_read)
            except ClosedBeforeResponse:
                conn.close()
                if not reused:
                    raise
                reused = False
                conn = await self._connect(origin, loop, timeout_connect, deadline)
                continue
            except BaseException:
                conn.close()
                raise
            return Response(conn, deadline, timeout_read)
