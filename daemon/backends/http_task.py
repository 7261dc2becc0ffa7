"""Any task class served by a local HTTP endpoint: task class name → URL.

This is how a task class the operator added by a catalog write (say ``image-generation``)
gets served without a daemon release: the daemon POSTs the dispatch's JSON body to the URL
configured for that class and relays the JSON answer (status and body). ``body["model"]``,
when present and mapped, is rewritten to the local name; the body is otherwise sent as the
gateway validated it. Results are not streamed: a streamed dispatch is refused (400).

Advertised models are the canonical names of the model map (the endpoints cannot list what
they serve); the default model is not this backend's to choose.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import Any

import msgspec

from daemon.backends.base import Advertisement, BackendReply
from daemon.backends.errors import StreamingNotSupported, UnsupportedTask
from daemon.backends.http_client import HttpSession, HttpTimeouts, new_session, post_json
from daemon.backends.mapping import ModelMap

__all__ = ["HttpTaskBackend"]

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class HttpTaskBackend:
    """POSTs each dispatch to the URL of its task class (see the module docstring)."""

    def __init__(
        self,
        task_urls: Mapping[str, str],
        *,
        model_map: ModelMap | None = None,
        concurrency: int = 256,
        timeouts: HttpTimeouts | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        for task, url in task_urls.items():
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"the URL for '{task}' is not http(s): {url!r}")
        self.task_urls = dict(task_urls)
        self._map = model_map or ModelMap()
        self._concurrency = concurrency
        self._timeouts = timeouts or HttpTimeouts()
        self._headers = dict(headers or {})
        self._session: HttpSession | None = None

    async def describe(self) -> Advertisement:
        return Advertisement(
            task_classes=tuple(self.task_urls),
            models=self._map.advertised(),
            default_model=None,
            concurrency=self._concurrency,
        )

    async def call(self, task: str, model: str, body: bytes) -> BackendReply:
        url = self.task_urls.get(task)
        if url is None:
            raise UnsupportedTask(f"No local endpoint serves '{task}' on this runtime.")
        if self._session is None:
            self._session = new_session(self._concurrency)
        return await post_json(
            self._session, url, self._rewrite(model, body), self._timeouts, self._headers
        )

    async def stream(self, task: str, model: str, body: bytes) -> AsyncGenerator[bytes, None]:
        raise StreamingNotSupported(f"'{task}' is served by a plain HTTP endpoint: not streamed.")
        yield b""  # pragma: no cover  (makes this an async generator)

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _rewrite(self, model: str, body: bytes) -> bytes:
        local = self._map.to_local(model)
        if local is None:
            return body
        try:
            request: Any = _decode(body)
        except (msgspec.DecodeError, RecursionError):
            return body  # the gateway validated it against the class's schema: pass it on
        if not isinstance(request, dict) or "model" not in request:
            return body
        request["model"] = local
        return _encode(request)
