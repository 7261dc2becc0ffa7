"""The fake Stripe's whole state, in memory, with Stripe's semantics and no sockets.

Each public method is one API operation: it takes the decoded parameters, returns the
object Stripe would render (a Struct or a JSON-ready dict) and raises
:class:`~billing.fake_stripe.errors.ApiError` where Stripe answers with an error. The clock is
injected, so tests move time (the 24 h windows, session expiry) without sleeping.

Semantics kept from Stripe (https://docs.stripe.com/api):

- Meter events (``/v1/billing/meter_events``): the ``identifier`` is unique within a rolling
  24 h; a second event with an identifier already accepted is refused with 400
  ``invalid_request_error``, no ``code``, message ``An event already exists with identifier
  <id>.`` (what Stripe answers). Timestamps must lie within the past 35 days and at most
  5 minutes ahead. Values are whole numbers. One deliberate difference: Stripe checks the
  customer asynchronously; this fake refuses an event for a missing or deleted customer at
  once with 400 ``resource_missing`` (param ``payload[stripe_customer_id]``), so a billing
  worker sees the failure per event.
- The v2 stream (``/v2/billing/meter_event_stream``) takes at most 100 events per call,
  authenticated by a 15-minute session token, and validates asynchronously: the call succeeds
  and invalid events are dropped into :attr:`FakeStripeState.meter_event_errors` with the codes
  of Stripe's meter error reports; duplicates are dropped silently.
- Summaries (``/v1/billing/meters/{id}/event_summaries``) need minute-aligned ``start_time``
  (inclusive) and ``end_time`` (exclusive) and, without ``value_grouping_window``, return one
  summary for the range. Accepted events count at once (Stripe may lag).
- Deleted customers answer ``{"id", "object": "customer", "deleted": true}`` and leave lists
  and search.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec

from billing.fake_stripe.connect import ConnectState
from billing.fake_stripe.customers import CustomerOps
from billing.fake_stripe.errors import ApiError, missing
from billing.fake_stripe.events import EventRejected, check_event, parse_stream_events
from billing.fake_stripe.idempotency import IdempotencyStore
from billing.fake_stripe.objects import (
    AcceptedEvent,
    Customer,
    CustomerMapping,
    DefaultAggregation,
    Meter,
    MeterEventError,
    ValueSettings,
)
from billing.fake_stripe.params import (
    check_known,
    list_page,
    optional_int,
    optional_str,
    required_int,
    required_str,
)

__all__ = ["IDENTIFIER_WINDOW_S", "SESSION_TTL_S", "FakeStripeState"]

#: Meter-event identifiers are unique "within a rolling 24 hour period" (Stripe).
IDENTIFIER_WINDOW_S = 86_400
#: "Authentication tokens are only valid for 15 minutes" (v2 meter event session).
SESSION_TTL_S = 15 * 60
_FORMULAS = frozenset({"sum", "count", "last"})


class FakeStripeState(CustomerOps):
    """Customers, meters, meter events, sessions, Connect and idempotency records."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        """Forget everything (``POST /_fake/reset``); the clock stays."""
        clock = self.clock
        self.customers: dict[str, Customer] = {}
        self.deleted_customers: set[str] = set()
        self.meters: dict[str, Meter] = {}
        self.meter_events: list[AcceptedEvent] = []
        self.meter_event_errors: list[MeterEventError] = []
        self.sessions: dict[str, float] = {}
        self.connect = ConnectState(clock)
        self.idempotency = IdempotencyStore(clock)
        self._meter_by_event: dict[str, str] = {}
        self._identifiers: dict[str, float] = {}
        self._events_by: dict[tuple[str, str], list[AcceptedEvent]] = {}

    def now(self) -> int:
        return int(self.clock())

    # -- meters ---------------------------------------------------------------------------------

    def create_meter(self, params: dict[str, Any]) -> Meter:
        check_known(
            params,
            (
                "display_name",
                "event_name",
                "default_aggregation",
                "customer_mapping",
                "value_settings",
                "event_time_window",
            ),
        )
        display_name = required_str(params, "display_name")
        event_name = required_str(params, "event_name")
        aggregation = _hash(params, "default_aggregation")
        formula = required_str(aggregation, "formula", "default_aggregation[formula]")
        if formula not in _FORMULAS:
            raise ApiError(
                400,
                f"Invalid default_aggregation[formula]: {formula}",
                code="parameter_invalid",
                param="default_aggregation[formula]",
            )
        mapping = _hash(params, "customer_mapping", required=False)
        value = _hash(params, "value_settings", required=False)
        if event_name in self._meter_by_event:
            raise ApiError(
                400,
                f"A meter with event_name '{event_name}' already exists.",
                code="resource_already_exists",
                param="event_name",
            )
        now = self.now()
        meter = Meter(
            id=f"mtr_{secrets.token_hex(8)}",
            created=now,
            updated=now,
            display_name=display_name,
            event_name=event_name,
            event_time_window=optional_str(params, "event_time_window"),
            customer_mapping=CustomerMapping(
                event_payload_key=optional_str(mapping, "event_payload_key")
                or "stripe_customer_id",
                type=optional_str(mapping, "type") or "by_id",
            ),
            default_aggregation=DefaultAggregation(formula=formula),  # type: ignore[arg-type]
            value_settings=ValueSettings(
                event_payload_key=optional_str(value, "event_payload_key") or "value"
            ),
        )
        self.meters[meter.id] = meter
        self._meter_by_event[event_name] = meter.id
        return meter

    def retrieve_meter(self, meter_id: str) -> Meter:
        meter = self.meters.get(meter_id)
        if meter is None:
            raise missing("billing meter", meter_id)
        return meter

    def list_meters(self, params: dict[str, Any]) -> dict[str, Any]:
        check_known(params, ("status", "limit", "starting_after", "ending_before"))
        status = optional_str(params, "status")
        chosen = [m for m in self.meters.values() if status is None or m.status == status]
        chosen.reverse()
        return list_page(chosen, params, "/v1/billing/meters", "billing meter")

    def deactivate_meter(self, meter_id: str) -> Meter:
        meter = self.retrieve_meter(meter_id)
        meter.status = "inactive"
        meter.updated = self.now()
        meter.status_transitions = msgspec.structs.replace(
            meter.status_transitions, deactivated_at=meter.updated
        )
        return meter

    def event_summaries(self, meter_id: str, params: dict[str, Any]) -> dict[str, Any]:
        check_known(
            params,
            (
                "customer",
                "start_time",
                "end_time",
                "value_grouping_window",
                "limit",
                "starting_after",
                "ending_before",
            ),
        )
        meter = self.retrieve_meter(meter_id)
        customer = required_str(params, "customer")
        start, end = required_int(params, "start_time"), required_int(params, "end_time")
        for name, value in (("start_time", start), ("end_time", end)):
            if value % 60:
                raise ApiError(400, f"{name} must be aligned with minute boundaries.", param=name)
        if start >= end:
            raise ApiError(400, "start_time must be before end_time.", param="start_time")
        if params.get("value_grouping_window") is not None:
            raise ApiError(
                400,
                "value_grouping_window is not supported by the fake Stripe.",
                param="value_grouping_window",
            )
        if customer not in self.customers and customer not in self.deleted_customers:
            raise missing("customer", customer, param="customer")
        digest = hashlib.sha256(f"{meter_id}:{customer}:{start}:{end}".encode()).hexdigest()
        summary = {
            "id": f"mtrusg_{digest[:24]}",
            "object": "billing.meter_event_summary",
            "aggregated_value": self.meter_total(meter.id, customer, start, end),
            "start_time": start,
            "end_time": end,
            "meter": meter.id,
            "livemode": False,
        }
        url = f"/v1/billing/meters/{meter_id}/event_summaries"
        return {"object": "list", "data": [summary], "has_more": False, "url": url}

    def meter_total(self, meter_id: str, customer: str, start: int, end: int) -> int:
        """The meter's aggregate over accepted events with ``start <= timestamp < end``."""
        events = [
            e for e in self._events_by.get((meter_id, customer), ()) if start <= e.timestamp < end
        ]
        formula = self.meters[meter_id].default_aggregation.formula
        if formula == "count":
            return len(events)
        if formula == "last":
            return max(events, key=lambda e: (e.timestamp, e.created)).value if events else 0
        return sum(e.value for e in events)

    # -- meter events ---------------------------------------------------------------------------

    def create_meter_event(self, params: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/billing/meter_events``: validated synchronously (see module doc)."""
        check_known(params, ("event_name", "payload", "identifier", "timestamp"))
        now = self.now()
        event_name = required_str(params, "event_name")
        payload = _hash(params, "payload")
        identifier = optional_str(params, "identifier") or f"mev_{secrets.token_hex(10)}"
        timestamp = optional_int(params, "timestamp")
        timestamp = now if timestamp is None else timestamp
        try:
            accepted = self._accept(event_name, identifier, payload, timestamp, "v1")
        except EventRejected as exc:
            raise exc.error from None
        if accepted is None:
            raise ApiError(400, f"An event already exists with identifier {identifier}.")
        return {
            "object": "billing.meter_event",
            "created": accepted.created,
            "event_name": event_name,
            "identifier": identifier,
            "livemode": False,
            "payload": payload,
            "timestamp": timestamp,
        }

    def create_meter_event_session(self) -> dict[str, Any]:
        """``POST /v2/billing/meter_event_session``: a token valid for 15 minutes."""
        created = self.clock()
        token = f"mets_{secrets.token_urlsafe(24)}"
        self.sessions[token] = created + SESSION_TTL_S
        return {
            "id": f"mes_{secrets.token_hex(8)}",
            "object": "v2.billing.meter_event_session",
            "authentication_token": token,
            "created": _iso(created),
            "expires_at": _iso(created + SESSION_TTL_S),
            "livemode": False,
        }

    def check_session(self, token: str) -> None:
        """401 unless ``token`` is a live session token (stream authentication)."""
        expires = self.sessions.get(token)
        if expires is None:
            raise ApiError(401, "Invalid meter event session token.", code="invalid_token")
        if expires <= self.clock():
            raise ApiError(
                401,
                "The meter event session has expired; create a new one.",
                type="temporary_session_expired",
                code="billing_meter_event_session_expired",
            )

    def stream_meter_events(self, token: str, body: Any) -> dict[str, Any]:
        """``POST /v2/billing/meter_event_stream``: shape checked now, events validated
        "asynchronously" (dropped into :attr:`meter_event_errors`); answers ``{}``."""
        self.check_session(token)
        for event in parse_stream_events(body, self.now()):
            try:
                self._accept(
                    event.event_name, event.identifier, event.payload, event.timestamp, "v2"
                )
            except EventRejected as exc:
                self.meter_event_errors.append(
                    MeterEventError(
                        identifier=event.identifier,
                        event_name=event.event_name,
                        code=exc.report_code,
                        message=exc.error.message,
                        created=self.now(),
                    )
                )
        return {}

    def _accept(
        self, event_name: str, identifier: str, payload: dict[str, Any], timestamp: int, via: Any
    ) -> AcceptedEvent | None:
        """Record one valid event; ``None`` for a duplicate identifier (within 24 h)."""
        self._prune_identifiers()
        meter_id = self._meter_by_event.get(event_name)
        meter = None if meter_id is None else self.meters[meter_id]
        if identifier in self._identifiers:
            return None
        customer, value = check_event(
            meter, event_name, identifier, payload, timestamp, self.now(), self._customer_live
        )
        assert meter is not None  # check_event rejects events without an active meter
        event = AcceptedEvent(
            identifier=identifier,
            event_name=event_name,
            meter=meter.id,
            customer=customer,
            value=value,
            timestamp=timestamp,
            created=self.now(),
            via=via,
        )
        self._identifiers[identifier] = self.clock()
        self.meter_events.append(event)
        self._events_by.setdefault((meter.id, customer), []).append(event)
        return event

    def _customer_live(self, customer_id: str) -> bool:
        return customer_id in self.customers

    def _prune_identifiers(self) -> None:
        horizon = self.clock() - IDENTIFIER_WINDOW_S
        while self._identifiers:
            first = next(iter(self._identifiers))
            if self._identifiers[first] > horizon:
                return
            del self._identifiers[first]

    # -- inspection -----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What ``GET /_fake/state`` shows: every object, accepted events, stream errors."""
        return {
            "customers": list(self.customers.values()),
            "deleted_customers": sorted(self.deleted_customers),
            "meters": list(self.meters.values()),
            "meter_events": self.meter_events,
            "meter_event_errors": self.meter_event_errors,
            "accounts": list(self.connect.accounts.values()),
            "transfers": list(self.connect.transfers.values()),
            "idempotency_records": len(self.idempotency),
        }


def _hash(params: dict[str, Any], name: str, *, required: bool = True) -> dict[str, Any]:
    value = params.get(name)
    if value is None and not required:
        return {}
    if value is None:
        raise ApiError(
            400, f"Missing required param: {name}.", code="parameter_missing", param=name
        )
    if not isinstance(value, dict):
        raise ApiError(400, f"Invalid {name}: must be a hash", param=name)
    return value


def _iso(ts: float) -> str:
    """Stripe v2 timestamps: RFC 3339 in UTC with milliseconds (``2024-06-01T12:00:00.000Z``)."""
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
