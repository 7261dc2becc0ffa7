"""Structured logs: JSON lines carrying the request id; prompts, completions and credentials
never appear, unless a workspace opted in to body logging."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx

from tests.e2e.conftest import Stack


def log_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def test_logs_carry_request_ids_and_no_bodies(stack: Stack, tmp_path: Path) -> None:
    log_file = stack.log_files[0]
    secret_prompt = f"prompt-{uuid.uuid4().hex}"
    resp = httpx.post(
        stack.base_url + "/chat/completions",
        json={"messages": [{"role": "user", "content": secret_prompt}]},
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    rid = resp.headers["x-request-id"]
    completion = resp.json()["choices"][0]["message"]["content"]
    bad = httpx.post(
        stack.base_url + "/chat/completions",
        content=b"{broken",
        headers={"Authorization": "Bearer sk_ltaaaaaaaaaaaa_" + "Z" * 43},
    )
    time.sleep(0.3)
    text = log_file.read_text()
    assert secret_prompt not in text and completion not in text
    assert stack.api_key not in text and "Z" * 43 not in text
    lines = log_lines(log_file)
    mine = [line for line in lines if line.get("request_id") == rid]
    assert mine and mine[-1]["msg"] == "request" and mine[-1]["status"] == 200
    assert any(line.get("request_id") == bad.headers["x-request-id"] for line in lines)


def test_workspace_opt_in_logs_bodies(stack: Stack) -> None:
    key = stack.new_key("verbose-ws")
    stack.admin("PATCH", "/admin/v1/workspaces/verbose-ws", {"log_bodies": True})
    time.sleep(0.6)
    marker = f"opted-in-{uuid.uuid4().hex}"
    httpx.post(
        stack.base_url + "/chat/completions",
        json={"messages": [{"role": "user", "content": marker}]},
        headers={"Authorization": f"Bearer {key}"},
    )
    time.sleep(0.3)
    assert marker in stack.log_files[0].read_text()
