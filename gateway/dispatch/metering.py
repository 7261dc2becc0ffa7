"""Counting units by a task class's meter and building the usage record (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from billing.usage import UsageRecord
from catalog.model import Meter, Offering
from catalog.pricing import cost_picousd, picousd_to_microusd

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
) -> UsageRecord:
    picousd = cost_picousd(units, offering)
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
        prices=dict(offering.prices),
        price_per=offering.price_per,
        cost_picousd=picousd,
        cost_microusd=picousd_to_microusd(picousd),
        started_ms=started_ms,
        finished_ms=finished_ms,
        status=status,  # type: ignore[arg-type]
        tags=tags,
        units_estimated=estimated,
    )
