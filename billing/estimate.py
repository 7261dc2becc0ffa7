"""What a request may cost before it runs: the amount reserved against a workspace's spend
limit and credit (:mod:`billing.spend`). Pure functions over the request body and catalog
data; money in integer pico-USD, rounded *up* (a reservation errs on the side of holding
enough).

- Request-metered task classes (``meter.source = "request"``): one of each unit, at the
  offering's price.
- Usage-metered classes: prompt tokens from the request text (≈ 4 characters a token, as
  the gateway counts when a backend reports none), capped at the model's context length;
  completion tokens are the request's ``max_completion_tokens`` / ``max_tokens`` (OpenAI
  reference: Chat, Completions), else the model's ``max_output_tokens``, else
  :data:`DEFAULT_MAX_OUTPUT_TOKENS`, capped by the model's limits, times ``n`` (or
  ``best_of``). Units the estimator cannot foresee (seconds of audio, a catalog class's own
  units) count zero: their actual cost is settled after the dispatch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from catalog.model import Meter, Offering
from catalog.pricing import PICO_PER_MICRO

__all__ = [
    "DEFAULT_MAX_OUTPUT_TOKENS",
    "estimate_completion_tokens",
    "estimate_picousd",
    "estimate_prompt_tokens",
    "estimate_units",
    "max_estimate_picousd",
]

#: Completion tokens assumed when neither the request nor the model bounds them.
DEFAULT_MAX_OUTPUT_TOKENS = 4096
#: Largest ``n`` / ``best_of`` believed (OpenAI caps ``n`` at 128).
MAX_CHOICES = 128

_PROMPT_UNITS = frozenset({"prompt_tokens", "input_tokens"})
_COMPLETION_UNITS = frozenset({"completion_tokens", "output_tokens"})
_encoder = msgspec.json.Encoder()


def _tokens(chars: int) -> int:
    return (chars + 3) // 4


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _count_input(value: Any) -> int:
    """Tokens of a ``prompt``/``input`` value: a string, a list of strings, or token ids
    (a list of ints, or a list of such lists)."""
    if isinstance(value, str):
        return _tokens(len(value))
    if not isinstance(value, list):
        return 0
    total = 0
    for item in value:
        if isinstance(item, str):
            total += _tokens(len(item))
        elif isinstance(item, int):
            total += 1
        elif isinstance(item, list):
            total += len(item)
    return total


def _count_messages(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    chars = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    chars += len(part["text"])
        for key in ("tool_calls", "function_call"):
            if message.get(key):
                chars += len(_encoder.encode(message[key]))
    return _tokens(chars)


def estimate_prompt_tokens(body: Mapping[str, Any], context_length: int | None = None) -> int:
    """Prompt tokens of a request: its messages (text parts, tool calls), ``prompt`` or
    ``input``, and tool definitions; at most ``context_length``."""
    tokens = _count_messages(body.get("messages"))
    tokens += _count_input(body.get("prompt")) + _count_input(body.get("input"))
    for key in ("tools", "functions"):
        if body.get(key):
            tokens += _tokens(len(_encoder.encode(body[key])))
    if context_length:
        tokens = min(tokens, context_length)
    return tokens


def estimate_completion_tokens(
    body: Mapping[str, Any],
    model_max_output_tokens: int | None = None,
    context_length: int | None = None,
) -> int:
    """The most completion tokens a request may produce, over all its choices."""
    requested = _positive_int(body.get("max_completion_tokens")) or _positive_int(
        body.get("max_tokens")
    )
    per_choice = requested or model_max_output_tokens or DEFAULT_MAX_OUTPUT_TOKENS
    for bound in (model_max_output_tokens, context_length):
        if bound:
            per_choice = min(per_choice, bound)
    choices = max(_positive_int(body.get("n")) or 1, _positive_int(body.get("best_of")) or 1)
    return per_choice * min(choices, MAX_CHOICES)


def estimate_units(
    meter: Meter,
    body: Mapping[str, Any],
    model_max_output_tokens: int | None = None,
    context_length: int | None = None,
) -> dict[str, int]:
    """Each meter unit's estimated count for one request."""
    if meter.source == "request":
        return {unit: 1 for unit in meter.units}
    prompt = completion = None
    units: dict[str, int] = {}
    for unit in meter.units:
        if unit in _PROMPT_UNITS or unit == "total_tokens":
            prompt = estimate_prompt_tokens(body, context_length) if prompt is None else prompt
        if (unit in _COMPLETION_UNITS or unit == "total_tokens") and completion is None:
            completion = estimate_completion_tokens(body, model_max_output_tokens, context_length)
        if unit in _PROMPT_UNITS:
            units[unit] = prompt or 0
        elif unit in _COMPLETION_UNITS:
            units[unit] = completion or 0
        elif unit == "total_tokens":
            units[unit] = (prompt or 0) + (completion or 0)
        elif unit == "requests":
            units[unit] = 1
        else:
            units[unit] = 0
    return units


def estimate_picousd(
    meter: Meter,
    prices: Mapping[str, int],
    price_per: int,
    body: Mapping[str, Any],
    model_max_output_tokens: int | None = None,
    context_length: int | None = None,
) -> int:
    """The estimated cost of one request at ``prices`` (micro-USD per ``price_per`` units),
    in pico-USD, rounded up."""
    if price_per <= 0:
        raise ValueError("price_per must be positive")
    units = estimate_units(meter, body, model_max_output_tokens, context_length)
    total = sum(count * prices.get(unit, 0) for unit, count in units.items())
    return -(-total * PICO_PER_MICRO // price_per)


def max_estimate_picousd(
    meter: Meter,
    offerings: Iterable[Offering],
    body: Mapping[str, Any],
    model_max_output_tokens: int | None = None,
    context_length: int | None = None,
) -> int:
    """The largest estimate over the offerings a dispatch may fall back to (0 for none)."""
    return max(
        (
            estimate_picousd(
                meter, o.prices, o.price_per, body, model_max_output_tokens, context_length
            )
            for o in offerings
        ),
        default=0,
    )
