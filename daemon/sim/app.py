"""The simulated OpenAI-compatible backend as a raw ASGI app (no web framework):
:class:`SimApp` serves :class:`daemon.sim.engine.SimEngine`. It is a simulator: the text is
deterministic filler, not a model's answer.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/embeddings``. Errors use OpenAI's envelope ``{"error": {message, type, param,
code}}``: 400 for bad JSON or wrong types, 401 without ``Authorization: Bearer <api_key>``
when the server has a key, 404 for unknown paths and models. Streams are SSE (one write per
decode step, then ``data: [DONE]``); a client disconnect stops the stream at the next step.
The per-token delay (``--token-delay-ms``, or a request's ``sim_token_delay_ms``) paces every
decode step of a stream, and delays a non-streamed answer by as many steps.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence

import msgspec

from daemon.sim.asgi import (
    Disconnected,
    Receive,
    Scope,
    Send,
    bad_request,
    lifespan,
    read_body,
    send_error,
    send_json,
)
from daemon.sim.engine import (
    DEFAULT_EMBEDDING_DIM,
    DEFAULT_MODELS,
    SimEngine,
    SimError,
    SimModel,
)
from daemon.sim.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    Usage,
)

__all__ = ["SimApp", "SimConfig", "SimStats", "create_app"]

BURST_STEPS = 64  # steps per write when there is no token delay
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_DONE = b"data: [DONE]\n\n"

_encode = msgspec.json.Encoder().encode
_decode_chat = msgspec.json.Decoder(ChatCompletionRequest).decode
_decode_completion = msgspec.json.Decoder(CompletionRequest).decode
_decode_embeddings = msgspec.json.Decoder(EmbeddingRequest).decode


class SimConfig(msgspec.Struct, frozen=True):
    """Settings of one simulated backend; ``api_key=None`` accepts any caller."""

    models: tuple[SimModel, ...] = DEFAULT_MODELS
    token_delay_ms: float = 0.0
    api_key: str | None = None
    embedding_dim: int = DEFAULT_EMBEDDING_DIM


class SimStats:
    """Counters a test or benchmark can read (the app is single-threaded on its loop)."""

    __slots__ = ("chunks_sent", "requests", "streams_cancelled", "streams_completed")

    def __init__(self) -> None:
        self.requests = 0
        self.chunks_sent = 0
        self.streams_completed = 0
        self.streams_cancelled = 0


class SimApp:
    """The ASGI callable; build it with :func:`create_app`."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.engine = SimEngine(config.models, config.embedding_dim)
        self.stats = SimStats()
        self._auth = None if config.api_key is None else b"Bearer " + config.api_key.encode()
        self._ids = itertools.count()
        self._id_prefix = secrets.token_hex(6)
        self._models_body = _encode(self.engine.list_models())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await lifespan(receive, send)

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}-sim{self._id_prefix}{next(self._ids):x}"

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.stats.requests += 1
        if self._auth is not None and not self._authorized(scope):
            await send_error(
                send,
                SimError(
                    401,
                    "Incorrect API key provided (lattice sim expects `Authorization: Bearer`).",
                    code="invalid_api_key",
                ),
            )
            return
        path, method = scope["path"].rstrip("/"), scope["method"]
        route = _ROUTES.get(path)
        if route is None:
            await send_error(
                send,
                SimError(
                    404, f"Unknown request URL: {method} {scope['path']}.", code="unknown_url"
                ),
            )
            return
        if method != route:
            await send_error(
                send,
                SimError(
                    405, f"Method {method} is not allowed on {path}.", code="method_not_allowed"
                ),
            )
            return
        try:
            if path == "/v1/models":
                await send_json(send, self._models_body)
            elif path == "/v1/chat/completions":
                await self._chat(await read_body(receive), receive, send)
            elif path == "/v1/completions":
                await self._completion(await read_body(receive), receive, send)
            else:
                request = _decode_embeddings(await read_body(receive))
                await send_json(send, _encode(self.engine.embeddings(request)))
        except (msgspec.DecodeError, RecursionError) as exc:
            await send_error(send, bad_request(exc))
        except SimError as exc:
            await send_error(send, exc)

    def _authorized(self, scope: Scope) -> bool:
        assert self._auth is not None
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value, self._auth)
        return False

    async def _chat(self, body: bytes, receive: Receive, send: Send) -> None:
        request = _decode_chat(body)
        rid, created = self._next_id("chatcmpl"), int(time.time())
        delay = self._delay(request.sim_token_delay_ms)
        if not request.stream:
            response = self.engine.chat(request, id=rid, created=created)
            await _pace(delay, response.usage.completion_tokens, len(response.choices))
            await send_json(send, _encode(response))
            return
        steps = self.engine.chat_stream(request, id=rid, created=created)
        await self._stream(steps, delay, receive, send)

    async def _completion(self, body: bytes, receive: Receive, send: Send) -> None:
        request = _decode_completion(body)
        rid, created = self._next_id("cmpl"), int(time.time())
        delay = self._delay(request.sim_token_delay_ms)
        if not request.stream:
            response = self.engine.completion(request, id=rid, created=created)
            if isinstance(response.usage, Usage):
                await _pace(delay, response.usage.completion_tokens, len(response.choices))
            await send_json(send, _encode(response))
            return
        steps = self.engine.completion_stream(request, id=rid, created=created)
        await self._stream(steps, delay, receive, send)

    def _delay(self, per_request_ms: float | None) -> float:
        ms = self.config.token_delay_ms if per_request_ms is None else per_request_ms
        return ms / 1000.0

    async def _stream(
        self, steps: Iterator[Sequence[msgspec.Struct]], delay: float, receive: Receive, send: Send
    ) -> None:
        """SSE: one write per step, sleeping ``delay`` s before every step but the first.

        With no delay every step is produced at the same instant, so steps go out in writes
        of up to :data:`BURST_STEPS` steps: a short answer is one write ending in ``[DONE]``.
        """
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        if not delay:
            batch = self._encode_steps(itertools.islice(steps, BURST_STEPS))
            more = next(steps, None)
            if more is None:  # the whole answer fits one write: no need to watch the client
                await send({"type": "http.response.body", "body": batch + _DONE})
                self.stats.streams_completed += 1
                return
            await send({"type": "http.response.body", "body": batch, "more_body": True})
            steps = itertools.chain([more], steps)
        else:
            first = self._encode_steps(itertools.islice(steps, 1))  # role chunks: no delay
            await send({"type": "http.response.body", "body": first, "more_body": True})
        disconnected = Disconnected()
        watcher = asyncio.ensure_future(disconnected.watch(receive))
        try:
            while True:
                if delay:
                    step = next(steps, None)
                    if step is None:
                        break
                    await asyncio.sleep(delay)
                    body = self._encode_steps([step])
                else:
                    await asyncio.sleep(0)  # let the watcher see a disconnect
                    body = self._encode_steps(itertools.islice(steps, BURST_STEPS))
                    if not body:
                        break
                if disconnected.is_set:
                    self.stats.streams_cancelled += 1
                    return
                await send({"type": "http.response.body", "body": body, "more_body": True})
            await send({"type": "http.response.body", "body": _DONE})
            self.stats.streams_completed += 1
        finally:
            watcher.cancel()

    def _encode_steps(self, steps: Iterable[Sequence[msgspec.Struct]]) -> bytes:
        chunks = [chunk for step in steps for chunk in step]
        self.stats.chunks_sent += len(chunks)
        return b"".join([b"data: " + _encode(chunk) + b"\n\n" for chunk in chunks])


_ROUTES = {
    "/v1/models": "GET",
    "/v1/chat/completions": "POST",
    "/v1/completions": "POST",
    "/v1/embeddings": "POST",
}


def create_app(config: SimConfig | None = None) -> SimApp:
    """The simulator's ASGI app (``config`` defaults to :class:`SimConfig`'s defaults)."""
    return SimApp(config or SimConfig())


async def _pace(delay: float, tokens: int, choices: int) -> None:
    """A non-streamed answer takes as long as its decode steps would (choices decode in
    parallel, so one step per token of the mean choice)."""
    if delay and tokens:
        await asyncio.sleep(delay * round(tokens / max(choices, 1)))
