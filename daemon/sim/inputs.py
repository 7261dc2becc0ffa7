"""What the chat and completions endpoints read alike: prompt/input normalisation, the
sampling fields that drive :func:`~daemon.sim.generation.generate`, and the ``usage`` they
report (``stream_options.include_usage`` for streams)."""

from __future__ import annotations

import msgspec

from daemon.sim.errors import SimError
from daemon.sim.generation import Generation, generate
from daemon.sim.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    StreamOptions,
    TextOrTokens,
    Usage,
)

__all__ = [
    "SYSTEM_FINGERPRINT",
    "StreamUsage",
    "generate_for",
    "stream_usage",
    "text_or_tokens",
    "usage",
]

SYSTEM_FINGERPRINT = "fp_lattice_sim"

# A streamed chunk's ``usage``: UNSET (not sent) unless stream_options.include_usage, then
# null on every chunk but the last.
StreamUsage = Usage | msgspec.UnsetType | None


def text_or_tokens(value: TextOrTokens, param: str) -> list[str | list[int]]:
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


def generate_for(
    req: ChatCompletionRequest | CompletionRequest,
    prompt: str,
    *,
    index: int,
    max_tokens: int | None,
    top_logprobs: int | None,
) -> Generation:
    """Choice ``index`` for ``prompt`` under the request's seed, stop, min_tokens, ignore_eos."""
    return generate(
        req.model,
        prompt,
        seed=req.seed,
        index=index,
        max_tokens=max_tokens,
        stop=_stops(req.stop),
        min_tokens=req.min_tokens or 0,
        ignore_eos=bool(req.ignore_eos),
        top_logprobs=top_logprobs,
    )


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def stream_usage(options: StreamOptions | None) -> tuple[bool, StreamUsage]:
    """Whether a stream ends with a usage chunk, and the ``usage`` of every other chunk."""
    include = bool(options and options.include_usage)
    return include, (None if include else msgspec.UNSET)
