"""The pre-dispatch cost estimate (pure)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.estimate import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    estimate_completion_tokens,
    estimate_picousd,
    estimate_prompt_tokens,
    estimate_units,
    max_estimate_picousd,
)
from catalog.model import Meter, Offering

TOKENS = Meter(units=("prompt_tokens", "completion_tokens"), source="usage")
EMBED = Meter(units=("prompt_tokens",), source="usage")
PER_REQUEST = Meter()
# $0.05 / $0.10 per 1M tokens, as the seed catalog's llama offering
PRICES = {"prompt_tokens": 50_000, "completion_tokens": 100_000}


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


def test_prompt_tokens_count_text_parts_tools_and_token_ids() -> None:
    assert estimate_prompt_tokens(chat("x" * 40)) == 10
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 8}]}]}
    assert estimate_prompt_tokens(parts) == 2
    assert estimate_prompt_tokens({"prompt": "abcde"}) == 2
    assert estimate_prompt_tokens({"input": ["abcd", "abcd", [1, 2, 3]]}) == 5
    assert estimate_prompt_tokens({"input": [[1, 2], [3]]}) == 3
    with_tools = chat("", tools=[{"type": "function", "function": {"name": "f" * 100}}])
    assert estimate_prompt_tokens(with_tools) > 25
    assert estimate_prompt_tokens(chat("x" * 4000), context_length=100) == 100
    assert estimate_prompt_tokens({"messages": "not a list", "prompt": 5}) == 0


def test_completion_tokens_follow_the_request_then_the_model() -> None:
    assert estimate_completion_tokens(chat("", max_tokens=50)) == 50
    assert estimate_completion_tokens(chat("", max_completion_tokens=70, max_tokens=50)) == 70
    assert estimate_completion_tokens(chat("", max_tokens=50, n=3)) == 150
    assert estimate_completion_tokens({"prompt": "", "max_tokens": 10, "best_of": 4, "n": 2}) == 40
    assert estimate_completion_tokens(chat(""), model_max_output_tokens=8192) == 8192
    assert estimate_completion_tokens(chat("")) == DEFAULT_MAX_OUTPUT_TOKENS
    assert estimate_completion_tokens(chat("", max_tokens=10**9), 8192, 131072) == 8192
    assert estimate_completion_tokens(chat(""), None, 512) == 512
    # junk values fall back instead of failing (the codec rejects them anyway)
    assert estimate_completion_tokens(chat("", max_tokens=True, n=-2), 100) == 100
    assert estimate_completion_tokens(chat("", max_tokens=1, n=10**6)) == 128


def test_estimate_in_picousd_rounds_up() -> None:
    body = chat("x" * 400, max_tokens=100)  # 100 prompt + 100 completion tokens
    # 100 * 50_000 + 100 * 100_000 micro-USD per 1M tokens = 15_000_000 pico-USD
    assert estimate_picousd(TOKENS, PRICES, 1_000_000, body) == 15_000_000
    assert estimate_picousd(TOKENS, {"prompt_tokens": 1}, 1_000_000, chat("x")) == 1  # ceil
    assert estimate_picousd(TOKENS, {}, 1_000_000, body) == 0
    with pytest.raises(ValueError):
        estimate_picousd(TOKENS, PRICES, 0, body)


def test_request_metered_classes_cost_their_per_request_price() -> None:
    meter = Meter(units=("requests", "images"), source="request")
    assert estimate_units(meter, {}) == {"requests": 1, "images": 1}
    assert estimate_picousd(meter, {"requests": 3, "images": 2}, 1, {}) == 5_000_000
    assert estimate_picousd(PER_REQUEST, {"requests": 250}, 1000, {"anything": 1}) == 250_000


def test_embeddings_and_unforeseeable_units() -> None:
    assert estimate_units(EMBED, {"input": "abcdefgh"}) == {"prompt_tokens": 2}
    audio = Meter(units=("seconds",), source="usage")
    assert estimate_units(audio, {"file": "..."}) == {"seconds": 0}
    total = Meter(units=("total_tokens", "requests"), source="usage")
    assert estimate_units(total, chat("x" * 8, max_tokens=5)) == {"total_tokens": 7, "requests": 1}


def test_max_over_fallback_offerings() -> None:
    cheap = Offering(id="a", model="m", prices={"completion_tokens": 1})
    dear = Offering(id="b", model="m", prices={"completion_tokens": 10})
    body = chat("", max_tokens=1000)
    assert max_estimate_picousd(TOKENS, [cheap, dear], body) == 10_000_000 * 1000 // 1_000_000
    assert max_estimate_picousd(TOKENS, [], body) == 0


@given(
    text=st.text(max_size=200),
    max_tokens=st.one_of(st.none(), st.integers(-5, 10_000)),
    n=st.one_of(st.none(), st.integers(-1, 300)),
    price=st.integers(0, 10**7),
    price_per=st.integers(1, 10**6),
)
def test_estimate_is_a_non_negative_integer_and_monotonic_in_max_tokens(
    text: str, max_tokens: int | None, n: int | None, price: int, price_per: int
) -> None:
    body = chat(text, max_tokens=max_tokens, n=n)
    prices = {"prompt_tokens": price, "completion_tokens": price}
    value = estimate_picousd(TOKENS, prices, price_per, body, 8192, 131072)
    assert isinstance(value, int) and value >= 0
    if isinstance(max_tokens, int) and 0 < max_tokens < 8192:
        bigger = estimate_picousd(
            TOKENS, prices, price_per, {**body, "max_tokens": max_tokens + 1}, 8192, 131072
        )
        assert bigger >= value
