"""The simulated OpenAI-compatible backend over HTTP: a raw ASGI app (no web framework).

``lattice sim`` serves :class:`daemon.sim.engine.SimEngine` on uvicorn (uvloop + httptools,
no access log) so tests, benchmarks and ``lattice up`` have an upstream when no real backend
is configured. It is a simulator: the text is deterministic filler, not a model's answer.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/embeddings``. Errors use OpenAI's envelope ``{"error": {message, type, param,
code}}``: 400 for bad JSON or wrong types, 401 without ``Authorization: Bearer <api_key>``
when the server has a key, 404 for unknown paths and models. Streams are SSE (one write per
decode step, then ``data: [DONE]``); a client disconnect stops the stream at the next step.
The per-token delay (``--token-delay-ms``, or a request's ``sim_token_delay_ms``) paces every
decode step of a stream, and delays a non-streamed answer by as many steps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import itertools
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from typing import Any

import msgspec
import uvicorn

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
    ErrorBody,
    ErrorResponse,
    Usage,
)

__all__ = [
    "SimApp",
    "SimConfig",
    "SimStats",
    "SimThread",
    "config_from_args",
    "create_app",
    "main",
    "serve",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY = 32 * 1024 * 1024
BURST_STEPS = 64  # steps per write when there is no token delay
_JSON = b"application/json"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_DONE = b"data: [DONE]\n\n"
_PARAM_PATH = re.compile(r"at `\$\.([^`\[]+)")

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


class _Disconnected:
    """Set by a watcher task when the ASGI server reports ``http.disconnect``."""

    __slots__ = ("is_set",)

    def __init__(self) -> None:
        self.is_set = False

    async def watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.is_set = True


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
            await _lifespan(receive, send)

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}-sim{self._id_prefix}{next(self._ids):x}"

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.stats.requests += 1
        if self._auth is not None and not self._authorized(scope):
            await _error(
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
            await _error(
                send,
                SimError(
                    404, f"Unknown request URL: {method} {scope['path']}.", code="unknown_url"
                ),
            )
            return
        if method != route:
            await _error(
                send,
                SimError(
                    405, f"Method {method} is not allowed on {path}.", code="method_not_allowed"
                ),
            )
            return
        try:
            if path == "/v1/models":
                await _json(send, self._models_body)
            elif path == "/v1/chat/completions":
                await self._chat(await _body(receive), receive, send)
            elif path == "/v1/completions":
                await self._completion(await _body(receive), receive, send)
            else:
                request = _decode_embeddings(await _body(receive))
                await _json(send, _encode(self.engine.embeddings(request)))
        except msgspec.DecodeError as exc:
            await _error(send, _bad_request(exc))
        except SimError as exc:
            await _error(send, exc)

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
            await _json(send, _encode(response))
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
            await _json(send, _encode(response))
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
        disconnected = _Disconnected()
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


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _body(receive: Receive) -> bytes:
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


async def _json(send: Send, body: bytes, status: int = 200) -> None:
    headers = [(b"content-type", _JSON), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _error(send: Send, exc: SimError) -> None:
    body = ErrorBody(message=exc.message, type=exc.type, param=exc.param, code=exc.code)
    await _json(send, _encode(ErrorResponse(error=body)), exc.status)


def _bad_request(exc: msgspec.DecodeError) -> SimError:
    if not isinstance(exc, msgspec.ValidationError):
        return SimError(
            400, f"We could not parse the JSON body of your request. (lattice sim: {exc})"
        )
    # msgspec names the offending field as "... - at `$.field`"; OpenAI reports it as `param`.
    match = _PARAM_PATH.search(str(exc))
    return SimError(400, f"Invalid request: {exc}", param=match.group(1) if match else None)


# -- running it ---------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    announce = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.announce:
            print(
                f"lattice sim: simulated OpenAI-compatible backend on {_base_url(self)}", flush=True
            )


def _base_url(server: uvicorn.Server) -> str:
    host = server.config.host
    port = server.config.port
    for listener in getattr(server, "servers", []):
        for sock in listener.sockets:
            port = sock.getsockname()[1]
    return f"http://{host}:{port}/v1"


def _build(host: str, port: int, config: SimConfig) -> _Server:
    return _Server(
        uvicorn.Config(
            create_app(config),
            host=host,
            port=port,
            http="httptools",
            loop="uvloop",
            lifespan="off",
            access_log=False,
            log_level="warning",
        )
    )


def serve(host: str = "127.0.0.1", port: int = 9100, config: SimConfig | None = None) -> None:
    """Serve the simulator until interrupted (blocking); prints one line when listening."""
    server = _build(host, port, config or SimConfig())
    server.announce = True
    server.run()


class SimThread:
    """The simulator on a background thread, for tests and benchmarks in one process.

    ``port=0`` picks a free port; ``base_url`` is known once :meth:`start` returns.
    """

    def __init__(
        self, config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._server = _build(host, port, config or SimConfig())
        self._thread = threading.Thread(target=self._server.run, name="lattice-sim", daemon=True)

    @property
    def app(self) -> SimApp:
        app = self._server.config.app
        assert isinstance(app, SimApp)
        return app

    @property
    def base_url(self) -> str:
        return _base_url(self._server)

    def start(self, timeout: float = 10.0) -> SimThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("lattice sim did not start")
            time.sleep(0.005)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> SimThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lattice sim",
        description="Run a deterministic simulated OpenAI-compatible backend (not a real model).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument(
        "--token-delay-ms",
        type=float,
        default=0.0,
        help="delay before each streamed decode step (default 0)",
    )
    parser.add_argument(
        "--api-key", default=None, help="require `Authorization: Bearer KEY` on every request"
    )
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="NAME",
        help="a chat/completions model (repeatable; replaces the default)",
    )
    parser.add_argument(
        "--embedding-model",
        action="append",
        default=None,
        metavar="NAME",
        help="an embedding model (repeatable; replaces the default)",
    )
    parser.add_argument("--embedding-dim", type=int, default=DEFAULT_EMBEDDING_DIM)
    return parser


def config_from_args(args: argparse.Namespace) -> SimConfig:
    text = [m for m in DEFAULT_MODELS if m.kind == "text"]
    embedding = [m for m in DEFAULT_MODELS if m.kind == "embedding"]
    if args.model:
        text = [SimModel(name) for name in args.model]
    if args.embedding_model:
        embedding = [SimModel(name, kind="embedding") for name in args.embedding_model]
    return SimConfig(
        models=(*text, *embedding),
        token_delay_ms=args.token_delay_ms,
        api_key=args.api_key,
        embedding_dim=args.embedding_dim,
    )


def main(argv: list[str] | None = None) -> int:
    """``lattice sim``: parse flags, serve until interrupted, return the exit code."""
    args = _parser().parse_args(argv)
    if args.embedding_dim < 1 or args.token_delay_ms < 0:
        print("lattice sim: --embedding-dim must be >= 1, --token-delay-ms >= 0", file=sys.stderr)
        return 2
    # uvicorn re-raises SIGINT once its graceful shutdown is done: that is a clean exit.
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.host, args.port, config_from_args(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
