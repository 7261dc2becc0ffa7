"""HTTP client for hosted upstreams (any OpenAI-compatible server, or a generic HTTP task
endpoint), with upstream failures mapped to typed gateway errors."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterator

import msgspec

from catalog.model import Upstream
from daemon.http1 import Http1Client, HttpClientError
from gateway.errors import (
    InvalidRequest,
    LatticeError,
    RateLimited,
    Unprocessable,
    UpstreamError,
    UpstreamTimeout,
)

__all__ = ["UpstreamClient", "UpstreamResponse"]


class UpstreamResponse(msgspec.Struct):
    status: int
    body: bytes


_error_decoder = msgspec.json.Decoder()


def _upstream_message(body: bytes) -> str:
    try:
        data = _error_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return body[:200].decode("utf-8", "replace")
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if isinstance(data.get("detail"), str):
            return str(data["detail"])
    return "upstream error"


def map_upstream_status(status: int, body: bytes, retry_after: str | None) -> LatticeError:
    """Turn a non-2xx upstream answer into the error the caller sees.

    A 400/422 is the caller's request (e.g. too long for the context), so it is passed on
    as a 400; a 429 stays a 429 with its retry-after; anything else (the upstream's auth
    failing, its 404, its 5xx) is the gateway's fault towards the caller: a 502.
    """
    message = _upstream_message(body)
    if status == 400:
        return InvalidRequest(f"Upstream rejected the request: {message}", code="upstream_rejected")
    if status == 422:
        return Unprocessable(
            f"Upstream could not process the request: {message}", code="upstream_rejected"
        )
    if status == 429:
        after = None
        if retry_after:
            try:
                after = float(retry_after)
            except ValueError:
                after = None
        return RateLimited("Upstream is rate limiting; retry later.", retry_after=after or 1.0)
    return UpstreamError(f"Upstream answered {status}: {message}", code="upstream_error")


class UpstreamClient:
    """One connection pool (:class:`~daemon.http1.Http1Client`) for every hosted
    upstream of a process."""

    def __init__(self, *, max_idle_per_origin: int = 256) -> None:
        self._http: Http1Client | None = None
        self._max_idle = max_idle_per_origin

    def _client(self) -> Http1Client:
        if self._http is None:
            self._http = Http1Client(max_idle_per_origin=self._max_idle)
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()

    @staticmethod
    def _headers(upstream: Upstream, stream: bool) -> list[tuple[bytes, bytes]]:
        headers = [(b"Content-Type", b"application/json")]
        key = upstream.api_key
        if key is None and upstream.api_key_env:
            key = os.environ.get(upstream.api_key_env)
        if key:
            headers.append((b"Authorization", b"Bearer " + key.encode("latin-1")))
        if stream:
            headers.append((b"Accept", b"text/event-stream"))
        return headers

    @staticmethod
    def _url(upstream: Upstream, path: str) -> str:
        return upstream.base_url.rstrip("/") + path

    async def post(self, upstream: Upstream, path: str, body: bytes) -> UpstreamResponse:
        """POST and read the whole answer; non-2xx answers raise the mapped error."""
        try:
            async with await self._client().request(
                "POST",
                self._url(upstream, path),
                body,
                self._headers(upstream, False),
                timeout_total=upstream.timeout_s,
                timeout_connect=upstream.connect_timeout_s,
            ) as resp:
                data = await resp.read()
        except TimeoutError as exc:
            raise UpstreamTimeout("The upstream did not answer in time.") from exc
        except HttpClientError as exc:
            raise UpstreamError(
                f"The upstream could not be reached ({type(exc).__name__}).",
                code="upstream_unreachable",
            ) from exc
        if resp.status >= 300:
            raise map_upstream_status(resp.status, data, resp.headers.get("retry-after"))
        return UpstreamResponse(resp.status, data)

    async def stream(
        self, upstream: Upstream, path: str, body: bytes
    ) -> AsyncGenerator[bytes, None]:
        """POST and yield the ``data:`` payloads of the SSE answer as they arrive.

        Errors before the first payload raise the mapped error (the caller may fall back to
        another target); the generator's ``aclose()`` closes the upstream connection, which
        is how a disconnected client cancels the upstream work.
        """
        try:
            async with await self._client().request(
                "POST",
                self._url(upstream, path),
                body,
                self._headers(upstream, True),
                timeout_total=None,
                timeout_connect=upstream.connect_timeout_s,
                timeout_read=upstream.timeout_s,
            ) as resp:
                if resp.status >= 300:
                    answer = await resp.read()
                    raise map_upstream_status(resp.status, answer, resp.headers.get("retry-after"))
                # SSE events (https://html.spec.whatwg.org/multipage/server-sent-events.html
                # #event-stream-interpretation): each event's data lines joined by "\n";
                # stops at [DONE]. Comments (":") and other fields (event:, id:, retry:)
                # carry nothing we relay. Parsed inline: no nested generator to finalise.
                data: list[bytes] = []
                lines = resp.iter_lines()
                async for line in lines:
                    if not line:
                        if data:
                            payload = data[0] if len(data) == 1 else b"\n".join(data)
                            data = []
                            if payload == b"[DONE]":
                                await _drain(lines)
                                return
                            yield payload
                        continue
                    if line.startswith(b"data:"):
                        value = line[5:]
                        data.append(value[1:] if value.startswith(b" ") else value)
                if data:
                    payload = b"\n".join(data)
                    if payload != b"[DONE]":
                        yield payload
        except TimeoutError as exc:
            raise UpstreamTimeout("The upstream stopped answering.") from exc
        except HttpClientError as exc:
            raise UpstreamError(
                f"The upstream connection failed ({type(exc).__name__}).",
                code="upstream_unreachable",
            ) from exc


#: How long to wait, after ``[DONE]``, for the end of the upstream's response (usually the
#: chunked terminator, already in flight) so that its connection can be reused.
_DRAIN_AFTER_DONE_S = 0.05


async def _drain(lines: AsyncIterator[bytes]) -> None:
    """Read what follows ``[DONE]`` so the connection returns to the pool; an upstream that
    keeps the stream open is cut off after a moment (its connection is then closed)."""

    async def consume() -> None:
        async for _ in lines:
            pass

    with contextlib.suppress(TimeoutError, HttpClientError):
        await asyncio.wait_for(consume(), _DRAIN_AFTER_DONE_S)
