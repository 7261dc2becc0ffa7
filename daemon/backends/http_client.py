"""HTTP plumbing the local-server backends share: one pooled :class:`HttpSession` per backend
(the lean HTTP/1.1 client of :mod:`daemon.http1`: every dispatch crosses it, so it is on the
tunnel's hot path), JSON POSTs, SSE streams, and the mapping of transport failures to typed
backend errors.

- connection refused/reset, DNS, a cut stream, a malformed answer → :class:`BackendUnavailable`
  (502);
- no answer within the timeout → :class:`BackendTimeout` (504);
- a 4xx → :class:`BackendRejected` with the backend's status and error body;
- a 5xx → :class:`BackendError` (502 ``backend_error``);
- a 2xx that is not what was asked for (not JSON, not an event stream) →
  :class:`BadBackendReply` (502).

A pooled connection the server closed while it sat idle (uvicorn-based servers such as vLLM
and the simulator close theirs after 5 s) is retried once on a new connection by the client,
as long as no byte of the answer arrived: nothing was processed on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterator

from daemon.backends.base import BackendReply
from daemon.backends.errors import (
    BackendError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    BadBackendReply,
)
from daemon.backends.sse import SseError, SseParser
from daemon.http1 import Http1Client, HttpClientError, Response

__all__ = [
    "HttpSession",
    "HttpTimeouts",
    "get_json",
    "new_session",
    "post_json",
    "reply_error",
    "stream_sse",
]

#: How long to wait, after ``[DONE]``, for the end of the response so the connection can be
#: reused (the chunked terminator is normally already in flight).
_DRAIN_AFTER_DONE_S = 0.05
_JSON_HEADERS = {"content-type": "application/json"}
_SSE_HEADERS = {"content-type": "application/json", "accept": "text/event-stream"}


class HttpTimeouts:
    """``request_s`` bounds a whole non-streamed call and each silence within a stream (a
    local model may think long before its first token); ``connect_s`` bounds connecting."""

    __slots__ = ("connect_s", "request_s")

    def __init__(self, request_s: float = 300.0, connect_s: float = 2.0) -> None:
        self.request_s = request_s
        self.connect_s = connect_s


class HttpSession:
    """A keep-alive pool to the local server(s) plus the headers every request carries
    (e.g. ``authorization``). Create it inside the running loop; :meth:`close` it."""

    __slots__ = ("client", "headers")

    def __init__(self, concurrency: int, headers: dict[str, str] | None = None) -> None:
        self.client = Http1Client(max_idle_per_origin=max(1, concurrency))
        self.headers = {name.lower(): value for name, value in (headers or {}).items()}

    def merged(self, headers: dict[str, str] | None, base: dict[str, str]) -> dict[str, str]:
        """``base``, then the session's headers, then the call's (later ones win)."""
        if not self.headers and not headers:
            return base
        merged = {**base, **self.headers}
        for name, value in (headers or {}).items():
            merged[name.lower()] = value
        return merged

    async def close(self) -> None:
        await self.client.close()


def new_session(concurrency: int, headers: dict[str, str] | None = None) -> HttpSession:
    """A session whose pool keeps up to ``concurrency`` idle connections per origin (call it
    inside the running loop)."""
    return HttpSession(concurrency, headers)


@contextlib.contextmanager
def _transport_errors(url: str, what: str) -> Iterator[None]:
    # The client's timeouts are TimeoutErrors *and* HttpClientErrors: check them first.
    try:
        yield
    except TimeoutError as exc:
        raise BackendTimeout(f"The local backend at {url} did not answer in time.") from exc
    except (HttpClientError, OSError) as exc:
        raise BackendUnavailable(
            f"The local backend at {url} {what} ({type(exc).__name__})."
        ) from exc


def reply_error(url: str, status: int, body: bytes) -> BackendError:
    """The error for a non-2xx answer."""
    if status < 500:
        return BackendRejected.from_reply(status, body)
    rejected = BackendRejected.from_reply(status, body)
    return BackendError(f"The local backend at {url} failed ({status}): {rejected.message}")


def _content_type(resp: Response) -> str:
    """The media type of the answer, lower-cased, without parameters (RFC 9110 §8.3.1)."""
    for name, value in resp.raw_headers:
        if len(name) == 12 and name.lower() == b"content-type":
            return value.partition(b";")[0].strip().lower().decode("latin-1")
    return "application/octet-stream"  # RFC 9110 §8.3: a recipient may assume this


def _is_json(kind: str) -> bool:
    return kind == "application/json" or kind.endswith("+json")


async def post_json(
    session: HttpSession,
    url: str,
    body: bytes,
    timeouts: HttpTimeouts,
    headers: dict[str, str] | None = None,
) -> BackendReply:
    """POST a JSON body and read the whole JSON answer."""
    return await _json_request(
        session, "POST", url, body, timeouts, session.merged(headers, _JSON_HEADERS)
    )


async def get_json(session: HttpSession, url: str, timeouts: HttpTimeouts) -> BackendReply:
    """GET a JSON document (e.g. the model list)."""
    return await _json_request(session, "GET", url, b"", timeouts, session.merged(None, {}))


async def _json_request(
    session: HttpSession,
    method: str,
    url: str,
    body: bytes,
    timeouts: HttpTimeouts,
    headers: dict[str, str],
) -> BackendReply:
    with _transport_errors(url, "could not be reached"):
        resp = await session.client.request(
            method,
            url,
            body,
            headers,
            timeout_total=timeouts.request_s,
            timeout_connect=timeouts.connect_s,
        )
        async with resp:
            data = await resp.read()
    status = resp.status
    if status >= 300:
        raise reply_error(url, status, data)
    kind = _content_type(resp)
    if not _is_json(kind):
        raise BadBackendReply(f"The local backend at {url} answered {kind}, not JSON.")
    return BackendReply(status, data)


async def stream_sse(
    session: HttpSession,
    url: str,
    body: bytes,
    timeouts: HttpTimeouts,
    headers: dict[str, str] | None = None,
) -> AsyncGenerator[bytes, None]:
    """POST and yield the ``data`` of each server-sent event as it arrives, up to ``[DONE]``.

    Reads only as fast as it is pulled (the client stops reading the socket when its buffer
    is full); closing the generator closes the connection unless the stream had ended.
    """
    parser = SseParser()
    with _transport_errors(url, "stopped streaming"):
        resp = await session.client.request(
            "POST",
            url,
            body,
            session.merged(headers, _SSE_HEADERS),
            timeout_connect=timeouts.connect_s,
            timeout_read=timeouts.request_s,
        )
        async with resp:
            if resp.status >= 300:
                raise reply_error(url, resp.status, await resp.read())
            kind = _content_type(resp)
            if kind != "text/event-stream":
                raise BadBackendReply(f"The local backend at {url} answered {kind}, not a stream.")
            # Parsed inline (no nested generator) so that closing this one closes the response.
            done = False
            async for chunk in resp.iter_chunks():
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


async def _drain(resp: Response) -> None:
    """Read what follows ``[DONE]`` so the connection returns to the pool; a server that keeps
    the stream open is cut off after a moment (its connection is then closed)."""
    with contextlib.suppress(TimeoutError, HttpClientError, OSError):
        async with asyncio.timeout(_DRAIN_AFTER_DONE_S):
            await resp.read()
