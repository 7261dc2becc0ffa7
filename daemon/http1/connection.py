"""One HTTP/1.1 connection: the :class:`asyncio.Protocol`, the llhttp parser callbacks
(``httptools.HttpResponseParser``) and the body buffer with its flow control.

A connection serves one request at a time and moves through :data:`IDLE` (fresh, or in the
pool) → :data:`WAITING` (request written, head not complete) → :data:`BODY` (head complete,
body streaming) → :data:`DONE` (response complete, not yet released); :meth:`Connection.release`
puts it back in the pool only if the response ended cleanly and the peer did not ask for
``Connection: close``. llhttp decodes the framing (Content-Length, chunked, read-until-close);
informational (1xx) heads are skipped. Body chunks are buffered; above ``buffer_limit``
buffered bytes the transport is paused, and resumed below a quarter of it. A ``HEAD``
response completes with its head and its connection is not reused.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Final, cast

import httptools

from daemon.http1.errors import ClosedBeforeResponse, ReadTimeout, RemoteProtocolError

if TYPE_CHECKING:
    from daemon.http1.client import Http1Client

__all__ = ["BODY", "DONE", "IDLE", "WAITING", "Connection"]

# connection states
IDLE: Final = 0  # no request in flight (fresh, or in the pool)
WAITING: Final = 1  # request written, response headers not yet complete
BODY: Final = 2  # headers complete, body streaming
DONE: Final = 3  # response complete, not yet released


def _expire(fut: asyncio.Future[None], message: str) -> None:
    if not fut.done():
        fut.set_exception(ReadTimeout(message))


class Connection(asyncio.Protocol):
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
        self.state = IDLE
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
        if self.state == IDLE:  # nothing was asked: the connection is out of sync
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
        if state == WAITING:
            if self._got_bytes:
                self._fail(RemoteProtocolError("the peer closed the connection mid-response"))
            else:
                self._fail(ClosedBeforeResponse("the peer closed the connection before answering"))
        elif state == BODY:
            if self._exc is not None:
                self._wake()
            elif self._until_close():
                self._reusable = False
                self.state = DONE
                self._wake()
            else:
                self._fail(RemoteProtocolError("the peer closed the connection mid-body"))

    def pause_writing(self) -> None:  # requests are written at once; nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.state != WAITING:  # an unsolicited second response
            self._reusable = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.state == WAITING:
            self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.state != WAITING:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # informational (100/103): skip it, the answer follows
            self._raw_headers.clear()
            return
        self.state = BODY
        if self._head:
            self._reusable = False
            self.state = DONE
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.state != BODY:
            return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > self._buffer_limit and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()
        if self._waiter is not None:
            self._wake()

    def on_message_complete(self) -> None:
        if self.state != BODY:
            return
        if not self._parser.should_keep_alive():
            self._reusable = False
        self.state = DONE
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
        self.state = WAITING
        self._exc = None
        self._got_bytes = False
        self._head = head
        self._raw_headers = []
        assert self.transport is not None
        self.transport.write(payload)

    async def response_head(self, deadline: float | None, read_timeout: float | None) -> None:
        while self.state == WAITING:
            if self._exc is not None:
                raise self._exc
            await self._wait(deadline, read_timeout)
        # an error before the headers completed leaves state == WAITING and loops above;
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
        if self.state == DONE and self._reusable and not self.closed and not self._body:
            self.state = IDLE
            self._raw_headers = []
            self._client._put(self)
        else:
            self.close()
