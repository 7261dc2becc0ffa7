"""The dispatch routes as a bare ASGI app in front of Litestar.

``POST /v1/tasks/{task}`` and its aliases (``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings`` and any ``alias_path`` of a catalog task class) are the hot path of the
gateway: every inference request takes it. Measured on a 2-core machine, Litestar's routing,
request and response objects and its streaming response cost about half a millisecond per
request there — more than the rest of the gateway's work — so these routes read the ASGI
messages themselves and hand a :class:`~gateway.dispatch.service.TaskCall` to the same
dispatch service. Everything else (models, tasks, admin, health, metrics, 404s) is Litestar's.
Errors are rendered by the same function as Litestar's exception handler.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable

from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPScope, Receive, Scope, Send

from gateway.dispatch.service import JsonOutcome, StreamOutcome, TaskCall
from gateway.errors import MethodNotAllowed, PayloadTooLarge
from gateway.http import as_lattice_error, check_json_headers, decode_json_object, error_body
from gateway.runtime import Gateway
from gateway.tunnel.host import TUNNEL_PATH

__all__ = ["ALIAS_PATHS", "call_dispatch", "decode_headers", "dispatch_app", "task_for"]

#: The built-in aliases of the generic dispatch path.
ALIAS_PATHS = {
    "/v1/chat/completions": "chat-completion",
    "/v1/completions": "text-completion",
    "/v1/embeddings": "embedding",
}
_TASKS_PREFIX = "/v1/tasks/"
_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


def task_for(gw: Gateway, path: str) -> str | None:
    """The task class a dispatch route serves, or ``None`` for any other path."""
    task = ALIAS_PATHS.get(path)
    if task is not None:
        return task
    if path.startswith(_TASKS_PREFIX):
        name = path[len(_TASKS_PREFIX) :]
        return name if name and "/" not in name else None
    if path.startswith("/v1/"):
        for task_class in gw.catalog.current.task_classes.values():
            if task_class.alias_path == path:
                return task_class.name
    return None


def decode_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in raw}


async def call_dispatch(
    gw: Gateway,
    task: str,
    headers: dict[str, str],
    read_body: Callable[[int], Awaitable[bytes]],
    request_id: str,
) -> JsonOutcome | StreamOutcome:
    """Authenticate, check and read the body, dispatch: what every server in front of the
    dispatch routes calls (this module's ASGI app, :mod:`gateway.front`)."""
    principal = await gw.authenticator.authenticate_headers(headers)
    limit = gw.settings.max_body_bytes
    check_json_headers(headers.get("content-type"), headers.get("content-length"), limit)
    raw = await read_body(limit)
    call = TaskCall(
        task=task,
        raw=raw,
        body=decode_json_object(raw),
        principal=principal,
        request_id=request_id,
        idempotency_key=headers.get("idempotency-key"),
    )
    return await gw.service.dispatch(call)


def dispatch_app(gw: Gateway) -> Callable[[ASGIApp], ASGIApp]:
    """Middleware factory: serve the dispatch routes, pass everything else to ``app``."""

    def factory(app: ASGIApp) -> ASGIApp:
        async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == ScopeType.WEBSOCKET and scope["path"] == TUNNEL_PATH:
                await gw.tunnels.serve(scope, receive, send)
                return
            if scope["type"] == ScopeType.HTTP:
                task = task_for(gw, scope["path"])
                if task is not None:
                    await _serve(gw, task, scope, receive, send)
                    return
            await app(scope, receive, send)

        return asgi

    return factory


async def _serve(gw: Gateway, task: str, scope: HTTPScope, receive: Receive, send: Send) -> None:
    method = scope["method"]
    try:
        if method != "POST":
            raise MethodNotAllowed(f"Method {method} is not allowed on {scope['path']}.")
        outcome = await call_dispatch(
            gw,
            task,
            decode_headers(scope["headers"]),
            lambda limit: _read_body(receive, limit),
            str(scope.get("state", {}).get("request_id", "")),
        )
    except _ClientGone:
        return
    except Exception as exc:
        error = as_lattice_error(exc, method, scope["path"])
        body, extra = error_body(error)
        await _send_whole(send, error.status, body, extra)
        return
    if isinstance(outcome, JsonOutcome):
        await _send_whole(send, outcome.status, outcome.body, outcome.headers)
    else:
        await _send_events(outcome.events, outcome.headers, receive, send)


async def _read_body(receive: Receive, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        assert isinstance(chunk, bytes)
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
            parts.append(chunk)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def _encode_headers(extra: dict[str, str] | None) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (extra or {}).items()]


async def _send_whole(send: Send, status: int, body: bytes, extra: dict[str, str] | None) -> None:
    headers = [_JSON, (b"content-length", str(len(body)).encode()), *_encode_headers(extra)]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_events(
    events: AsyncGenerator[bytes, None], extra: dict[str, str], receive: Receive, send: Send
) -> None:
    """Relay SSE events in this task; a watcher cancels it when the client disconnects (the
    relay's ``finally`` then closes the upstream connection and meters what was delivered)."""
    task = asyncio.current_task()
    assert task is not None
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()
        task.cancel()

    watcher = asyncio.create_task(watch(), name="lattice-sse-disconnect")
    try:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*_SSE_HEADERS, *_encode_headers(extra)],
            }
        )
        async for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if not gone.is_set():
            raise
        task.uncancel()  # the client went away: the stream simply ends
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await events.aclose()
