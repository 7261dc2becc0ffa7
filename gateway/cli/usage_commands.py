"""``lattice usage`` (a workspace's own usage, with its API key) and ``lattice spend …``
(the operator's spend limits and credit, with the admin key).

``lattice workspaces`` belongs to :mod:`gateway.cli.admin_commands`; the spend controls are
their own command so the two modules never edit each other's parsers:

    lattice usage [--start D] [--end D] [--group-by day|model|key|tag] [--csv | --json]
    lattice usage --spend
    lattice spend show NAME
    lattice spend limit NAME AMOUNT_USD|none
    lattice spend credit NAME AMOUNT_USD --grant-id ID

Amounts in USD are decimal strings converted to integer micro-USD with :mod:`decimal`
(never a float); more than six decimal places is an error, not a rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.parse
from decimal import Decimal
from typing import Any

import msgspec

from billing.usage_query import UsageRow, microusd_text, render_csv
from gateway.cli.admin_client import AdminClient, AdminError

__all__ = ["add_usage_commands", "format_table", "usd_to_microusd"]

_USD_RE = re.compile(r"^(-?)\$?(\d+)(\.\d{1,6})?$")
_GROUPS = ("day", "model", "key", "tag")


def usd_to_microusd(text: str, *, signed: bool = False) -> int:
    """``"12.5"`` → ``12500000``. ``ValueError`` for anything but a plain decimal with at
    most six decimal places (a leading ``$`` is allowed; ``-`` only when ``signed``)."""
    match = _USD_RE.match(text.strip())
    if match is None or (match.group(1) and not signed):
        raise ValueError(
            f"not an amount in USD: {text!r} (use e.g. 25 or 12.50, at most 6 decimals)"
        )
    return int(Decimal(text.strip().replace("$", "")) * 1_000_000)


def _group_of(row: UsageRow, group_by: str) -> str:
    if group_by == "model":
        return row.model or ""
    if group_by == "key":
        return row.key_id or (f"app:{row.client_id}" if row.client_id else "")
    if group_by == "tag":
        return f"{row.tag_key}={row.tag_value}"
    return ""


def format_table(rows: list[UsageRow], group_by: str) -> str:
    """Rows as an aligned text table (costs in USD, exact to the micro-USD)."""
    head = (
        ["DAY"]
        + ([group_by.upper()] if group_by != "day" else [])
        + ["REQUESTS", "COST_USD", "UNITS"]
    )
    lines = [head]
    for row in rows:
        units = " ".join(f"{k}={v}" for k, v in row.units.items())
        group = [_group_of(row, group_by)] if group_by != "day" else []
        lines.append([row.day, *group, str(row.requests), microusd_text(row.cost_microusd), units])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return (
        "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False))
            + "  "
            + line[-1]
            for line in lines
        ).rstrip()
        + "\n"
    )


def _api_client(args: argparse.Namespace) -> AdminClient:
    key = args.api_key or os.environ.get("LATTICE_API_KEY")
    if not key:
        raise AdminError(0, "no API key: pass --api-key KEY or set LATTICE_API_KEY")
    return AdminClient(args.gateway, key)


def usage_show(args: argparse.Namespace) -> int:
    client = _api_client(args)
    if args.spend:
        print(json.dumps(client.call("GET", "/v1/usage/spend"), indent=2))
        return 0
    params = {"group_by": args.group_by}
    for name in ("start", "end"):
        if getattr(args, name):
            params[name] = getattr(args, name)
    result = client.call("GET", "/v1/usage?" + urllib.parse.urlencode(params))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = msgspec.convert(result["data"], list[UsageRow])
    if args.csv:
        sys.stdout.write(render_csv(rows, args.group_by))
    else:
        sys.stdout.write(format_table(rows, args.group_by))
    return 0


def _admin(args: argparse.Namespace) -> AdminClient:
    return AdminClient(args.gateway, args.admin_key)


def _print_spend(state: dict[str, Any]) -> None:
    limit = state.get("monthly_limit_microusd")
    credit = state.get("credit_balance_microusd")
    print(f"workspace {state['workspace']}, {state['month']}")
    print(f"  monthly limit  {'none' if limit is None else microusd_text(limit)} USD")
    print(f"  spent          {microusd_text(state['spent_microusd'])} USD")
    print(f"  reserved       {microusd_text(state['reserved_microusd'])} USD")
    print(f"  credit         {'off' if credit is None else microusd_text(credit) + ' USD'}")


def spend_show(args: argparse.Namespace) -> int:
    _print_spend(_admin(args).call("GET", f"/admin/v1/workspaces/{args.name}/spend"))
    return 0


def spend_limit(args: argparse.Namespace) -> int:
    limit = None if args.amount.strip().lower() == "none" else usd_to_microusd(args.amount)
    state = _admin(args).call(
        "PUT", f"/admin/v1/workspaces/{args.name}/spend-limit", {"monthly_limit_microusd": limit}
    )
    _print_spend(state)
    return 0


def spend_credit(args: argparse.Namespace) -> int:
    amount = usd_to_microusd(args.amount, signed=True)
    state = _admin(args).call(
        "POST",
        f"/admin/v1/workspaces/{args.name}/credit",
        {"amount_microusd": amount, "grant_id": args.grant_id},
    )
    if not state.get("added", True):
        print(f"grant {args.grant_id} was added before; nothing changed", file=sys.stderr)
    _print_spend(state)
    return 0


def _amount_arg(func: Any) -> Any:
    """Wrap a command so a bad USD amount is a usage error (exit 2), not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except ValueError as exc:
            print(f"lattice: {exc}", file=sys.stderr)
            return 2

    return run


def add_usage_commands(sub: Any) -> None:
    p = sub.add_parser("usage", help="your workspace's usage by day, model, key or tag")
    p.add_argument("--start", help="first UTC day, YYYY-MM-DD (default: start of this month)")
    p.add_argument("--end", help="last UTC day, YYYY-MM-DD (default: today)")
    p.add_argument("--group-by", choices=_GROUPS, default="day")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="print CSV")
    out.add_argument("--json", action="store_true", help="print the API's JSON")
    out.add_argument("--spend", action="store_true", help="show this month's spend instead")
    p.add_argument("--gateway", help="gateway URL (default: $LATTICE_GATEWAY_URL)")
    p.add_argument("--api-key", help="workspace API key (default: $LATTICE_API_KEY)")
    p.set_defaults(func=usage_show)

    spend = sub.add_parser("spend", help="workspace spend limits and prepaid credit (admin)")
    spend_sub = spend.add_subparsers(dest="spend_cmd", required=True)
    commands = (
        ("show", "show a workspace's spend this month", spend_show),
        ("limit", "set the monthly limit in USD, or 'none'", spend_limit),
        ("credit", "add prepaid credit in USD (negative: a correction)", spend_credit),
    )
    for name, help_text, func in commands:
        c = spend_sub.add_parser(name, help=help_text)
        c.add_argument("name", help="workspace")
        if name != "show":
            c.add_argument(
                "amount", help="USD, e.g. 25 or 12.50" + (" or none" if name == "limit" else "")
            )
        if name == "credit":
            c.add_argument("--grant-id", required=True, help="idempotency: a grant is added once")
        c.add_argument("--gateway", help="gateway URL (default: $LATTICE_GATEWAY_URL)")
        c.add_argument("--admin-key", help="admin key (default: $LATTICE_ADMIN_KEY)")
        c.set_defaults(func=_amount_arg(func))
