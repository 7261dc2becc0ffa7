"""The StripeApi contract of :class:`billing.stripe_api.StripeClientApi` (the real stripe-python
client) against the in-repo fake Stripe over loopback HTTP: customers created once per
workspace and deleted ones detected, meters created once, meter events de-duplicated by
identifier on v1 and on the v2 stream, idempotent transfers, every injected failure a
StripeRetryable that changed nothing, and authentication failures permanent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from billing.fake_stripe import FakeStripeServer
from billing.fake_stripe.state import SESSION_TTL_S
from billing.stripe_api import (
    MeterEvent,
    MeterEventResult,
    StripeClientApi,
    StripePermanent,
    StripeRetryable,
    Transfer,
    stripe_api_from_env,
)

KEY = "sk_test_contract"
NAME = "lattice_usage_microusd"


class Clock:
    """The fake's clock: real time plus what a test skipped."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def __call__(self) -> float:
        return time.time() + self.skipped


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def server(clock: Clock) -> Iterator[FakeStripeServer]:
    with FakeStripeServer(clock=clock) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeStripeServer, clock: Clock) -> FakeStripeServer:
    server.reset()
    clock.skipped = 0.0
    return server


@pytest.fixture
async def api(fake: FakeStripeServer) -> AsyncIterator[StripeClientApi]:
    client = StripeClientApi(KEY, api_base=fake.url, timeout_s=5.0)
    yield client
    await client.aclose()


@pytest.fixture
async def stream_api(fake: FakeStripeServer) -> AsyncIterator[StripeClientApi]:
    client = StripeClientApi(KEY, api_base=fake.url, timeout_s=5.0, use_v2_stream=True)
    yield client
    await client.aclose()


def minute() -> int:
    return int(time.time()) // 60 * 60


def events(
    customer: str, *identifiers: str, value: int = 10, ts: int | None = None
) -> list[MeterEvent]:
    at = minute() if ts is None else ts
    return [MeterEvent(NAME, i, customer, value, at) for i in identifiers]


def accepted(*identifiers: str) -> list[MeterEventResult]:
    return [MeterEventResult(identifier=i, accepted=True) for i in identifiers]


async def setup_meter(api: StripeClientApi, *workspaces: str) -> tuple[str, list[str]]:
    meter = await api.ensure_meter(event_name=NAME, display_name="Lattice usage")
    return meter, [await api.find_or_create_customer(ws) for ws in workspaces]


# -- customers and meters ---------------------------------------------------------------------


async def test_one_customer_per_workspace(
    api: StripeClientApi, fake: FakeStripeServer, clock: Clock
) -> None:
    first, second = await asyncio.gather(
        api.find_or_create_customer("ws_1"), api.find_or_create_customer("ws_1")
    )
    other = await api.find_or_create_customer("ws_2")
    clock.skipped += 25 * 3600  # the idempotency key is gone: found by its metadata instead
    assert first == second == await api.find_or_create_customer("ws_1") != other
    with fake.locked() as state:
        assert {c.id: c.metadata for c in state.customers.values()} == {
            first: {"lattice_workspace": "ws_1"},
            other: {"lattice_workspace": "ws_2"},
        }


async def test_deleted_customers_are_detected_and_relinked_explicitly(
    api: StripeClientApi, fake: FakeStripeServer
) -> None:
    customer = await api.find_or_create_customer("ws_gone")
    assert not await api.customer_deleted(customer)
    with fake.locked() as state:
        state.delete_customer(customer)
    assert await api.customer_deleted(customer)
    assert await api.customer_deleted("cus_never_existed")
    new = await api.relink_customer("ws_gone", replaces=customer)
    assert new != customer and await api.relink_customer("ws_gone", replaces=customer) == new
    assert await api.find_or_create_customer("ws_gone") == new


async def test_ensure_meter_creates_once(api: StripeClientApi, fake: FakeStripeServer) -> None:
    first, second = await asyncio.gather(
        api.ensure_meter(event_name=NAME, display_name="Usage"),
        api.ensure_meter(event_name=NAME, display_name="Usage"),
    )
    assert first == second == await api.ensure_meter(event_name=NAME, display_name="Usage")
    with fake.locked() as state:
        [meter] = state.meters.values()
    assert (meter.event_name, meter.default_aggregation.formula) == (NAME, "sum")
    assert meter.customer_mapping.event_payload_key == "stripe_customer_id"
    assert meter.value_settings.event_payload_key == "value"


async def test_a_meter_that_would_bill_wrongly_is_refused(
    api: StripeClientApi, fake: FakeStripeServer
) -> None:
    with fake.locked() as state:
        params = {
            "display_name": "x",
            "event_name": "calls",
            "default_aggregation": {"formula": "count"},
        }
        state.create_meter(params)
        gone = state.create_meter(
            {**params, "event_name": "old", "default_aggregation": {"formula": "sum"}}
        )
        state.deactivate_meter(gone.id)
    for name, code in [("calls", "meter_misconfigured"), ("old", "meter_inactive")]:
        with pytest.raises(StripePermanent) as caught:
            await api.ensure_meter(event_name=name, display_name="x")
        assert caught.value.code == code


# -- meter events -------------------------------------------------------------------------------


async def test_meter_events_count_once_per_identifier(
    api: StripeClientApi, fake: FakeStripeServer
) -> None:
    meter, [customer] = await setup_meter(api, "ws_m")
    batch = events(customer, "e1", "e2", "e3")
    assert await api.send_meter_events(batch) == accepted("e1", "e2", "e3")
    again = batch[:2] + events(customer, "e4", value=5)
    assert await api.send_meter_events(again) == accepted("e1", "e2", "e4")
    start = minute()
    assert await api.meter_total(meter, customer, start, start + 60) == 35
    # Past Stripe's 24 h of idempotency keys, a resent event meets identifier
    # de-duplication instead ("An event already exists ..."): still accepted, not counted.
    with fake.locked() as state:
        state.idempotency.clear()
    assert await api.send_meter_events(batch[:1]) == accepted("e1")
    assert await api.meter_total(meter, customer, start, start + 60) == 35
    assert await api.send_meter_events([]) == []


async def test_an_identifier_resent_with_another_value_is_refused(
    api: StripeClientApi, fake: FakeStripeServer
) -> None:
    meter, [customer] = await setup_meter(api, "ws_v")
    await api.send_meter_events(events(customer, "e1", value=10))
    [result] = await api.send_meter_events(events(customer, "e1", value=11))
    assert result == MeterEventResult("e1", accepted=False, error_code="idempotency_error")
    assert await api.meter_total(meter, customer, minute(), minute() + 60) == 10


async def test_events_of_a_deleted_customer_fail_one_by_one(
    api: StripeClientApi, fake: FakeStripeServer
) -> None:
    meter, [alive, gone] = await setup_meter(api, "ws_alive", "ws_deleted")
    with fake.locked() as state:
        state.delete_customer(gone)
    mixed = events(alive, "a1") + events(gone, "g1") + events(alive, "a2")
    assert await api.send_meter_events(mixed) == [
        MeterEventResult("a1", accepted=True),
        MeterEventResult("g1", accepted=False, error_code="resource_missing"),
        MeterEventResult("a2", accepted=True),
    ]
    assert await api.meter_total(meter, alive, minute(), minute() + 60) == 20


async def test_one_customer_and_meter_at_a_time_in_order(
    api: StripeClientApi, fake: FakeStripeServer
) -> None:
    _, [a, b] = await setup_meter(api, "ws_a", "ws_b")
    interleaved = [e for i in range(8) for e in events(a, f"a{i}") + events(b, f"b{i}")]
    await api.send_meter_events(interleaved)
    with fake.locked() as state:
        of_a = [e.identifier for e in state.meter_events if e.customer == a]
    assert of_a == [f"a{i}" for i in range(8)]


async def test_the_v2_stream(
    stream_api: StripeClientApi, fake: FakeStripeServer, clock: Clock
) -> None:
    meter, [customer, gone] = await setup_meter(stream_api, "ws_s", "ws_s_gone")
    batch = events(customer, *(f"s{i}" for i in range(250)), value=2)
    assert await stream_api.send_meter_events(batch) == accepted(*(f"s{i}" for i in range(250)))
    with fake.locked() as state:
        state.delete_customer(gone)
    later = batch[:10] + events(gone, "lost")  # duplicates dropped; "lost" fails later
    assert await stream_api.send_meter_events(later) == accepted(*(e.identifier for e in later))
    assert await stream_api.meter_total(meter, customer, minute(), minute() + 60) == 500
    with fake.locked() as state:
        assert len(state.sessions) == 1  # cached across calls
        assert [(e.identifier, e.code) for e in state.meter_event_errors] == [
            ("lost", "meter_event_customer_not_found")
        ]
    clock.skipped += SESSION_TTL_S  # expired at Stripe before the client expected it
    assert await stream_api.send_meter_events(events(customer, "s250", value=2)) == accepted("s250")
    with fake.locked() as state:
        assert len(state.sessions) == 2


async def test_meter_total_needs_whole_minutes(api: StripeClientApi) -> None:
    with pytest.raises(ValueError):
        await api.meter_total("mtr_x", "cus_x", 61, 120)
    assert await api.meter_total("mtr_x", "cus_x", 120, 120) == 0


# -- Connect ------------------------------------------------------------------------------------


async def test_connected_accounts_and_links(api: StripeClientApi, fake: FakeStripeServer) -> None:
    account = await api.create_connected_account("prov_1", email="p@example.com")
    assert await api.create_connected_account("prov_1") == account
    assert await api.create_connected_account("prov_2") != account
    link = await api.account_link(account, refresh_url="http://r", return_url="http://d")
    assert link.startswith(f"{fake.url}/_fake/connect/account_onboarding/{account}/")
    with fake.locked() as state:
        assert state.connect.accounts[account].metadata == {"lattice_provider": "prov_1"}
        assert state.connect.accounts[account].email == "p@example.com"


async def test_transfers_are_idempotent(api: StripeClientApi, fake: FakeStripeServer) -> None:
    account = await api.create_connected_account("prov_t")

    async def pay(key: str, amount: int = 1234) -> Transfer:
        return await api.create_transfer(
            amount=amount,
            currency="usd",
            destination=account,
            idempotency_key=key,
            metadata={"p": "1"},
        )

    first = await pay("payout-1")
    assert await pay("payout-1") == first
    assert (first.amount, first.currency, first.destination, first.metadata) == (
        1234,
        "usd",
        account,
        {"p": "1"},
    )
    with pytest.raises(StripePermanent) as caught:
        await pay("payout-1", amount=1)  # the same key with other parameters
    assert (caught.value.code, caught.value.http_status) == ("idempotency_error", 400)
    second = await pay("payout-2", amount=5)
    assert await api.list_transfers(account) == [second, first]
    assert await api.list_transfers("acct_other") == []


# -- failures -------------------------------------------------------------------------------------


def state_counts(fake: FakeStripeServer) -> tuple[int, int]:
    with fake.locked() as state:
        return len(state.connect.transfers), len(state.meter_events)


@pytest.mark.parametrize("mode", ["500", "429", "timeout", "reset"])
async def test_injected_failures_are_retryable_and_change_nothing(
    fake: FakeStripeServer, mode: str
) -> None:
    client = StripeClientApi(KEY, api_base=fake.url, timeout_s=0.5)
    try:
        _, [customer] = await setup_meter(client, "ws_f")
        account = await client.create_connected_account("prov_f")
        fake.fail(mode, 2, retry_after=2.5, paths="/v1/")  # type: ignore[arg-type]
        with pytest.raises(StripeRetryable) as caught:
            await client.create_transfer(
                amount=9, currency="usd", destination=account, idempotency_key="t", metadata={}
            )
        assert caught.value.retry_after_s == (2.5 if mode == "429" else None)
        with pytest.raises(StripeRetryable):
            await client.send_meter_events(events(customer, "f1"))
        assert state_counts(fake) == (0, 0)
        await client.create_transfer(
            amount=9, currency="usd", destination=account, idempotency_key="t", metadata={}
        )
        assert await client.send_meter_events(events(customer, "f1")) == accepted("f1")
        assert state_counts(fake) == (1, 1)
        assert fake.failures.injected == 2
    finally:
        await client.aclose()


async def test_a_lost_answer_is_retried_into_the_same_transfer(
    api: StripeClientApi, fake: FakeStripeServer
) -> None:
    account = await api.create_connected_account("prov_lost")
    fake.fail("reset_after", paths="/v1/transfers")
    with pytest.raises(StripeRetryable):
        await api.create_transfer(
            amount=7, currency="usd", destination=account, idempotency_key="lost", metadata={}
        )
    assert state_counts(fake) == (1, 0)  # Stripe made it; the client did not hear
    transfer = await api.create_transfer(
        amount=7, currency="usd", destination=account, idempotency_key="lost", metadata={}
    )
    assert await api.list_transfers(account) == [transfer]


async def test_no_new_event_starts_after_a_failure(
    api: StripeClientApi, fake: FakeStripeServer
) -> None:
    _, customers = await setup_meter(api, *(f"ws_{i}" for i in range(40)))
    batch = [e for i, c in enumerate(customers) for e in events(c, f"x{i}", value=1)]
    fake.fail("500", paths="/v1/billing/meter_events")
    with pytest.raises(StripeRetryable):
        await api.send_meter_events(batch)
    assert state_counts(fake)[1] < len(batch)
    assert await api.send_meter_events(batch) == accepted(*(e.identifier for e in batch))
    assert state_counts(fake)[1] == len(batch)


async def test_authentication_failures_are_permanent(fake: FakeStripeServer) -> None:
    good = StripeClientApi(KEY, api_base=fake.url)
    bad = StripeClientApi("sk_live_wrongmode", api_base=fake.url)
    try:
        _, [customer] = await setup_meter(good, "ws_auth")
        with pytest.raises(StripePermanent) as caught:
            await bad.find_or_create_customer("ws_auth")
        assert caught.value.http_status == 401
        assert "sk_live_wrongmode" not in caught.value.message  # Stripe masks the key
        with pytest.raises(StripePermanent) as caught:
            await bad.send_meter_events(events(customer, "auth1"))
        assert caught.value.http_status == 401
    finally:
        await good.aclose()
        await bad.aclose()


async def test_settings_from_the_environment(fake: FakeStripeServer) -> None:
    with pytest.raises(ValueError):
        stripe_api_from_env({})
    client = stripe_api_from_env(
        {
            "LATTICE_STRIPE_API_KEY": KEY,
            "LATTICE_STRIPE_API_BASE": fake.url,
            "LATTICE_STRIPE_METER_EVENTS_V2": "1",
            "LATTICE_STRIPE_TIMEOUT_S": "3",
        }
    )
    try:
        assert client.use_v2_stream
        _, [customer] = await setup_meter(client, "ws_env")
        assert await client.send_meter_events(events(customer, "env1")) == accepted("env1")
    finally:
        await client.aclose()


def test_transfer_is_a_plain_struct() -> None:
    transfer = Transfer("tr_1", 5, "usd", "acct_1", {"k": "v"}, 1)
    assert transfer.metadata == {"k": "v"}
