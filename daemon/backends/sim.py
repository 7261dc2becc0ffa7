"""The simulator as an in-process backend: :class:`daemon.sim.engine.SimEngine`, no HTTP.

Serves ``chat-completion`` and ``text-completion`` with the simulator's text models and
``embedding`` with its embedding models. Its models are named after catalog models, so each
is advertised as ``lovelace:<name>`` unless a mapping says otherwise. ``token_delay_ms``
paces every decode step of a stream (and delays a non-streamed answer by as many steps), as
``lattice sim --token-delay-ms`` does; a request's ``sim_token_delay_ms`` overrides it.

The output is deterministic filler from a simulator, not a model's answer.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
import time
from collections.abc import AsyncGenerator, Iterator, Sequence

import msgspec

from daemon.backends.base import Advertisement, BackendReply
from daemon.backends.errors import (
    BackendRejected,
    StreamingNotSupported,
    UnsupportedModel,
    UnsupportedTask,
)
from daemon.backends.mapping import ModelMap, pick_default
from daemon.sim.engine import DEFAULT_EMBEDDING_DIM, DEFAULT_MODELS, SimEngine, SimError, SimModel
from daemon.sim.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ErrorBody,
    ErrorResponse,
    Usage,
)

__all__ = ["SimBackend"]

#: Steps produced between two yields to the event loop when there is no delay, so a long
#: stream does not hold the loop (same burst size as the simulator's HTTP server).
_BURST_STEPS = 64

_PARAM_PATH = re.compile(r"at `\$\.([^`\[]+)")
_encode = msgspec.json.Encoder().encode
_decode_chat = msgspec.json.Decoder(ChatCompletionRequest).decode
_decode_completion = msgspec.json.Decoder(CompletionRequest).decode
_decode_embeddings = msgspec.json.Decoder(EmbeddingRequest).decode


class SimBackend:
    """The simulator, in-process (see the module docstring)."""

    def __init__(
        self,
        *,
        models: Sequence[SimModel] = DEFAULT_MODELS,
        token_delay_ms: float = 0.0,
        model_map: ModelMap | None = None,
        default_model: str | None = None,
        concurrency: int = 256,
        embedding_dim: int = DEFAULT_EMBEDDING_DIM,
    ) -> None:
        if token_delay_ms < 0:
            raise ValueError("token_delay_ms must be >= 0")
        self.engine = SimEngine(models, embedding_dim)
        self.token_delay_ms = token_delay_ms
        names = ModelMap({m.id: m.id for m in models})  # "x" → "lovelace:x" = "x"
        self._map = names.merged(model_map or ModelMap())
        local = [m.id for m in models]
        self._default = pick_default(self._map, default_model, local)
        kinds = {m.kind for m in models}
        tasks = []
        if "text" in kinds:
            tasks += ["chat-completion", "text-completion"]
        if "embedding" in kinds:
            tasks.append("embedding")
        self._advertisement = Advertisement(
            task_classes=tuple(tasks),
            models=self._map.advertised(local),
            default_model=self._default,
            concurrency=concurrency,
        )
        self._ids = itertools.count()
        self._id_prefix = secrets.token_hex(6)

    async def describe(self) -> Advertisement:
        return self._advertisement

    async def call(self, task: str, model: str, body: bytes) -> BackendReply:
        local = self._local(task, model)
        try:
            if task == "chat-completion":
                chat = _decode_chat(body)
                chat.model = local
                result = self.engine.chat(chat, id=self._id("chatcmpl"), created=_now())
                await self._pace(chat.sim_token_delay_ms, result.usage, len(result.choices))
                return BackendReply(200, _encode(result))
            if task == "text-completion":
                legacy = _decode_completion(body)
                legacy.model = local
                done = self.engine.completion(legacy, id=self._id("cmpl"), created=_now())
                await self._pace(legacy.sim_token_delay_ms, done.usage, len(done.choices))
                return BackendReply(200, _encode(done))
            request = _decode_embeddings(body)
            request.model = local
            return BackendReply(200, _encode(self.engine.embeddings(request)))
        except (msgspec.DecodeError, RecursionError, SimError) as exc:
            raise _rejected(exc) from None

    async def stream(self, task: str, model: str, body: bytes) -> AsyncGenerator[bytes, None]:
        local = self._local(task, model)
        try:
            if task == "chat-completion":
                chat = _decode_chat(body)
                chat.model = local
                chat.stream = True
                delay_ms = chat.sim_token_delay_ms
                steps = _encoded(
                    self.engine.chat_stream(chat, id=self._id("chatcmpl"), created=_now())
                )
            elif task == "text-completion":
                legacy = _decode_completion(body)
                legacy.model = local
                legacy.stream = True
                delay_ms = legacy.sim_token_delay_ms
                steps = _encoded(
                    self.engine.completion_stream(legacy, id=self._id("cmpl"), created=_now())
                )
            else:
                raise StreamingNotSupported(f"'{task}' results are not streamed.")
        except (msgspec.DecodeError, RecursionError, SimError) as exc:
            raise _rejected(exc) from None
        delay = self._delay(delay_ms)
        n = 0
        while True:
            try:
                step = next(steps, None)
            except SimError as exc:  # the engine validates up front; this is a safety net
                raise _rejected(exc) from None
            if step is None:
                return
            if n and delay:  # the first step (role chunks) goes out at once
                await asyncio.sleep(delay)
            elif n and n % _BURST_STEPS == 0:
                await asyncio.sleep(0)
            n += 1
            for chunk in step:
                yield chunk

    async def aclose(self) -> None:
        return None

    def _local(self, task: str, model: str) -> str:
        if task not in self._advertisement.task_classes:
            raise UnsupportedTask(f"The simulator does not serve '{task}'.")
        local = self._map.to_local(model) or (model if model == self._default else None)
        if local is None or local not in self.engine.models:
            raise UnsupportedModel(
                f"This runtime does not serve the model '{model}'.", param="model"
            )
        return local

    def _id(self, prefix: str) -> str:
        return f"{prefix}-sim{self._id_prefix}{next(self._ids):x}"

    def _delay(self, per_request_ms: float | None) -> float:
        ms = self.token_delay_ms if per_request_ms is None else per_request_ms
        return ms / 1000.0

    async def _pace(self, per_request_ms: float | None, usage: object, choices: int) -> None:
        """A non-streamed answer takes as long as its decode steps would (one step per token
        of the mean choice, as the simulator's server paces it)."""
        delay = self._delay(per_request_ms)
        if delay and isinstance(usage, Usage) and usage.completion_tokens:
            await asyncio.sleep(delay * round(usage.completion_tokens / max(choices, 1)))


def _encoded(steps: Iterator[Sequence[msgspec.Struct]]) -> Iterator[list[bytes]]:
    """Each step's chunks as JSON, encoded only when the step is reached."""
    return ([_encode(chunk) for chunk in step] for step in steps)


def _now() -> int:
    return int(time.time())


def _rejected(exc: msgspec.DecodeError | RecursionError | SimError) -> BackendRejected:
    """The refusal, with the body the simulator's HTTP server would have sent."""
    if isinstance(exc, msgspec.ValidationError):
        # msgspec names the field as "... - at `$.field`"; OpenAI reports it as ``param``.
        match = _PARAM_PATH.search(str(exc))
        exc = SimError(400, f"Invalid request: {exc}", param=match.group(1) if match else None)
    elif not isinstance(exc, SimError):
        exc = SimError(
            400, f"We could not parse the JSON body of your request. (lattice sim: {exc})"
        )
    error = ErrorBody(message=exc.message, type=exc.type, param=exc.param, code=exc.code)
    return BackendRejected.from_reply(exc.status, _encode(ErrorResponse(error=error)))
