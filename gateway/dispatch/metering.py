"""Counting units by a task class's meter and building the usage record (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from billing.usage import UsageRecord
from catalog.charges import applied_prices, charge
from catalog.model import Meter, Offering, Pricing
from catalog.pricing import picousd_to_microusd

__all__ = ["build_record", "estimate_tokens", "meter_units"]


def estimate_tokens(text: str) -> int:
    """A rough token count (≈ 4 characters a token) for when a backend reports none."""
    return max(1, (len(text) + 3) // 4) if text else 0


def meter_units(meter: Meter, usage: Mapping[str, Any] | None) -> tuple[dict[str, int], bool]:
    """Units to bill, and whether any was estimated (missing from the backend's usage)."""
    if meter.source == "request":
        return {unit: 1 for unit in meter.units}, False
    units: dict[str, int] = {}
    estimated = usage is None
    for unit in meter.units:
        value = usage.get(unit) if usage is not None else None
        if isinstance(value, int) and value >= 0:
            units[unit] = value
        else:
            units[unit] = 0
            estimated = True
    return units, estimated


def build_record(
    *,
    dispatch_id: str,
    request_id: str,
    principal_fields: Mapping[str, str | None],
    task: str,
    model: str,
    offering: Offering,
    units: dict[str, int],
    estimated: bool,
    started_ms: int,
    finished_ms: int,
    status: str,
    tags: dict[str, str],
    pricing: Pricing | None = None,
    same_workspace: bool = False,
) -> UsageRecord:
    """The usage record of one dispatch, charged by :func:`catalog.charges.charge`.

    ``pricing`` is the catalog's policy in force (``catalog.charges.effective_pricing``;
    ``None``: the defaults); ``same_workspace`` says whether the serving party belongs to the
    calling workspace (a personal runtime always does). ``offering`` names the serving party
    (its ``provider``) and how it serves (its ``kind``); for a personal runtime pass
    ``catalog.charges.runtime_offering(model, lat_id, pricing)``.
    """
    money = charge(units, offering, pricing, same_workspace=same_workspace)
    prices, price_per = applied_prices(offering, pricing, same_workspace=same_workspace)
    picousd = money.customer_picousd
    return UsageRecord(
        dispatch_id=dispatch_id,
        request_id=request_id,
        workspace=str(principal_fields["workspace"]),
        key_id=principal_fields.get("key_id"),
        client_id=principal_fields.get("client_id"),
        subject=principal_fields.get("subject"),
        task=task,
        model=model,
        offering=offering.id,
        provider=offering.provider,
        units=units,
        prices=prices,
        price_per=price_per,
        cost_picousd=picousd,
        cost_microusd=picousd_to_microusd(picousd),
        started_ms=started_ms,
        finished_ms=finished_ms,
        status=status,  # type: ignore[arg-type]
        tags=tags,
        units_estimated=estimated,
        serving_kind=offering.kind,
        serving_id=offering.provider,
        provider_earnings_picousd=money.provider_earnings_picousd,
        platform_picousd=money.platform_picousd,
    )
