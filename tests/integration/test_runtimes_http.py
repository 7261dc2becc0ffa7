"""Personal runtimes and pairing over real loopback HTTP: the daemon's pairing code and the
``lattice runtimes`` commands against the routes, with real Redis. The server's clock is
moved by the daemon's injected ``sleep``, so the device flow runs without waiting."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis

from daemon.config import load_credentials
from daemon.pairing import DeviceCode, PairingError, pair
from gateway.auth.apikeys import ApiKeyStore
from gateway.auth.principal import Scope
from gateway.auth.workspaces import WorkspaceStore
from gateway.cli.main import main
from gateway.redis_server import RedisServer, free_port
from gateway.runtimes.device_grants import DeviceGrant, DeviceGrantStore, device_key
from gateway.runtimes.protocol import (
    CreatedPersonalRuntime,
    DeviceAuthorizationResponse,
    PersonalRuntime,
    PersonalRuntimeList,
    TokenResponse,
)
from gateway.runtimes.store import RuntimeStore
from tests.integration.runtimes_server import RuntimesServer

GRANT = "urn:ietf:params:oauth:grant-type:device_code"
MANAGE = [Scope.INFERENCE, Scope.RUNTIME_MANAGE]


@pytest.fixture(scope="module")
def server(redis_server: RedisServer) -> Iterator[RuntimesServer]:
    with RuntimesServer(redis_server.url, free_port()) as srv:
        yield srv


@dataclass
class Keys:
    acme: str  # manage scope, workspace acme
    beta: str  # manage scope, workspace beta
    plain: str  # workspace acme, default scopes (no manage)


@pytest.fixture
async def keys(aredis: aioredis.Redis, server: RuntimesServer) -> Keys:
    server.clock.offset_ms = 0
    workspaces = WorkspaceStore(aredis)
    await workspaces.create("acme")
    await workspaces.create("beta")
    apikeys = ApiKeyStore(aredis)
    acme, _ = await apikeys.create("acme", scopes=MANAGE)
    beta, _ = await apikeys.create("beta", scopes=MANAGE)
    plain, _ = await apikeys.create("acme")
    return Keys(acme, beta, plain)


@pytest.fixture
def http(server: RuntimesServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def call(
    http: httpx.Client, method: str, path: str, key: str | None, body: Any = None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return http.request(method, path, json=body, headers=headers)


def authorize(http: httpx.Client, **extra: str) -> DeviceAuthorizationResponse:
    resp = http.post(
        "/v1/oauth/device_authorization", data={"client_id": "lattice-daemon", **extra}
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store"
    return msgspec.json.decode(resp.content, type=DeviceAuthorizationResponse)


def poll(http: httpx.Client, device_code: str) -> httpx.Response:
    return http.post(
        "/v1/oauth/token",
        data={"grant_type": GRANT, "device_code": device_code, "client_id": "lattice-daemon"},
    )


def oauth_error(resp: httpx.Response) -> str:
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert set(body) <= {"error", "error_description", "error_uri"}
    return str(body["error"])


def fake_sleep(
    server: RuntimesServer, then: Callable[[int], None] | None = None
) -> tuple[Callable[[float], None], list[float]]:
    """A ``sleep`` that moves the server's clock instead, and runs ``then(n)`` on call n."""
    calls: list[float] = []

    def sleep(seconds: float) -> None:
        calls.append(seconds)
        server.clock.advance(seconds)
        if then is not None:
            then(len(calls))

    return sleep, calls


def cli(*argv: str) -> int:
    return main(list(argv))


# -- the device flow ------------------------------------------------------------------------


def test_device_flow_end_to_end(
    server: RuntimesServer,
    http: httpx.Client,
    keys: Keys,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    codes: list[DeviceCode] = []

    def approve(n: int) -> None:
        if n == 2:  # the owner approves while the daemon waits
            code = codes[0].user_code.lower().replace("-", " ")
            assert (
                cli("runtimes", "approve", code, "--gateway", server.url, "--api-key", keys.acme)
                == 0
            )

    sleep, calls = fake_sleep(server, approve)
    creds, path = pair(
        [server.url + "/v1/", server.url],
        name="laptop",
        directory=tmp_path / "cfg",
        sleep=sleep,
        on_code=codes.append,
    )
    code = codes[0]
    assert len(code.user_code) == 9 and code.user_code[4] == "-"
    assert set(code.user_code.replace("-", "")) <= set("BCDFGHJKLMNPQRSTVWXZ")
    assert code.verification_uri == server.url + "/device"
    assert code.verification_uri_complete == f"{server.url}/device?user_code={code.user_code}"
    assert code.expires_in == 600 and code.interval == 5
    assert calls == [5, 5]  # first poll pending, second one approved
    assert creds.gateway_urls == (server.url,)
    assert creds.runtime_id.startswith("lat_") and creds.credential.startswith("lrt_")
    assert "approved " + code.user_code in capsys.readouterr().out
    # Stored 0600, and readable back.
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_credentials(tmp_path / "cfg") == creds
    # Listed in the approver's workspace, named as the daemon asked, paired.
    listed = msgspec.json.decode(
        call(http, "GET", "/v1/personal-runtimes", keys.acme).content, type=PersonalRuntimeList
    )
    assert [(r.id, r.name, r.status) for r in listed.data] == [
        (creds.runtime_id, "laptop", "offline")
    ]
    # The device code is spent.
    assert oauth_error(poll(http, "x" * 43)) == "invalid_grant"


def test_device_flow_token_response_shape(
    server: RuntimesServer, http: httpx.Client, keys: Keys
) -> None:
    grant = authorize(http, name="box")
    assert oauth_error(poll(http, grant.device_code)) == "authorization_pending"
    resp = call(
        http,
        "POST",
        "/v1/personal-runtimes/device/approve",
        keys.acme,
        {"user_code": grant.user_code, "name": "renamed"},
    )
    assert resp.status_code == 200, resp.text
    decision = resp.json()
    assert decision["object"] == "device_authorization" and decision["status"] == "approved"
    assert decision["runtime"]["name"] == "renamed" and decision["runtime"]["status"] == "unpaired"
    server.clock.advance(5)
    resp = poll(http, grant.device_code)
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store"
    token = msgspec.json.decode(resp.content, type=TokenResponse)
    assert token.token_type == "Bearer" and token.runtime_id == decision["runtime"]["id"]
    assert set(resp.json()) == {"access_token", "token_type", "runtime_id"}
    server.clock.advance(5)
    assert oauth_error(poll(http, grant.device_code)) == "invalid_grant"  # single use


def test_slow_down_adds_five_seconds_each_time(
    server: RuntimesServer, http: httpx.Client, keys: Keys
) -> None:
    grant = authorize(http)
    assert oauth_error(poll(http, grant.device_code)) == "authorization_pending"
    assert oauth_error(poll(http, grant.device_code)) == "slow_down"  # interval now 10
    server.clock.advance(6)
    assert oauth_error(poll(http, grant.device_code)) == "slow_down"  # 6 < 10; now 15
    server.clock.advance(15)
    assert oauth_error(poll(http, grant.device_code)) == "authorization_pending"
    server.clock.advance(12)
    assert oauth_error(poll(http, grant.device_code)) == "slow_down"  # 12 < 15


def test_daemon_honours_slow_down(server: RuntimesServer, keys: Keys, tmp_path: Path) -> None:
    codes: list[DeviceCode] = []

    def step(n: int) -> None:
        if n == 2:
            server.clock.advance(-3)  # this poll arrives early: the server answers slow_down
        if n == 3:
            resp = httpx.post(
                server.url + "/v1/personal-runtimes/device/approve",
                json={"user_code": codes[0].user_code},
                headers={"Authorization": f"Bearer {keys.acme}"},
            )
            assert resp.status_code == 200, resp.text

    sleep, calls = fake_sleep(server, step)
    creds, _ = pair([server.url], directory=tmp_path, sleep=sleep, on_code=codes.append)
    assert calls == [5, 5, 10]
    assert creds.runtime_id.startswith("lat_")


def test_expired_code(
    server: RuntimesServer, http: httpx.Client, keys: Keys, tmp_path: Path
) -> None:
    def late(n: int) -> None:
        server.clock.advance(600)

    sleep, _ = fake_sleep(server, late)
    with pytest.raises(PairingError, match="expired"):
        pair([server.url], directory=tmp_path, sleep=sleep, on_code=lambda c: None)
    assert not (tmp_path / "runtime.json").exists()
    # And an expired code cannot be approved.
    grant = authorize(http)
    server.clock.advance(601)
    resp = call(
        http,
        "POST",
        "/v1/personal-runtimes/device/approve",
        keys.acme,
        {"user_code": grant.user_code},
    )
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "user_code_not_found"
    assert oauth_error(poll(http, grant.device_code)) == "expired_token"


def test_denied_code(
    server: RuntimesServer, keys: Keys, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    codes: list[DeviceCode] = []

    def deny(n: int) -> None:
        assert (
            cli(
                "runtimes",
                "deny",
                codes[0].user_code,
                "--gateway",
                server.url,
                "--api-key",
                keys.acme,
            )
            == 0
        )

    sleep, _ = fake_sleep(server, deny)
    with pytest.raises(PairingError, match="denied"):
        pair([server.url], directory=tmp_path, sleep=sleep, on_code=codes.append)
    assert "denied " + codes[0].user_code in capsys.readouterr().out
    assert not (tmp_path / "runtime.json").exists()
    listed = httpx.get(
        server.url + "/v1/personal-runtimes", headers={"Authorization": f"Bearer {keys.acme}"}
    )
    assert listed.json()["data"] == []


def test_unknown_codes(
    http: httpx.Client, keys: Keys, capsys: pytest.CaptureFixture[str], server: RuntimesServer
) -> None:
    assert oauth_error(poll(http, "no-such-device-code")) == "invalid_grant"
    resp = call(
        http, "POST", "/v1/personal-runtimes/device/approve", keys.acme, {"user_code": "BCDF-GHJK"}
    )
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "user_code_not_found"
    assert (
        cli("runtimes", "approve", "nonsense!", "--gateway", server.url, "--api-key", keys.acme)
        == 1
    )
    assert "No pending device authorization" in capsys.readouterr().err


def test_oauth_request_errors(http: httpx.Client, keys: Keys) -> None:
    # Not form-encoded, repeated parameter, unknown client, missing code, wrong grant type.
    resp = http.post("/v1/oauth/token", json={"grant_type": GRANT})
    assert oauth_error(resp) == "invalid_request"
    resp = http.post(
        "/v1/oauth/token",
        content=b"grant_type=a&grant_type=b",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert oauth_error(resp) == "invalid_request"
    resp = http.post("/v1/oauth/device_authorization", data={"client_id": "someone-else"})
    assert resp.status_code in (400, 401) and resp.json()["error"] == "invalid_client"
    resp = http.post(
        "/v1/oauth/device_authorization", data={"client_id": "lattice-daemon", "name": "x" * 200}
    )
    assert oauth_error(resp) == "invalid_request"
    resp = http.post("/v1/oauth/token", data={"grant_type": GRANT, "client_id": "lattice-daemon"})
    assert oauth_error(resp) == "invalid_request"
    resp = http.post(
        "/v1/oauth/token", data={"grant_type": "password", "client_id": "lattice-daemon"}
    )
    assert oauth_error(resp) == "unsupported_grant_type"
    grant = authorize(http)
    resp = http.post(
        "/v1/oauth/token", data={"grant_type": GRANT, "device_code": grant.device_code}
    )
    assert resp.json()["error"] == "invalid_client"


def test_device_page(http: httpx.Client) -> None:
    resp = http.get("/device", params={"user_code": "bcdf ghjk"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert "lattice runtimes approve BCDF-GHJK" in resp.text
    resp = http.get("/device", params={"user_code": "<script>alert(1)</script>"})
    assert "<script>" not in resp.text and "XXXX-XXXX" in resp.text


# -- guessing limits ------------------------------------------------------------------------


def test_rate_limit_per_address(http: httpx.Client, keys: Keys) -> None:
    grant = authorize(http)
    for i in range(10):
        resp = call(
            http,
            "POST",
            "/v1/personal-runtimes/device/approve",
            keys.acme,
            {"user_code": f"BBBB-BBB{'BCDFGHJKLM'[i]}"},
        )
        assert resp.status_code == 404, resp.text
    resp = call(
        http,
        "POST",
        "/v1/personal-runtimes/device/approve",
        keys.acme,
        {"user_code": grant.user_code},
    )
    assert resp.status_code == 429
    assert resp.json()["error"]["code"] == "rate_limit_exceeded"
    assert resp.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(resp.headers["retry-after"]) <= 60
    # Deny is limited the same way.
    resp = call(
        http, "POST", "/v1/personal-runtimes/device/deny", keys.acme, {"user_code": grant.user_code}
    )
    assert resp.status_code == 429


async def test_rate_limit_per_code_burns_it(
    aredis: aioredis.Redis, server: RuntimesServer, keys: Keys
) -> None:
    # Five attempts on a code before it exists (they fail: it is unknown yet) ...
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        headers = {"Authorization": f"Bearer {keys.acme}"}
        for _ in range(5):
            resp = await client.post(
                "/v1/personal-runtimes/device/approve",
                json={"user_code": "MNPQ-RSTV"},
                headers=headers,
            )
            assert resp.status_code == 404
        # ... then a daemon is given exactly that code ...
        now = server.clock()
        grant = DeviceGrant(
            device_key=device_key("guessed-device-code"),
            client_id="lattice-daemon",
            user_code="MNPQRSTV",
            created_ms=now,
            expires_ms=now + 600_000,
            interval_s=5,
        )
        assert await DeviceGrantStore(aredis).create(grant, now)
        # ... and the sixth attempt is refused and burns it: the daemon is told access_denied.
        resp = await client.post(
            "/v1/personal-runtimes/device/approve", json={"user_code": "mnpqrstv"}, headers=headers
        )
        assert resp.status_code == 429
        assert resp.json()["error"]["code"] == "rate_limit_exceeded"
        assert "retry-after" in resp.headers
        burned = await client.post(
            "/v1/oauth/token",
            data={
                "grant_type": GRANT,
                "device_code": "guessed-device-code",
                "client_id": "lattice-daemon",
            },
        )
        assert burned.json()["error"] == "access_denied"
    assert await RuntimeStore(aredis).list("acme") == []


# -- headless pairing -----------------------------------------------------------------------


def test_headless_bootstrap_once(
    server: RuntimesServer,
    http: httpx.Client,
    keys: Keys,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    resp = call(http, "POST", "/v1/personal-runtimes", keys.acme, {"name": "ci-runner"})
    assert resp.status_code == 201, resp.text
    created = msgspec.json.decode(resp.content, type=CreatedPersonalRuntime)
    assert created.object == "personal_runtime" and created.status == "unpaired"
    assert created.bootstrap_token.startswith("lbt_")
    assert created.bootstrap_expires_at == created.created_at + 3600
    # The daemon redeems it through the CLI ...
    assert (
        cli(
            "daemon",
            "pair",
            "--gateway",
            server.url,
            "--token",
            created.bootstrap_token,
            "--config-dir",
            str(tmp_path),
        )
        == 0
    )
    assert created.id in capsys.readouterr().out
    creds = load_credentials(tmp_path)
    assert creds.runtime_id == created.id
    assert stat.S_IMODE(os.stat(tmp_path / "runtime.json").st_mode) == 0o600
    # ... once.
    again = http.post("/v1/personal-runtimes/bootstrap", json={"token": created.bootstrap_token})
    assert again.status_code == 401
    assert again.json()["error"]["code"] == "invalid_bootstrap_token"
    assert (
        cli(
            "daemon",
            "pair",
            "--gateway",
            server.url,
            "--token",
            created.bootstrap_token,
            "--config-dir",
            str(tmp_path / "x"),
        )
        == 1
    )
    assert "already used" in capsys.readouterr().err
    shown = call(http, "GET", f"/v1/personal-runtimes/{created.id}", keys.acme).json()
    assert shown["status"] == "offline" and shown["paired_at"] is not None


def test_bootstrap_expired_or_unknown(
    server: RuntimesServer, http: httpx.Client, keys: Keys
) -> None:
    created = call(http, "POST", "/v1/personal-runtimes", keys.acme, {"name": "late"}).json()
    server.clock.advance(3601)
    for token in [created["bootstrap_token"], "lbt_" + "a" * 16 + "_" + "b" * 43, "junk"]:
        resp = http.post("/v1/personal-runtimes/bootstrap", json={"token": token})
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_bootstrap_token"


def test_bootstrap_direct_response(http: httpx.Client, keys: Keys) -> None:
    created = call(http, "POST", "/v1/personal-runtimes", keys.acme, {"name": "direct"}).json()
    resp = http.post("/v1/personal-runtimes/bootstrap", json={"token": created["bootstrap_token"]})
    assert resp.status_code == 200
    assert resp.json().keys() == {"runtime_id", "credential"}
    assert resp.json()["runtime_id"] == created["id"]


# -- list, get, revoke ----------------------------------------------------------------------


def test_list_get_revoke(
    server: RuntimesServer, http: httpx.Client, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    a = call(http, "POST", "/v1/personal-runtimes", keys.acme, {"name": "a"}).json()
    b = call(http, "POST", "/v1/personal-runtimes", keys.acme, {"name": "b"}).json()
    listed = call(http, "GET", "/v1/personal-runtimes", keys.acme).json()
    assert listed["object"] == "list"
    assert {r["id"] for r in listed["data"]} == {a["id"], b["id"]}
    order = [r["created_at"] for r in listed["data"]]
    assert order == sorted(order)  # oldest first (ties within a second keep creation order)
    obj = call(http, "GET", f"/v1/personal-runtimes/{a['id']}", keys.acme).json()
    msgspec.convert(obj, PersonalRuntime)
    assert set(obj) == {
        "id",
        "object",
        "name",
        "status",
        "created_at",
        "paired_at",
        "last_seen_at",
        "revoked_at",
        "models",
        "task_classes",
        "default_model",
        "daemon_version",
    }
    assert obj["status"] == "unpaired" and obj["revoked_at"] is None and obj["models"] == []
    assert "bootstrap_token" not in json.dumps(listed) and "sha256" not in json.dumps(listed)
    resp = call(http, "DELETE", f"/v1/personal-runtimes/{a['id']}", keys.acme)
    assert resp.status_code == 200
    assert resp.json()["status"] == "revoked" and resp.json()["revoked_at"] is not None
    assert (
        call(http, "GET", f"/v1/personal-runtimes/{a['id']}", keys.acme).json()["status"]
        == "revoked"
    )
    # The CLI.
    capsys.readouterr()
    base = ["--gateway", server.url, "--api-key", keys.acme]
    assert cli("runtimes", "list", *base) == 0
    out = capsys.readouterr().out
    assert a["id"] in out and "revoked" in out and b["id"] in out
    assert cli("runtimes", "show", b["id"], *base) == 0
    assert "unpaired" in capsys.readouterr().out
    assert cli("runtimes", "revoke", b["id"], *base) == 0
    assert f"revoked {b['id']}" in capsys.readouterr().out
    assert cli("runtimes", "create", "--name", "c", *base) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("lbt_") and "lattice daemon pair" in captured.err
    assert cli("runtimes", "show", "lat_" + "a" * 16, *base) == 1
    assert "does not exist" in capsys.readouterr().err


def test_scopes(http: httpx.Client, keys: Keys) -> None:
    rt = call(http, "POST", "/v1/personal-runtimes", keys.acme, {"name": "a"}).json()
    cases = [
        ("GET", "/v1/personal-runtimes", None),
        ("POST", "/v1/personal-runtimes", {"name": "x"}),
        ("GET", f"/v1/personal-runtimes/{rt['id']}", None),
        ("DELETE", f"/v1/personal-runtimes/{rt['id']}", None),
        ("POST", "/v1/personal-runtimes/device/approve", {"user_code": "BCDF-GHJK"}),
        ("POST", "/v1/personal-runtimes/device/deny", {"user_code": "BCDF-GHJK"}),
    ]
    for method, path, body in cases:
        resp = call(http, method, path, keys.plain, body)
        assert resp.status_code == 403, (method, path, resp.text)
        error = resp.json()["error"]
        assert error["code"] == "insufficient_scopes" and error["type"] == "permission_error"
        assert call(http, method, path, None, body).status_code == 401
    assert (
        call(http, "GET", f"/v1/personal-runtimes/{rt['id']}", keys.acme).json()["status"]
        == "unpaired"
    )


def test_workspaces_cannot_see_each_other(http: httpx.Client, keys: Keys) -> None:
    mine = call(http, "POST", "/v1/personal-runtimes", keys.acme, {"name": "mine"}).json()
    ghost = "lat_" + "x" * 16
    assert call(http, "GET", "/v1/personal-runtimes", keys.beta).json()["data"] == []
    for method in ("GET", "DELETE"):
        foreign = call(http, method, f"/v1/personal-runtimes/{mine['id']}", keys.beta)
        unknown = call(http, method, f"/v1/personal-runtimes/{ghost}", keys.beta)
        assert foreign.status_code == unknown.status_code == 404
        assert foreign.json()["error"]["code"] == "personal_lattice_not_found"
        assert foreign.content == unknown.content.replace(ghost.encode(), mine["id"].encode())
        drop = {"date", "x-request-id"}
        assert {k: v for k, v in foreign.headers.items() if k not in drop} == {
            k: v for k, v in unknown.headers.items() if k not in drop
        }
    # Still there, unrevoked, for its owner.
    assert (
        call(http, "GET", f"/v1/personal-runtimes/{mine['id']}", keys.acme).json()["revoked_at"]
        is None
    )
