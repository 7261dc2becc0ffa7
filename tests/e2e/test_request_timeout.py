"""How long a request may take to arrive (``LATTICE_REQUEST_TIMEOUT_S``), on a real
``lattice serve`` over raw sockets: a client that stalls in its headers or mid-body gets a 408
in the OpenAI envelope and its connection is closed, on the dispatch routes (the front door)
and on every other route (uvicorn's ASGI path) alike; time spent answering is never counted,
so a stream that outlasts the limit is not cut, and neither is the daemon's tunnel."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.cli.processes import wait_http_ok
from gateway.redis_server import free_port
from tests.e2e.conftest import RuntimeFactory, Stack, start_gateway
from tests.e2e.test_front_door import Conn
from tests.e2e.test_upstreams import model as upstream_model
from tests.e2e.test_upstreams import scripted  # noqa: F401  (the fixture)

TIMEOUT_S = 0.6


@pytest.fixture(scope="module")
def gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = Path(tmp_path_factory.mktemp("timeout")) / "gateway.log"
    env = {**stack.gateway_env, "LATTICE_REQUEST_TIMEOUT_S": str(TIMEOUT_S)}
    child = start_gateway(port, env, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http_ok(url + "/readyz", 60, child.proc)
        yield url
    finally:
        child.stop()


@pytest.fixture
def conns() -> Iterator[list[Conn]]:
    opened: list[Conn] = []
    yield opened
    for conn in opened:
        conn.close()


def _open(conns: list[Conn], url: str) -> Conn:
    conns.append(Conn(url))
    return conns[-1]


def _assert_408_and_closed(conn: Conn, started: float) -> None:
    status, headers, body = conn.response()
    waited = time.monotonic() - started
    assert status == 408
    assert TIMEOUT_S - 0.1 <= waited < TIMEOUT_S + 5
    assert headers["connection"] == "close" and headers["x-request-id"]
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert conn.closed_by_peer()


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/personal-runtimes"], ids=["front-door", "asgi"]
)
def test_a_body_that_stalls_gets_408(
    stack: Stack, gateway: str, path: str, conns: list[Conn]
) -> None:
    conn = _open(conns, gateway)
    conn.send(
        (
            f"POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {stack.api_key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        ).encode()
        + b'{"model": "x", '
    )
    _assert_408_and_closed(conn, time.monotonic())


def test_headers_that_stall_get_408(gateway: str, conns: list[Conn]) -> None:
    conn = _open(conns, gateway)
    conn.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Le")
    _assert_408_and_closed(conn, time.monotonic())


def test_a_chunked_body_that_stalls_gets_408(stack: Stack, gateway: str, conns: list[Conn]) -> None:
    conn = _open(conns, gateway)
    conn.send(
        (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
            f"Authorization: Bearer {stack.api_key}\r\nContent-Type: application/json\r\n"
            'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n'
        ).encode()
    )
    _assert_408_and_closed(conn, time.monotonic())


def test_answers_and_keep_alive_are_not_timed(
    stack: Stack, gateway: str, conns: list[Conn]
) -> None:
    """An idle keep-alive connection between two requests is uvicorn's business (its 5 s
    keep-alive timeout), not this limit's."""
    conn = _open(conns, gateway)
    body = json.dumps(
        {
            "model": "lovelace:llama-3.2-3b-instruct",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1,
        }
    ).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
        f"Authorization: Bearer {stack.api_key}\r\nContent-Type: application/json\r\n"
    )
    conn.send(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert conn.response()[0] == 200
    time.sleep(TIMEOUT_S + 0.3)  # idle, under uvicorn's 5 s keep-alive
    conn.send(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert conn.response()[0] == 200
    conn.close()


def test_a_stream_outlasting_the_limit_is_not_cut(
    scripted: Stack,  # noqa: F811  (the fixture imported above)
    gateway: str,
) -> None:
    # The scripted upstream sends a chunk every 50 ms: read for well past the limit.
    events = 0
    with httpx.stream(
        "POST",
        gateway + "/v1/chat/completions",
        json={
            "model": upstream_model("slow-stream"),
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
        },
        headers={"Authorization": f"Bearer {scripted.api_key}"},
        timeout=10,
    ) as resp:
        assert resp.status_code == 200
        until = time.monotonic() + TIMEOUT_S * 3
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                assert '"error"' not in line
                events += 1
            if time.monotonic() > until:
                break
    assert events >= TIMEOUT_S * 3 / 0.05 * 0.5


def test_the_tunnel_outlives_the_limit(
    stack: Stack, gateway: str, runtimes: RuntimeFactory
) -> None:
    """The daemon's WebSocket is no request waiting to arrive: held for several limits, it is
    still the same tunnel, and dispatches through it succeed."""
    runtime = runtimes.pair(stack, name="timeout-tunnel")
    runtime.start([gateway])
    try:
        holder = runtime.holder()
        time.sleep(TIMEOUT_S * 4)
        assert runtime.holder() == holder
        with openai.OpenAI(base_url=gateway + "/v1", api_key=runtime.key) as client:
            reply = client.chat.completions.create(
                model=runtime.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        assert reply.choices[0].message.content
        assert runtime.output().count("tunnel open") == 1
    finally:
        runtime.stop()
