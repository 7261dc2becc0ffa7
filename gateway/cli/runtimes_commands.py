"""``lattice runtimes …``: a workspace owner's commands for personal runtimes.

They call a gateway's ``/v1/personal-runtimes`` API with a workspace key holding the scope
``lattice:compute:personal_runtime:manage`` (``--api-key`` or ``$LATTICE_API_KEY``;
``--gateway`` or ``$LATTICE_GATEWAY_URL``)::

    lattice runtimes list [--json]
    lattice runtimes show lat_…
    lattice runtimes create --name NAME      # headless: prints a one-time bootstrap token
    lattice runtimes approve ABCD-EFGH [--name NAME]
    lattice runtimes deny ABCD-EFGH
    lattice runtimes revoke lat_…
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
from typing import Any

from gateway.cli.admin_client import AdminClient, api_client

__all__ = ["add_runtimes_commands"]

_BASE = "/v1/personal-runtimes"


def _client(args: argparse.Namespace) -> AdminClient:
    return api_client(args.gateway, args.api_key)


def _path(runtime_id: str) -> str:
    return f"{_BASE}/{urllib.parse.quote(runtime_id, safe='')}"


def _when(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _print_runtime(rt: dict[str, Any]) -> None:
    rows = [
        ("id", rt["id"]),
        ("name", rt["name"]),
        ("status", rt["status"]),
        ("created", _when(rt.get("created_at"))),
        ("paired", _when(rt.get("paired_at"))),
        ("last seen", _when(rt.get("last_seen_at"))),
        ("revoked", _when(rt.get("revoked_at"))),
        ("models", ", ".join(rt.get("models") or []) or "-"),
        ("task classes", ", ".join(rt.get("task_classes") or []) or "-"),
        ("default model", rt.get("default_model") or "-"),
        ("daemon version", rt.get("daemon_version") or "-"),
    ]
    for label, value in rows:
        print(f"{label + ':':<16}{value}")


def runtimes_list(args: argparse.Namespace) -> int:
    rows = _client(args).call("GET", _BASE)["data"]
    if args.json:
        _print_json(rows)
        return 0
    print(f"{'ID':<22} {'STATUS':<10} {'LAST SEEN':<20} NAME")
    for row in rows:
        print(f"{row['id']:<22} {row['status']:<10} {_when(row['last_seen_at']):<20} {row['name']}")
    return 0


def runtimes_show(args: argparse.Namespace) -> int:
    runtime = _client(args).call("GET", _path(args.id))
    if args.json:
        _print_json(runtime)
    else:
        _print_runtime(runtime)
    return 0


def runtimes_create(args: argparse.Namespace) -> int:
    created = _client(args).call("POST", _BASE, {"name": args.name})
    print(created["bootstrap_token"])
    expires = _when(created["bootstrap_expires_at"])
    print(
        f"# runtime {created['id']} ({created['name']}) created, status unpaired.\n"
        f"# On the machine to pair, before {expires}:\n"
        f"#   lattice daemon pair --gateway URL --token {created['bootstrap_token']}\n"
        "# The token works once and is shown only now.",
        file=sys.stderr,
    )
    return 0


def runtimes_approve(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"user_code": args.code}
    if args.name:
        body["name"] = args.name
    decision = _client(args).call("POST", f"{_BASE}/device/approve", body)
    runtime = decision["runtime"]
    print(
        f"approved {decision['user_code']}: runtime {runtime['id']} ({runtime['name']}); "
        "the daemon receives its credential on its next poll"
    )
    return 0


def runtimes_deny(args: argparse.Namespace) -> int:
    decision = _client(args).call("POST", f"{_BASE}/device/deny", {"user_code": args.code})
    print(f"denied {decision['user_code']}")
    return 0


def runtimes_revoke(args: argparse.Namespace) -> int:
    runtime = _client(args).call("DELETE", _path(args.id))
    print(f"revoked {runtime['id']} ({runtime['name']})")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gateway", help="gateway URL (default: $LATTICE_GATEWAY_URL)")
    p.add_argument("--api-key", help="workspace API key (default: $LATTICE_API_KEY)")


def add_runtimes_commands(sub: Any) -> None:
    """Add ``lattice runtimes …`` to the top-level subparsers ``sub``."""
    rt = sub.add_parser("runtimes", help="personal runtimes of your workspace")
    rt_sub = rt.add_subparsers(dest="runtimes_cmd", required=True)

    p = rt_sub.add_parser("list", help="list runtimes (no secrets)")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=runtimes_list)

    p = rt_sub.add_parser("show", help="show one runtime")
    p.add_argument("id", help="runtime id (lat_…)")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=runtimes_show)

    p = rt_sub.add_parser("create", help="create an unpaired runtime and a one-time token")
    p.add_argument("--name", required=True)
    _common(p)
    p.set_defaults(func=runtimes_create)

    p = rt_sub.add_parser("approve", help="approve the code a pairing daemon shows")
    p.add_argument("code", help="user code, e.g. BCDF-GHJK")
    p.add_argument("--name", help="runtime name (default: the one the daemon sent)")
    _common(p)
    p.set_defaults(func=runtimes_approve)

    p = rt_sub.add_parser("deny", help="refuse the code a pairing daemon shows")
    p.add_argument("code")
    _common(p)
    p.set_defaults(func=runtimes_deny)

    p = rt_sub.add_parser("revoke", help="revoke a runtime: its tunnel closes, for good")
    p.add_argument("id", help="runtime id (lat_…)")
    _common(p)
    p.set_defaults(func=runtimes_revoke)
