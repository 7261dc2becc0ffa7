"""The fake Stripe's in-memory model, without sockets: customers (deleted ones leave lists
and search), meters, meter events (identifier de-duplication in a rolling 24 h, the 35-day
and 5-minute timestamp window, missing or deleted customers), summaries, v2 sessions and the
asynchronously validated stream, Connect transfers, and reset."""

from __future__ import annotations

from typing import Any

import pytest

from billing.fake_stripe.errors import ApiError
from billing.fake_stripe.state import IDENTIFIER_WINDOW_S, SESSION_TTL_S, FakeStripeState

T0 = 1_735_776_000  # 2025-01-02T00:00:00Z, a whole minute


class Clock:
    def __init__(self) -> None:
        self.now = float(T0)

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(clock: Clock) -> FakeStripeState:
    return FakeStripeState(clock)


def meter(state: FakeStripeState, name: str = "usage", formula: str = "sum") -> str:
    params = {"display_name": name, "event_name": name, "default_aggregation": {"formula": formula}}
    return state.create_meter(params).id


def event(customer: str, identifier: str, value: int = 5, ts: int = T0, name: str = "usage") -> Any:
    return {
        "event_name": name,
        "identifier": identifier,
        "timestamp": str(ts),
        "payload": {"stripe_customer_id": customer, "value": str(value)},
    }


def refused(call: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call(*args)
    return caught.value


def test_customers_create_delete_list_and_search(state: FakeStripeState) -> None:
    a = state.create_customer({"metadata": {"lattice_workspace": "ws_a"}, "email": "a@x.io"})
    b = state.create_customer({"metadata": {"lattice_workspace": "it's"}})
    found = state.search_customers({"query": "metadata['lattice_workspace']:'ws_a'"})
    assert [c.id for c in found["data"]] == [a.id]
    escaped = state.search_customers({"query": r"metadata['lattice_workspace']:'it\'s'"})
    assert [c.id for c in escaped["data"]] == [b.id]
    both = state.search_customers(
        {"query": "email:'a@x.io' AND metadata[\"lattice_workspace\"]:'ws_a'"}
    )
    assert [c.id for c in both["data"]] == [a.id]
    assert [c.id for c in state.list_customers({})["data"]] == [b.id, a.id]  # newest first

    assert state.delete_customer(a.id) == {"id": a.id, "object": "customer", "deleted": True}
    assert state.retrieve_customer(a.id) == {"id": a.id, "object": "customer", "deleted": True}
    assert state.search_customers({"query": "metadata['lattice_workspace']:'ws_a'"})["data"] == []
    assert [c.id for c in state.list_customers({})["data"]] == [b.id]
    gone = refused(state.delete_customer, a.id)
    assert (gone.status, gone.code, gone.param) == (404, "resource_missing", "id")
    assert refused(state.retrieve_customer, "cus_nope").status == 404


@pytest.mark.parametrize(
    "query", ["", "foo:'x'", "email:x", "email:'a' OR name:'b'", "email:'a' AND"]
)
def test_unsupported_search_queries_are_400(state: FakeStripeState, query: str) -> None:
    error = refused(state.search_customers, {"query": query})
    assert (error.status, error.param) == (400, "query") or error.code == "parameter_missing"


def test_unknown_parameters_and_list_cursors(state: FakeStripeState) -> None:
    error = refused(state.create_customer, {"colour": "red"})
    assert (error.status, error.code, error.param) == (400, "parameter_unknown", "colour")
    ids = [state.create_customer({}).id for _ in range(5)][::-1]  # newest first
    first = state.list_customers({"limit": "2"})
    assert [c.id for c in first["data"]] == ids[:2] and first["has_more"]
    rest = state.list_customers({"limit": "10", "starting_after": ids[1]})
    assert [c.id for c in rest["data"]] == ids[2:] and not rest["has_more"]
    before = state.list_customers({"limit": "2", "ending_before": ids[4]})
    assert [c.id for c in before["data"]] == ids[2:4]
    assert refused(state.list_customers, {"limit": "101"}).param == "limit"
    assert refused(state.list_customers, {"starting_after": "cus_x"}).code == "resource_missing"


def test_meter_create_validation_and_uniqueness(state: FakeStripeState) -> None:
    mid = meter(state)
    m = state.retrieve_meter(mid)
    assert (m.customer_mapping.event_payload_key, m.value_settings.event_payload_key) == (
        "stripe_customer_id",
        "value",
    )
    again = refused(meter, state)
    assert (again.status, again.code) == (400, "resource_already_exists")
    bad = refused(meter, state, "other", "median")
    assert bad.param == "default_aggregation[formula]"
    missing = refused(state.create_meter, {"display_name": "x", "event_name": "y"})
    assert (missing.code, missing.param) == ("parameter_missing", "default_aggregation")
    assert [x.id for x in state.list_meters({"status": "active"})["data"]] == [mid]
    state.deactivate_meter(mid)
    assert state.list_meters({"status": "active"})["data"] == []


def test_meter_events_deduplicate_identifiers_for_24_hours(
    state: FakeStripeState, clock: Clock
) -> None:
    mid = meter(state)
    cus = state.create_customer({}).id
    state.create_meter_event(event(cus, "e1", 5))
    state.create_meter_event(event(cus, "e2", 7))
    duplicate = refused(state.create_meter_event, event(cus, "e1", 5))
    # What Stripe answers: a 400 invalid_request_error with no code, only this message.
    assert duplicate.body() == {
        "error": {
            "type": "invalid_request_error",
            "message": "An event already exists with identifier e1.",
        }
    }
    assert state.meter_total(mid, cus, T0, T0 + 60) == 12
    clock.now += IDENTIFIER_WINDOW_S  # the rolling window has passed: accepted again
    state.create_meter_event(event(cus, "e1", 5, ts=int(clock.now)))
    assert state.meter_total(mid, cus, T0, int(clock.now) + 60) == 17
    assert [e.identifier for e in state.meter_events] == ["e1", "e2", "e1"]


@pytest.mark.parametrize(
    ("change", "code", "param"),
    [
        ({"timestamp": str(T0 - 35 * 86_400 - 1)}, "timestamp_too_far_in_past", "timestamp"),
        ({"timestamp": str(T0 + 301)}, "timestamp_in_future", "timestamp"),
        (
            {"payload": {"stripe_customer_id": "cus_nope", "value": "1"}},
            "resource_missing",
            "payload[stripe_customer_id]",
        ),
        ({"payload": {"value": "1"}}, "parameter_missing", "payload[stripe_customer_id]"),
        (
            {"payload": {"stripe_customer_id": "CUS", "value": "1.5"}},
            "parameter_invalid_integer",
            "payload[value]",
        ),
        ({"event_name": "nobody"}, None, "event_name"),
    ],
)
def test_meter_event_validation(
    state: FakeStripeState, change: dict[str, Any], code: str | None, param: str
) -> None:
    meter(state)
    cus = state.create_customer({}).id
    params = event(cus, "e1") | change
    if params["payload"].get("stripe_customer_id") == "CUS":
        params["payload"]["stripe_customer_id"] = cus
    error = refused(state.create_meter_event, params)
    assert (error.status, error.code, error.param) == (400, code, param)
    assert state.meter_events == []


def test_events_for_a_deleted_customer_fail_but_duplicates_of_accepted_ones_do_not(
    state: FakeStripeState,
) -> None:
    mid = meter(state)
    cus = state.create_customer({}).id
    state.create_meter_event(event(cus, "before"))
    state.delete_customer(cus)
    assert refused(state.create_meter_event, event(cus, "after")).code == "resource_missing"
    # A retry of an event accepted before the deletion is still a duplicate, not an error.
    assert "already exists" in refused(state.create_meter_event, event(cus, "before")).message
    assert state.meter_total(mid, cus, T0, T0 + 60) == 5
    summary = state.event_summaries(mid, {"customer": cus, "start_time": T0, "end_time": T0 + 60})
    assert summary["data"][0]["aggregated_value"] == 5


def test_summaries_need_minute_aligned_ranges(state: FakeStripeState) -> None:
    mid = meter(state)
    cus = state.create_customer({}).id
    state.create_meter_event(event(cus, "a", 3, ts=T0 + 59))
    state.create_meter_event(event(cus, "b", 4, ts=T0 + 60))
    window = {"customer": cus, "start_time": str(T0), "end_time": str(T0 + 60)}
    [summary] = state.event_summaries(mid, window)["data"]
    assert summary["aggregated_value"] == 3  # end_time is exclusive
    assert summary["object"] == "billing.meter_event_summary"
    assert (
        refused(state.event_summaries, mid, window | {"start_time": str(T0 + 1)}).param
        == "start_time"
    )
    assert refused(state.event_summaries, mid, window | {"end_time": str(T0)}).status == 400
    assert refused(state.event_summaries, mid, window | {"customer": "cus_x"}).status == 404
    assert refused(state.event_summaries, "mtr_x", window).status == 404


def test_count_and_last_formulas(state: FakeStripeState) -> None:
    counted, last = meter(state, "calls", "count"), meter(state, "seats", "last")
    cus = state.create_customer({}).id
    for i, value in enumerate([4, 9, 2]):
        state.create_meter_event(event(cus, f"c{i}", value, ts=T0 + i, name="calls"))
        state.create_meter_event(event(cus, f"s{i}", value, ts=T0 + i, name="seats"))
    assert state.meter_total(counted, cus, T0, T0 + 60) == 3
    assert state.meter_total(last, cus, T0, T0 + 60) == 2


def test_stream_sessions_expire_after_15_minutes(state: FakeStripeState, clock: Clock) -> None:
    meter(state)
    cus = state.create_customer({}).id
    session = state.create_meter_event_session()
    assert session["object"] == "v2.billing.meter_event_session"
    assert session["expires_at"] == "2025-01-02T00:15:00.000Z"
    token = session["authentication_token"]
    body = {
        "events": [
            {
                "event_name": "usage",
                "identifier": "s1",
                "payload": {"stripe_customer_id": cus, "value": "2"},
                "timestamp": "2025-01-02T00:00:30.000Z",
            }
        ]
    }
    assert state.stream_meter_events(token, body) == {}
    assert [(e.identifier, e.timestamp, e.via) for e in state.meter_events] == [
        ("s1", T0 + 30, "v2")
    ]
    clock.now += SESSION_TTL_S
    expired = refused(state.stream_meter_events, token, body)
    assert (expired.status, expired.type, expired.code) == (
        401,
        "temporary_session_expired",
        "billing_meter_event_session_expired",
    )
    assert refused(state.check_session, "mets_unknown").status == 401


def test_stream_validates_asynchronously(state: FakeStripeState) -> None:
    mid = meter(state)
    cus = state.create_customer({}).id
    token = state.create_meter_event_session()["authentication_token"]

    def one(identifier: str, customer: str, value: str = "1", name: str = "usage") -> Any:
        payload = {"stripe_customer_id": customer, "value": value}
        return {"event_name": name, "identifier": identifier, "payload": payload}

    events = [
        one("ok", cus),
        one("ok", cus),
        one("ghost", "cus_x"),
        one("nan", cus, "x"),
        one("nomtr", cus, name="other"),
    ]
    assert state.stream_meter_events(token, {"events": events}) == {}
    assert state.meter_total(mid, cus, T0, T0 + 60) == 1  # the duplicate dropped silently
    assert [(e.identifier, e.code) for e in state.meter_event_errors] == [
        ("ghost", "meter_event_customer_not_found"),
        ("nan", "meter_event_invalid_value"),
        ("nomtr", "no_meter"),
    ]
    too_many = {"events": [one(f"e{i}", cus) for i in range(101)]}
    assert refused(state.stream_meter_events, token, too_many).code == "invalid_fields"
    assert refused(state.stream_meter_events, token, {"events": []}).status == 400
    bad_time = {"events": [one("t", cus) | {"timestamp": "yesterday"}]}
    assert refused(state.stream_meter_events, token, bad_time).param == "events[0].timestamp"


def test_transfers_and_accounts(state: FakeStripeState) -> None:
    connect = state.connect
    acct = connect.create_account({"type": "express", "metadata": {"lattice_provider": "p1"}})
    t1 = connect.create_transfer({"amount": "150", "currency": "USD", "destination": acct.id})
    other = connect.create_account({"type": "express"})
    connect.create_transfer({"amount": "7", "currency": "usd", "destination": other.id})
    t3 = connect.create_transfer(
        {"amount": "9", "currency": "usd", "destination": acct.id, "metadata": {"k": "v"}}
    )
    listed = connect.list_transfers({"destination": acct.id})["data"]
    assert [t.id for t in listed] == [t3.id, t1.id] and t1.currency == "usd"
    assert t3.metadata == {"k": "v"}
    nowhere = refused(
        connect.create_transfer, {"amount": "1", "currency": "usd", "destination": "acct_x"}
    )
    assert (nowhere.code, nowhere.param) == ("resource_missing", "destination")
    assert (
        refused(
            connect.create_transfer, {"amount": "0", "currency": "usd", "destination": acct.id}
        ).param
        == "amount"
    )
    assert (
        refused(
            connect.create_transfer, {"amount": "1.5", "currency": "usd", "destination": acct.id}
        ).code
        == "parameter_invalid_integer"
    )
    link = connect.create_account_link(
        {"account": acct.id, "refresh_url": "r", "return_url": "u", "type": "account_onboarding"},
        "http://fake",
    )
    assert link.url.startswith(f"http://fake/_fake/connect/account_onboarding/{acct.id}/")
    assert link.expires_at > link.created
    assert refused(connect.create_account, {}).param == "type"


def test_reset_forgets_everything(state: FakeStripeState) -> None:
    meter(state)
    state.create_customer({})
    state.connect.create_account({"type": "express"})
    state.reset()
    snapshot = state.snapshot()
    assert all(not snapshot[k] for k in ("customers", "meters", "meter_events", "accounts"))
