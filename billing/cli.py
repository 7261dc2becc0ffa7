"""``lattice billing …``: run the billing worker, reconcile the ledger with Stripe, status.

Wiring (``gateway/cli/main.py``): ``add_billing_commands(sub)``. Other billing command
modules register their subcommands under ``lattice billing`` through ``extra``: each is a
callable given the ``billing`` subparsers (``add_parser``), e.g.
``add_billing_commands(sub, extra=[add_payouts_commands])``; a subcommand sets
``func=<callable(args) -> int>`` with ``set_defaults`` like every ``lattice`` command.

Configuration: ``LATTICE_REDIS_URL`` (or ``--redis-url``), Stripe from the environment
(:func:`billing.stripe_api.stripe_api_from_env`), and the worker's flags, whose defaults may
also come from ``LATTICE_BILLING_WINDOW_S``, ``LATTICE_BILLING_GRACE_S``,
``LATTICE_BILLING_BATCH`` and ``LATTICE_BILLING_UNIT_METERS`` (comma-separated units). The
usage stream trimmer beside the worker (:mod:`billing.usage_trim`): ``LATTICE_USAGE_TRIM``
(``true``/``false``), ``LATTICE_USAGE_RETAIN_S`` and ``LATTICE_USAGE_GROUPS`` (comma-separated
consumer groups that must have acknowledged an entry before it is trimmed).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis

from billing.usage_trim import DEFAULT_GROUPS, DEFAULT_RETAIN_S

__all__ = ["add_billing_commands", "build_parser", "main", "worker_config"]

Register = Callable[[Any], None]

_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class _Formatter(logging.Formatter):
    """Plain lines with the record's ``extra`` fields appended as ``key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}
        return line + "".join(f" {k}={v}" for k, v in extra.items())


def _setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("LATTICE_LOG_LEVEL", "INFO").upper())
        # stripe-python logs every request at INFO: one line per meter event call
        logging.getLogger("stripe").setLevel(logging.WARNING)


def _units(text: str) -> tuple[str, ...]:
    return tuple(u.strip() for u in text.split(",") if u.strip())


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in _TRUE | _FALSE:
        raise SystemExit(f"lattice: {name} must be true or false, not {value!r}")
    return value in _TRUE


def _seconds(text: str) -> float:
    """argparse type: a non-negative number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _redis(args: argparse.Namespace) -> aioredis.Redis:
    url = args.redis_url or os.environ.get("LATTICE_REDIS_URL")
    if not url:
        raise SystemExit("lattice: set LATTICE_REDIS_URL or pass --redis-url")
    return aioredis.Redis.from_url(url)


def _with_clients(
    args: argparse.Namespace, body: Callable[[aioredis.Redis, Any], Awaitable[int]]
) -> int:
    """Run ``body(redis, stripe)`` with both clients closed afterwards."""
    from billing.stripe_api import StripeError, stripe_api_from_env

    async def go() -> int:
        try:
            stripe = stripe_api_from_env()
        except ValueError as exc:  # no API key
            raise SystemExit(f"lattice: {exc}") from None
        redis = _redis(args)
        try:
            return await body(redis, stripe)
        except StripeError as exc:
            print(f"lattice: Stripe: {exc.message}", file=sys.stderr)
            return 2
        finally:
            await stripe.aclose()
            await redis.aclose()

    return asyncio.run(go())


def worker_config(args: argparse.Namespace) -> Any:
    """The :class:`billing.worker.WorkerConfig` of ``lattice billing run``'s flags."""
    from billing.worker import WorkerConfig

    return WorkerConfig(
        window_s=args.window_s,
        grace_s=args.grace_s,
        batch=args.batch,
        block_ms=args.block_ms,
        events_per_call=args.events_per_call,
        lock_ms=args.lock_ms,
        dead_consumer_ms=args.dead_consumer_ms,
        reclaim_every_s=args.reclaim_s,
        backoff_cap_s=args.backoff_cap_s,
        unit_meters=_units(args.unit_meters),
        **_trim_config(args),
    )


def _trim_config(args: argparse.Namespace) -> dict[str, Any]:
    trim = args.trim_usage if args.trim_usage is not None else _env_flag("LATTICE_USAGE_TRIM", True)
    groups = _units(args.usage_groups)
    if trim and not groups:
        raise SystemExit(
            "lattice: --usage-groups is empty (turn trimming off with --no-trim-usage)"
        )
    if args.trim_interval_s <= 0:
        raise SystemExit("lattice: --trim-interval-s must be positive")
    return {
        "trim_usage": trim,
        "usage_retain_s": args.usage_retain_s,
        "usage_groups": groups,
        "trim_interval_s": args.trim_interval_s,
    }


def run_worker(args: argparse.Namespace) -> int:
    from billing.worker import BillingWorker

    _setup_logging()
    config = worker_config(args)

    async def body(redis: aioredis.Redis, stripe: Any) -> int:
        await BillingWorker(redis, stripe, config).run()
        return 0

    return _with_clients(args, body)


def run_reconcile(args: argparse.Namespace) -> int:
    from billing.ledger import Ledger
    from billing.reconcile import parse_since, reconcile, render_reconcile

    now = time.time()
    try:
        since = parse_since(args.since, now)
        until = parse_since(args.until, now) if args.until else int(now) + 1
    except ValueError as exc:
        print(f"lattice: {exc}", file=sys.stderr)
        return 2

    async def body(redis: aioredis.Redis, stripe: Any) -> int:
        report = await reconcile(
            Ledger(redis), stripe, since, until, unit_meters=_units(args.unit_meters)
        )
        if args.json:
            print(msgspec.json.encode(report).decode())
        else:
            print(render_reconcile(report))
        return 0 if report.ok else 1

    return _with_clients(args, body)


def run_status(args: argparse.Namespace) -> int:
    from billing.ledger import Ledger
    from billing.reconcile import render_status, status

    async def go() -> int:
        redis = _redis(args)
        try:
            report = await status(Ledger(redis))
        finally:
            await redis.aclose()
        if args.json:
            print(msgspec.json.encode(report).decode())
        else:
            print(render_status(report))
        return 0

    return asyncio.run(go())


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def add_billing_commands(sub: Any, extra: Iterable[Register] = ()) -> argparse.ArgumentParser:
    """Add ``billing`` with ``run``, ``reconcile`` and ``status`` to ``sub`` (the ``lattice``
    subparsers); each of ``extra`` is called with the ``billing`` subparsers to add more."""
    billing: argparse.ArgumentParser = sub.add_parser(
        "billing", help="usage to Stripe: worker, reconcile, status"
    )
    bsub = billing.add_subparsers(dest="billing_cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--redis-url", help="default: $LATTICE_REDIS_URL")

    p = bsub.add_parser("run", help="send usage to Stripe as meter events (until SIGTERM)")
    common(p)
    p.add_argument(
        "--window-s",
        type=int,
        default=int(_env("LATTICE_BILLING_WINDOW_S", "60")),
        help="aggregation window in seconds (default 60; divide 60 or be a multiple)",
    )
    p.add_argument(
        "--grace-s",
        type=float,
        default=float(_env("LATTICE_BILLING_GRACE_S", "10")),
        help="wait this long after a window's end and last record (default 10)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=int(_env("LATTICE_BILLING_BATCH", "1000")),
        help="stream entries read and folded per step (default 1000)",
    )
    p.add_argument("--block-ms", type=int, default=1000)
    p.add_argument("--events-per-call", type=int, default=100)
    p.add_argument("--lock-ms", type=int, default=60_000)
    p.add_argument(
        "--dead-consumer-ms",
        type=int,
        default=60_000,
        help="reclaim the entries of consumers idle this long (default 60000)",
    )
    p.add_argument("--reclaim-s", type=float, default=15.0)
    p.add_argument("--backoff-cap-s", type=float, default=30.0)
    p.add_argument(
        "--unit-meters",
        default=_env("LATTICE_BILLING_UNIT_METERS", ""),
        help="comma-separated units also billed on their own meter",
    )
    p.add_argument(
        "--trim-usage",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="trim the usage stream below what every --usage-groups group acknowledged "
        "(default: $LATTICE_USAGE_TRIM, else on)",
    )
    p.add_argument(
        "--usage-retain-s",
        type=_seconds,
        default=_env("LATTICE_USAGE_RETAIN_S", str(DEFAULT_RETAIN_S)),
        help="keep acknowledged usage entries this long (default 604800, 7 days)",
    )
    p.add_argument(
        "--usage-groups",
        default=_env("LATTICE_USAGE_GROUPS", ",".join(DEFAULT_GROUPS)),
        help="consumer groups that must acknowledge an entry before it is trimmed "
        "(default billing,ledger,earnings)",
    )
    p.add_argument("--trim-interval-s", type=_seconds, default=60.0)
    p.set_defaults(func=run_worker)

    p = bsub.add_parser("reconcile", help="compare the ledger with what Stripe accepted")
    common(p)
    p.add_argument("--since", required=True, help="24h, 30m, 7d, a unix time or an ISO date")
    p.add_argument("--until", help="same forms; default now")
    p.add_argument("--unit-meters", default=_env("LATTICE_BILLING_UNIT_METERS", ""))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_reconcile)

    p = bsub.add_parser("status", help="pending records, open windows, dead letters")
    common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_status)

    for register in extra:
        register(bsub)
    return billing


def build_parser(extra: Iterable[Register] = ()) -> argparse.ArgumentParser:
    """A stand-alone parser whose commands are ``billing``'s subcommands (``python -m
    billing.worker`` and tests)."""
    parser = argparse.ArgumentParser(prog="lattice")
    add_billing_commands(parser.add_subparsers(dest="command", required=True), extra)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``main(["run", "--window-s", "5"])`` is ``lattice billing run --window-s 5``."""
    args = build_parser().parse_args(["billing", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
