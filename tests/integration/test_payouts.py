"""Provider payouts (billing/payouts.py) against a real Redis and an in-memory Stripe with
Stripe's idempotency semantics: one transfer per payout through reruns, crashes between
Stripe's answer and the record, Stripe failures and concurrent runs; statements add up."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from collections.abc import Sequence

import msgspec
import pytest
import redis.asyncio as aioredis

from billing.earnings import EarningsConsumer
from billing.keys import USAGE_STREAM
from billing.payouts import (
    PICO_PER_CENT,
    PayoutError,
    PayoutOutcome,
    PayoutService,
    idempotency_key,
)
from billing.payouts_cli import add_payout_commands, format_cents, format_picousd
from billing.stripe_api import (
    MeterEvent,
    MeterEventResult,
    StripePermanent,
    StripeRetryable,
    Transfer,
)
from billing.usage import encode_record
from tests.usage_records import record

LINK = {"refresh_url": "http://127.0.0.1/refresh", "return_url": "http://127.0.0.1/done"}
DAY1_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z


class MemoryStripe:
    """An in-memory :class:`billing.stripe_api.StripeApi` for payouts: connected accounts
    (idempotent per provider) and transfers with Stripe's idempotency keys (a key replays its
    first result while retained; reused with other parameters it is an error). ``fail`` holds
    errors the next ``create_transfer`` calls raise before doing anything; ``crash_after``
    makes that many calls raise :class:`Crash` once the transfer is made (the caller dies
    between Stripe's answer and recording it)."""

    def __init__(self) -> None:
        self.accounts: dict[str, str] = {}
        self.links: list[str] = []
        self.transfers: list[Transfer] = []
        self.keys: dict[str, tuple[tuple[int, str, str, tuple[tuple[str, str], ...]], Transfer]]
        self.keys = {}
        self.fail: list[Exception] = []
        self.crash_after = 0
        self.create_calls = 0
        self._ids = itertools.count(1)

    async def find_or_create_customer(self, workspace: str) -> str:
        return f"cus_{workspace}"

    async def customer_deleted(self, customer_id: str) -> bool:
        return False

    async def ensure_meter(self, *, event_name: str, display_name: str) -> str:
        return f"mtr_{event_name}"

    async def send_meter_events(self, events: Sequence[MeterEvent]) -> list[MeterEventResult]:
        return [MeterEventResult(identifier=e.identifier, accepted=True) for e in events]

    async def meter_total(self, meter_id: str, customer_id: str, start: int, end: int) -> int:
        return 0

    async def create_connected_account(self, provider: str, *, email: str | None = None) -> str:
        return self.accounts.setdefault(provider, f"acct_{provider}")

    async def account_link(self, account_id: str, *, refresh_url: str, return_url: str) -> str:
        url = f"http://127.0.0.1/onboard/{account_id}/{next(self._ids)}"
        self.links.append(url)
        return url

    async def create_transfer(
        self,
        *,
        amount: int,
        currency: str,
        destination: str,
        idempotency_key: str,
        metadata: dict[str, str],
    ) -> Transfer:
        self.create_calls += 1
        if self.fail:
            raise self.fail.pop(0)
        params = (amount, currency, destination, tuple(sorted(metadata.items())))
        if idempotency_key in self.keys:
            first, transfer = self.keys[idempotency_key]
            if first != params:
                raise StripePermanent(
                    "Keys for idempotent requests can only be used with the same parameters",
                    code="idempotency_error",
                    http_status=400,
                )
            return transfer
        transfer = Transfer(
            id=f"tr_{next(self._ids)}",
            amount=amount,
            currency=currency,
            destination=destination,
            metadata=dict(metadata),
            created=1_735_776_000 + len(self.transfers),  # 2025-01-02
        )
        self.transfers.append(transfer)
        self.keys[idempotency_key] = (params, transfer)
        if self.crash_after:
            self.crash_after -= 1
            raise Crash
        return transfer

    async def list_transfers(self, destination: str) -> list[Transfer]:
        return [t for t in self.transfers if t.destination == destination]

    async def aclose(self) -> None:
        return None

    def forget_keys(self) -> None:
        """Stripe keeps idempotency keys for 24 hours; then a key is new again."""
        self.keys.clear()


class Crash(Exception):
    """The process dies right after Stripe accepted the transfer."""


async def earn(aredis: aioredis.Redis, party: str, *picousd: int) -> None:
    """Usage records in the stream whose earnings go to ``party``; accrued into the ledger."""
    base = await aredis.xlen(USAGE_STREAM)
    for i, pico in enumerate(picousd):
        rec = msgspec.structs.replace(
            record(base + i),
            dispatch_id=f"dsp_{party}_{base + i}",
            serving_kind="marketplace",
            serving_id=party,
            provider=party,
            provider_earnings_picousd=pico,
            finished_ms=DAY1_MS + i * 86_400_000,
        )
        await aredis.xadd(USAGE_STREAM, {"r": encode_record(rec)})
    consumer = EarningsConsumer(aredis, consumer="test")
    while (await consumer.run_once()).entries:
        pass


@pytest.fixture
def stripe() -> MemoryStripe:
    return MemoryStripe()


@pytest.fixture
def service(aredis: aioredis.Redis, stripe: MemoryStripe) -> PayoutService:
    return PayoutService(aredis, stripe, clock=lambda: 1_735_776_000.0)


def statuses(outcomes: list[PayoutOutcome]) -> list[tuple[str, str, int]]:
    return [(o.provider, o.status, o.amount_cents) for o in outcomes]


async def test_link_provider_creates_one_account(
    service: PayoutService, stripe: MemoryStripe
) -> None:
    first = await service.link_provider("acme", "ops@acme.test", **LINK)
    again = await service.link_provider("acme", **LINK)
    assert first.account_id == again.account_id == "acct_acme"
    assert first.onboarding_url != again.onboarding_url  # links expire; a fresh one each time
    assert await service.accounts() == {"acme": "acct_acme"}
    for bad in ("hosted", "", "a b"):
        with pytest.raises(PayoutError):
            await service.link_provider(bad, **LINK)


async def test_run_twice_makes_one_transfer(
    aredis: aioredis.Redis, service: PayoutService, stripe: MemoryStripe
) -> None:
    await service.link_provider("acme", **LINK)
    # $1.234567... earned: 123 cents are paid, the rest stays for next time.
    await earn(aredis, "acme", 1_000_000_000_000, 234_567_890_123)
    assert statuses(await service.run_payouts(min_amount_cents=100)) == [("acme", "paid", 123)]
    assert statuses(await service.run_payouts(min_amount_cents=100)) == [
        ("acme", "below_minimum", 0)
    ]
    assert [t.amount for t in stripe.transfers] == [123]
    t = stripe.transfers[0]
    assert t.destination == "acct_acme" and t.currency == "usd"
    assert t.metadata == {"lattice_provider": "acme", "lattice_payout_seq": "1"}
    assert idempotency_key("acme", 1) in stripe.keys

    st = await service.statement("acme")
    assert st.earned_picousd == 1_234_567_890_123
    assert st.paid_cents == 123
    assert st.balance_picousd == 1_234_567_890_123 - 123 * PICO_PER_CENT == 4_567_890_123
    assert st.payable_cents == 0 and st.pending is None
    assert [(p.seq, p.amount_cents, p.transfer_id) for p in st.payouts] == [(1, 123, t.id)]

    # More earnings: the remainder and the new money make the next payout.
    await earn(aredis, "acme", 6_000_000_000)  # 0.6 cents + 0.456... cents = 1 cent
    assert statuses(await service.run_payouts(min_amount_cents=1)) == [("acme", "paid", 1)]
    assert stripe.transfers[1].metadata["lattice_payout_seq"] == "2"
    assert (await service.statement("acme")).paid_cents == 124


async def test_unlinked_and_small_balances_are_not_paid(
    aredis: aioredis.Redis, service: PayoutService, stripe: MemoryStripe
) -> None:
    await earn(aredis, "hosted", 10**15)  # the operator's own capacity: never linked
    await earn(aredis, "bolt", 10**15)  # a provider that has not linked an account yet
    await service.link_provider("acme", **LINK)
    await earn(aredis, "acme", 99 * PICO_PER_CENT)
    assert statuses(await service.run_payouts(min_amount_cents=100)) == [
        ("acme", "below_minimum", 99)
    ]
    assert stripe.transfers == []
    assert (await service.statement("hosted")).earned_picousd == 10**15
    assert (await service.statement("bolt")).account_id is None


async def test_crash_after_stripe_accepted_is_healed_by_the_same_key(
    aredis: aioredis.Redis, service: PayoutService, stripe: MemoryStripe
) -> None:
    await service.link_provider("acme", **LINK)
    await earn(aredis, "acme", 500 * PICO_PER_CENT)
    stripe.crash_after = 1
    with pytest.raises(Crash):
        await service.run_payouts()
    assert len(stripe.transfers) == 1  # Stripe made it; Lattice did not record it
    state = await service.state("acme")
    assert state.paid_cents == 0 and state.pending is not None and state.pending.seq == 1
    # More earnings arrive meanwhile: the healed payout keeps its amount and key.
    await earn(aredis, "acme", 50 * PICO_PER_CENT)
    stripe.transfers.clear()  # hide it from the lookup: the retry must go by the key alone
    outcomes = await service.run_payouts()
    assert statuses(outcomes) == [("acme", "healed", 500), ("acme", "below_minimum", 50)]
    assert stripe.transfers == []  # the key replayed the first transfer; none was made
    st = await service.statement("acme")
    assert st.paid_cents == 500 and st.pending is None and len(st.payouts) == 1
    assert statuses(await service.run_payouts(min_amount_cents=50)) == [("acme", "paid", 50)]


async def test_crash_healed_after_stripe_forgot_the_key(
    aredis: aioredis.Redis, service: PayoutService, stripe: MemoryStripe
) -> None:
    await service.link_provider("acme", **LINK)
    await earn(aredis, "acme", 500 * PICO_PER_CENT)
    stripe.crash_after = 1
    with pytest.raises(Crash):
        await service.run_payouts()
    stripe.forget_keys()  # more than 24 hours later
    calls = stripe.create_calls
    assert statuses(await service.run_payouts()) == [
        ("acme", "healed", 500),
        ("acme", "below_minimum", 0),
    ]
    assert stripe.create_calls == calls  # found by its metadata, not sent again
    assert len(stripe.transfers) == 1
    assert (await service.statement("acme")).paid_cents == 500


async def test_transient_failure_keeps_the_attempt_for_the_next_run(
    aredis: aioredis.Redis, service: PayoutService, stripe: MemoryStripe
) -> None:
    await service.link_provider("acme", **LINK)
    await earn(aredis, "acme", 300 * PICO_PER_CENT)
    stripe.fail = [StripeRetryable("rate limited", retry_after_s=1.0)]
    assert statuses(await service.run_payouts()) == [("acme", "retry", 300)]
    assert (await service.state("acme")).pending is not None
    assert statuses(await service.run_payouts()) == [
        ("acme", "healed", 300),
        ("acme", "below_minimum", 0),
    ]
    assert [t.amount for t in stripe.transfers] == [300]


async def test_refused_transfer_is_dropped_and_the_next_gets_a_new_key(
    aredis: aioredis.Redis, service: PayoutService, stripe: MemoryStripe
) -> None:
    await service.link_provider("acme", **LINK)
    await earn(aredis, "acme", 300 * PICO_PER_CENT)
    stripe.fail = [
        StripePermanent("account cannot take transfers", code="account_invalid", http_status=400)
    ]
    [failed] = await service.run_payouts()
    assert failed.status == "failed" and failed.error == "account_invalid"
    state = await service.state("acme")
    assert state.pending is None and state.seq == 1 and state.paid_cents == 0
    assert statuses(await service.run_payouts()) == [("acme", "paid", 300)]
    assert stripe.transfers[0].metadata["lattice_payout_seq"] == "2"


@pytest.mark.parametrize(
    "error",
    [
        StripeRetryable("a request with this key is in progress"),  # 409, as StripeClientApi has it
        StripePermanent("in progress", code=None, http_status=409),
        StripePermanent("other parameters", code="idempotency_error", http_status=400),
    ],
)
async def test_key_conflicts_keep_the_attempt(
    aredis: aioredis.Redis, service: PayoutService, stripe: MemoryStripe, error: Exception
) -> None:
    await service.link_provider("acme", **LINK)
    await earn(aredis, "acme", 300 * PICO_PER_CENT)
    stripe.fail = [error]
    assert statuses(await service.run_payouts())[0][2] == 300
    assert (await service.state("acme")).pending is not None
    assert statuses(await service.run_payouts())[0] == ("acme", "healed", 300)
    assert len(stripe.transfers) == 1


async def test_concurrent_runs_pay_once(
    aredis: aioredis.Redis, service: PayoutService, stripe: MemoryStripe
) -> None:
    for p in ("acme", "bolt", "cargo"):
        await service.link_provider(p, **LINK)
        await earn(aredis, p, 700 * PICO_PER_CENT)
    other = PayoutService(aredis, stripe)
    for _ in range(3):
        await asyncio.gather(service.run_payouts(), other.run_payouts())
    assert sorted((t.destination, t.amount) for t in stripe.transfers) == [
        ("acct_acme", 700),
        ("acct_bolt", 700),
        ("acct_cargo", 700),
    ]
    for p in ("acme", "bolt", "cargo"):
        assert (await service.statement(p)).paid_cents == 700


async def test_dry_run_changes_nothing_and_needs_no_stripe(
    aredis: aioredis.Redis, service: PayoutService, stripe: MemoryStripe
) -> None:
    await service.link_provider("acme", **LINK)
    await earn(aredis, "acme", 250 * PICO_PER_CENT)
    readonly = PayoutService(aredis, None)
    assert statuses(await readonly.run_payouts(dry_run=True)) == [("acme", "dry_run", 250)]
    assert stripe.create_calls == 0 and (await service.state("acme")).seq == 0
    with pytest.raises(PayoutError):
        await readonly.run_payouts()


async def test_statement_lines_since(aredis: aioredis.Redis, service: PayoutService) -> None:
    await earn(aredis, "acme", 5, 7, 11)  # 2025-01-01, -02, -03
    st = await service.statement("acme", since="2025-01-02")
    assert [(line.day, line.earned_picousd, line.dispatches) for line in st.lines] == [
        ("2025-01-02", 7, 1),
        ("2025-01-03", 11, 1),
    ]
    assert st.earned_picousd == 23 and st.account_id is None


def test_money_formatting() -> None:
    assert format_picousd(1_234_567) == "0.000001234567"
    assert format_picousd(-(10**12) - 1) == "-1.000000000001"
    assert format_cents(12_345) == "123.45" and format_cents(5) == "0.05"


async def test_cli_statement_and_dry_run(
    aredis: aioredis.Redis,
    redis_url: str,
    service: PayoutService,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await service.link_provider("acme", **LINK)
    await earn(aredis, "acme", 1_500_000_000_123)
    parser = argparse.ArgumentParser(prog="lattice billing")
    add_payout_commands(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> int:
        args = parser.parse_args(argv)
        # The commands run their own event loop, as they do from the command line.
        return int(args.func(args))

    code = await asyncio.to_thread(
        run, "statement", "--provider", "acme", "--redis-url", redis_url, "--json"
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["earned_picousd"] == 1_500_000_000_123 and data["payable_cents"] == 150
    assert data["lines"] == [
        {"day": "2025-01-01", "earned_picousd": 1_500_000_000_123, "dispatches": 1}
    ]

    code = await asyncio.to_thread(run, "statement", "--provider", "acme", "--redis-url", redis_url)
    text = capsys.readouterr().out
    assert code == 0 and "earned    $1.500000000123" in text and "acct_acme" in text

    code = await asyncio.to_thread(run, "payouts", "--dry-run", "--redis-url", redis_url)
    assert code == 0 and "acme: dry_run $1.50 #1" in capsys.readouterr().out
    assert (await service.state("acme")).seq == 0


async def test_cli_earnings_once(
    aredis: aioredis.Redis, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(3):
        rec = msgspec.structs.replace(
            record(i), serving_id="acme", provider_earnings_picousd=10, finished_ms=DAY1_MS
        )
        await aredis.xadd(USAGE_STREAM, {"r": encode_record(rec)})
    parser = argparse.ArgumentParser(prog="lattice billing")
    add_payout_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["earnings", "--once", "--json", "--redis-url", redis_url])
    assert await asyncio.to_thread(args.func, args) == 0
    assert json.loads(capsys.readouterr().out)["accrued"] == 3
    assert (await PayoutService(aredis, None).statement("acme")).earned_picousd == 30
