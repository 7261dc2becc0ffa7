"""``lattice billing earnings | connect | payouts | statement``: provider earnings and payouts.

Registered under the ``billing`` command by :func:`add_payout_commands`. ``earnings`` runs the
earnings ledger's consumer (:class:`billing.earnings.EarningsConsumer`; one or more, beside
the billing worker). Every command talks to Redis (``--redis-url``, default
``$LATTICE_REDIS_URL``); ``connect`` and ``payouts`` also to Stripe, configured from the
environment like every billing command (:func:`billing.stripe_api.stripe_api_from_env`: the
secret key from ``$LATTICE_STRIPE_API_KEY``, never a flag, since command lines are visible to
other users); ``--stripe-api-base`` overrides ``$LATTICE_STRIPE_API_BASE`` (a fake Stripe).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import redis.asyncio as aioredis

from billing.earnings import EarningsConsumer, StepResult
from billing.payouts import PayoutError, PayoutOutcome, PayoutService, Statement
from billing.stripe_types import StripeApi, StripeError

__all__ = ["add_payout_commands", "format_cents", "format_picousd"]

_T = TypeVar("_T")
_NOT_PAID = frozenset({"failed", "retry"})


def format_picousd(pico: int) -> str:
    """Exact dollars: ``1234567`` pico-USD → ``"0.000001234567"``."""
    sign = "-" if pico < 0 else ""
    whole, frac = divmod(abs(pico), 10**12)
    return f"{sign}{whole}.{frac:012d}"


def format_cents(cents: int) -> str:
    sign = "-" if cents < 0 else ""
    whole, frac = divmod(abs(cents), 100)
    return f"{sign}{whole}.{frac:02d}"


def add_payout_commands(billing_sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``earnings``, ``connect``, ``payouts`` and ``statement`` to the ``lattice billing``
    subparsers."""
    p = billing_sub.add_parser(
        "earnings", help="accrue provider earnings from the usage stream (until SIGTERM)"
    )
    p.add_argument("--once", action="store_true", help="accrue what is there now, then exit")
    p.add_argument("--batch", type=int, default=500, help="entries per step (default 500)")
    p.add_argument(
        "--dead-consumer-ms",
        type=int,
        default=60_000,
        help="reclaim the entries of consumers idle this long (default 60000)",
    )
    _common(p, stripe=False)
    p.set_defaults(func=run_earnings)

    p = billing_sub.add_parser("connect", help="link a provider to a Stripe Connect account")
    p.add_argument("--provider", required=True, help="the serving party's id")
    p.add_argument("--email", help="prefill the provider's onboarding form")
    p.add_argument(
        "--return-url",
        default=os.environ.get("LATTICE_CONNECT_RETURN_URL", "http://127.0.0.1:8080/"),
        help="where Stripe sends the provider after onboarding",
    )
    p.add_argument(
        "--refresh-url",
        default=os.environ.get("LATTICE_CONNECT_REFRESH_URL", "http://127.0.0.1:8080/"),
        help="where Stripe sends the provider when the onboarding link expired",
    )
    _common(p, stripe=True)
    p.set_defaults(func=run_connect)

    p = billing_sub.add_parser("payouts", help="transfer providers' earnings (Stripe Connect)")
    p.add_argument("--dry-run", action="store_true", help="show what would be paid")
    p.add_argument("--min-cents", type=int, default=100, help="smallest transfer (default 100)")
    _common(p, stripe=True)
    p.set_defaults(func=run_payouts)

    p = billing_sub.add_parser("statement", help="a provider's earnings, payouts and balance")
    p.add_argument("--provider", required=True)
    p.add_argument("--since", type=_day, help="day lines and payouts from YYYY-MM-DD on")
    _common(p, stripe=False)
    p.set_defaults(func=run_statement)


def _common(p: argparse.ArgumentParser, *, stripe: bool) -> None:
    p.add_argument("--redis-url", default=os.environ.get("LATTICE_REDIS_URL"))
    p.add_argument("--json", action="store_true", help="print JSON")
    if stripe:
        p.add_argument("--stripe-api-base", default=os.environ.get("LATTICE_STRIPE_API_BASE"))


def _day(text: str) -> str:
    try:
        return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a day (YYYY-MM-DD): {text!r}") from None


def open_stripe(args: argparse.Namespace) -> StripeApi:
    """The Stripe API from the ``LATTICE_STRIPE_*`` environment
    (:func:`billing.stripe_api.stripe_api_from_env`), ``--stripe-api-base`` winning."""
    from billing.stripe_api import stripe_api_from_env

    overrides = {"api_base": args.stripe_api_base} if args.stripe_api_base else {}
    try:
        return stripe_api_from_env(**overrides)
    except ValueError as exc:
        raise PayoutError(str(exc)) from None


def _run(
    args: argparse.Namespace, action: Callable[[PayoutService], Awaitable[_T]], *, stripe: bool
) -> _T:
    if not args.redis_url:
        raise PayoutError("set --redis-url or $LATTICE_REDIS_URL")

    async def go() -> _T:
        client = aioredis.Redis.from_url(args.redis_url)
        api = open_stripe(args) if stripe else None
        try:
            return await action(PayoutService(client, api))
        finally:
            if api is not None:
                await api.aclose()
            await client.aclose()

    return asyncio.run(go())


def _fail(message: str) -> int:
    print(f"lattice: {message}", file=sys.stderr)
    return 1


def run_earnings(args: argparse.Namespace) -> int:
    """Run the earnings consumer (``--once``: until the stream is drained, then print what
    it did)."""
    if not args.redis_url:
        return _fail("set --redis-url or $LATTICE_REDIS_URL")

    async def go() -> StepResult:
        client = aioredis.Redis.from_url(args.redis_url)
        consumer = EarningsConsumer(client, batch=args.batch, min_idle_ms=args.dead_consumer_ms)
        try:
            if args.once:
                while (await consumer.run_once()).entries:
                    pass
                return consumer.totals
            task = asyncio.create_task(consumer.run())
            with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return consumer.totals
        finally:
            await client.aclose()

    totals = asyncio.run(go())
    if args.json:
        print(json.dumps(msgspec.to_builtins(totals)))
    else:
        print(
            f"accrued {totals.accrued}, duplicates {totals.duplicates}, "
            f"already acknowledged {totals.stale}, undecodable {totals.undecodable}"
        )
    return 0


def run_connect(args: argparse.Namespace) -> int:
    try:
        result = _run(
            args,
            lambda s: s.link_provider(
                args.provider, args.email, refresh_url=args.refresh_url, return_url=args.return_url
            ),
            stripe=True,
        )
    except (PayoutError, StripeError) as exc:
        return _fail(exc.message)
    if args.json:
        print(json.dumps(msgspec.to_builtins(result), indent=2))
    else:
        print(f"provider {result.provider} is linked to {result.account_id}")
        print(f"onboarding: {result.onboarding_url}")
    return 0


def run_payouts(args: argparse.Namespace) -> int:
    try:
        outcomes = _run(
            args,
            lambda s: s.run_payouts(min_amount_cents=args.min_cents, dry_run=args.dry_run),
            stripe=not args.dry_run,
        )
    except (PayoutError, StripeError) as exc:
        return _fail(exc.message)
    if args.json:
        print(json.dumps(msgspec.to_builtins(outcomes), indent=2))
    else:
        for o in outcomes:
            print(_outcome_line(o))
        if not outcomes:
            print("no linked providers")
    return 1 if any(o.status in _NOT_PAID for o in outcomes) else 0


def _outcome_line(o: PayoutOutcome) -> str:
    parts = [f"{o.provider}: {o.status}", f"${format_cents(o.amount_cents)}"]
    if o.seq is not None:
        parts.append(f"#{o.seq}")
    if o.transfer_id:
        parts.append(o.transfer_id)
    if o.error:
        parts.append(f"({o.error})")
    return " ".join(parts)


def run_statement(args: argparse.Namespace) -> int:
    try:
        st = _run(args, lambda s: s.statement(args.provider, since=args.since), stripe=False)
    except PayoutError as exc:
        return _fail(exc.message)
    if args.json:
        print(json.dumps(msgspec.to_builtins(st), indent=2))
    else:
        print(_statement_text(st))
    return 0


def _statement_text(st: Statement) -> str:
    out = [
        f"provider  {st.provider} ({st.account_id or 'not linked: earnings are not paid out'})",
        f"earned    ${format_picousd(st.earned_picousd)}",
        f"paid      ${format_cents(st.paid_cents)}",
        f"balance   ${format_picousd(st.balance_picousd)}",
        f"payable   ${format_cents(st.payable_cents)}",
    ]
    if st.pending is not None:
        out.append(f"pending   ${format_cents(st.pending.amount_cents)} (#{st.pending.seq})")
    out.append("")
    out.append(f"{'day':<12}{'earned (USD)':>20}{'dispatches':>12}")
    for line in st.lines:
        out.append(f"{line.day:<12}{format_picousd(line.earned_picousd):>20}{line.dispatches:>12}")
    if st.payouts:
        out.append("")
        out.append("payouts")
        for p in st.payouts:
            day = datetime.datetime.fromtimestamp(p.created, datetime.UTC).date().isoformat()
            out.append(f"  #{p.seq}  {day}  ${format_cents(p.amount_cents)}  {p.transfer_id}")
    return "\n".join(out)
