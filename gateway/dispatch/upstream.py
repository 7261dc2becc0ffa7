"""HTTP client for hosted upstreams (any OpenAI-compatible server, or a generic HTTP task
endpoint), with upstream failures mapped to typed gateway errors."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import aiohttp
import msgspec

from catalog.model import Upstream
from gateway.errors import (
    InvalidRequest,
    LatticeError,
    RateLimited,
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
    except msgspec.DecodeError:
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
    if status in (400, 422):
        return InvalidRequest(f"Upstream rejected the request: {message}", code="upstream_rejected")
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
    """One aiohttp session (connection pool) for every hosted upstream of a process."""

    def __init__(self, *, limit: int = 1024) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._limit = limit

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit, ttl_dns_cache=300),
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @staticmethod
    def _headers(upstream: Upstream, stream: bool) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = upstream.api_key
        if key is None and upstream.api_key_env:
            key = os.environ.get(upstream.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if stream:
            headers["Accept"] = "text/event-stream"
        return headers

    @staticmethod
    def _url(upstream: Upstream, path: str) -> str:
        return upstream.base_url.rstrip("/") + path

    def _timeout(self, upstream: Upstream) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=upstream.timeout_s, sock_connect=upstream.connect_timeout_s
        )

    async def post(self, upstream: Upstream, path: str, body: bytes) -> UpstreamResponse:
        """POST and read the whole answer; non-2xx answers raise the mapped error."""
        try:
            async with self._get_session().post(
                self._url(upstream, path),
                data=body,
                headers=self._headers(upstream, False),
                timeout=self._timeout(upstream),
            ) as resp:
                data = await resp.read()
                if resp.status >= 300:
                    raise map_upstream_status(resp.status, data, resp.headers.get("retry-after"))
                return UpstreamResponse(resp.status, data)
        except TimeoutError as exc:
            raise UpstreamTimeout("The upstream did not answer in time.") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"The upstream could not be reached ({type(exc).__name__}).",
                code="upstream_unreachable",
            ) from exc

    async def stream(self, upstream: Upstream, path: str, body: bytes) -> AsyncIterator[bytes]:
        """POST and yield the ``data:`` payloads of the SSE answer as they arrive.

        Errors before the first payload raise the mapped error (the caller may fall back to
        another target); the generator's ``aclose()`` closes the upstream connection, which
        is how a disconnected client cancels the upstream work.
        """
        try:
            async with self._get_session().post(
                self._url(upstream, path),
                data=body,
                headers=self._headers(upstream, True),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=upstream.connect_timeout_s,
                    sock_read=upstream.timeout_s,
                ),
            ) as resp:
                if resp.status >= 300:
                    data = await resp.read()
                    raise map_upstream_status(resp.status, data, resp.headers.get("retry-after"))
                async for payload in _sse_payloads(resp.content):
                    yield payload
        except TimeoutError as exc:
            raise UpstreamTimeout("The upstream stopped answering.") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"The upstream connection failed ({type(exc).__name__}).",
                code="upstream_unreachable",
            ) from exc


async def _sse_payloads(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Yield each event's data (multi-line data joined by ``\\n``), per the SSE spec
    (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).
    Stops at ``[DONE]``."""
    data: list[bytes] = []
    async for raw in content:
        line = raw.rstrip(b"\r\n")
        if not line:
            if data:
                payload = b"\n".join(data)
                data = []
                if payload == b"[DONE]":
                    return
                yield payload
            continue
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        # comments (":") and other fields (event:, id:, retry:) carry nothing we relay
    if data:
        payload = b"\n".join(data)
        if payload != b"[DONE]":
            yield payload
