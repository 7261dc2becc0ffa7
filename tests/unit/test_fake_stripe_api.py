"""The fake Stripe's HTTP semantics without a socket: form decoding, authentication, Stripe's
error bodies and ``Request-Id``, the idempotency layer (replay, mismatched parameters or
endpoint, 24 h expiry, errors never saved), control endpoints and failure plans."""

from __future__ import annotations

import json
from typing import Any

import pytest

from billing.fake_stripe.api import FakeStripeApi, Request, Response
from billing.fake_stripe.errors import ApiError
from billing.fake_stripe.failures import FailureInjector, FailurePlan, failure_response
from billing.fake_stripe.forms import decode_form
from billing.fake_stripe.idempotency import KEY_TTL_S
from billing.fake_stripe.state import FakeStripeState

KEY = "Bearer sk_test_unit"


class Clock:
    def __init__(self) -> None:
        self.now = 1_735_776_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def api(clock: Clock) -> FakeStripeApi:
    return FakeStripeApi(FakeStripeState(clock), FailureInjector(), base_url=lambda: "http://f")


def call(
    api: FakeStripeApi,
    method: str,
    path: str,
    body: str = "",
    *,
    key: str | None = None,
    auth: str | None = KEY,
    query: str = "",
) -> tuple[Response, Any]:
    response = api.handle(Request(method, path, query, body.encode(), auth, key))
    return response, json.loads(response.body)


def test_decode_form_nests_like_stripe() -> None:
    raw = "a=1&metadata[k]=v&metadata[e]=&items[1][p]=y&items[0][p]=x&expand[]=one&expand[]=two"
    assert decode_form(raw) == {
        "a": "1",
        "metadata": {"k": "v", "e": ""},
        "items": [{"p": "x"}, {"p": "y"}],
        "expand": ["one", "two"],
    }
    assert decode_form("payload%5Bvalue%5D=5") == {"payload": {"value": "5"}}
    for bad in ("a=1&a[b]=2", "a=1&a=2", "a[b=1"):
        with pytest.raises(ApiError):
            decode_form(bad)


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        (None, "You did not provide an API key"),
        ("Basic !!!", "You did not provide an API key"),
        ("Token sk_test_abc", "You did not provide an API key"),
        ("Bearer sk_live_0123456789", "Invalid API Key provided: sk_live_******6789"),
        ("Bearer sk_test_", "Invalid API Key provided"),
    ],
)
def test_authentication(api: FakeStripeApi, auth: str | None, message: str) -> None:
    response, body = call(api, "GET", "/v1/customers", auth=auth)
    assert response.status == 401
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith(message)
    assert response.headers["Request-Id"].startswith("req_")


def test_basic_auth_takes_the_key_as_user_name(api: FakeStripeApi) -> None:
    response, _ = call(api, "GET", "/v1/customers", auth="Basic c2tfdGVzdF9hYmM6")  # sk_test_abc:
    assert response.status == 200


def test_the_stream_takes_a_session_token_not_an_api_key(api: FakeStripeApi) -> None:
    response, _ = call(api, "POST", "/v2/billing/meter_event_stream", '{"events": []}')
    assert response.status == 401
    _, session = call(api, "POST", "/v2/billing/meter_event_session", "{}")
    token = f"Bearer {session['authentication_token']}"
    response, body = call(api, "POST", "/v2/billing/meter_event_stream", "{}", auth=token)
    assert (response.status, body["error"]["code"]) == (400, "invalid_fields")


def test_unknown_urls_and_methods_are_404(api: FakeStripeApi) -> None:
    for method, path in [("GET", "/v1/charges"), ("PUT", "/v1/customers")]:
        response, body = call(api, method, path)
        assert response.status == 404
        assert body["error"]["message"].startswith(f"Unrecognized request URL ({method}: {path})")


def test_idempotent_replay(api: FakeStripeApi) -> None:
    first, created = call(api, "POST", "/v1/customers", "metadata[ws]=a", key="k1")
    again, replayed = call(api, "POST", "/v1/customers", "metadata[ws]=a", key="k1")
    assert replayed == created and again.status == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Original-Request"] == first.headers["Request-Id"]
    assert "Idempotent-Replayed" not in first.headers
    assert len(api.state.customers) == 1


def test_same_key_other_parameters_or_endpoint_is_an_idempotency_error(api: FakeStripeApi) -> None:
    call(api, "POST", "/v1/customers", "metadata[ws]=a", key="k1")
    response, body = call(api, "POST", "/v1/customers", "metadata[ws]=b", key="k1")
    assert response.status == 400
    assert body["error"]["type"] == "idempotency_error"
    assert "same parameters" in body["error"]["message"]
    response, body = call(api, "POST", "/v1/billing/meters", "metadata[ws]=a", key="k1")
    assert body["error"]["type"] == "idempotency_error"
    assert "same endpoint" in body["error"]["message"]
    assert len(api.state.customers) == 1


def test_keys_expire_after_24_hours(api: FakeStripeApi, clock: Clock) -> None:
    call(api, "POST", "/v1/customers", "metadata[ws]=a", key="k1")
    clock.now += KEY_TTL_S
    response, _ = call(api, "POST", "/v1/customers", "metadata[ws]=b", key="k1")
    assert response.status == 200 and "Idempotent-Replayed" not in response.headers
    assert len(api.state.customers) == 2


def test_errors_are_not_saved(api: FakeStripeApi) -> None:
    response, _ = call(
        api, "POST", "/v1/transfers", "amount=5&currency=usd&destination=acct_x", key="t"
    )
    assert response.status == 400
    _, account = call(api, "POST", "/v1/accounts", "type=express")
    body = f"amount=5&currency=usd&destination={account['id']}"
    response, _ = call(api, "POST", "/v1/transfers", body, key="t")
    assert response.status == 200 and len(api.state.connect.transfers) == 1


def test_get_query_strings_and_deleted_customers(api: FakeStripeApi) -> None:
    _, customer = call(api, "POST", "/v1/customers", "metadata[lattice_workspace]=w1")
    query = "query=metadata%5B%27lattice_workspace%27%5D%3A%27w1%27"
    _, found = call(api, "GET", "/v1/customers/search", query=query)
    assert [c["id"] for c in found["data"]] == [customer["id"]]
    _, deleted = call(api, "DELETE", f"/v1/customers/{customer['id']}")
    assert deleted == {"id": customer["id"], "object": "customer", "deleted": True}
    _, fetched = call(api, "GET", f"/v1/customers/{customer['id']}")
    assert fetched["deleted"] is True


def test_control_endpoints(api: FakeStripeApi) -> None:
    plan = '{"mode": "429", "count": 2, "retry_after": 1.5, "paths": "/v1/billing"}'
    response, body = call(api, "POST", "/_fake/fail", plan, auth=None)
    assert (response.status, body) == (200, {"pending": 2})
    response, _ = call(api, "POST", "/_fake/fail", '{"mode": "teapot"}', auth=None)
    assert response.status == 400
    call(api, "POST", "/v1/customers", "")
    _, state = call(api, "GET", "/_fake/state", auth=None)
    assert len(state["customers"]) == 1 and state["failures_pending"] == 2
    call(api, "POST", "/_fake/reset", auth=None)
    _, state = call(api, "GET", "/_fake/state", auth=None)
    assert state["customers"] == [] and state["failures_pending"] == 0


def test_failure_plans_count_and_match_paths() -> None:
    injector = FailureInjector()
    injector.arm(FailurePlan("500", count=2, paths="/v1/billing"))
    injector.arm(FailurePlan("reset"))
    assert injector.take("/_fake/state") is None  # control paths never fail
    assert injector.take("/v1/customers") == FailurePlan("reset")
    assert injector.take("/v1/customers") is None
    assert [injector.take("/v1/billing/meter_events") for _ in range(3)] == [
        FailurePlan("500", count=2, paths="/v1/billing"),
        FailurePlan("500", count=2, paths="/v1/billing"),
        None,
    ]
    assert (injector.injected, injector.pending()) == (3, 0)
    with pytest.raises(ValueError):
        FailurePlan("500", count=0)


def test_failure_responses_have_stripes_shape() -> None:
    status, body, headers = failure_response(FailurePlan("429", retry_after=2.5))
    assert (status, headers) == (429, {"Retry-After": "2.5"})
    assert body["error"]["code"] == "rate_limit"
    status, body, headers = failure_response(FailurePlan("500"))
    assert (status, body["error"]["type"], headers) == (500, "api_error", {})
