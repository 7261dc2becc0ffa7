"""Raw ASGI plumbing for the simulator's app (no web framework): reading a request body,
sending JSON and OpenAI-style errors, the lifespan protocol, watching for a disconnect.

Errors use OpenAI's envelope ``{"error": {message, type, param, code}}``; a body that is not
JSON is a 400, and so is a field of the wrong type, reported in ``param``; a body over
:data:`MAX_BODY` bytes is a 413.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec

from daemon.sim.engine import SimError
from daemon.sim.protocol import ErrorBody, ErrorResponse

__all__ = [
    "MAX_BODY",
    "Disconnected",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "bad_request",
    "lifespan",
    "read_body",
    "send_error",
    "send_json",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY = 32 * 1024 * 1024
_JSON = b"application/json"
_PARAM_PATH = re.compile(r"at `\$\.([^`\[]+)")

_encode = msgspec.json.Encoder().encode


class Disconnected:
    """Set by a watcher task when the ASGI server reports ``http.disconnect``."""

    __slots__ = ("is_set",)

    def __init__(self) -> None:
        self.is_set = False

    async def watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.is_set = True


async def lifespan(receive: Receive, send: Send) -> None:
    """Answer the lifespan protocol's startup and shutdown (nothing to set up)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def read_body(receive: Receive) -> bytes:
    """The whole request body (what arrived, if the client disconnected); a :class:`SimError`
    413 past :data:`MAX_BODY` bytes."""
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body
    parts = [body]
    size = len(body)
    while message.get("more_body"):
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        part: bytes = message.get("body", b"")
        size += len(part)
        if size > MAX_BODY:
            raise SimError(413, f"Request body exceeds {MAX_BODY} bytes.")
        parts.append(part)
    return b"".join(parts)


async def send_json(send: Send, body: bytes, status: int = 200) -> None:
    """Send a complete JSON response (``body`` is already encoded)."""
    headers = [(b"content-type", _JSON), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Send, exc: SimError) -> None:
    """Send ``exc`` in OpenAI's error envelope with its status."""
    body = ErrorBody(message=exc.message, type=exc.type, param=exc.param, code=exc.code)
    await send_json(send, _encode(ErrorResponse(error=body)), exc.status)


def bad_request(exc: msgspec.DecodeError | RecursionError) -> SimError:
    """The 400 for a body msgspec could not decode: not JSON, or a field of the wrong type."""
    if not isinstance(exc, msgspec.ValidationError):
        return SimError(
            400, f"We could not parse the JSON body of your request. (lattice sim: {exc})"
        )
    # msgspec names the offending field as "... - at `$.field`"; OpenAI reports it as `param`.
    match = _PARAM_PATH.search(str(exc))
    return SimError(400, f"Invalid request: {exc}", param=match.group(1) if match else None)
