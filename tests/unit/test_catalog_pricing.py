"""Integer money (catalog/pricing.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from catalog.model import Offering
from catalog.pricing import cost_picousd, picousd_to_microusd

CHAT = Offering(id="o", model="m", prices={"prompt_tokens": 150_000, "completion_tokens": 600_000})


def test_token_cost_is_exact() -> None:
    # $0.15 / 1M prompt tokens: 1000 tokens cost $0.00015 = 150 micro-USD.
    assert cost_picousd({"prompt_tokens": 1000}, CHAT) == 150 * 10**6
    # 7 prompt + 3 completion = (7*150000 + 3*600000) micro-USD per million tokens
    assert cost_picousd({"prompt_tokens": 7, "completion_tokens": 3}, CHAT) == 2_850_000
    assert picousd_to_microusd(2_850_000) == 3


def test_unpriced_units_are_free_and_empty_usage_costs_nothing() -> None:
    assert cost_picousd({"seconds": 99}, CHAT) == 0
    assert cost_picousd({}, CHAT) == 0


def test_price_per_and_floor() -> None:
    per_request = Offering(id="i", model="m", prices={"requests": 40_000}, price_per=1)
    assert cost_picousd({"requests": 2}, per_request) == 80_000 * 10**6
    odd = Offering(id="x", model="m", prices={"seconds": 1}, price_per=7 * 10**6)
    # 1 second at 1 micro-USD per 7e6 seconds = 1/7 pico-USD -> floor 0; 10 s -> 1.
    assert cost_picousd({"seconds": 1}, odd) == 0
    assert cost_picousd({"seconds": 10}, odd) == 1


def test_negative_usage_is_rejected() -> None:
    with pytest.raises(ValueError, match="prompt_tokens"):
        cost_picousd({"prompt_tokens": -1}, CHAT)


@pytest.mark.parametrize(
    ("pico", "micro"),
    [
        (0, 0),
        (499_999, 0),
        (500_000, 1),
        (1_499_999, 1),
        (1_500_000, 2),
        (-500_000, -1),
        (-499_999, 0),
    ],
)
def test_picousd_to_microusd_rounds_half_up(pico: int, micro: int) -> None:
    assert picousd_to_microusd(pico) == micro


@given(
    st.dictionaries(st.sampled_from(["prompt_tokens", "completion_tokens"]), st.integers(0, 10**9))
)
def test_cost_is_additive_when_exact(units: dict[str, int]) -> None:
    whole = cost_picousd(units, CHAT)
    parts = sum(cost_picousd({u: n}, CHAT) for u, n in units.items())
    assert whole == parts
