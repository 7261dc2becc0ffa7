"""The simulator's engine: deterministic fake generation in OpenAI's shapes (pure, no I/O).

This is a *simulator*, not a model. Output is a pure function of the request:

- text: each choice draws words from :data:`VOCABULARY` with a PRNG seeded from a BLAKE2b hash
  of ``(model, prompt text, seed, choice index)`` — never Python's salted ``hash()`` — so the
  same request gives the same words in every process. A shorter ``max_tokens`` gives a prefix
  of the longer answer. The natural length is 8-24 tokens (``finish_reason: "stop"``); a
  ``max_tokens`` below it ends with ``"length"``. A token is a word with a leading space
  (the first is capitalised, without one).
- prompt tokens: whitespace-split words of every message's text + 3 per message (chat), words
  of the prompt or the length of a token array (completions, embeddings).
- embeddings: unit vectors (L2 norm 1) from SHAKE-256 of the input, rounded to float32 so the
  ``float`` and ``base64`` encodings carry the same numbers.

No clock and no randomness from the outside: the caller passes ``id`` and ``created``.
Streaming builders return an iterator of *steps*: the first step is sent at once (role/echo
chunks), each later step is one decode step (one token per choice), which is where a server
puts its per-token delay.
"""

from __future__ import annotations

import array
import base64
import hashlib
import math
import random
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Literal

import msgspec

from daemon.sim.protocol import (
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    FunctionCall,
    ModelCard,
    ModelList,
    TextOrTokens,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    TopLogprob,
    Usage,
)

__all__ = [
    "DEFAULT_EMBEDDING_DIM",
    "DEFAULT_MODELS",
    "OWNED_BY",
    "SYSTEM_FINGERPRINT",
    "VOCABULARY",
    "Generation",
    "SimEngine",
    "SimError",
    "SimModel",
    "embed",
    "generate",
]

OWNED_BY = "lattice-sim"
SYSTEM_FINGERPRINT = "fp_lattice_sim"
MODEL_CREATED = 1735689600  # 2025-01-01, fixed: the engine has no clock
DEFAULT_EMBEDDING_DIM = 384
MAX_GENERATED_TOKENS = 4096  # cap for ignore_eos without max_tokens
NATURAL_LENGTH = (8, 24)

# Filler words (deduplicated below); a token is one of them, never a real model's output.
_WORDS = """
the of and to in is was for that on as with by it at from his an were are which this be has
or had not but one their its also first new after who they two have her she been other when
there all time during into would more may over can only most some than then these people
year state world city between many under later while both use part such where through made
before each since well three work system team known until against high found however life
number small music second place name early several album game house water during river north
south east west light sound signal model token vector stream queue route price value market
cloud local daemon worker tunnel request answer order field forest mountain valley garden
bridge window paper letter story history science nature energy power engine motor wheel road
track station harbor island ocean coast desert summer winter spring autumn morning evening
night day week month color green blue red yellow silver golden quiet bright simple clear
steady rapid gentle careful honest patient curious brave calm warm cool soft strong light
heavy ancient modern public private open closed final central common natural human animal
plant stone metal glass wood cotton bread salt sugar coffee tea milk apple river cable
circuit signal pattern method theory reason result effect cause change growth balance
measure limit design shape level layer surface center corner edge point line circle square
frame bridge tower castle village market harbor
"""
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(_WORDS.split()))

_V = len(VOCABULARY)
_FIRST = tuple(word.capitalize() for word in VOCABULARY)
_REST = tuple(" " + word for word in VOCABULARY)
_ALT_STRIDE = 37  # coprime with _V: the 19 alternatives of a token are distinct words
assert math.gcd(_ALT_STRIDE, _V) == 1 and _V > 20
_PROMPT_PIECES = re.compile(r"\s*\S+|\s+")


class SimModel(msgspec.Struct, frozen=True):
    """A simulated model: ``kind="text"`` serves chat and completions, ``"embedding"`` embeds."""

    id: str
    kind: Literal["text", "embedding"] = "text"


DEFAULT_MODELS: tuple[SimModel, ...] = (
    SimModel("llama-3.2-3b-instruct"),
    SimModel("all-minilm-l6-v2", kind="embedding"),
)


class SimError(Exception):
    """A request the simulator refuses, rendered as OpenAI's error envelope with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code


class Generation(msgspec.Struct, frozen=True):
    """One choice's output. ``top`` holds, per token, the ``(token, logprob)`` alternatives
    (the chosen token first) when logprobs were asked for, else it is ``None``."""

    tokens: list[str]
    finish_reason: str
    logprobs: list[float] | None = None
    top: list[list[tuple[str, float]]] | None = None

    @property
    def text(self) -> str:
        return "".join(self.tokens)


def _seed_int(*parts: str) -> int:
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def generate(
    model: str,
    prompt: str,
    *,
    seed: int | None = None,
    index: int = 0,
    max_tokens: int | None = None,
    stop: Sequence[str] = (),
    min_tokens: int = 0,
    ignore_eos: bool = False,
    top_logprobs: int | None = None,
) -> Generation:
    """Deterministic tokens for one choice; ``top_logprobs`` (0-20) asks for logprobs."""
    seed_int = _seed_int(model, str(seed), str(index), prompt)
    rng = random.Random(seed_int)
    natural = rng.randint(*NATURAL_LENGTH)
    limit = MAX_GENERATED_TOKENS if ignore_eos else max(natural, min_tokens)
    finish = "stop"
    if max_tokens is not None and max_tokens < limit:
        limit, finish = max_tokens, "length"
    elif ignore_eos:
        finish = "length"
    picks = [int(rng.random() * _V) for _ in range(limit)]
    tokens = [_FIRST[i] if pos == 0 else _REST[i] for pos, i in enumerate(picks)]
    if stop:
        cut = _stop_cut(tokens, stop)
        if cut is not None:
            tokens, finish = cut, "stop"
    if top_logprobs is None:
        return Generation(tokens, finish)
    lp_rng = random.Random(seed_int ^ 0x5DEECE66D)
    logprobs: list[float] = []
    top: list[list[tuple[str, float]]] = []
    for pos, token in enumerate(tokens):
        logprob = -round(lp_rng.random() * 2.0, 6)
        alternatives = [(token, logprob)]
        table = _FIRST if pos == 0 else _REST
        below = logprob
        for j in range(1, top_logprobs):
            below = round(below - 0.25 - lp_rng.random() * 0.5, 6)  # strictly decreasing
            alternatives.append((table[(picks[pos] + j * _ALT_STRIDE) % _V], below))
        logprobs.append(logprob)
        top.append(alternatives[:top_logprobs])
    return Generation(tokens, finish, logprobs, top)


def _stop_cut(tokens: list[str], stop: Sequence[str]) -> list[str] | None:
    """Tokens up to (not including) the earliest stop sequence, or ``None`` if none occurs."""
    text = "".join(tokens)
    found = [p for p in (text.find(s) for s in stop if s) if p >= 0]
    if not found:
        return None
    end = min(found)
    kept: list[str] = []
    offset = 0
    for token in tokens:
        if offset + len(token) > end:
            if end > offset:
                kept.append(token[: end - offset])
            break
        kept.append(token)
        offset += len(token)
    return kept


def embed(text_key: str, dim: int, dimensions: int | None = None) -> list[float]:
    """A deterministic unit vector for an input (``dimensions`` truncates and renormalises)."""
    raw = hashlib.shake_256(text_key.encode()).digest(4 * dim)
    ints = array.array("i", raw)
    if sys.byteorder == "big":
        ints.byteswap()
    values = [x / 2147483648.0 for x in ints[: dimensions or dim]]
    norm = math.hypot(*values) or 1.0
    return array.array("f", [x / norm for x in values]).tolist()


def _float32_base64(vector: list[float]) -> str:
    # The OpenAI SDK decodes base64 embeddings as little-endian float32.
    packed = array.array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode()


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _message_text(message: ChatMessage) -> str:
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(part.text for part in content if part.type == "text" and part.text)


def _token_bytes(token: str) -> list[int]:
    return list(token.encode())


def _chat_logprobs(gen: Generation, start: int = 0, stop: int | None = None) -> ChatLogprobs:
    assert gen.logprobs is not None and gen.top is not None
    end = len(gen.tokens) if stop is None else stop
    return ChatLogprobs(
        content=[
            TokenLogprob(
                token=gen.tokens[i],
                logprob=gen.logprobs[i],
                bytes=_token_bytes(gen.tokens[i]),
                top_logprobs=[
                    TopLogprob(token=t, logprob=lp, bytes=_token_bytes(t)) for t, lp in gen.top[i]
                ],
            )
            for i in range(start, end)
        ]
    )


class _ChatPlan(msgspec.Struct):
    model: str
    prompt_tokens: int
    gens: list[Generation]
    tool_calls: list[ToolCall | None]
    want_logprobs: bool

    def completion_tokens(self) -> int:
        total = 0
        for gen, call in zip(self.gens, self.tool_calls, strict=True):
            total += len(gen.tokens) if call is None else max(1, len(call.function.arguments) // 4)
        return total

    def usage(self) -> Usage:
        done = self.completion_tokens()
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=done,
            total_tokens=self.prompt_tokens + done,
        )


class _PromptPlan(msgspec.Struct):
    text: str
    tokens: int


class SimEngine:
    """Serves the simulated OpenAI surface over a model list (see the module docstring)."""

    def __init__(
        self,
        models: Sequence[SimModel] = DEFAULT_MODELS,
        embedding_dim: int = DEFAULT_EMBEDDING_DIM,
    ) -> None:
        self.models = {m.id: m for m in models}
        self.embedding_dim = embedding_dim
        self._model_list = ModelList(
            data=[ModelCard(id=m.id, created=MODEL_CREATED, owned_by=OWNED_BY) for m in models]
        )

    def list_models(self) -> ModelList:
        return self._model_list

    def _model(self, name: str, kind: Literal["text", "embedding"]) -> SimModel:
        model = self.models.get(name)
        if model is None:
            raise SimError(
                404,
                f"The model `{name}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        if model.kind != kind:
            what = "an embedding" if kind == "embedding" else "a text-generation"
            raise SimError(400, f"The model `{name}` is not {what} model.", param="model")
        return model

    # -- chat ---------------------------------------------------------------------------------

    def _plan_chat(self, req: ChatCompletionRequest) -> _ChatPlan:
        self._model(req.model, "text")
        if not req.messages:
            raise SimError(400, "'$.messages' must contain at least one message.", param="messages")
        texts = [_message_text(m) for m in req.messages]
        prompt = "\n".join(f"{m.role}: {t}" for m, t in zip(req.messages, texts, strict=True))
        prompt_tokens = sum(len(t.split()) + 3 for t in texts)
        max_tokens = req.max_completion_tokens
        if max_tokens is None:
            max_tokens = req.max_tokens
        want_logprobs = bool(req.logprobs)
        top = (req.top_logprobs or 0) if want_logprobs else None
        forced = self._forced_tool(req)
        gens: list[Generation] = []
        calls: list[ToolCall | None] = []
        for i in range(req.n):
            gen = generate(
                req.model,
                prompt,
                seed=req.seed,
                index=i,
                max_tokens=max_tokens,
                stop=_stops(req.stop),
                min_tokens=req.min_tokens or 0,
                ignore_eos=bool(req.ignore_eos),
                top_logprobs=None if forced else top,
            )
            if forced is None:
                gens.append(gen)
                calls.append(None)
            else:
                gens.append(Generation([], "tool_calls"))
                calls.append(self._tool_call(forced, gen, req, i))
        return _ChatPlan(req.model, prompt_tokens, gens, calls, want_logprobs and forced is None)

    @staticmethod
    def _forced_tool(req: ChatCompletionRequest) -> int | None:
        """Index of the tool that ``tool_choice`` forces, if it forces one."""
        if not req.tools or req.tool_choice is None:
            return None
        functions = [i for i, tool in enumerate(req.tools) if tool.function is not None]
        if isinstance(req.tool_choice, ToolChoice):
            if req.tool_choice.function is None:
                return None
            name = req.tool_choice.function.name
            for i in functions:
                function = req.tools[i].function
                if function is not None and function.name == name:
                    return i
            raise SimError(
                400, f"tool_choice names an unknown function `{name}`.", param="tool_choice"
            )
        return functions[0] if req.tool_choice == "required" and functions else None

    @staticmethod
    def _tool_call(tool: int, gen: Generation, req: ChatCompletionRequest, i: int) -> ToolCall:
        assert req.tools is not None
        function = req.tools[tool].function
        assert function is not None
        props = (function.parameters or {}).get("properties")
        words = [w.strip().lower() for w in gen.tokens] or ["sim"]
        args: dict[str, object] = {}
        if isinstance(props, dict):
            for k, (name, spec) in enumerate(props.items()):
                kind = spec.get("type") if isinstance(spec, dict) else None
                word = words[k % len(words)]
                if kind in ("integer", "number"):
                    args[name] = len(word) + k
                elif kind == "boolean":
                    args[name] = len(word) % 2 == 0
                else:
                    args[name] = word
        call_id = (
            "call_"
            + hashlib.blake2b(
                f"{req.model}\x00{req.seed}\x00{i}\x00{gen.text}".encode(), digest_size=12
            ).hexdigest()
        )
        arguments = msgspec.json.encode(args).decode()
        return ToolCall(id=call_id, function=FunctionCall(name=function.name, arguments=arguments))

    def chat(self, req: ChatCompletionRequest, *, id: str, created: int) -> ChatCompletion:
        """A ``chat.completion`` for ``req``."""
        plan = self._plan_chat(req)
        choices = []
        for i, (gen, call) in enumerate(zip(plan.gens, plan.tool_calls, strict=True)):
            if call is None:
                message = ChatMessageOut(content=gen.text)
            else:
                message = ChatMessageOut(content=None, tool_calls=[call])
            logprobs = _chat_logprobs(gen) if plan.want_logprobs else None
            choices.append(
                ChatChoice(
                    index=i, message=message, logprobs=logprobs, finish_reason=gen.finish_reason
                )
            )
        return ChatCompletion(
            id=id,
            created=created,
            model=req.model,
            system_fingerprint=SYSTEM_FINGERPRINT,
            choices=choices,
            usage=plan.usage(),
        )

    def chat_stream(
        self, req: ChatCompletionRequest, *, id: str, created: int
    ) -> Iterator[list[ChatChunk]]:
        """Steps of ``chat.completion.chunk``s; validation errors raise before it is returned."""
        plan = self._plan_chat(req)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return self._chat_steps(plan, id, created, include_usage)

    @staticmethod
    def _chat_steps(
        plan: _ChatPlan, id: str, created: int, include_usage: bool
    ) -> Iterator[list[ChatChunk]]:
        usage: Usage | msgspec.UnsetType | None = None if include_usage else msgspec.UNSET

        def chunk(choice: ChatChunkChoice) -> ChatChunk:
            return ChatChunk(
                id=id,
                object="chat.completion.chunk",
                created=created,
                model=plan.model,
                system_fingerprint=SYSTEM_FINGERPRINT,
                choices=[choice],
                usage=usage,
            )

        first: list[ChatChunk] = []
        steps = 0
        for i, (gen, call) in enumerate(zip(plan.gens, plan.tool_calls, strict=True)):
            content = "" if call is None else None
            delta = ChatDelta(role="assistant", content=content, refusal=None)
            first.append(chunk(ChatChunkChoice(index=i, delta=delta)))
            if call is None and not gen.tokens:
                first.append(chunk(_finish(i, gen.finish_reason)))
            steps = max(steps, 1 if call is not None else len(gen.tokens))
        yield first
        for t in range(steps):
            step: list[ChatChunk] = []
            for i, (gen, call) in enumerate(zip(plan.gens, plan.tool_calls, strict=True)):
                if call is not None:
                    if t == 0:
                        calls = [ToolCallDelta(index=0, id=call.id, function=call.function)]
                        step.append(
                            chunk(ChatChunkChoice(index=i, delta=ChatDelta(tool_calls=calls)))
                        )
                        step.append(chunk(_finish(i, gen.finish_reason)))
                    continue
                if t >= len(gen.tokens):
                    continue
                logprobs = _chat_logprobs(gen, t, t + 1) if plan.want_logprobs else None
                delta = ChatDelta(content=gen.tokens[t])
                step.append(chunk(ChatChunkChoice(index=i, delta=delta, logprobs=logprobs)))
                if t == len(gen.tokens) - 1:
                    step.append(chunk(_finish(i, gen.finish_reason)))
            if t == steps - 1 and include_usage:
                step.append(_usage_chunk(plan, id, created))
            yield step
        if steps == 0 and include_usage:
            yield [_usage_chunk(plan, id, created)]

    # -- legacy completions -------------------------------------------------------------------

    def _prompts(self, prompt: TextOrTokens) -> list[_PromptPlan]:
        items = _text_or_tokens(prompt, "prompt")
        return [
            _PromptPlan(item, len(item.split()))
            if isinstance(item, str)
            else _PromptPlan(" ".join(map(str, item)), len(item))
            for item in items
        ]

    def _plan_completion(
        self, req: CompletionRequest
    ) -> tuple[list[_PromptPlan], list[Generation]]:
        self._model(req.model, "text")
        prompts = self._prompts(req.prompt)
        gens = [
            generate(
                req.model,
                p.text,
                seed=req.seed,
                index=j,
                max_tokens=req.max_tokens,
                stop=_stops(req.stop),
                min_tokens=req.min_tokens or 0,
                ignore_eos=bool(req.ignore_eos),
                top_logprobs=req.logprobs,
            )
            for p in prompts
            for j in range(req.n)
        ]
        return prompts, gens

    @staticmethod
    def _completion_usage(prompts: list[_PromptPlan], gens: list[Generation], n: int) -> Usage:
        prompt_tokens = sum(p.tokens for p in prompts)  # once per prompt, whatever n is
        done = sum(len(g.tokens) for g in gens)
        return Usage(
            prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done
        )

    def completion(self, req: CompletionRequest, *, id: str, created: int) -> Completion:
        """A ``text_completion`` for ``req`` (choice ``k`` answers prompt ``k // n``)."""
        prompts, gens = self._plan_completion(req)
        choices = []
        for k, gen in enumerate(gens):
            prompt = prompts[k // req.n]
            head = prompt.text if req.echo else ""
            logprobs = None
            if req.logprobs is not None:
                logprobs = _legacy_logprobs(
                    req.model, prompt.text, gen, req.logprobs, bool(req.echo)
                )
            text = head + gen.text + (req.suffix or "")
            choices.append(
                CompletionChoice(
                    text=text, index=k, logprobs=logprobs, finish_reason=gen.finish_reason
                )
            )
        return Completion(
            id=id,
            object="text_completion",
            created=created,
            model=req.model,
            system_fingerprint=SYSTEM_FINGERPRINT,
            choices=choices,
            usage=self._completion_usage(prompts, gens, req.n),
        )

    def completion_stream(
        self, req: CompletionRequest, *, id: str, created: int
    ) -> Iterator[list[Completion]]:
        """Steps of streamed ``text_completion`` chunks (same shape as the full response)."""
        prompts, gens = self._plan_completion(req)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return self._completion_steps(req, prompts, gens, id, created, include_usage)

    def _completion_steps(
        self,
        req: CompletionRequest,
        prompts: list[_PromptPlan],
        gens: list[Generation],
        id: str,
        created: int,
        include_usage: bool,
    ) -> Iterator[list[Completion]]:
        usage: Usage | msgspec.UnsetType | None = None if include_usage else msgspec.UNSET

        def chunk(
            k: int, text: str, logprobs: CompletionLogprobs | None, finish: str | None
        ) -> Completion:
            choice = CompletionChoice(text=text, index=k, logprobs=logprobs, finish_reason=finish)
            return Completion(
                id=id,
                object="text_completion",
                created=created,
                model=req.model,
                system_fingerprint=SYSTEM_FINGERPRINT,
                choices=[choice],
                usage=usage,
            )

        echo, want = bool(req.echo), req.logprobs
        full = [
            _legacy_logprobs(req.model, prompts[k // req.n].text, g, want, echo)
            if want is not None
            else None
            for k, g in enumerate(gens)
        ]
        first: list[Completion] = []
        for k, gen in enumerate(gens):
            lp = full[k]
            n_prompt = len(lp.tokens) - len(gen.tokens) if lp is not None else 0
            if echo:
                first.append(chunk(k, prompts[k // req.n].text, _slice(lp, 0, n_prompt), None))
            if not gen.tokens:
                first.append(chunk(k, req.suffix or "", None, gen.finish_reason))
        yield first
        steps = max((len(g.tokens) for g in gens), default=0)
        for t in range(steps):
            step: list[Completion] = []
            for k, gen in enumerate(gens):
                if t >= len(gen.tokens):
                    continue
                lp = full[k]
                at = len(lp.tokens) - len(gen.tokens) + t if lp is not None else 0
                step.append(chunk(k, gen.tokens[t], _slice(lp, at, at + 1), None))
                if t == len(gen.tokens) - 1:
                    step.append(chunk(k, req.suffix or "", None, gen.finish_reason))
            yield step
        if include_usage:
            final = Completion(
                id=id,
                object="text_completion",
                created=created,
                model=req.model,
                system_fingerprint=SYSTEM_FINGERPRINT,
                choices=[],
                usage=self._completion_usage(prompts, gens, req.n),
            )
            yield [final]

    # -- embeddings ---------------------------------------------------------------------------

    def embeddings(self, req: EmbeddingRequest) -> EmbeddingResponse:
        """Unit vectors for every input, as floats or base64 float32 (``encoding_format``)."""
        self._model(req.model, "embedding")
        dim = self.embedding_dim
        if req.dimensions is not None and req.dimensions > dim:
            raise SimError(
                400, f"dimensions must be at most {dim} for `{req.model}`.", param="dimensions"
            )
        items = _text_or_tokens(req.input, "input")
        data: list[EmbeddingData] = []
        tokens = 0
        for i, item in enumerate(items):
            if isinstance(item, str):
                if not item:
                    raise SimError(400, "'$.input' is invalid: empty string.", param="input")
                key, tokens = f"{req.model}\x00s\x00{item}", tokens + len(item.split())
            else:
                key, tokens = f"{req.model}\x00t\x00{item}", tokens + len(item)
            vector = embed(key, dim, req.dimensions)
            value = _float32_base64(vector) if req.encoding_format == "base64" else vector
            data.append(EmbeddingData(embedding=value, index=i))
        return EmbeddingResponse(
            data=data,
            model=req.model,
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )


def _finish(index: int, reason: str) -> ChatChunkChoice:
    return ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=reason)


def _usage_chunk(plan: _ChatPlan, id: str, created: int) -> ChatChunk:
    return ChatChunk(
        id=id,
        object="chat.completion.chunk",
        created=created,
        model=plan.model,
        system_fingerprint=SYSTEM_FINGERPRINT,
        choices=[],
        usage=plan.usage(),
    )


def _text_or_tokens(value: TextOrTokens, param: str) -> list[str | list[int]]:
    """Normalise a prompt/input: a string, one token array, or a list of either kind."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise SimError(400, f"'$.{param}' must not be empty.", param=param)
    if all(isinstance(v, int) for v in value):
        return [[v for v in value if isinstance(v, int)]]
    if all(isinstance(v, str) for v in value) or all(isinstance(v, list) for v in value):
        return [v for v in value if not isinstance(v, int)]
    raise SimError(
        400, f"'$.{param}' must be a string, a token array, or a list of one kind.", param=param
    )


def _legacy_logprobs(
    model: str, prompt: str, gen: Generation, k: int, echo: bool
) -> CompletionLogprobs:
    """The legacy logprobs object; with ``echo`` the prompt's pieces come first, and
    ``text_offset`` indexes the choice's text."""
    assert gen.logprobs is not None and gen.top is not None
    tokens: list[str] = []
    values: list[float] = []
    tops: list[dict[str, float]] = []
    if echo:
        rng = random.Random(_seed_int(model, "echo", prompt))
        for piece in _PROMPT_PIECES.findall(prompt):
            value = -round(rng.random() * 6.0, 6)
            tokens.append(piece)
            values.append(value)
            tops.append({piece: value} if k else {})
    tokens += gen.tokens
    values += gen.logprobs
    tops += [dict(alts) for alts in gen.top]
    offsets: list[int] = []
    at = 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets
    )


def _slice(lp: CompletionLogprobs | None, start: int, stop: int) -> CompletionLogprobs | None:
    if lp is None:
        return None
    return CompletionLogprobs(
        tokens=lp.tokens[start:stop],
        token_logprobs=lp.token_logprobs[start:stop],
        top_logprobs=lp.top_logprobs[start:stop],
        text_offset=lp.text_offset[start:stop],
    )
