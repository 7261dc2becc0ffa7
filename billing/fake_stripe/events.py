"""Validation of one meter event, shared by the v1 endpoint and the v2 stream.

Both APIs check the same things (https://docs.stripe.com/billing/subscriptions/usage-based/
recording-usage-api): an active meter for ``event_name``, a timestamp within the past 35 days
and at most 5 minutes ahead, the customer under the meter's customer-mapping key, a whole
number under its value key. v1 answers a failure with a 400 (:attr:`EventRejected.error`);
the v2 stream drops the event and reports it under the code of Stripe's meter error reports
(:attr:`EventRejected.report_code`: ``no_meter``, ``archived_meter``,
``timestamp_too_far_in_past``, ``timestamp_in_future``, ``meter_event_no_customer_defined``,
``meter_event_customer_not_found``, ``meter_event_value_not_found``,
``meter_event_invalid_value``).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

from billing.fake_stripe.errors import ApiError
from billing.fake_stripe.objects import Meter

__all__ = [
    "FUTURE_SKEW_S",
    "MAX_IDENTIFIER",
    "MAX_STREAM_EVENTS",
    "PAST_WINDOW_S",
    "EventRejected",
    "StreamEvent",
    "check_event",
    "parse_stream_events",
]

PAST_WINDOW_S = 35 * 86_400
FUTURE_SKEW_S = 5 * 60
MAX_IDENTIFIER = 100
#: "Supports up to 100 events per request" (v2 meter event stream).
MAX_STREAM_EVENTS = 100
_WHOLE = re.compile(r"-?\d+")


class EventRejected(Exception):
    """An invalid event: the v1 error to answer, and the v2 error-report code."""

    def __init__(self, error: ApiError, report_code: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.report_code = report_code


class StreamEvent(NamedTuple):
    event_name: str
    identifier: str
    payload: dict[str, Any]
    timestamp: int


def check_event(
    meter: Meter | None,
    event_name: str,
    identifier: str,
    payload: dict[str, Any],
    timestamp: int,
    now: int,
    customer_live: Callable[[str], bool],
) -> tuple[str, int]:
    """``(customer id, value)`` of a valid event; raises :class:`EventRejected`."""
    if len(identifier) > MAX_IDENTIFIER:
        raise EventRejected(
            ApiError(
                400, f"identifier is longer than {MAX_IDENTIFIER} characters.", param="identifier"
            ),
            "meter_event_invalid_value",
        )
    if meter is None or meter.status != "active":
        raise EventRejected(
            ApiError(
                400, f"No active meter found for event_name '{event_name}'.", param="event_name"
            ),
            "no_meter" if meter is None else "archived_meter",
        )
    if timestamp < now - PAST_WINDOW_S:
        raise EventRejected(
            ApiError(
                400,
                "Timestamp must be within the past 35 calendar days.",
                code="timestamp_too_far_in_past",
                param="timestamp",
            ),
            "timestamp_too_far_in_past",
        )
    if timestamp > now + FUTURE_SKEW_S:
        raise EventRejected(
            ApiError(
                400,
                "Timestamp must be at most 5 minutes in the future.",
                code="timestamp_in_future",
                param="timestamp",
            ),
            "timestamp_in_future",
        )
    customer_key = meter.customer_mapping.event_payload_key
    customer = payload.get(customer_key)
    if not isinstance(customer, str) or not customer:
        raise EventRejected(
            ApiError(
                400,
                f"Missing required param: payload[{customer_key}].",
                code="parameter_missing",
                param=f"payload[{customer_key}]",
            ),
            "meter_event_no_customer_defined",
        )
    if not customer_live(customer):
        raise EventRejected(
            ApiError(
                400,
                f"No such customer: '{customer}'",
                code="resource_missing",
                param=f"payload[{customer_key}]",
            ),
            "meter_event_customer_not_found",
        )
    value_key = meter.value_settings.event_payload_key
    value = payload.get(value_key)
    if value is None or value == "":
        raise EventRejected(
            ApiError(
                400,
                f"Missing required param: payload[{value_key}].",
                code="parameter_missing",
                param=f"payload[{value_key}]",
            ),
            "meter_event_value_not_found",
        )
    if not isinstance(value, str) or not _WHOLE.fullmatch(value):
        raise EventRejected(
            ApiError(
                400,
                f"Invalid integer: {value}",
                code="parameter_invalid_integer",
                param=f"payload[{value_key}]",
            ),
            "meter_event_invalid_value",
        )
    return customer, int(value)


def parse_stream_events(body: Any, now: int) -> list[StreamEvent]:
    """The events of one v2 stream call; a malformed call is refused whole (400,
    code ``invalid_fields``) before any event is looked at."""
    events = body.get("events") if isinstance(body, dict) else None
    if not isinstance(events, list) or not events:
        raise _invalid("events must be a non-empty list.", "events")
    if len(events) > MAX_STREAM_EVENTS:
        raise _invalid(f"At most {MAX_STREAM_EVENTS} events per request.", "events")
    parsed = []
    for i, raw in enumerate(events):
        if not isinstance(raw, dict):
            raise _invalid("Each event must be an object.", f"events[{i}]")
        name, payload = raw.get("event_name"), raw.get("payload")
        identifier = raw.get("identifier") or f"mev_{secrets.token_hex(10)}"
        if not isinstance(name, str) or not name:
            raise _invalid("event_name is required.", f"events[{i}].event_name")
        if not isinstance(payload, dict) or not all(isinstance(v, str) for v in payload.values()):
            raise _invalid("payload must map keys to strings.", f"events[{i}].payload")
        if not isinstance(identifier, str):
            raise _invalid("identifier must be a string.", f"events[{i}].identifier")
        parsed.append(StreamEvent(name, identifier, payload, _timestamp(raw, i, now)))
    return parsed


def _timestamp(raw: dict[str, Any], index: int, now: int) -> int:
    value = raw.get("timestamp")
    if value is None:
        return now
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        raise _invalid(
            "timestamp must be an RFC 3339 date-time.", f"events[{index}].timestamp"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def _invalid(message: str, field: str) -> ApiError:
    return ApiError(400, message, code="invalid_fields", param=field)
