"""Pairing and the personal-runtime API across the two ``lattice serve`` processes of the
stack (one Redis): whatever process a call reaches, the answer is the same."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
from pathlib import Path
from typing import Any

import httpx

from daemon.config import load_credentials
from daemon.pairing import DeviceCode, pair
from gateway.auth.principal import Scope
from gateway.cli.processes import python_module
from tests.e2e.conftest import Stack

MANAGE = [Scope.INFERENCE, Scope.RUNTIME_MANAGE]


def _workspace() -> str:
    return "rt-" + secrets.token_hex(4)


def _call(
    stack: Stack, gateway: int, method: str, path: str, key: str, body: Any = None
) -> httpx.Response:
    return httpx.request(
        method,
        stack.gateways[gateway] + path,
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )


def test_device_flow_across_processes(stack: Stack, tmp_path: Path) -> None:
    key = stack.new_key(_workspace(), scopes=MANAGE)

    def approve_on_the_other_process(code: DeviceCode) -> None:
        resp = _call(
            stack,
            0,
            "POST",
            "/v1/personal-runtimes/device/approve",
            key,
            {"user_code": code.user_code},
        )
        assert resp.status_code == 200, resp.text

    # The daemon talks to process 1, the owner to process 0; approval lands before the
    # first poll, so one poll (after a skipped interval) gets the credential.
    creds, path = pair(
        stack.gateways[::-1],
        name="e2e-box",
        directory=tmp_path,
        sleep=lambda seconds: None,
        on_code=approve_on_the_other_process,
    )
    assert creds.gateway_urls == tuple(stack.gateways[::-1])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for gateway in (0, 1):
        shown = _call(
            stack, gateway, "GET", f"/v1/personal-runtimes/{creds.runtime_id}", key
        ).json()
        assert shown["name"] == "e2e-box" and shown["status"] == "offline"


def test_headless_bootstrap_with_the_real_command(stack: Stack, tmp_path: Path) -> None:
    key = stack.new_key(_workspace(), scopes=MANAGE)
    created = _call(stack, 0, "POST", "/v1/personal-runtimes", key, {"name": "headless"})
    assert created.status_code == 201, created.text
    token = created.json()["bootstrap_token"]
    env = {**os.environ, "LATTICE_CONFIG_DIR": str(tmp_path / "cfg")}
    argv = python_module(
        "gateway.cli.main", "daemon", "pair", "--gateway", stack.gateways[1], "--token", token
    )
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    creds = load_credentials(tmp_path / "cfg")
    assert creds.runtime_id == created.json()["id"]
    assert stat.S_IMODE((tmp_path / "cfg" / "runtime.json").stat().st_mode) == 0o600
    # Once: the other process refuses it too.
    again = httpx.post(
        stack.gateways[0] + "/v1/personal-runtimes/bootstrap", json={"token": token}, timeout=10
    )
    assert again.status_code == 401 and again.json()["error"]["code"] == "invalid_bootstrap_token"


def test_two_workspaces_across_processes(stack: Stack) -> None:
    a = stack.new_key(_workspace(), scopes=MANAGE)
    b = stack.new_key(_workspace(), scopes=MANAGE)
    plain = stack.new_key(_workspace())
    mine = _call(stack, 0, "POST", "/v1/personal-runtimes", a, {"name": "mine"}).json()
    ghost = "lat_" + "y" * 16
    assert _call(stack, 1, "GET", "/v1/personal-runtimes", b).json()["data"] == []
    for method in ("GET", "DELETE"):
        foreign = _call(stack, 1, method, f"/v1/personal-runtimes/{mine['id']}", b)
        unknown = _call(stack, 0, method, f"/v1/personal-runtimes/{ghost}", b)
        assert foreign.status_code == unknown.status_code == 404
        assert foreign.content == unknown.content.replace(ghost.encode(), mine["id"].encode())
    denied = _call(stack, 1, "GET", "/v1/personal-runtimes", plain)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_scopes"
    revoked = _call(stack, 1, "DELETE", f"/v1/personal-runtimes/{mine['id']}", a)
    assert revoked.json()["status"] == "revoked"
    assert (
        _call(stack, 0, "GET", f"/v1/personal-runtimes/{mine['id']}", a).json()["status"]
        == "revoked"
    )
