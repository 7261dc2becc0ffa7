"""``POST /v1/chat/completions``: plans the choices of a chat request (text or a forced tool
call), then renders them as one ``chat.completion`` or as streamed steps of
``chat.completion.chunk``s.

Prompt tokens are the whitespace-split words of every message's text + 3 per message.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import msgspec

from daemon.sim.errors import SimError
from daemon.sim.generation import Generation
from daemon.sim.inputs import SYSTEM_FINGERPRINT, StreamUsage, generate_for, stream_usage, usage
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
    FunctionCall,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    TopLogprob,
    Usage,
)

__all__ = ["ChatPlan", "chat_completion", "chat_steps", "plan_chat"]


class ChatPlan(msgspec.Struct):
    """A chat request's choices: ``tool_calls[i]`` is set when choice ``i`` calls a tool."""

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
        return usage(self.prompt_tokens, self.completion_tokens())


def plan_chat(req: ChatCompletionRequest) -> ChatPlan:
    """The choices of ``req`` (its model is checked by the caller)."""
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
    forced = _forced_tool(req)
    gens: list[Generation] = []
    calls: list[ToolCall | None] = []
    for i in range(req.n):
        gen = generate_for(
            req, prompt, index=i, max_tokens=max_tokens, top_logprobs=None if forced else top
        )
        if forced is None:
            gens.append(gen)
            calls.append(None)
        else:
            gens.append(Generation([], "tool_calls"))
            calls.append(_tool_call(forced, gen, req, i))
    return ChatPlan(req.model, prompt_tokens, gens, calls, want_logprobs and forced is None)


def chat_completion(plan: ChatPlan, *, id: str, created: int) -> ChatCompletion:
    """The ``chat.completion`` for a planned request."""
    choices = []
    for i, (gen, call) in enumerate(zip(plan.gens, plan.tool_calls, strict=True)):
        if call is None:
            message = ChatMessageOut(content=gen.text)
        else:
            message = ChatMessageOut(content=None, tool_calls=[call])
        logprobs = _chat_logprobs(gen) if plan.want_logprobs else None
        choices.append(
            ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=gen.finish_reason)
        )
    return ChatCompletion(
        id=id,
        created=created,
        model=plan.model,
        system_fingerprint=SYSTEM_FINGERPRINT,
        choices=choices,
        usage=plan.usage(),
    )


def chat_steps(
    plan: ChatPlan, req: ChatCompletionRequest, *, id: str, created: int
) -> Iterator[list[ChatChunk]]:
    """Steps of ``chat.completion.chunk``s: the role chunks, then one token per choice a step
    (a tool call is one step), then the usage chunk if ``stream_options.include_usage``."""
    include_usage, usage_field = stream_usage(req.stream_options)

    def chunk(choices: list[ChatChunkChoice], usage: StreamUsage = usage_field) -> ChatChunk:
        return ChatChunk(
            id=id,
            object="chat.completion.chunk",
            created=created,
            model=plan.model,
            system_fingerprint=SYSTEM_FINGERPRINT,
            choices=choices,
            usage=usage,
        )

    first: list[ChatChunk] = []
    steps = 0
    for i, (gen, call) in enumerate(zip(plan.gens, plan.tool_calls, strict=True)):
        content = "" if call is None else None
        delta = ChatDelta(role="assistant", content=content, refusal=None)
        first.append(chunk([ChatChunkChoice(index=i, delta=delta)]))
        if call is None and not gen.tokens:
            first.append(chunk([_finish(i, gen.finish_reason)]))
        steps = max(steps, 1 if call is not None else len(gen.tokens))
    yield first
    for t in range(steps):
        step: list[ChatChunk] = []
        for i, (gen, call) in enumerate(zip(plan.gens, plan.tool_calls, strict=True)):
            if call is not None:
                if t == 0:
                    calls = [ToolCallDelta(index=0, id=call.id, function=call.function)]
                    step.append(
                        chunk([ChatChunkChoice(index=i, delta=ChatDelta(tool_calls=calls))])
                    )
                    step.append(chunk([_finish(i, gen.finish_reason)]))
                continue
            if t >= len(gen.tokens):
                continue
            logprobs = _chat_logprobs(gen, t, t + 1) if plan.want_logprobs else None
            delta = ChatDelta(content=gen.tokens[t])
            step.append(chunk([ChatChunkChoice(index=i, delta=delta, logprobs=logprobs)]))
            if t == len(gen.tokens) - 1:
                step.append(chunk([_finish(i, gen.finish_reason)]))
        if t == steps - 1 and include_usage:
            step.append(chunk([], plan.usage()))
        yield step
    if steps == 0 and include_usage:
        yield [chunk([], plan.usage())]


def _message_text(message: ChatMessage) -> str:
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(part.text for part in content if part.type == "text" and part.text)


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
        raise SimError(400, f"tool_choice names an unknown function `{name}`.", param="tool_choice")
    return functions[0] if req.tool_choice == "required" and functions else None


def _tool_call(tool: int, gen: Generation, req: ChatCompletionRequest, i: int) -> ToolCall:
    """A call of tool ``tool`` whose arguments fill the schema's properties from ``gen``."""
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


def _chat_logprobs(gen: Generation, start: int = 0, stop: int | None = None) -> ChatLogprobs:
    assert gen.logprobs is not None and gen.top is not None
    end = len(gen.tokens) if stop is None else stop
    return ChatLogprobs(
        content=[
            TokenLogprob(
                token=gen.tokens[i],
                logprob=gen.logprobs[i],
                bytes=list(gen.tokens[i].encode()),
                top_logprobs=[
                    TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in gen.top[i]
                ],
            )
            for i in range(start, end)
        ]
    )


def _finish(index: int, reason: str) -> ChatChunkChoice:
    return ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=reason)
