"""A local OpenAI-compatible server as a backend: Ollama, llama.cpp server, vLLM, LM Studio.

:func:`detect` finds them on their default loopback ports (Ollama 11434, llama.cpp 8080,
vLLM 8000, LM Studio 1234) by asking each ``GET /v1/models`` at once; a port counts only if
it answers with an OpenAI model list, so an unrelated web server there is ignored.

:class:`OpenAICompatBackend` forwards ``chat-completion`` → ``/chat/completions``,
``text-completion`` → ``/completions`` and ``embedding`` → ``/embeddings`` (under a base URL
that ends in ``/v1``), with ``body["model"]`` rewritten to the local name
(:mod:`daemon.backends.mapping`) and ``stream`` set to match the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import msgspec

from daemon.backends.base import Advertisement, BackendReply
from daemon.backends.errors import (
    BackendRejected,
    BadBackendReply,
    StreamingNotSupported,
    UnsupportedModel,
    UnsupportedTask,
)
from daemon.backends.http_client import (
    HttpSession,
    HttpTimeouts,
    get_json,
    new_session,
    post_json,
    stream_sse,
)
from daemon.backends.mapping import ModelMap, pick_default

__all__ = [
    "DEFAULT_PORTS",
    "TASK_PATHS",
    "DetectedServer",
    "OpenAICompatBackend",
    "detect",
    "normalize_base_url",
]

#: Ollama, llama.cpp server, vLLM, LM Studio.
DEFAULT_PORTS: tuple[int, ...] = (11434, 8080, 8000, 1234)
TASK_PATHS: dict[str, str] = {
    "chat-completion": "/chat/completions",
    "text-completion": "/completions",
    "embedding": "/embeddings",
}
_STREAMING_TASKS = frozenset({"chat-completion", "text-completion"})


class _ModelCard(msgspec.Struct):
    id: str


class _ModelList(msgspec.Struct):
    data: list[_ModelCard]


_decode_models = msgspec.json.Decoder(_ModelList).decode
_decode_object = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode


class DetectedServer(msgspec.Struct, frozen=True):
    """A local OpenAI-compatible server that answered, with the models it listed."""

    base_url: str
    models: tuple[str, ...]


def normalize_base_url(url: str) -> str:
    """``http://host:port`` or ``…/`` becomes ``http://host:port/v1`` (the OpenAI SDKs'
    convention: the base URL includes ``/v1``); a URL with a path is kept as given."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) base URL: {url!r}")
    path = parts.path.rstrip("/") or "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _auth(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


async def _list_models(
    session: aiohttp.ClientSession, base_url: str, limit: aiohttp.ClientTimeout
) -> tuple[str, ...] | None:
    """The model ids at ``{base_url}/models``, or ``None`` if that is not an OpenAI list."""
    try:
        async with session.get(base_url + "/models", timeout=limit) as resp:
            if resp.status != 200:
                return None
            body = await resp.read()
    except (aiohttp.ClientError, TimeoutError):
        return None
    try:
        return tuple(card.id for card in _decode_models(body).data)
    except (msgspec.DecodeError, RecursionError):
        return None


async def detect(
    ports: Sequence[int] = DEFAULT_PORTS,
    host: str = "127.0.0.1",
    timeout: float = 0.3,  # noqa: ASYNC109 (each probe's limit, not the caller's deadline)
    api_key: str | None = None,
) -> list[DetectedServer]:
    """The OpenAI-compatible servers answering on ``host`` at ``ports`` (probed concurrently,
    each within ``timeout`` s), in the order of ``ports``."""
    limit = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(headers=_auth(api_key)) as session:
        urls = [f"http://{host}:{port}/v1" for port in ports]
        found = await asyncio.gather(*(_list_models(session, url, limit) for url in urls))
    return [
        DetectedServer(url, models)
        for url, models in zip(urls, found, strict=True)
        if models is not None
    ]


class OpenAICompatBackend:
    """Forwards dispatches to one OpenAI-compatible server (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model_map: ModelMap | None = None,
        default_model: str | None = None,
        concurrency: int = 256,
        timeouts: HttpTimeouts | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self._headers = _auth(api_key)
        self._map = model_map or ModelMap()
        self._configured_default = default_model
        self._default: str | None = None
        self._concurrency = concurrency
        self._timeouts = timeouts or HttpTimeouts()
        self._session: HttpSession | None = None

    def _http(self) -> HttpSession:
        if self._session is None:
            self._session = new_session(self._concurrency, self._headers)
        return self._session

    async def describe(self) -> Advertisement:
        """Asks the server for its models: advertises the mapped ones it has."""
        url = self.base_url + "/models"
        reply = await get_json(self._http(), url, self._timeouts)
        try:
            local = tuple(card.id for card in _decode_models(reply.body).data)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise BadBackendReply(f"The local backend at {url} sent no model list.") from exc
        self._default = pick_default(self._map, self._configured_default, local)
        return Advertisement(
            task_classes=tuple(TASK_PATHS),
            models=self._map.advertised(local),
            default_model=self._default,
            concurrency=self._concurrency,
        )

    async def call(self, task: str, model: str, body: bytes) -> BackendReply:
        url, payload = self._prepare(task, model, body, stream=False)
        return await post_json(self._http(), url, payload, self._timeouts)

    async def stream(self, task: str, model: str, body: bytes) -> AsyncGenerator[bytes, None]:
        if task not in _STREAMING_TASKS and task in TASK_PATHS:
            raise StreamingNotSupported(f"'{task}' results are not streamed.")
        url, payload = self._prepare(task, model, body, stream=True)
        async for chunk in stream_sse(self._http(), url, payload, self._timeouts):
            yield chunk

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _prepare(self, task: str, model: str, body: bytes, *, stream: bool) -> tuple[str, bytes]:
        path = TASK_PATHS.get(task)
        if path is None:
            raise UnsupportedTask(
                f"This runtime's OpenAI-compatible backend does not serve '{task}'."
            )
        local = self._map.to_local(model) or (model if model == self._default else None)
        if local is None:
            raise UnsupportedModel(
                f"This runtime does not serve the model '{model}'.", param="model"
            )
        try:
            request = _decode_object(body)
        except (msgspec.DecodeError, RecursionError):
            raise BackendRejected("The request body is not a JSON object.", status=400) from None
        request["model"] = local
        if task in _STREAMING_TASKS:
            if stream:
                request["stream"] = True
            else:
                # Some servers (vLLM) refuse stream_options on a non-streamed request.
                request.pop("stream", None)
                request.pop("stream_options", None)
        return self.base_url + path, _encode(request)
