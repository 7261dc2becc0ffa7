"""``POST /v1/completions`` (legacy): choice ``k`` answers prompt ``k // n``, rendered as one
``text_completion`` or as streamed chunks of the same shape, with the legacy ``logprobs``
object (``echo`` puts the prompt's pieces first).

Prompt tokens are the words of a text prompt, or the length of a token array.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

import msgspec

from daemon.sim.generation import Generation, seed_int
from daemon.sim.inputs import (
    SYSTEM_FINGERPRINT,
    StreamUsage,
    generate_for,
    stream_usage,
    text_or_tokens,
    usage,
)
from daemon.sim.protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Usage,
)

__all__ = ["CompletionPlan", "completion", "completion_steps", "plan_completion"]

_PROMPT_PIECES = re.compile(r"\s*\S+|\s+")


class CompletionPlan(msgspec.Struct):
    """A legacy request's prompt texts and token counts, and its ``len(prompts) * n``
    generations (choice ``k`` answers prompt ``k // n``)."""

    prompts: list[str]
    prompt_tokens: list[int]
    gens: list[Generation]

    def usage(self) -> Usage:
        # Prompt tokens count once per prompt, whatever n is.
        return usage(sum(self.prompt_tokens), sum(len(g.tokens) for g in self.gens))


def plan_completion(req: CompletionRequest) -> CompletionPlan:
    """The prompts and choices of ``req`` (its model is checked by the caller)."""
    prompts: list[str] = []
    counts: list[int] = []
    for item in text_or_tokens(req.prompt, "prompt"):
        if isinstance(item, str):
            prompts.append(item)
            counts.append(len(item.split()))
        else:
            prompts.append(" ".join(map(str, item)))
            counts.append(len(item))
    gens = [
        generate_for(req, text, index=j, max_tokens=req.max_tokens, top_logprobs=req.logprobs)
        for text in prompts
        for j in range(req.n)
    ]
    return CompletionPlan(prompts, counts, gens)


def completion(
    plan: CompletionPlan, req: CompletionRequest, *, id: str, created: int
) -> Completion:
    """The ``text_completion`` for a planned request."""
    full = _choice_logprobs(plan, req)
    choices = []
    for k, gen in enumerate(plan.gens):
        head = plan.prompts[k // req.n] if req.echo else ""
        text = head + gen.text + (req.suffix or "")
        choices.append(
            CompletionChoice(text=text, index=k, logprobs=full[k], finish_reason=gen.finish_reason)
        )
    return _text_completion(req, id, created, choices, plan.usage())


def completion_steps(
    plan: CompletionPlan, req: CompletionRequest, *, id: str, created: int
) -> Iterator[list[Completion]]:
    """Steps of streamed ``text_completion`` chunks: the echoed prompts, then one token per
    choice a step (the suffix comes with the finish), then the usage chunk if asked for."""
    include_usage, usage_field = stream_usage(req.stream_options)

    def chunk(
        k: int, text: str, logprobs: CompletionLogprobs | None, finish: str | None
    ) -> Completion:
        choice = CompletionChoice(text=text, index=k, logprobs=logprobs, finish_reason=finish)
        return _text_completion(req, id, created, [choice], usage_field)

    full = _choice_logprobs(plan, req)
    first: list[Completion] = []
    for k, gen in enumerate(plan.gens):
        lp = full[k]
        n_prompt = len(lp.tokens) - len(gen.tokens) if lp is not None else 0
        if req.echo:
            first.append(chunk(k, plan.prompts[k // req.n], _slice(lp, 0, n_prompt), None))
        if not gen.tokens:
            first.append(chunk(k, req.suffix or "", None, gen.finish_reason))
    yield first
    steps = max((len(g.tokens) for g in plan.gens), default=0)
    for t in range(steps):
        step: list[Completion] = []
        for k, gen in enumerate(plan.gens):
            if t >= len(gen.tokens):
                continue
            lp = full[k]
            at = len(lp.tokens) - len(gen.tokens) + t if lp is not None else 0
            step.append(chunk(k, gen.tokens[t], _slice(lp, at, at + 1), None))
            if t == len(gen.tokens) - 1:
                step.append(chunk(k, req.suffix or "", None, gen.finish_reason))
        yield step
    if include_usage:
        yield [_text_completion(req, id, created, [], plan.usage())]


def _text_completion(
    req: CompletionRequest,
    id: str,
    created: int,
    choices: list[CompletionChoice],
    usage: StreamUsage,
) -> Completion:
    return Completion(
        id=id,
        object="text_completion",
        created=created,
        model=req.model,
        system_fingerprint=SYSTEM_FINGERPRINT,
        choices=choices,
        usage=usage,
    )


def _choice_logprobs(
    plan: CompletionPlan, req: CompletionRequest
) -> list[CompletionLogprobs | None]:
    """Each choice's whole legacy logprobs object (``None`` each unless ``logprobs`` is set)."""
    want = req.logprobs
    if want is None:
        return [None] * len(plan.gens)
    echo = bool(req.echo)
    return [
        _legacy_logprobs(req.model, plan.prompts[k // req.n], gen, want, echo)
        for k, gen in enumerate(plan.gens)
    ]


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
        rng = random.Random(seed_int(model, "echo", prompt))
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
