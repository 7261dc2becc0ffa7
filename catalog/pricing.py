"""What usage costs, in integers only (money is never a float).

An offering prices each meter unit in integer micro-USD per ``price_per`` units
(``prices = {prompt_tokens = 150000}`` with ``price_per = 1000000`` is $0.15 per million prompt
tokens). One dispatch usually costs a fraction of a micro-USD, so costs are computed in
pico-USD (10**-12 USD, 10**6 per micro-USD): exact whenever ``price_per`` divides
``10**6 * units * price`` — always for the usual ``price_per`` of 1, 1000 or 1000000 — and
otherwise rounded down (floor) once, on the sum. Usage records and ledgers accumulate
pico-USD; only the amount sent to Stripe is converted (:func:`picousd_to_microusd`).
"""

from __future__ import annotations

from collections.abc import Mapping

from catalog.model import Offering

__all__ = ["PICO_PER_MICRO", "cost_picousd", "picousd_to_microusd", "price_picousd"]

PICO_PER_MICRO = 10**6


def cost_picousd(units: Mapping[str, int], offering: Offering) -> int:
    """The cost of ``units`` (meter unit → count) at ``offering``'s prices, in pico-USD.

    ``floor(sum(units[u] * prices[u]) * 10**6 / price_per)``. Units the offering does not
    price are free. Negative counts raise ``ValueError``. Who pays and who earns it:
    :func:`catalog.charges.charge`.
    """
    return price_picousd(units, offering.prices, offering.price_per)


def price_picousd(units: Mapping[str, int], prices: Mapping[str, int], price_per: int) -> int:
    """:func:`cost_picousd` for any price table: ``prices`` in micro-USD per ``price_per``
    units (an offering's, or the platform fee of :class:`catalog.model.Pricing`)."""
    total = 0
    for unit, count in units.items():
        if count < 0:
            raise ValueError(f"negative usage for {unit!r}: {count}")
        total += count * prices.get(unit, 0)
    return total * PICO_PER_MICRO // price_per


def picousd_to_microusd(picousd: int) -> int:
    """Pico-USD to micro-USD, rounding half up (away from zero for negative amounts, so a
    credit mirrors its charge)."""
    half = PICO_PER_MICRO // 2
    if picousd < 0:
        return -((-picousd + half) // PICO_PER_MICRO)
    return (picousd + half) // PICO_PER_MICRO
