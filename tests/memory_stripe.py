"""An in-memory :class:`billing.stripe_api.StripeApi` for tests: a real implementation of the
Protocol with Stripe's semantics where billing depends on them (identifier de-duplication,
deleted customers refused per event, idempotent transfers), no sockets.

Failures on demand: :meth:`MemoryStripe.fail_next` queues errors raised by the next calls of
a method (``StripeRetryable`` with a ``retry_after_s``, say); :attr:`down` fails every call of
``send_meter_events`` until cleared. :attr:`calls` logs each call (method, clock time).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

from billing.stripe_api import (
    MeterEvent,
    MeterEventResult,
    StripeError,
    StripePermanent,
    StripeRetryable,
    Transfer,
)

__all__ = ["MemoryStripe", "retryable"]


class MemoryStripe:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.customers: dict[str, str] = {}  # cus_ → workspace
        self.deleted: set[str] = set()
        self.meters: dict[str, str] = {}  # event_name → mtr_
        self.events: dict[str, MeterEvent] = {}  # accepted, by identifier
        self.duplicates = 0
        self.transfers: dict[str, Transfer] = {}  # by idempotency key
        self.accounts: dict[str, str] = {}  # provider → acct_
        self.calls: list[tuple[str, float]] = []
        self.down: StripeError | None = None
        self._faults: dict[str, list[StripeError]] = {}
        self._ids = itertools.count(1)

    # -- test controls ---------------------------------------------------------------------

    def fail_next(self, method: str, *errors: StripeError) -> None:
        self._faults.setdefault(method, []).extend(errors)

    def delete_customer(self, customer_id: str) -> None:
        self.deleted.add(customer_id)

    def total(self, event_name: str, customer_id: str) -> int:
        return sum(
            e.value
            for e in self.events.values()
            if e.event_name == event_name and e.customer_id == customer_id
        )

    def customer_of(self, workspace: str) -> str:
        return next(c for c, ws in self.customers.items() if ws == workspace)

    def _enter(self, method: str) -> None:
        self.calls.append((method, self.clock()))
        queued = self._faults.get(method)
        if queued:
            raise queued.pop(0)
        if self.down is not None and method == "send_meter_events":
            raise self.down

    def _new(self, prefix: str) -> str:
        return f"{prefix}_mem{next(self._ids):06d}"

    # -- StripeApi -------------------------------------------------------------------------

    async def find_or_create_customer(self, workspace: str) -> str:
        self._enter("find_or_create_customer")
        for cid, ws in self.customers.items():
            if ws == workspace:
                return cid  # deleted ones too: a new customer needs an explicit relink
        cid = self._new("cus")
        self.customers[cid] = workspace
        return cid

    async def customer_deleted(self, customer_id: str) -> bool:
        self._enter("customer_deleted")
        return customer_id in self.deleted or customer_id not in self.customers

    async def ensure_meter(self, *, event_name: str, display_name: str) -> str:
        self._enter("ensure_meter")
        if event_name not in self.meters:
            self.meters[event_name] = self._new("mtr")
        return self.meters[event_name]

    async def send_meter_events(self, events: Sequence[MeterEvent]) -> list[MeterEventResult]:
        self._enter("send_meter_events")
        results = []
        for e in events:
            if e.event_name not in self.meters:
                results.append(MeterEventResult(e.identifier, False, "meter_not_found"))
            elif e.customer_id in self.deleted or e.customer_id not in self.customers:
                results.append(MeterEventResult(e.identifier, False, "resource_missing"))
            elif e.identifier in self.events:
                self.duplicates += 1
                results.append(MeterEventResult(e.identifier, True))
            else:
                self.events[e.identifier] = e
                results.append(MeterEventResult(e.identifier, True))
        return results

    async def meter_total(self, meter_id: str, customer_id: str, start: int, end: int) -> int:
        self._enter("meter_total")
        if start % 60 or end % 60:
            raise ValueError("meter_total needs minute-aligned start and end")
        names = [n for n, m in self.meters.items() if m == meter_id]
        return sum(
            e.value
            for e in self.events.values()
            if e.event_name in names and e.customer_id == customer_id and start <= e.timestamp < end
        )

    async def create_connected_account(self, provider: str, *, email: str | None = None) -> str:
        self._enter("create_connected_account")
        if provider not in self.accounts:
            self.accounts[provider] = self._new("acct")
        return self.accounts[provider]

    async def account_link(self, account_id: str, *, refresh_url: str, return_url: str) -> str:
        self._enter("account_link")
        if account_id not in self.accounts.values():
            raise StripePermanent("No such account", code="resource_missing", http_status=404)
        return f"https://connect.invalid/setup/{account_id}"

    async def create_transfer(
        self,
        *,
        amount: int,
        currency: str,
        destination: str,
        idempotency_key: str,
        metadata: dict[str, str],
    ) -> Transfer:
        self._enter("create_transfer")
        if idempotency_key not in self.transfers:
            self.transfers[idempotency_key] = Transfer(
                id=self._new("tr"),
                amount=amount,
                currency=currency,
                destination=destination,
                metadata=dict(metadata),
                created=int(self.clock()),
            )
        return self.transfers[idempotency_key]

    async def list_transfers(self, destination: str) -> list[Transfer]:
        self._enter("list_transfers")
        found = [t for t in self.transfers.values() if t.destination == destination]
        return sorted(found, key=lambda t: (t.created, t.id), reverse=True)

    async def aclose(self) -> None:
        pass


def retryable(retry_after_s: float | None = None) -> StripeRetryable:
    return StripeRetryable("Stripe is unavailable (test)", retry_after_s=retry_after_s)
