"""A lean asyncio HTTP/1.1 client for the gateway's hot path (talking to upstreams).

Built on :class:`asyncio.Protocol` and ``httptools.HttpResponseParser`` (llhttp), with:

* a keep-alive pool per (scheme, host, port): LIFO, bounded idle connections per origin;
  a connection goes back to the pool only after its response was received completely and
  did not ask for ``Connection: close``; idle connections the peer closed are dropped;
* ``https`` through an :mod:`ssl` context (``ssl.create_default_context()`` by default);
* streaming bodies with flow control (the transport is paused above ``buffer_limit``
  buffered bytes and resumed below a quarter of it), Content-Length, chunked and
  read-until-close bodies (llhttp decodes the framing);
* one transparent retry when a *reused* idle connection turns out to be dead before any
  byte of the response arrived (the peer closed it while it sat in the pool);
* typed errors: :class:`HttpClientError` and its subclasses.

The request is written with one ``transport.write`` of a pre-joined buffer carrying the
request line, ``Host``, ``Content-Length``, ``Connection: keep-alive`` and the caller's
headers only. ``HEAD`` responses are supported (their connection is not reused);
``Expect: 100-continue`` and upgrades are not.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Final, cast

import httptools

__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "Http1Client",
    "HttpClientError",
    "ReadTimeout",
    "RemoteProtocolError",
    "Response",
]


class HttpClientError(Exception):
    """Base class of every error this client raises."""


class ConnectError(HttpClientError):
    """The TCP (or TLS) connection could not be established."""


class ConnectTimeout(ConnectError, TimeoutError):
    """Establishing the connection took longer than the connect timeout."""


class ReadTimeout(HttpClientError, TimeoutError):
    """The response (or the next part of its body) did not arrive in time."""


class RemoteProtocolError(HttpClientError):
    """The peer sent a malformed response or closed the connection before it was done."""


class _ClosedBeforeResponse(RemoteProtocolError):
    """The connection died before any byte of the response arrived (retryable once when
    the connection came from the pool)."""


HeaderInput = Mapping[str, str] | Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]]

_DEFAULT_BUFFER_LIMIT: Final = 256 * 1024
_DEFAULT_MAX_IDLE: Final = 256
_ORIGIN_CACHE_MAX: Final = 1024
_SKIPPED_HEADERS: Final = frozenset((b"content-length", b"connection", b"transfer-encoding"))

# connection states
_IDLE: Final = 0  # no request in flight (fresh, or in the pool)
_WAITING: Final = 1  # request written, response headers not yet complete
_BODY: Final = 2  # headers complete, body streaming
_DONE: Final = 3  # response complete, not yet released


def _expire(fut: asyncio.Future[None], message: str) -> None:
    if not fut.done():
        fut.set_exception(ReadTimeout(message))


class _Origin:
    """What a URL means to the pool: origin key, address, Host header and request target."""

    __slots__ = ("host", "host_header", "key", "port", "target", "tls")

    def __init__(self, url: str) -> None:
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL: {url!r}")
        end = len(rest)
        for stop in "/?#":
            at = rest.find(stop)
            if 0 <= at < end:
                end = at
        authority, target = rest[:end], rest[end:].partition("#")[0]
        if not target or target.startswith("?"):
            target = "/" + target
        if "@" in authority:
            raise ValueError("credentials in the URL are not supported")
        self.tls = scheme == "https"
        default_port = 443 if self.tls else 80
        if authority.startswith("["):  # IPv6 literal
            close = authority.find("]")
            if close < 0:
                raise ValueError(f"invalid URL: {url!r}")
            host, port_text = authority[1:close], authority[close + 1 :].removeprefix(":")
        else:
            host, _, port_text = authority.partition(":")
        if not host:
            raise ValueError(f"invalid URL: {url!r}")
        port = int(port_text) if port_text else default_port
        self.host = host
        self.port = port
        self.key = (scheme, host.lower(), port)
        shown = f"[{host}]" if ":" in host else host
        if port != default_port:
            shown = f"{shown}:{port}"
        self.host_header = shown.encode("idna")
        self.target = target.encode("ascii")


def _check(value: bytes) -> bytes:
    if b"\r" in value or b"\n" in value:
        raise ValueError("CR/LF in an HTTP header")
    return value


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: protocol callbacks, parser callbacks and body buffer."""

    __slots__ = (
        "_body",
        "_buffer_limit",
        "_buffered",
        "_client",
        "_exc",
        "_got_bytes",
        "_head",
        "_loop",
        "_parser",
        "_paused",
        "_raw_headers",
        "_resume_at",
        "_reusable",
        "_waiter",
        "closed",
        "key",
        "state",
        "transport",
    )

    def __init__(
        self, client: Http1Client, key: tuple[str, str, int], loop: asyncio.AbstractEventLoop
    ) -> None:
        self._client = client
        self.key = key
        self._loop = loop
        self._buffer_limit = client._buffer_limit
        self._resume_at = client._buffer_limit // 4
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.state = _IDLE
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._exc: BaseException | None = None
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._got_bytes = False
        self._reusable = True
        self._head = False

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.state == _IDLE:  # nothing was asked: the connection is out of sync
            self._reusable = False
            self.close()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(RemoteProtocolError(f"malformed HTTP response: {exc}"))
            self.close()

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost does the bookkeeping

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._client._forget(self)
        state = self.state
        if state == _WAITING:
            if self._got_bytes:
                self._fail(RemoteProtocolError("the peer closed the connection mid-response"))
            else:
                self._fail(_ClosedBeforeResponse("the peer closed the connection before answering"))
        elif state == _BODY:
            if self._exc is not None:
                self._wake()
            elif self._until_close():
                self._reusable = False
                self.state = _DONE
                self._wake()
            else:
                self._fail(RemoteProtocolError("the peer closed the connection mid-body"))

    def pause_writing(self) -> None:  # requests are written at once; nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.state != _WAITING:  # an unsolicited second response
            self._reusable = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.state == _WAITING:
            self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.state != _WAITING:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # informational (100/103): skip it, the answer follows
            self._raw_headers.clear()
            return
        self.state = _BODY
        if self._head:
            self._reusable = False
            self.state = _DONE
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.state != _BODY:
            return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > self._buffer_limit and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()
        if self._waiter is not None:
            self._wake()

    def on_message_complete(self) -> None:
        if self.state != _BODY:
            return
        if not self._parser.should_keep_alive():
            self._reusable = False
        self.state = _DONE
        if self._waiter is not None:
            self._wake()

    # -- helpers -----------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        self._reusable = False
        self._wake()

    def _until_close(self) -> bool:
        """Whether the body is delimited by the end of the connection."""
        for name, value in self._raw_headers:
            lname = name.lower()
            if lname == b"content-length":
                return False
            if lname == b"transfer-encoding" and b"chunked" in value.lower():
                return False
        return True

    def close(self) -> None:
        self._reusable = False
        transport = self.transport
        if transport is not None and not self.closed:
            self.closed = True
            transport.close()

    async def _wait(self, deadline: float | None, read_timeout: float | None) -> None:
        loop = self._loop
        when = None
        if read_timeout is not None:
            when = loop.time() + read_timeout
        if deadline is not None and (when is None or deadline < when):
            when = deadline
        fut = loop.create_future()
        self._waiter = fut
        handle = (
            loop.call_at(when, _expire, fut, "the upstream did not answer in time")
            if when is not None
            else None
        )
        try:
            await fut
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    # -- request cycle -----------------------------------------------------------------

    def start(self, payload: bytes, head: bool) -> None:
        self.state = _WAITING
        self._exc = None
        self._got_bytes = False
        self._head = head
        self._raw_headers = []
        assert self.transport is not None
        self.transport.write(payload)

    async def response_head(self, deadline: float | None, read_timeout: float | None) -> None:
        while self.state == _WAITING:
            if self._exc is not None:
                raise self._exc
            await self._wait(deadline, read_timeout)
        # an error before the headers completed leaves state == _WAITING and loops above;
        # later errors are raised by the body readers.

    def take(self) -> bytes | None:
        """The next buffered body chunk, or None when nothing is buffered."""
        body = self._body
        if not body:
            return None
        chunk = body.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= self._resume_at:
            self._paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()
        return chunk

    def take_all(self) -> bytes:
        body = self._body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()
        return data

    def release(self) -> None:
        """After a response: back to the pool if it ended cleanly and may be reused."""
        if self.state == _DONE and self._reusable and not self.closed and not self._body:
            self.state = _IDLE
            self._raw_headers = []
            self._client._put(self)
        else:
            self.close()


class Response:
    """A response whose head has arrived; read or stream the body, then close it (or use
    it as an async context manager). Closing hands the connection back to the pool when
    the body was received completely, and closes the socket otherwise."""

    __slots__ = (
        "_conn",
        "_deadline",
        "_headers",
        "_pending",
        "_read_timeout",
        "raw_headers",
        "status",
    )

    def __init__(
        self, conn: _Connection, deadline: float | None, read_timeout: float | None
    ) -> None:
        self._conn: _Connection | None = conn
        self.status: int = conn._parser.get_status_code()
        self.raw_headers: list[tuple[bytes, bytes]] = conn._raw_headers
        self._headers: dict[str, str] | None = None
        self._deadline = deadline
        self._read_timeout = read_timeout
        self._pending = b""

    @property
    def headers(self) -> dict[str, str]:
        """Header names lower-cased; repeated headers joined with ``", "``."""
        headers = self._headers
        if headers is None:
            headers = {}
            for raw_name, raw_value in self.raw_headers:
                name = raw_name.decode("latin-1").lower()
                value = raw_value.decode("latin-1")
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            self._headers = headers
        return headers

    async def _next(self) -> bytes | None:
        """The next body chunk, or None at the end of the body."""
        conn = self._conn
        if conn is None:
            return None
        while True:
            chunk = conn.take()
            if chunk is not None:
                return chunk
            if conn._exc is not None:
                exc = conn._exc
                self.close()
                raise exc
            if conn.state == _DONE:
                conn.release()
                self._conn = None
                return None
            try:
                await conn._wait(self._deadline, self._read_timeout)
            except BaseException:
                self.close()
                raise

    async def read(self) -> bytes:
        """The whole (remaining) body."""
        conn = self._conn
        if conn is None:
            return b""
        if conn.state == _DONE:  # typical small answer: everything arrived with the head
            data = conn.take_all()
            conn.release()
            self._conn = None
            return data
        parts: list[bytes] = []
        while (chunk := await self._next()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def iter_chunks(self) -> _ChunkIterator:
        """Body chunks as they arrive (``async for chunk in resp.iter_chunks()``)."""
        return _ChunkIterator(self)

    def iter_lines(self) -> _LineIterator:
        """Body lines as they arrive, each without its ``\\n`` / ``\\r\\n``; a last line
        without a terminator is yielded too."""
        return _LineIterator(self)

    def close(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.release()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _ChunkIterator:
    __slots__ = ("_resp",)

    def __init__(self, resp: Response) -> None:
        self._resp = resp

    def __aiter__(self) -> _ChunkIterator:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._resp._next()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class _LineIterator:
    __slots__ = ("_buf", "_lines", "_resp")

    def __init__(self, resp: Response) -> None:
        self._resp = resp
        self._buf = b""
        self._lines: deque[bytes] = deque()

    def __aiter__(self) -> _LineIterator:
        return self

    async def __anext__(self) -> bytes:
        lines = self._lines
        while not lines:
            chunk = await self._resp._next()
            if chunk is None:
                if self._buf:
                    line, self._buf = self._buf, b""
                    return line[:-1] if line.endswith(b"\r") else line
                raise StopAsyncIteration
            buf = self._buf + chunk if self._buf else chunk
            parts = buf.split(b"\n")
            self._buf = parts.pop()
            for line in parts:
                lines.append(line[:-1] if line.endswith(b"\r") else line)
        return lines.popleft()


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
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._origins: dict[str, _Origin] = {}
        self._closed = False

    # -- pool --------------------------------------------------------------------------

    def _get(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def _put(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = deque()
        idle.append(conn)
        if len(idle) > self._max_idle:
            idle.popleft().close()

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn.state == _IDLE and conn in idle:
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

    def _origin(self, url: str) -> _Origin:
        origin = self._origins.get(url)
        if origin is None:
            origin = _Origin(url)
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
        origin: _Origin,
        loop: asyncio.AbstractEventLoop,
        timeout_connect: float | None,
        deadline: float | None,
    ) -> _Connection:
        if self._closed:
            raise HttpClientError("the client is closed")
        timeout = timeout_connect
        if deadline is not None:
            left = deadline - loop.time()
            timeout = left if timeout is None else min(timeout, left)
        conn = _Connection(self, origin.key, loop)
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

    @staticmethod
    def _serialize(method: str, origin: _Origin, body: bytes, headers: HeaderInput | None) -> bytes:
        host = origin.host_header
        parts: list[bytes] = []
        if headers:
            items = headers.items() if isinstance(headers, Mapping) else headers
            for name, value in items:
                bname = name.encode("latin-1") if isinstance(name, str) else name
                bvalue = value.encode("latin-1") if isinstance(value, str) else value
                lname = bname.lower()
                if lname == b"host":
                    host = _check(bvalue)
                    continue
                if lname in _SKIPPED_HEADERS:
                    continue
                parts += (_check(bname), b": ", _check(bvalue), b"\r\n")
        return b"".join(
            (
                method.encode("ascii"),
                b" ",
                origin.target,
                b" HTTP/1.1\r\nHost: ",
                host,
                b"\r\nContent-Length: ",
                str(len(body)).encode("ascii"),
                b"\r\nConnection: keep-alive\r\n",
                *parts,
                b"\r\n",
                body,
            )
        )

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
        payload = self._serialize(method, origin, body, headers)
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
            except _ClosedBeforeResponse:
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
