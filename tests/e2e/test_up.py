"""``lattice up``: one command brings up a working stack, writes the state file, and stops
everything it started on SIGTERM; ``--upstream`` fronts an existing OpenAI-compatible server."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai

from gateway.cli.processes import Child, python_module
from gateway.redis_server import free_port


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


def test_up_serves_and_stops_cleanly(tmp_path: Path) -> None:
    proc, state = start_up(tmp_path)
    try:
        assert state["base_url"].endswith("/v1")
        assert {"api_key", "admin_key", "gateway_url", "redis_url"} <= set(state)
        client = openai.OpenAI(base_url=state["base_url"], api_key=state["api_key"], max_retries=0)
        reply = client.chat.completions.create(
            model="lovelace:llama-3.2-3b-instruct", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert b"Lattice is up" in out and state["api_key"].encode() in out
    for url in (state["gateway_url"], state["redis_url"], state["upstream"]):
        assert not port_open(url), f"{url} still listening"
    # the embedded Redis kept its data on disk (AOF) and the credentials survive a restart
    assert (tmp_path / "data" / "redis" / "appendonly.aof").exists()
    proc, again = start_up(tmp_path)
    try:
        assert again["api_key"] == state["api_key"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 0


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
            tmp_path, "--upstream", f"http://127.0.0.1:{port}/v1", "--upstream-key", "up-key"
        )
        try:
            client = openai.OpenAI(
                base_url=state["base_url"], api_key=state["api_key"], max_retries=0
            )
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
