"""``GET /v1/usage``, ``GET /v1/usage/spend``, the admin spend routes and the ``lattice
usage`` / ``lattice spend`` commands, through a real gateway app served by uvicorn on a
loopback port: JSON and CSV, the usage:read scope, bad parameters, and workspace isolation
(a workspace never sees another's usage, even with the same key id or tag)."""

from __future__ import annotations

import argparse
import asyncio
import calendar
import contextlib
import json
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
from litestar import Litestar

from billing import keys as billing_keys
from billing.usage import UsageRecord, encode_record
from billing.usage_ledger import UsageLedger
from gateway import keys
from gateway.admin.spend_routes import spend_admin_routes
from gateway.auth.apikeys import ApiKeyStore
from gateway.auth.principal import Scope
from gateway.auth.workspaces import WorkspaceStore
from gateway.cli.admin_client import AdminError
from gateway.cli.usage_commands import add_usage_commands
from gateway.http import exception_to_response
from gateway.redis_server import free_port
from gateway.runtime import Gateway
from gateway.settings import Settings
from gateway.usage_routes import usage_routes

DAY = calendar.timegm((2025, 3, 1, 10, 0, 0)) * 1000
RANGE = {"start": "2025-03-01", "end": "2025-03-31"}


class AppThread:
    """A gateway app (the usage and spend routes) under uvicorn on a background thread."""

    def __init__(self, redis_url: str, spool: Path) -> None:
        settings = Settings(redis_url=redis_url, metering=False, spool_dir=str(spool))
        self.gateway = Gateway(settings)
        gw = self.gateway

        @contextlib.asynccontextmanager
        async def lifespan(_: Litestar) -> AsyncIterator[None]:
            await gw.start()
            try:
                yield
            finally:
                await gw.stop()

        app = Litestar(
            route_handlers=[*usage_routes(gw), *spend_admin_routes(gw)],
            exception_handlers={Exception: exception_to_response},
            lifespan=[lifespan],
            openapi_config=None,
            logging_config=None,
        )
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> AppThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "app did not start"
            time.sleep(0.005)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@dataclass
class Env:
    url: str
    admin: str
    acme: str  # acme's key with usage:read
    rival: str  # rival's key with usage:read
    plain: str  # acme's key without usage:read
    acme_key_id: str


def rec(i: int, ws: str, key_id: str, tags: dict[str, str], cost: int) -> UsageRecord:
    return UsageRecord(
        dispatch_id=f"dsp_{ws}_{i}",
        request_id=f"req_{i}",
        workspace=ws,
        task="chat-completion",
        model="lovelace:m",
        offering="o",
        provider="hosted",
        units={"prompt_tokens": 3, "completion_tokens": 2},
        prices={"prompt_tokens": 1},
        price_per=1,
        cost_picousd=cost,
        cost_microusd=0,
        started_ms=DAY,
        finished_ms=DAY,
        key_id=key_id,
        tags=tags,
    )


@pytest.fixture
async def env(aredis: aioredis.Redis, redis_url: str, tmp_path: Path) -> AsyncIterator[Env]:
    workspaces, apikeys = WorkspaceStore(aredis), ApiKeyStore(aredis)
    for ws in ("acme", "rival"):
        await workspaces.create(ws)
    read = [Scope.INFERENCE, Scope.USAGE_READ]
    acme, acme_record = await apikeys.create("acme", scopes=read)
    rival, _ = await apikeys.create("rival", scopes=read)
    plain, _ = await apikeys.create("acme", scopes=[Scope.INFERENCE])
    admin, _ = await apikeys.create_admin_key()
    # the rival's record carries acme's key id and the same tag: it must never show for acme
    records = [
        rec(1, "acme", acme_record.id, {"team": "search"}, 2_000_000),
        rec(2, "acme", acme_record.id, {"team": "ads"}, 500_000),
        rec(1, "rival", acme_record.id, {"team": "search"}, 9_000_000),
    ]
    for r in records:
        await aredis.xadd(billing_keys.USAGE_STREAM, {"r": encode_record(r)})
    await UsageLedger(aredis).run_once()
    app = await asyncio.to_thread(AppThread(redis_url, tmp_path).__enter__)
    try:
        yield Env(app.url, admin, acme, rival, plain, acme_record.id)
    finally:
        await asyncio.to_thread(app.__exit__)


async def get(env: Env, path: str, key: str | None, **params: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=env.url, timeout=10) as client:
        return await client.get(path, params=params, headers=headers)


async def call(env: Env, method: str, path: str, body: object, key: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=env.url, timeout=10) as client:
        return await client.request(
            method, path, json=body, headers={"Authorization": f"Bearer {key}"}
        )


async def test_usage_json_by_each_grouping_and_isolation(env: Env) -> None:
    resp = await get(env, "/v1/usage", env.acme, **RANGE)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert (body["object"], body["workspace"], body["group_by"]) == ("list", "acme", "day")
    assert body["data"] == [
        {
            "day": "2025-03-01",
            "requests": 2,
            "cost_picousd": 2_500_000,
            "cost_microusd": 3,
            "units": {"completion_tokens": 4, "prompt_tokens": 6},
        }
    ]
    by_key = (await get(env, "/v1/usage", env.acme, group_by="key", **RANGE)).json()["data"]
    assert [(r["key_id"], r["requests"], r["cost_picousd"]) for r in by_key] == [
        (env.acme_key_id, 2, 2_500_000)
    ]
    by_tag = (await get(env, "/v1/usage", env.acme, group_by="tag", **RANGE)).json()["data"]
    assert [(r["tag_value"], r["cost_picousd"]) for r in by_tag] == [
        ("ads", 500_000),
        ("search", 2_000_000),
    ]
    # the rival, with the same key id and tag in its records, sees only its own
    rival = (await get(env, "/v1/usage", env.rival, group_by="key", **RANGE)).json()
    assert rival["workspace"] == "rival"
    assert [(r["key_id"], r["cost_picousd"]) for r in rival["data"]] == [
        (env.acme_key_id, 9_000_000)
    ]
    rival_tags = (await get(env, "/v1/usage", env.rival, group_by="tag", **RANGE)).json()
    assert [(r["tag_value"], r["requests"]) for r in rival_tags["data"]] == [("search", 1)]
    # a query string cannot name another workspace
    sneaky = await get(env, "/v1/usage", env.rival, workspace="acme", **RANGE)
    assert sneaky.json()["workspace"] == "rival"
    # defaults: this month up to today (nothing there)
    assert (await get(env, "/v1/usage", env.acme)).json()["data"] == []


async def test_usage_csv(env: Env) -> None:
    resp = await get(env, "/v1/usage", env.acme, group_by="model", format="csv", **RANGE)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/csv")
    assert "attachment" in resp.headers["content-disposition"]
    lines = resp.text.split("\r\n")
    assert lines == [
        "day,model,requests,cost_usd,cost_picousd,units.completion_tokens,units.prompt_tokens",
        "2025-03-01,lovelace:m,2,0.000003,2500000,4,6",
        "",
    ]


async def test_usage_needs_the_scope_and_a_key(env: Env) -> None:
    for path in ("/v1/usage", "/v1/usage/spend"):
        resp = await get(env, path, env.plain)
        assert resp.status_code == 403
        error = resp.json()["error"]
        assert (error["code"], error["type"]) == ("insufficient_scopes", "permission_error")
        assert Scope.USAGE_READ in error["message"]
        assert (await get(env, path, None)).status_code == 401


BAD_PARAMS = [
    ({"start": "2025-13-01"}, "start"),
    ({"start": "20250301"}, "start"),
    ({"end": "yesterday"}, "end"),
    ({"start": "2025-03-10", "end": "2025-03-01"}, "start"),
    ({"start": "2020-01-01", "end": "2025-01-01"}, "start"),
    ({"group_by": "provider"}, "group_by"),
    ({"format": "xml"}, "format"),
]


async def test_bad_parameters_are_named(env: Env) -> None:
    for params, param in BAD_PARAMS:
        resp = await get(env, "/v1/usage", env.acme, **params)
        assert resp.status_code == 400, params
        error = resp.json()["error"]
        assert (error["param"], error["type"]) == (param, "invalid_request_error"), params


async def test_admin_spend_controls_and_the_workspace_view(
    env: Env, aredis: aioredis.Redis
) -> None:
    pubsub = aredis.pubsub()
    await pubsub.subscribe(keys.EVENTS_CHANNEL)
    try:
        path = "/admin/v1/workspaces/acme/spend-limit"
        resp = await call(env, "PUT", path, {"monthly_limit_microusd": 5_000_000}, env.admin)
        assert resp.status_code == 200, resp.text
        assert resp.json()["monthly_limit_microusd"] == 5_000_000
        # every gateway process hears of it (and drops its cached "no limits" fact)
        events = []
        deadline = time.monotonic() + 5
        while "workspace-changed:acme" not in events and time.monotonic() < deadline:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if msg:
                events.append(msg["data"].decode())
        assert "workspace-changed:acme" in events
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]

    credit = "/admin/v1/workspaces/acme/credit"
    first = await call(
        env, "POST", credit, {"amount_microusd": 2_000_000, "grant_id": "g-1"}, env.admin
    )
    again = await call(
        env, "POST", credit, {"amount_microusd": 2_000_000, "grant_id": "g-1"}, env.admin
    )
    assert (first.json()["added"], again.json()["added"]) == (True, False)
    assert again.json()["credit_balance_microusd"] == 2_000_000
    clash = await call(env, "POST", credit, {"amount_microusd": 3, "grant_id": "g-1"}, env.admin)
    assert clash.status_code == 409 and clash.json()["error"]["code"] == "grant_id_reused"

    view = (await get(env, "/v1/usage/spend", env.acme)).json()
    assert view["workspace"] == "acme" and view["monthly_limit_microusd"] == 5_000_000
    assert view["credit_enabled"] is True and view["credit_balance_microusd"] == 2_000_000
    other = (await get(env, "/v1/usage/spend", env.rival)).json()
    assert (other["monthly_limit_microusd"], other["credit_balance_microusd"]) == (None, None)

    removed = await call(env, "PUT", path, {"monthly_limit_microusd": None}, env.admin)
    assert removed.json()["monthly_limit_microusd"] is None

    bad = [
        ({"monthly_limit_microusd": -1}, "monthly_limit_microusd", path, "PUT"),
        ({"monthly_limit_microusd": 1.5}, "monthly_limit_microusd", path, "PUT"),
        ({}, "monthly_limit_microusd", path, "PUT"),
        ({"monthly_limit_microusd": 1, "x": 1}, "x", path, "PUT"),
        ({"amount_microusd": 0, "grant_id": "g"}, "amount_microusd", credit, "POST"),
        ({"amount_microusd": 5, "grant_id": ""}, "grant_id", credit, "POST"),
    ]
    for body, param, where, method in bad:
        resp = await call(env, method, where, body, env.admin)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, body
    # the workspace's own key is not an admin key; an unknown workspace is a 404
    assert (
        await call(env, "PUT", path, {"monthly_limit_microusd": 1}, env.acme)
    ).status_code == 403
    missing = await call(
        env,
        "PUT",
        "/admin/v1/workspaces/nope/spend-limit",
        {"monthly_limit_microusd": 1},
        env.admin,
    )
    assert missing.status_code == 404


def lattice(argv: list[str]) -> int:
    """``lattice`` with only this module's commands (main.py registers them the same way)."""
    parser = argparse.ArgumentParser(prog="lattice")
    add_usage_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except AdminError as exc:  # as gateway.cli.main does
        print(f"lattice: {exc.message}", file=sys.stderr)
        return 1


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = lattice(argv)
    out, err = capsys.readouterr()
    return code, out, err


async def test_cli_usage_and_spend(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--gateway", env.url]
    code, out, _ = await asyncio.to_thread(
        run_cli,
        [
            "usage",
            "--start",
            "2025-03-01",
            "--end",
            "2025-03-02",
            "--group-by",
            "tag",
            "--api-key",
            env.acme,
            *base,
        ],
        capsys,
    )
    assert code == 0
    assert out.splitlines()[0].split() == ["DAY", "TAG", "REQUESTS", "COST_USD", "UNITS"]
    assert "team=search" in out and "0.000002" in out
    code, out, _ = await asyncio.to_thread(
        run_cli,
        [
            "usage",
            "--start",
            "2025-03-01",
            "--end",
            "2025-03-01",
            "--csv",
            "--api-key",
            env.acme,
            *base,
        ],
        capsys,
    )
    assert out.splitlines()[1] == "2025-03-01,2,0.000003,2500000,4,6"

    admin = [*base, "--admin-key", env.admin]
    code, out, _ = await asyncio.to_thread(
        run_cli, ["spend", "limit", "acme", "12.5", *admin], capsys
    )
    assert code == 0 and "12.500000 USD" in out
    code, out, _ = await asyncio.to_thread(
        run_cli, ["spend", "credit", "acme", "$0.000001", "--grant-id", "cli-1", *admin], capsys
    )
    assert code == 0 and "0.000001 USD" in out
    code, _, err = await asyncio.to_thread(
        run_cli, ["spend", "limit", "acme", "1.0000001", *admin], capsys
    )
    assert code == 2 and "6 decimals" in err
    code, out, _ = await asyncio.to_thread(
        run_cli, ["spend", "limit", "acme", "none", *admin], capsys
    )
    assert "monthly limit  none" in out
    code, out, _ = await asyncio.to_thread(
        run_cli, ["usage", "--spend", "--api-key", env.acme, *base], capsys
    )
    assert json.loads(out)["credit_balance_microusd"] == 1
    code, _, err = await asyncio.to_thread(
        run_cli, ["usage", "--api-key", env.plain, *base], capsys
    )
    assert code == 1 and Scope.USAGE_READ in err


def test_usage_commands_register_without_clashing() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_usage_commands(sub)
    args = parser.parse_args(["spend", "credit", "acme", "-5", "--grant-id", "fix-1"])
    assert (args.name, args.amount, args.grant_id) == ("acme", "-5", "fix-1")
