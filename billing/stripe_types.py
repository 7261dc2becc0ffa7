"""The Stripe contract billing codes against: errors, wire Structs, the :class:`StripeApi`
Protocol. No ``stripe`` import here, so modules that only need the contract (the worker, the
reconcile, payouts, the command line) load without stripe-python; the implementation is
:class:`billing.stripe_api.StripeClientApi`::

    StripeError                 .message
    ├── StripeRetryable         .retry_after_s   429, 409, 5xx, timeouts, connection resets
    └── StripePermanent         .code, .http_status   other 4xx (resource_missing, ...)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec

__all__ = [
    "MeterEvent",
    "MeterEventResult",
    "StripeApi",
    "StripeError",
    "StripePermanent",
    "StripeRetryable",
    "Transfer",
]


class StripeError(Exception):
    """A Stripe call failed; :attr:`message` says why (never contains the API key)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class StripeRetryable(StripeError):
    """Try again later (429, 409, 5xx, timeout, reset); ``retry_after_s`` if Stripe said."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StripePermanent(StripeError):
    """Stripe refused for good (4xx other than 409/429); ``code`` is Stripe's error code
    (``resource_missing``, ``idempotency_error`` for a reused idempotency key, ...)."""

    def __init__(self, message: str, *, code: str | None, http_status: int) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status


class MeterEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    event_name: str  # the meter's event_name, e.g. "lattice_usage_microusd"
    identifier: str  # deterministic; Stripe de-duplicates on it (24 h window)
    customer_id: str  # cus_...
    value: int  # whole number >= 0
    timestamp: int  # unix seconds


class MeterEventResult(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    identifier: str
    accepted: bool  # also True for a duplicate of an event Stripe accepted
    error_code: str | None = None  # permanent failure of this event (e.g. resource_missing)


class Transfer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    amount: int
    currency: str
    destination: str
    metadata: dict[str, str]
    created: int


class StripeApi(Protocol):
    """What billing needs from Stripe. Methods raise :class:`StripeRetryable` or
    :class:`StripePermanent`; none retries by itself."""

    async def find_or_create_customer(self, workspace: str) -> str:
        """The live customer whose metadata ``lattice_workspace`` is ``workspace``, created
        (idempotency key derived from the workspace) when there is none."""
        ...

    async def customer_deleted(self, customer_id: str) -> bool: ...

    async def ensure_meter(self, *, event_name: str, display_name: str) -> str:
        """The ``mtr_`` id of the meter of ``event_name`` (sum of payload ``value`` by
        ``stripe_customer_id``), created if missing."""
        ...

    async def send_meter_events(self, events: Sequence[MeterEvent]) -> list[MeterEventResult]:
        """One result per event, in order; raises StripeRetryable when the call as a whole
        failed transiently (no result is lost by retrying: identifiers de-duplicate)."""
        ...

    async def meter_total(self, meter_id: str, customer_id: str, start: int, end: int) -> int:
        """Sum of accepted values with ``start <= timestamp < end`` (minute-aligned)."""
        ...

    async def create_connected_account(self, provider: str, *, email: str | None = None) -> str: ...

    async def account_link(self, account_id: str, *, refresh_url: str, return_url: str) -> str: ...

    async def create_transfer(
        self,
        *,
        amount: int,
        currency: str,
        destination: str,
        idempotency_key: str,
        metadata: dict[str, str],
    ) -> Transfer: ...

    async def list_transfers(self, destination: str) -> list[Transfer]: ...

    async def aclose(self) -> None: ...
