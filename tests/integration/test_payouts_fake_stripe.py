"""Payouts through the real Stripe client (billing/stripe_api.py) and the in-repo fake Stripe
over loopback HTTP: ``lattice billing connect`` and ``payouts`` end to end, and a transfer
Stripe made whose answer was lost (the connection reset after Stripe saved it) paid once."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Iterator

import msgspec
import pytest
import redis.asyncio as aioredis

from billing.earnings import EarningsConsumer
from billing.fake_stripe import FakeStripeServer
from billing.keys import USAGE_STREAM
from billing.payouts import PICO_PER_CENT, PayoutService
from billing.payouts_cli import add_payout_commands
from billing.stripe_api import StripeClientApi
from billing.usage import encode_record
from tests.usage_records import record

API_KEY = "sk_test_payouts"
LINK = {"refresh_url": "http://127.0.0.1/refresh", "return_url": "http://127.0.0.1/done"}


class Clock:
    def __init__(self) -> None:
        self.now = 1_735_776_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> Iterator[FakeStripeServer]:
    with FakeStripeServer(clock=clock) as server:
        yield server


async def earn(aredis: aioredis.Redis, party: str, picousd: int) -> None:
    n = await aredis.xlen(USAGE_STREAM)
    rec = msgspec.structs.replace(
        record(n),
        dispatch_id=f"dsp_fake_{n}",
        serving_kind="marketplace",
        serving_id=party,
        provider=party,
        provider_earnings_picousd=picousd,
    )
    await aredis.xadd(USAGE_STREAM, {"r": encode_record(rec)})
    await EarningsConsumer(aredis, consumer="test").run_once()


def transfers(fake: FakeStripeServer) -> list[tuple[str, int, dict[str, str]]]:
    with fake.locked() as state:
        return [
            (t.destination, t.amount, dict(t.metadata)) for t in state.connect.transfers.values()
        ]


async def test_cli_connect_and_payouts(
    aredis: aioredis.Redis,
    redis_url: str,
    fake: FakeStripeServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LATTICE_STRIPE_API_KEY", API_KEY)
    parser = argparse.ArgumentParser(prog="lattice billing")
    add_payout_commands(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> int:
        args = parser.parse_args([*argv, "--redis-url", redis_url])
        return int(args.func(args))

    base = ("--stripe-api-base", fake.url)
    code = await asyncio.to_thread(
        run, "connect", "--provider", "acme", "--email", "ops@acme.test", "--json", *base
    )
    assert code == 0
    linked = json.loads(capsys.readouterr().out)
    assert linked["account_id"].startswith("acct_") and linked["onboarding_url"]
    with fake.locked() as state:
        [account] = state.connect.accounts.values()
        assert account.id == linked["account_id"] and account.type == "express"

    await earn(aredis, "acme", 1234 * PICO_PER_CENT + 5)
    await earn(aredis, "hosted", 10**15)  # never linked, never paid
    for _ in range(2):
        code = await asyncio.to_thread(run, "payouts", "--min-cents", "100", "--json", *base)
        assert code == 0
    first, second = (json.loads(chunk) for chunk in _json_documents(capsys.readouterr().out))
    assert [(o["provider"], o["status"], o["amount_cents"]) for o in first] == [
        ("acme", "paid", 1234)
    ]
    assert [o["status"] for o in second] == ["below_minimum"]
    assert transfers(fake) == [
        (linked["account_id"], 1234, {"lattice_provider": "acme", "lattice_payout_seq": "1"})
    ]


@pytest.mark.parametrize("keys_expired", [False, True])
async def test_transfer_made_but_answer_lost_is_paid_once(
    aredis: aioredis.Redis, fake: FakeStripeServer, clock: Clock, keys_expired: bool
) -> None:
    stripe = StripeClientApi(API_KEY, api_base=fake.url, timeout_s=5)
    try:
        service = PayoutService(aredis, stripe, clock=clock)
        account = (await service.link_provider("acme", **LINK)).account_id
        await earn(aredis, "acme", 800 * PICO_PER_CENT)
        # Stripe executes the transfer and saves it for the idempotency key, then the
        # connection is reset: Lattice cannot know whether it happened.
        fake.fail("reset_after", paths="/v1/transfers")
        [lost] = await service.run_payouts()
        assert (lost.status, lost.amount_cents, lost.seq) == ("retry", 800, 1)
        assert len(transfers(fake)) == 1
        await earn(aredis, "acme", 100 * PICO_PER_CENT)
        if keys_expired:
            clock.now += 25 * 3600  # Stripe forgot the key: found by its metadata instead
        outcomes = await service.run_payouts()
        assert [(o.status, o.amount_cents) for o in outcomes] == [("healed", 800), ("paid", 100)]
        assert sorted((a, n) for a, n, _ in transfers(fake)) == [(account, 100), (account, 800)]
        st = await service.statement("acme")
        assert st.paid_cents == 900 and st.pending is None and len(st.payouts) == 2
    finally:
        await stripe.aclose()


async def test_stripe_errors_then_recovery(aredis: aioredis.Redis, fake: FakeStripeServer) -> None:
    stripe = StripeClientApi(API_KEY, api_base=fake.url, timeout_s=5)
    try:
        service = PayoutService(aredis, stripe)
        await service.link_provider("acme", **LINK)
        await earn(aredis, "acme", 300 * PICO_PER_CENT)
        fake.fail("500", paths="/v1/transfers")
        assert [o.status for o in await service.run_payouts()] == ["retry"]
        fake.fail("429", retry_after=1, paths="/v1/transfers")
        assert [o.status for o in await service.run_payouts()] == ["retry"]
        assert [o.status for o in await service.run_payouts()] == ["healed", "below_minimum"]
        assert [n for _, n, _ in transfers(fake)] == [300]
    finally:
        await stripe.aclose()


def _json_documents(text: str) -> list[str]:
    """Split concatenated pretty-printed JSON documents (one per command run)."""
    decoder = json.JSONDecoder()
    docs, index = [], 0
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        _, end = decoder.raw_decode(text, index)
        docs.append(text[index:end])
        index = end
    return docs
