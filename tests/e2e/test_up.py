"""``lattice up``: one command brings up a working stack (with a daemon paired to the dev
workspace), writes the state file, and stops everything it started on SIGTERM; ``--upstream``
fronts an existing OpenAI-compatible server."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis.asyncio as aioredis

from daemon.backends import DEFAULT_PORTS
from daemon.config import RuntimeCredentials, load_credentials
from daemon.run_command import add_run_command, backend_spec
from gateway.auth.apikeys import ApiKeyStore
from gateway.auth.principal import Scope
from gateway.cli.processes import Child, python_module
from gateway.cli.up import DEV_KEY_SCOPES, bootstrap, daemon_config_dir, write_daemon_toml
from gateway.redis_server import free_port
from gateway.runtimes.store import RuntimeStore


def start_up(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    state = tmp_path / "state.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli.main",
            "up",
            "--port",
            str(free_port()),
            "--data-dir",
            str(tmp_path / "data"),
            "--state-file",
            str(state),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 90
    while not state.exists():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else b""
        assert time.monotonic() < deadline, "lattice up did not become ready"
        time.sleep(0.1)
    return proc, json.loads(state.read_text())


def port_open(url: str) -> bool:
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) == 0


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def ask_personal(client: openai.OpenAI, model: str) -> None:
    """One plain and one streamed chat completion on the personal runtime."""
    messages: Any = [{"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(model=model, messages=messages)
    assert reply.model == model and reply.choices[0].message.content
    chunks = client.chat.completions.create(model=model, messages=messages, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_up_serves_and_stops_cleanly(tmp_path: Path) -> None:
    proc, state = start_up(tmp_path)
    data = tmp_path / "data"
    try:
        assert state["base_url"].endswith("/v1")
        assert {"api_key", "admin_key", "gateway_url", "redis_url"} <= set(state)
        runtime_id = state["runtime_id"]
        assert runtime_id.startswith("lat_")
        assert state["personal_model"] == f"lattice:personal:{runtime_id}"
        client = openai.OpenAI(base_url=state["base_url"], api_key=state["api_key"], max_retries=0)
        reply = client.chat.completions.create(
            model="lovelace:llama-3.2-3b-instruct", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content
        ask_personal(client, state["personal_model"])
        client.close()
        # the dev key manages its own workspace's runtimes; the daemon's tunnel is up
        shown = httpx.get(
            f"{state['base_url']}/personal-runtimes/{runtime_id}",
            headers={"Authorization": f"Bearer {state['api_key']}"},
            timeout=10,
        )
        assert shown.status_code == 200, shown.text
        assert shown.json()["status"] == "reachable" and shown.json()["name"] == "lattice-up"
        assert mode(data / "credentials.json") == 0o600
        assert mode(data / "daemon" / "runtime.json") == 0o600
        assert pid_alive(state["daemon_pid"])
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert b"Traceback" not in out, out
    assert b"Lattice is up" in out and state["api_key"].encode() in out
    assert f'model="{state["personal_model"]}"'.encode() in out
    for url in (state["gateway_url"], state["redis_url"], state["upstream"]):
        assert not port_open(url), f"{url} still listening"
    assert not pid_alive(state["daemon_pid"]), "the daemon outlived lattice up"
    # the embedded Redis kept its data on disk (AOF); the credentials and the runtime survive
    # a restart, and the daemon reconnects as the same runtime
    assert (data / "redis" / "appendonly.aof").exists()
    proc, again = start_up(tmp_path)
    try:
        assert again["api_key"] == state["api_key"]
        assert again["runtime_id"] == state["runtime_id"]
        client = openai.OpenAI(base_url=again["base_url"], api_key=again["api_key"], max_retries=0)
        reply = client.chat.completions.create(
            model=again["personal_model"], messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content
        client.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert not pid_alive(again["daemon_pid"])


async def test_bootstrap_keeps_the_runtime_while_it_authenticates(
    redis_url: str, aredis: aioredis.Redis, tmp_path: Path
) -> None:
    async def run(gateway_url: str) -> dict[str, str]:
        sim = "http://127.0.0.1:9/v1"
        return await bootstrap(
            redis_url, tmp_path, sim_url=sim, upstream=None, gateway_url=gateway_url
        )

    first = await run("http://127.0.0.1:1")
    again = await run("http://127.0.0.1:2")
    assert again == first
    runtime_id, credential = first["runtime_id"], first["runtime_credential"]
    # runtime.json in daemon/config.py's format, naming the current gateway
    assert load_credentials(daemon_config_dir(tmp_path)) == RuntimeCredentials(
        gateway_urls=("http://127.0.0.1:2",), runtime_id=runtime_id, credential=credential
    )
    runtimes = RuntimeStore(aredis)
    record = await runtimes.authenticate(credential)
    assert record is not None and (record.workspace, record.name) == ("dev", "lattice-up")
    principal = await ApiKeyStore(aredis).verify(first["api_key"])
    assert set(principal.scopes) == set(DEV_KEY_SCOPES)
    assert {Scope.RUNTIME_MANAGE, Scope.USAGE_READ} <= set(principal.scopes)
    # a credential that stops authenticating (here: revoked) is replaced by a new runtime
    await runtimes.revoke("dev", runtime_id)
    fresh = await run("http://127.0.0.1:2")
    assert fresh["runtime_id"] != runtime_id and fresh["api_key"] == first["api_key"]
    assert load_credentials(daemon_config_dir(tmp_path)).runtime_id == fresh["runtime_id"]
    assert await runtimes.authenticate(fresh["runtime_credential"]) is not None
    assert mode(tmp_path / "credentials.json") == 0o600


def test_daemon_toml_keeps_detection_off_the_gateway_port(tmp_path: Path) -> None:
    """The daemon never probes the gateway's own port for a local server (a gateway on 8080,
    llama.cpp's default, would otherwise be its own backend)."""
    parser = argparse.ArgumentParser()
    add_run_command(parser.add_subparsers())
    args = parser.parse_args(["run", "--backend", "auto"])
    assert 8080 in DEFAULT_PORTS
    write_daemon_toml(tmp_path, 8080)
    spec = backend_spec(args, tmp_path)
    assert spec.kind == "auto"
    assert spec.detect_ports == tuple(p for p in DEFAULT_PORTS if p != 8080)
    write_daemon_toml(tmp_path, 9999)  # rewritten at every start
    assert backend_spec(args, tmp_path).detect_ports == DEFAULT_PORTS


def test_up_fronts_an_existing_upstream(tmp_path: Path) -> None:
    port = free_port()
    sim = Child(
        "sim",
        python_module(
            "gateway.cli.main",
            "sim",
            "--port",
            str(port),
            "--api-key",
            "up-key",
            "--model",
            "qwen2.5:0.5b",
        ),
        quiet=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_open(f"http://127.0.0.1:{port}"):
            assert sim.alive() and time.monotonic() < deadline
            time.sleep(0.05)
        proc, state = start_up(
            tmp_path,
            "--upstream",
            f"http://127.0.0.1:{port}/v1",
            "--upstream-key",
            "up-key",
            "--no-daemon",
        )
        try:
            client = openai.OpenAI(
                base_url=state["base_url"], api_key=state["api_key"], max_retries=0
            )
            # --no-daemon: the runtime is paired (runtime.json is ready) but not connected
            assert state["daemon_pid"] is None
            assert (Path(state["daemon_config_dir"]) / "runtime.json").exists()
            with pytest.raises(openai.APIStatusError) as offline:
                client.chat.completions.create(
                    model=state["personal_model"], messages=[{"role": "user", "content": "hi"}]
                )
            assert offline.value.status_code == 503
            assert offline.value.code == "personal_lattice_relay_unavailable"
            ids = [m.id for m in client.models.list()]
            assert "qwen2.5:0.5b" in ids
            reply = client.chat.completions.create(
                model="qwen2.5:0.5b", messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.model == "qwen2.5:0.5b"
            alias = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "gateway.cli.main",
                    "catalog",
                    "alias",
                    "gpt-4o-mini",
                    "qwen2.5:0.5b",
                    "--gateway",
                    state["gateway_url"],
                    "--admin-key",
                    state["admin_key"],
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert alias.returncode == 0, alias.stderr
            deadline = time.monotonic() + 2
            while "gpt-4o-mini" not in [m.id for m in client.models.list()]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            out = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
            assert out.choices[0].message.content
            client.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
    finally:
        sim.stop()
