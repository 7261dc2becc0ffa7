"""``lattice catalog …``, ``lattice keys …`` and ``lattice workspaces …``: operator commands
that talk to a running gateway's admin API."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from gateway.cli.admin_client import AdminClient

__all__ = ["add_admin_commands"]


def _client(args: argparse.Namespace) -> AdminClient:
    return AdminClient(args.gateway, args.admin_key)


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def _read_document(path: Path) -> Any:
    raw = path.read_bytes()
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return tomllib.loads(raw.decode())
    if suffix == ".json":
        return json.loads(raw)
    if suffix in (".yaml", ".yml"):
        import yaml  # type: ignore[import-untyped]

        return yaml.safe_load(raw)
    raise SystemExit(f"lattice: {path}: unknown catalog file type (use .toml, .json or .yaml)")


def catalog_show(args: argparse.Namespace) -> int:
    _print(_client(args).call("GET", "/admin/v1/catalog"))
    return 0


def catalog_apply(args: argparse.Namespace) -> int:
    try:
        document = _read_document(Path(args.file))
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        print(f"lattice: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    body: dict[str, Any] = {"catalog": document, "mode": "replace" if args.replace else "merge"}
    result = _client(args).call("POST", "/admin/v1/catalog", body)
    print(f"catalog version {result['version']} applied")
    return 0


def catalog_alias(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.delete:
        result = client.call("DELETE", f"/admin/v1/catalog/aliases/{args.name}")
        print(f"alias {args.name} removed (catalog version {result['version']})")
    else:
        result = client.call(
            "PUT", f"/admin/v1/catalog/aliases/{args.name}", {"target": args.target}
        )
        print(f"{args.name} -> {args.target} (catalog version {result['version']})")
    return 0


def keys_create(args: argparse.Namespace) -> int:
    client = _client(args)
    client.call("POST", "/admin/v1/workspaces", {"name": args.workspace})
    body: dict[str, Any] = {"workspace": args.workspace, "name": args.name}
    if args.scope:
        body["scopes"] = args.scope
    result = client.call("POST", "/admin/v1/keys", body)
    print(result["key"])
    print(
        f"# key id {result['id']} in workspace {result['workspace']}; "
        "this is the only time the key is shown",
        file=sys.stderr,
    )
    return 0


def keys_list(args: argparse.Namespace) -> int:
    path = "/admin/v1/keys" + (f"?workspace={args.workspace}" if args.workspace else "")
    rows = _client(args).call("GET", path)["data"]
    if args.json:
        _print(rows)
        return 0
    print(f"{'ID':<16} {'WORKSPACE':<20} {'NAME':<16} {'STATUS':<8} SCOPES")
    for row in rows:
        status = "revoked" if row.get("revoked_at") else "active"
        print(
            f"{row['id']:<16} {row['workspace']:<20} {(row.get('name') or ''):<16} "
            f"{status:<8} {' '.join(row['scopes'])}"
        )
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    _client(args).call("DELETE", f"/admin/v1/keys/{args.id}")
    print(f"revoked {args.id}")
    return 0


def workspaces_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name}
    if args.default_model:
        body["default_model"] = args.default_model
    _print(_client(args).call("POST", "/admin/v1/workspaces", body))
    return 0


def workspaces_list(args: argparse.Namespace) -> int:
    _print(_client(args).call("GET", "/admin/v1/workspaces")["data"])
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gateway", help="gateway URL (default: $LATTICE_GATEWAY_URL)")
    p.add_argument("--admin-key", help="admin key (default: $LATTICE_ADMIN_KEY)")


def add_admin_commands(sub: Any) -> None:
    cat = sub.add_parser("catalog", help="show and change the live catalog")
    cat_sub = cat.add_subparsers(dest="catalog_cmd", required=True)
    p = cat_sub.add_parser("show", help="print the live catalog as JSON")
    _common(p)
    p.set_defaults(func=catalog_show)
    p = cat_sub.add_parser("apply", help="merge (or --replace with) a catalog file")
    p.add_argument("file")
    p.add_argument("--replace", action="store_true", help="replace the whole catalog")
    _common(p)
    p.set_defaults(func=catalog_apply)
    p = cat_sub.add_parser("alias", help="point a model name at a catalog model")
    p.add_argument("name")
    p.add_argument("target", nargs="?")
    p.add_argument("--delete", action="store_true")
    _common(p)
    p.set_defaults(func=catalog_alias)

    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="keys_cmd", required=True)
    p = keys_sub.add_parser("create", help="create an sk_ key (printed once)")
    p.add_argument("--workspace", required=True)
    p.add_argument("--name")
    p.add_argument("--scope", action="append", help="scope to grant (repeatable)")
    _common(p)
    p.set_defaults(func=keys_create)
    p = keys_sub.add_parser("list", help="list keys (no secrets)")
    p.add_argument("--workspace")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=keys_list)
    p = keys_sub.add_parser("revoke", help="revoke a key by id")
    p.add_argument("id")
    _common(p)
    p.set_defaults(func=keys_revoke)

    ws = sub.add_parser("workspaces", help="workspaces")
    ws_sub = ws.add_subparsers(dest="ws_cmd", required=True)
    p = ws_sub.add_parser("create")
    p.add_argument("name")
    p.add_argument("--default-model")
    _common(p)
    p.set_defaults(func=workspaces_create)
    p = ws_sub.add_parser("list")
    _common(p)
    p.set_defaults(func=workspaces_list)
