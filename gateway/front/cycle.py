"""One request on a dispatch route, answered without ASGI.

:class:`FastCycle` stands where uvicorn's ``RequestResponseCycle`` stands for an ASGI
request: uvicorn's protocol feeds it the body (``body``, ``more_body``, ``message_event``),
marks it ``disconnected``, clears ``keep_alive`` on shutdown, and is called back through
``on_response`` when the response is complete. Instead of ASGI messages it offers
:meth:`read_body`, :meth:`respond` (a whole JSON answer, one write) and :meth:`stream`
(server-sent events as chunked transfer encoding, one write per event, each waiting for the
client to drain when the transport's buffer is full). Writes follow RFC 9112: the server's
default headers (``date``, ``server``), a ``content-length`` or ``transfer-encoding:
chunked``, and ``connection: close`` when the connection will not be kept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from gateway.errors import PayloadTooLarge

if TYPE_CHECKING:
    from uvicorn.protocols.http.flow_control import FlowControl

__all__ = ["ClientGone", "FastCycle"]

log = logging.getLogger("lattice.http")

_JSON_HEAD = b"content-type: application/json\r\ncontent-length: "
_SSE_HEAD = (
    b"content-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"x-accel-buffering: no\r\ntransfer-encoding: chunked\r\n"
)
_CLOSE = b"connection: close\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


#: uvicorn replaces its list of default headers (``date``, ``server``) once a second: the
#: encoded form of the current list is kept here, not rebuilt per request.
_defaults: tuple[list[tuple[bytes, bytes]] | None, bytes] = (None, b"")


def _encoded_defaults(headers: list[tuple[bytes, bytes]]) -> bytes:
    global _defaults
    cached, encoded = _defaults
    if cached is not headers:
        encoded = b"".join(b"%s: %s\r\n" % (n, v) for n, v in headers)
        _defaults = (headers, encoded)
    return encoded


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class FastCycle:
    """The state of one request/response on a connection (see the module docstring)."""

    def __init__(
        self,
        *,
        transport: asyncio.Transport,
        flow: FlowControl,
        default_headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        expect_100_continue: bool,
        on_response: Callable[[], None],
    ) -> None:
        self.transport = transport
        self.flow = flow
        self.message_event = asyncio.Event()
        self.on_response = on_response
        self.disconnected = False
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = expect_100_continue
        self.body = bytearray()
        self.more_body = True
        self.response_started = False
        self.response_complete = False
        self.task: asyncio.Task[None] | None = None
        self._default = _encoded_defaults(default_headers)
        self._streaming = False
        self._gone = False

    # -- the request ------------------------------------------------------------------------

    async def read_body(self, limit: int) -> bytes:
        """The whole request body; :class:`PayloadTooLarge` past ``limit`` bytes,
        :class:`ClientGone` if the client left first."""
        parts: list[bytes] = []
        size = 0
        while True:
            if self.waiting_for_100_continue and not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.waiting_for_100_continue = False
            if self.more_body and not self.disconnected and not self.body:
                self.flow.resume_reading()
                await self.message_event.wait()
                self.message_event.clear()
            if self.disconnected:
                raise ClientGone
            if self.body:
                chunk = bytes(self.body)
                self.body = bytearray()
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
                parts.append(chunk)
            if not self.more_body:
                return parts[0] if len(parts) == 1 else b"".join(parts)

    def client_gone(self) -> None:
        """The connection was lost: a stream being relayed stops at once (its relay's
        ``finally`` closes the upstream and meters what was delivered)."""
        if self._streaming and self.task is not None and not self.task.done():
            self._gone = True
            self.task.cancel()

    # -- the response -----------------------------------------------------------------------

    def _head(self, status: int, extra: dict[str, str] | None) -> list[bytes]:
        head = [STATUS_LINE[status], self._default]
        if extra:
            for name, value in extra.items():
                head.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        if not self.keep_alive:
            head.append(_CLOSE)
        return head

    def respond(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        """Send a whole JSON answer (one write) and complete the response."""
        if self.disconnected or self.response_started:
            return
        self.response_started = True
        head = self._head(status, headers)
        head += (_JSON_HEAD, b"%d\r\n\r\n" % len(body), body)
        self.transport.write(b"".join(head))
        self._complete()

    async def stream(
        self, events: AsyncGenerator[bytes, None], headers: dict[str, str] | None = None
    ) -> None:
        """Relay server-sent events as they come, then the last chunk. A client that
        disconnects ends the relay (:meth:`client_gone`); ``events`` is always closed."""
        task = asyncio.current_task()
        self._streaming = True
        try:
            if self.disconnected:
                return
            self.response_started = True
            head = self._head(200, headers)
            head.append(_SSE_HEAD + b"\r\n")
            self.transport.write(b"".join(head))
            async for event in events:
                if self.flow.write_paused and not self.disconnected:
                    await self.flow.drain()
                if self.disconnected:
                    return
                self.transport.write(b"%x\r\n%s\r\n" % (len(event), event))
            if not self.disconnected:
                self.transport.write(_LAST_CHUNK)
                self._complete()
        except asyncio.CancelledError:
            if not self._gone or task is None:
                raise
            task.uncancel()  # the client went away: the stream simply ends
        finally:
            self._streaming = False
            await events.aclose()

    def _complete(self) -> None:
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()

    def abort(self) -> None:
        """After an error once the response has started: cut the connection (a half-sent
        response cannot be completed honestly)."""
        if not self.response_complete:
            self.keep_alive = False
            self.transport.close()
