"""Hosted upstreams: failures mapped to structured errors, fallback before the first byte,
drop_params, cancellation on disconnect, idempotency and one usage record per dispatch."""

from __future__ import annotations

import json
import socket
import time
from contextlib import AbstractContextManager
from typing import Any

import httpx
import msgspec
import openai
import pytest
import redis

from billing.keys import USAGE_STREAM
from billing.usage import decode_record
from tests.e2e.conftest import Stack
from tests.e2e.test_errors import assert_envelope

BEHAVIOURS = [
    "status-500",
    "status-429",
    "status-422",
    "status-401",
    "slow",
    "bad-json",
    "deep-json",
    "deep-stream",
    "record",
    "slow-stream",
    "die-mid-stream",
]
CHAT_PARAMS = ["max_tokens", "temperature", "stream", "stream_options"]


def model(name: str) -> str:
    return f"lovelace:scripted-{name}"


@pytest.fixture(scope="module")
def scripted(stack: Stack) -> Stack:
    url = stack.upstream.base_url
    models: dict[str, Any] = {}
    offerings: list[dict[str, Any]] = []
    for name in BEHAVIOURS:
        models[model(name)] = {
            "task_classes": ["chat-completion"],
            "supported_params": CHAT_PARAMS,
        }
        offerings.append(
            {
                "id": f"scripted-{name}",
                "model": model(name),
                "upstream": {
                    "base_url": url,
                    "model": name,
                    "timeout_s": 1.0,
                    "api_key": "up-secret",
                },
                "prices": {"prompt_tokens": 1_000_000, "completion_tokens": 2_000_000},
            }
        )
    # fallback: a failing offering first (higher priority), a working one second
    models[model("fallback")] = {"task_classes": ["chat-completion"]}
    offerings.append(
        {
            "id": "fallback-broken",
            "model": model("fallback"),
            "priority": 10,
            "upstream": {"base_url": "http://127.0.0.1:9/v1", "connect_timeout_s": 1.0},
        }
    )
    offerings.append(
        {
            "id": "fallback-good",
            "model": model("fallback"),
            "upstream": {"base_url": url, "model": "record"},
        }
    )
    stack.apply_catalog({"models": models, "offerings": offerings})
    time.sleep(0.6)
    return stack


def chat(stack: Stack, name: str, **extra: Any) -> httpx.Response:
    headers = extra.pop("headers", {})
    headers["Authorization"] = f"Bearer {stack.api_key}"
    return httpx.post(
        stack.base_url + "/chat/completions",
        json={"model": model(name), "messages": [{"role": "user", "content": "hi"}], **extra},
        headers=headers,
        timeout=10,
    )


@pytest.mark.parametrize(
    ("name", "status", "code"),
    [
        ("status-500", 502, "upstream_error"),
        ("status-401", 502, "upstream_error"),
        ("status-422", 422, "upstream_rejected"),
        ("bad-json", 502, "upstream_error"),
        ("deep-json", 502, "upstream_error"),
        ("slow", 504, "upstream_timeout"),
    ],
)
def test_upstream_failures_are_structured(
    scripted: Stack, name: str, status: int, code: str
) -> None:
    assert_envelope(chat(scripted, name), status, code)


def test_an_undecodable_stream_event_is_skipped(scripted: Stack) -> None:
    # A hostile upstream's event nested too deep to decode is dropped, as a malformed one is:
    # the stream goes on to its end.
    resp = chat(scripted, "deep-stream", stream=True)
    assert resp.status_code == 200, resp.text
    events = [line for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"content":"ok"' in resp.text.replace(" ", "")
    assert '"finish_reason":"stop"' in resp.text.replace(" ", "")


def test_upstream_429_keeps_retry_after(scripted: Stack) -> None:
    resp = chat(scripted, "status-429")
    assert_envelope(resp, 429)
    assert resp.headers["retry-after"] == "7"
    with scripted.client() as client, pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model=model("status-429"), messages=[{"role": "user", "content": "x"}]
        )


def test_unreachable_upstream_falls_back_before_first_byte(scripted: Stack) -> None:
    resp = chat(scripted, "fallback")
    assert resp.status_code == 200, resp.text
    streamed = chat(scripted, "fallback", stream=True)
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")


def test_upstream_credential_and_model_are_forwarded(scripted: Stack) -> None:
    scripted.upstream.received.clear()
    assert chat(scripted, "record", max_tokens=5).status_code == 200
    sent = scripted.upstream.received[-1]
    assert sent["model"] == "record"
    assert sent["max_tokens"] == 5


def test_drop_params(scripted: Stack) -> None:
    scripted.upstream.received.clear()
    resp = chat(scripted, "record", seed=5, top_p=0.5)  # not in the offering's supported list
    assert resp.status_code == 200
    sent = scripted.upstream.received[-1]
    assert "seed" not in sent and "top_p" not in sent and "drop_params" not in sent
    err = assert_envelope(
        chat(scripted, "record", seed=5, drop_params=False), 400, "unsupported_parameter"
    )
    assert err["param"] == "seed"
    # a supported parameter passes with drop_params false
    assert chat(scripted, "record", max_tokens=3, drop_params=False).status_code == 200


def test_workspace_drop_params_policy(scripted: Stack) -> None:
    key = scripted.new_key("strict-ws")
    scripted.admin("PATCH", "/admin/v1/workspaces/strict-ws", {"drop_params": False})
    time.sleep(0.6)
    resp = httpx.post(
        scripted.base_url + "/chat/completions",
        json={"model": model("record"), "messages": [{"role": "user", "content": "x"}], "seed": 1},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert_envelope(resp, 400, "unsupported_parameter")


def slow_stream(stack: Stack, gateway: int = 0) -> AbstractContextManager[httpx.Response]:
    """A streamed chat on the upstream that sends one chunk every 50 ms."""
    return httpx.stream(
        "POST",
        stack.gateways[gateway] + "/v1/chat/completions",
        json={
            "model": model("slow-stream"),
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
        },
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )


def assert_upstream_saw_the_disconnect(stack: Stack, closed: float) -> None:
    """The upstream saw its connection close within half a second of ``closed``."""
    deadline = closed + 2.0
    while not stack.upstream.disconnects and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stack.upstream.disconnects, "upstream never saw the disconnect"
    assert stack.upstream.disconnects[0] - closed < 0.5


@pytest.mark.parametrize("gateway", [0, 1], ids=["front-door", "asgi"])
def test_client_disconnect_cancels_upstream(scripted: Stack, gateway: int) -> None:
    scripted.upstream.disconnects.clear()
    with slow_stream(scripted, gateway) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert all(line.startswith("data: ") or line == "" for line in got)
    assert_upstream_saw_the_disconnect(scripted, time.monotonic())


@pytest.mark.parametrize("gateway", [0, 1], ids=["front-door", "asgi"])
def test_disconnect_with_a_request_pipelined_behind_the_stream(
    scripted: Stack, gateway: int
) -> None:
    """The client pipelines a second request behind a stream, then leaves: the stream's
    upstream is still cancelled at once."""
    scripted.upstream.disconnects.clear()
    body = json.dumps(
        {
            "model": model("slow-stream"),
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
        }
    ).encode()
    req = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {scripted.api_key}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    host, port = scripted.gateways[gateway].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(req + req)
        got = b""
        while got.count(b"data: ") < 2:
            got += sock.recv(65536)
    assert_upstream_saw_the_disconnect(scripted, time.monotonic())


def test_upstream_dying_mid_stream_ends_with_error_event(scripted: Stack) -> None:
    resp = chat(scripted, "die-mid-stream", stream=True)
    assert resp.status_code == 200
    events = [line for line in resp.text.split("\n\n") if line]
    assert '"error"' in events[-1]
    assert "[DONE]" not in resp.text


def usage_records(stack: Stack) -> list[Any]:
    client = redis.Redis.from_url(stack.redis_url)
    try:
        return [decode_record(fields[b"r"]) for _, fields in client.xrange(USAGE_STREAM)]
    finally:
        client.close()


def records_of(stack: Stack, dispatch_id: str, deadline_s: float = 3.0) -> list[Any]:
    """The stream's records of one dispatch, polled: the spool ships them within milliseconds."""
    deadline = time.monotonic() + deadline_s
    while True:
        records = [r for r in usage_records(stack) if r.dispatch_id == dispatch_id]
        if records or time.monotonic() > deadline:
            return records
        time.sleep(0.02)


def test_one_usage_record_per_dispatch(scripted: Stack) -> None:
    resp = chat(scripted, "record", metadata={"team": "ml"})
    dispatch_id = resp.headers["x-lattice-dispatch-id"]
    records = records_of(scripted, dispatch_id)
    time.sleep(0.1)  # and no second one follows
    assert records_of(scripted, dispatch_id) == records
    assert len(records) == 1
    rec = records[0]
    assert rec.workspace == "dev" and rec.offering == "scripted-record"
    assert rec.units == {"prompt_tokens": 3, "completion_tokens": 1}
    # 3 * 1_000_000 + 1 * 2_000_000 micro-USD per 1M tokens = 5 micro-USD exactly
    assert rec.cost_picousd == 5_000_000 and rec.cost_microusd == 5
    assert rec.tags == {"team": "ml"}
    assert rec.key_id == scripted.api_key.split("_")[1]
    assert rec.status == "completed"
    assert isinstance(msgspec.to_builtins(rec), dict)


def test_cancelled_stream_is_metered(scripted: Stack) -> None:
    with slow_stream(scripted) as resp:
        dispatch_id = resp.headers["x-lattice-dispatch-id"]
        lines = resp.iter_lines()
        for _ in range(4):
            next(lines)
    records = records_of(scripted, dispatch_id)
    assert len(records) == 1
    assert records[0].status == "cancelled"
    assert records[0].units["completion_tokens"] >= 1 and records[0].units_estimated


def test_idempotency_replays_and_conflicts(stack: Stack) -> None:
    body = {
        "model": "lovelace:llama-3.2-3b-instruct",
        "messages": [{"role": "user", "content": "idem"}],
    }
    headers = {"Authorization": f"Bearer {stack.api_key}", "Idempotency-Key": f"k-{time.time_ns()}"}
    first = httpx.post(stack.base_url + "/chat/completions", json=body, headers=headers)
    # the replay is served by the other gateway process
    second = httpx.post(stack.gateways[1] + "/v1/chat/completions", json=body, headers=headers)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert second.headers["idempotent-replayed"] == "true"
    other = httpx.post(stack.base_url + "/chat/completions", json={**body, "n": 2}, headers=headers)
    assert_envelope(other, 409, "idempotency_key_reused")
    with stack.client() as client, pytest.raises(openai.ConflictError):
        client.chat.completions.create(
            model="lovelace:llama-3.2-3b-instruct",
            messages=[{"role": "user", "content": "different"}],
            extra_headers={"Idempotency-Key": headers["Idempotency-Key"]},
        )


@pytest.mark.parametrize(
    ("name", "exception", "status"),
    [
        ("status-422", openai.UnprocessableEntityError, 422),
        ("status-500", openai.InternalServerError, 502),
        ("slow", openai.InternalServerError, 504),
    ],
)
def test_sdk_exceptions_for_upstream_statuses(
    scripted: Stack, name: str, exception: type[openai.APIStatusError], status: int
) -> None:
    with scripted.client() as client, pytest.raises(exception) as info:
        client.chat.completions.create(
            model=model(name), messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.status_code == status
    assert info.value.response.headers["x-request-id"]


def test_sdk_exceptions_for_413_and_503(stack: Stack) -> None:
    with stack.client() as client:
        with pytest.raises(openai.APIStatusError) as too_big:
            client.chat.completions.create(
                model="lovelace:llama-3.2-3b-instruct",
                messages=[{"role": "user", "content": "x" * 300_000}],
            )
        assert too_big.value.status_code == 413
        stack.apply_catalog(
            {"models": {"lovelace:unserved": {"task_classes": ["chat-completion"]}}}
        )
        deadline = time.monotonic() + 2
        while True:
            try:
                client.chat.completions.create(
                    model="lovelace:unserved", messages=[{"role": "user", "content": "x"}]
                )
            except openai.NotFoundError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
                continue
            except openai.InternalServerError as exc:
                assert exc.status_code == 503 and exc.code == "no_capacity"
                break
            raise AssertionError("expected a 503")
