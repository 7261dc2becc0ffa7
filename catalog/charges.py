"""Who pays what for one dispatch, and who earns it: the pricing rules, in integers.

A dispatch's :class:`Charge` splits what the calling workspace pays into what the serving party
earns and what the operator keeps, exactly, in pico-USD (``customer = provider + platform``,
nothing negative). The rules (issue 4, "Pricing rules"; the policy is :class:`Pricing`):

- **self-served**: a workspace's own capacity serving its own request — a personal runtime
  (which only ever serves its own workspace, ARCHITECTURE.md Resolve), or a marketplace
  daemon of the caller's own workspace — costs no compute. The operator's platform fee
  (``runtime_platform_fee``, per meter unit) is charged, all of it to the operator. A
  runtime's synthetic offering (:func:`runtime_offering`) carries the fee in force when it
  was built, so its own prices are the fee.
- **marketplace**: ``price`` is the offering's price for the units; the caller pays
  ``price + floor(price * margin_bps / 10000)``; the provider earns
  ``floor(price * share_bps / 10000)``; the operator keeps the rest (the margin and the
  provider's unshared part). Rounding is down on both, in pico-USD: the caller never pays a
  fraction more, the provider never earns a fraction more.
- **hosted**: the caller pays the offering's price; it is earned by the offering's provider
  (``"hosted"`` for the operator's own capacity), so every dispatch has a ledger entry.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from catalog.model import Catalog, Offering, Pricing, ServingKind
from catalog.pricing import price_picousd

__all__ = [
    "BPS",
    "RUNTIME_PREFIX",
    "Charge",
    "applied_prices",
    "charge",
    "effective_pricing",
    "runtime_offering",
    "self_served",
]

#: Basis points in a whole: 10000 bps = 100 %.
BPS = 10_000
#: Offering ids and provider ids of personal runtimes: ``runtime:<lat_id>``.
RUNTIME_PREFIX = "runtime:"

_DEFAULT_PRICING = Pricing()


class Charge(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One dispatch's money, in exact pico-USD.

    ``customer_picousd`` is what the calling workspace pays; it is split into
    ``provider_earnings_picousd`` (the serving party's) and ``platform_picousd`` (the
    operator's): ``customer == provider_earnings + platform``, all three >= 0.
    """

    customer_picousd: int
    provider_earnings_picousd: int
    platform_picousd: int


def effective_pricing(cat: Catalog) -> Pricing:
    """The catalog's pricing policy, or the defaults when it sets none."""
    return cat.pricing if cat.pricing is not None else _DEFAULT_PRICING


def self_served(serving_kind: ServingKind, same_workspace: bool) -> bool:
    """Whether the caller's own capacity serves the dispatch: a runtime always (it serves only
    its own workspace), a marketplace daemon when it belongs to the caller's workspace."""
    return serving_kind == "runtime" or (serving_kind == "marketplace" and same_workspace)


def applied_prices(
    offering: Offering,
    pricing: Pricing | None = None,
    *,
    serving_kind: ServingKind | None = None,
    same_workspace: bool = False,
) -> tuple[dict[str, int], int]:
    """The price table a dispatch is charged by, before any margin, as ``(prices,
    price_per)``: the offering's own (for a runtime's synthetic offering, the fee), or the
    platform fee of ``pricing`` for the caller's own marketplace daemon."""
    kind = serving_kind if serving_kind is not None else offering.kind
    if kind == "marketplace" and same_workspace:
        policy = pricing if pricing is not None else _DEFAULT_PRICING
        return dict(policy.runtime_platform_fee), policy.runtime_platform_fee_per
    return dict(offering.prices), offering.price_per


def charge(
    units: Mapping[str, int],
    offering: Offering,
    pricing: Pricing | None = None,
    *,
    serving_kind: ServingKind | None = None,
    same_workspace: bool = False,
) -> Charge:
    """Charge ``units`` served through ``offering`` under ``pricing`` (module docstring).

    ``serving_kind`` defaults to ``offering.kind``; ``same_workspace`` says whether the
    serving party belongs to the calling workspace (it matters for marketplace daemons only:
    a runtime is always its workspace's own, hosted capacity never is). A runtime is charged
    its offering's prices (the fee, see :func:`runtime_offering`), the caller's own
    marketplace daemon ``pricing``'s fee. ``pricing=None`` means the defaults (no fee, no
    margin, providers keep all of their price). Negative unit counts raise ``ValueError``.
    """
    policy = pricing if pricing is not None else _DEFAULT_PRICING
    kind = serving_kind if serving_kind is not None else offering.kind
    prices, per = applied_prices(offering, policy, serving_kind=kind, same_workspace=same_workspace)
    price = price_picousd(units, prices, per)
    if self_served(kind, same_workspace):
        return Charge(customer_picousd=price, provider_earnings_picousd=0, platform_picousd=price)
    if kind == "hosted":
        return Charge(customer_picousd=price, provider_earnings_picousd=price, platform_picousd=0)
    customer = price + price * policy.marketplace_margin_bps // BPS
    earned = price * policy.provider_share_bps // BPS
    return Charge(
        customer_picousd=customer,
        provider_earnings_picousd=earned,
        platform_picousd=customer - earned,
    )


def runtime_offering(model_id: str, runtime_id: str, pricing: Pricing | None = None) -> Offering:
    """The synthetic offering of personal runtime ``runtime_id`` (``lat_…``) serving
    ``model_id``: id and provider ``runtime:<runtime_id>``, kind ``runtime``, priced at the
    platform fee (its compute is free to its own workspace). Usage records name it, so the
    runtime's ledger and the fee in force at dispatch time are on every record."""
    policy = pricing if pricing is not None else _DEFAULT_PRICING
    party = RUNTIME_PREFIX + runtime_id
    return Offering(
        id=party,
        model=model_id,
        provider=party,
        kind="runtime",
        prices=dict(policy.runtime_platform_fee),
        price_per=policy.runtime_platform_fee_per,
    )
