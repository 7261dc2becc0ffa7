"""HTTP plumbing the local-server backends share (aiohttp): one pooled session per backend,
JSON POSTs, SSE streams, and the mapping of transport failures to typed backend errors.

- connection refused/reset, DNS, a cut stream → :class:`BackendUnavailable` (502);
- no answer within the timeout → :class:`BackendTimeout` (504);
- a 4xx → :class:`BackendRejected` with the backend's status and error body;
- a 5xx → :class:`BackendError` (502 ``backend_error``);
- a 2xx that is not what was asked for (not JSON, not an event stream) →
  :class:`BadBackendReply` (502).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import aiohttp

from daemon.backends.base import BackendReply
from daemon.backends.errors import (
    BackendError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    BadBackendReply,
)
from daemon.backends.sse import SseError, SseParser

__all__ = ["HttpTimeouts", "get_json", "new_session", "post_json", "reply_error", "stream_sse"]

#: How long to wait, after ``[DONE]``, for the end of the response so the connection can be
#: reused (the chunked terminator is normally already in flight).
_DRAIN_AFTER_DONE_S = 0.05


class HttpTimeouts:
    """``request_s`` bounds a whole non-streamed call and each silence within a stream (a
    local model may think long before its first token); ``connect_s`` bounds connecting."""

    __slots__ = ("connect_s", "request_s")

    def __init__(self, request_s: float = 300.0, connect_s: float = 2.0) -> None:
        self.request_s = request_s
        self.connect_s = connect_s

    def call(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.request_s, connect=self.connect_s)

    def stream(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, connect=self.connect_s, sock_read=self.request_s)


def new_session(concurrency: int, headers: dict[str, str] | None = None) -> aiohttp.ClientSession:
    """A session whose pool keeps up to ``concurrency`` connections to the local server (call
    it inside the running loop)."""
    # Idle connections are dropped after 4 s: uvicorn-based servers (vLLM, the simulator)
    # close theirs after 5 s, and reusing one they just closed fails the dispatch.
    connector = aiohttp.TCPConnector(
        limit=concurrency, limit_per_host=concurrency, keepalive_timeout=4.0
    )
    return aiohttp.ClientSession(connector=connector, headers=headers, auto_decompress=True)


#: A pooled connection the server had closed: nothing was sent on it, so one retry is safe.
_STALE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


async def _send(
    session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> aiohttp.ClientResponse:
    """The response (headers read) to one request, retried once on a stale connection."""
    try:
        return await session.request(method, url, **kwargs)
    except _STALE:
        return await session.request(method, url, **kwargs)


@contextlib.contextmanager
def _transport_errors(url: str, what: str) -> Iterator[None]:
    # aiohttp's timeouts are TimeoutErrors *and* ClientErrors: check them first.
    try:
        yield
    except TimeoutError as exc:
        raise BackendTimeout(f"The local backend at {url} did not answer in time.") from exc
    except aiohttp.ClientError as exc:
        raise BackendUnavailable(
            f"The local backend at {url} {what} ({type(exc).__name__})."
        ) from exc


def reply_error(url: str, status: int, body: bytes) -> BackendError:
    """The error for a non-2xx answer."""
    if status < 500:
        return BackendRejected.from_reply(status, body)
    rejected = BackendRejected.from_reply(status, body)
    return BackendError(f"The local backend at {url} failed ({status}): {rejected.message}")


def _is_json(resp: aiohttp.ClientResponse) -> bool:
    kind = resp.content_type
    return kind == "application/json" or kind.endswith("+json")


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    timeouts: HttpTimeouts,
    headers: dict[str, str] | None = None,
) -> BackendReply:
    """POST a JSON body and read the whole JSON answer."""
    headers = {"content-type": "application/json", **(headers or {})}
    return await _json_request(session, "POST", url, body, timeouts, headers)


async def get_json(
    session: aiohttp.ClientSession, url: str, timeouts: HttpTimeouts
) -> BackendReply:
    """GET a JSON document (e.g. the model list)."""
    return await _json_request(session, "GET", url, None, timeouts, {})


async def _json_request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: bytes | None,
    timeouts: HttpTimeouts,
    headers: dict[str, str],
) -> BackendReply:
    with _transport_errors(url, "could not be reached"):
        resp = await _send(
            session, method, url, data=body, headers=headers, timeout=timeouts.call()
        )
        async with resp:
            data = await resp.read()
    if resp.status >= 300:
        raise reply_error(url, resp.status, data)
    if not _is_json(resp):
        raise BadBackendReply(f"The local backend at {url} answered {resp.content_type}, not JSON.")
    return BackendReply(resp.status, data)


async def stream_sse(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    timeouts: HttpTimeouts,
    headers: dict[str, str] | None = None,
) -> AsyncGenerator[bytes, None]:
    """POST and yield the ``data`` of each server-sent event as it arrives, up to ``[DONE]``.

    Reads only as fast as it is pulled (aiohttp stops reading the socket when its buffer is
    full); closing the generator closes the connection unless the stream had ended.
    """
    parser = SseParser()
    with _transport_errors(url, "stopped streaming"):
        resp = await _send(
            session,
            "POST",
            url,
            data=body,
            headers={
                "content-type": "application/json",
                "accept": "text/event-stream",
                **(headers or {}),
            },
            timeout=timeouts.stream(),
        )
        async with resp:
            if resp.status >= 300:
                raise reply_error(url, resp.status, await resp.read())
            if resp.content_type != "text/event-stream":
                raise BadBackendReply(
                    f"The local backend at {url} answered {resp.content_type}, not a stream."
                )
            # Parsed inline (no nested generator) so that closing this one closes the response.
            done = False
            async for chunk in resp.content.iter_any():
                try:
                    payloads = parser.feed(chunk)
                except SseError as exc:
                    raise BadBackendReply(f"The local backend at {url}: {exc}.") from exc
                for payload in payloads:
                    if payload == b"[DONE]":
                        done = True
                        break
                    yield payload
                if done:
                    break
            if done:
                await _drain(resp)
                return
            for payload in parser.close():
                if payload != b"[DONE]":
                    yield payload


async def _drain(resp: aiohttp.ClientResponse) -> None:
    """Read what follows ``[DONE]`` so the connection returns to the pool; a server that keeps
    the stream open is cut off after a moment (its connection is then closed)."""
    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
        await asyncio.wait_for(resp.content.read(), _DRAIN_AFTER_DONE_S)
