"""uvicorn's httptools protocol, with the dispatch routes served without ASGI.

Measured on a 2-core machine, the ASGI path of a dispatch request (uvicorn's scope and
request-response cycle, the ASGI messages, the middleware layers) cost about 40% of the
gateway's CPU per request and a quarter of a millisecond of added time to first token. So a
``POST`` to a dispatch route (:func:`gateway.openai.dispatch_app.task_for`) on a connection
with nothing else in flight is handed to :class:`~gateway.front.serve.FrontDoor` with a
:class:`~gateway.front.cycle.FastCycle` in place of uvicorn's cycle. Everything else —
other methods and paths, WebSocket upgrades (the tunnel), pipelined requests, a server run
with ``limit_concurrency`` — takes uvicorn's ordinary ASGI path, as does every request when
the app carries no front door (``lattice_front``). Keep-alive, timeouts, flow control and
graceful shutdown stay uvicorn's: the fast cycle has the attributes its protocol drives.

It also bounds how long a request may take to *arrive*, which uvicorn leaves open: from a
request's first byte to the end of its body, ``request_timeout_s`` (``LATTICE_REQUEST_TIMEOUT_S``,
30 s). A client that stalls in its headers or its body (a truncated upload, a slowloris) gets a
408 in the OpenAI envelope and the connection is closed, instead of holding a request, a task
and its buffers for as long as it likes. Time spent answering is not counted: a long stream is
never cut by it.

``lattice serve`` runs with this protocol (``--http lattice``, the default).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.errors import RequestTimeout
from gateway.front.cycle import FastCycle
from gateway.http import error_body, request_id_of

__all__ = ["LatticeHttpProtocol", "find_front"]


def find_front(app: Any) -> Any:
    """The ``lattice_front`` of ``app`` or of an app it wraps (uvicorn's proxy-headers
    middleware, say), or ``None``."""
    for _ in range(8):
        if app is None:
            return None
        front = getattr(app, "lattice_front", None)
        if front is not None:
            return front
        app = getattr(app, "app", None)
    return None


class LatticeHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        front = find_front(self.app)
        self._front = front if self.limit_concurrency is None else None
        #: the fast cycle in progress (uvicorn's ``self.cycle`` moves on to a request
        #: pipelined behind it, which must not hide this one from ``connection_lost``)
        self._fast: FastCycle | None = None
        self._request_timeout_s: float | None = front.request_timeout_s if front else None
        self._arrival: asyncio.TimerHandle | None = None

    # -- how long a request may take to arrive ------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._request_timeout_s is not None and self._arrival is None:
            self._arrival = self.loop.call_later(self._request_timeout_s, self._arrival_expired)

    def on_message_complete(self) -> None:
        self._stop_arrival()
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._stop_arrival()  # the socket is the WebSocket protocol's from here on
        super().handle_websocket_upgrade()

    def _stop_arrival(self) -> None:
        if self._arrival is not None:
            self._arrival.cancel()
            self._arrival = None

    def _arrival_expired(self) -> None:
        """The request did not arrive in time: 408 (unless an answer already started) and
        close; a handler waiting for the rest of the body sees the client gone."""
        self._arrival = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            error = RequestTimeout(
                f"The request did not arrive within {self._request_timeout_s:g} s."
            )
            body, _ = error_body(error)
            head = [STATUS_LINE[408]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head.append(
                b"content-type: application/json\r\ncontent-length: %d\r\n"
                b"x-request-id: %s\r\nconnection: close\r\n\r\n"
                % (len(body), request_id_of(self.headers).encode())
            )
            self.transport.write(b"".join(head) + body)
        self.transport.close()  # connection_lost tells the cycle in progress

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_arrival()
        super().connection_lost(exc)
        fast, self._fast = self._fast, None
        if fast is not None and not fast.response_complete:
            fast.disconnected = True
            fast.message_event.set()
            fast.client_gone()

    def on_headers_complete(self) -> None:
        front = self._front
        parser = self.parser
        if (
            front is not None
            and parser.get_method() == b"POST"
            and (self.cycle is None or self.cycle.response_complete)
            and not parser.should_upgrade()
        ):
            # origin-form ("/v1/…?…", what clients send); anything else goes uvicorn's way
            raw_path = self.url.partition(b"?")[0]
            task = None
            if raw_path[:1] == b"/" and b"%" not in raw_path:
                path = raw_path.decode("ascii", "replace")
                task = front.task_for(path)
            if task is not None:
                cycle = FastCycle(
                    transport=self.transport,
                    flow=self.flow,
                    default_headers=self.server_state.default_headers,
                    keep_alive=parser.get_http_version() != "1.0" and parser.should_keep_alive(),
                    expect_100_continue=self.expect_100_continue,
                    on_response=self.on_response_complete,
                )
                self.cycle = self._fast = cycle  # type: ignore[assignment]
                cycle.task = self.loop.create_task(front.serve(task, path, self.headers, cycle))
                cycle.task.add_done_callback(self.tasks.discard)
                self.tasks.add(cycle.task)
                return
        super().on_headers_complete()
