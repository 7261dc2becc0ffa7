"""The Stripe objects the fake stores, shaped as Stripe renders them (field names and
``object`` tags from https://docs.stripe.com/api), encoded with msgspec as they are.

Only the fields Lattice reads or a reader of ``GET /_fake/state`` needs are kept; stripe-python
accepts objects with fewer fields than the real API returns.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "AcceptedEvent",
    "Account",
    "AccountLink",
    "Customer",
    "CustomerMapping",
    "DefaultAggregation",
    "Meter",
    "MeterEventError",
    "StatusTransitions",
    "Transfer",
    "ValueSettings",
]

Formula = Literal["sum", "count", "last"]


class Customer(msgspec.Struct, kw_only=True):
    id: str
    object: str = "customer"
    created: int
    email: str | None = None
    name: str | None = None
    description: str | None = None
    metadata: dict[str, str] = {}
    livemode: bool = False


class CustomerMapping(msgspec.Struct, frozen=True):
    event_payload_key: str = "stripe_customer_id"
    type: str = "by_id"


class DefaultAggregation(msgspec.Struct, frozen=True):
    formula: Formula = "sum"


class ValueSettings(msgspec.Struct, frozen=True):
    event_payload_key: str = "value"


class StatusTransitions(msgspec.Struct, frozen=True):
    deactivated_at: int | None = None


class Meter(msgspec.Struct, kw_only=True):
    id: str
    object: str = "billing.meter"
    created: int
    updated: int
    display_name: str
    event_name: str
    event_time_window: str | None = None
    customer_mapping: CustomerMapping = msgspec.field(default_factory=CustomerMapping)
    default_aggregation: DefaultAggregation = msgspec.field(default_factory=DefaultAggregation)
    value_settings: ValueSettings = msgspec.field(default_factory=ValueSettings)
    status: Literal["active", "inactive"] = "active"
    status_transitions: StatusTransitions = msgspec.field(default_factory=StatusTransitions)
    livemode: bool = False


class AcceptedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A meter event Stripe accepted (counted in summaries); ``via`` is the API used."""

    identifier: str
    event_name: str
    meter: str
    customer: str
    value: int
    timestamp: int
    created: int
    via: Literal["v1", "v2"]


class MeterEventError(msgspec.Struct, frozen=True, kw_only=True):
    """A v2 stream event dropped by Stripe's asynchronous validation; Stripe reports these
    as ``v1.billing.meter.error_report_triggered`` events, with these ``code`` values."""

    identifier: str
    event_name: str
    code: str
    message: str
    created: int


class Account(msgspec.Struct, kw_only=True):
    id: str
    object: str = "account"
    created: int
    type: str = "express"
    email: str | None = None
    country: str = "US"
    default_currency: str = "usd"
    charges_enabled: bool = False
    payouts_enabled: bool = False
    details_submitted: bool = False
    capabilities: dict[str, str] = {}
    metadata: dict[str, str] = {}
    livemode: bool = False


class AccountLink(msgspec.Struct, kw_only=True):
    object: str = "account_link"
    created: int
    expires_at: int
    url: str


class Transfer(msgspec.Struct, kw_only=True):
    id: str
    object: str = "transfer"
    created: int
    amount: int
    amount_reversed: int = 0
    currency: str
    destination: str
    description: str | None = None
    transfer_group: str | None = None
    metadata: dict[str, str] = {}
    reversed: bool = False
    livemode: bool = False
