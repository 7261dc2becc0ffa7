"""HTTP/1.1 on the dispatch routes, over raw sockets: the front door (gateway 0, ``lattice
serve``'s default protocol) and plain uvicorn + ASGI (gateway 1, ``--http httptools``) must
answer byte-for-byte alike in what matters — keep-alive, pipelining, ``Expect:
100-continue``, chunked request bodies, HTTP/1.0, ``connection: close``, body limits."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import Stack

GATEWAYS = pytest.mark.parametrize("gateway", [0, 1], ids=["front-door", "asgi"])
BODY = json.dumps(
    {"model": "lovelace:llama-3.2-3b-instruct", "messages": [{"role": "user", "content": "hi"}]}
).encode()


class Conn:
    """One raw keep-alive connection that reads whole HTTP/1.1 responses."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("closed")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("closed")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status = int(self._line().split(b" ")[1])
        headers: dict[str, str] = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = self._exact(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            parts = []
            while size := int(self._line(), 16):
                parts.append(self._exact(size))
                self._exact(2)
            self._exact(2)
            body = b"".join(parts)
        else:
            body = b""
        return status, headers, body

    def closed_by_peer(self) -> bool:
        self.sock.settimeout(5)
        try:
            return self.sock.recv(1) == b"" and not self.buf
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def conn_to(stack: Stack) -> Iterator[object]:
    opened: list[Conn] = []

    def open_(gateway: int) -> Conn:
        opened.append(Conn(stack.gateways[gateway]))
        return opened[-1]

    yield open_
    for c in opened:
        c.close()


def request(stack: Stack, body: bytes = BODY, *, extra: str = "", version: str = "1.1") -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/{version}\r\nHost: gw\r\n"
        f"Authorization: Bearer {stack.api_key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def chunked_request(stack: Stack, body: bytes, chunk: int) -> bytes:
    """A chat request whose body is sent with chunked transfer encoding, ``chunk`` bytes a
    chunk."""
    parts = (body[i : i + chunk] for i in range(0, len(body), chunk))
    return (
        (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
            f"Authorization: Bearer {stack.api_key}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        ).encode()
        + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
        + b"0\r\n\r\n"
    )


@GATEWAYS
def test_keep_alive_serves_many_requests_on_one_connection(
    stack: Stack, conn_to: object, gateway: int
) -> None:
    conn = conn_to(gateway)  # type: ignore[operator]
    ids = set()
    for _ in range(5):
        conn.send(request(stack))
        status, headers, body = conn.response()
        assert status == 200, body
        assert json.loads(body)["object"] == "chat.completion"
        assert headers["content-type"] == "application/json"
        assert "connection" not in headers
        ids.add(headers["x-request-id"])
    assert len(ids) == 5


@GATEWAYS
def test_pipelined_requests_are_answered_in_order(
    stack: Stack, conn_to: object, gateway: int
) -> None:
    conn = conn_to(gateway)  # type: ignore[operator]
    conn.send(
        request(stack, extra="X-Request-Id: first\r\n")
        + request(stack, extra="X-Request-Id: second\r\n")
    )
    first = conn.response()
    second = conn.response()
    assert (first[0], second[0]) == (200, 200)
    assert (first[1]["x-request-id"], second[1]["x-request-id"]) == ("first", "second")


@GATEWAYS
def test_expect_100_continue(stack: Stack, conn_to: object, gateway: int) -> None:
    conn = conn_to(gateway)  # type: ignore[operator]
    whole = request(stack, extra="Expect: 100-continue\r\n")
    head, body = whole.split(b"\r\n\r\n", 1)
    conn.send(head + b"\r\n\r\n")
    status, _, _ = conn.response()
    assert status == 100
    conn.send(body)
    status, _, payload = conn.response()
    assert status == 200, payload


@GATEWAYS
def test_chunked_request_body(stack: Stack, conn_to: object, gateway: int) -> None:
    conn = conn_to(gateway)  # type: ignore[operator]
    conn.send(chunked_request(stack, BODY, len(BODY) // 2))
    status, _, payload = conn.response()
    assert status == 200, payload


@GATEWAYS
def test_http_1_0_and_connection_close_end_the_connection(
    stack: Stack, conn_to: object, gateway: int
) -> None:
    old = conn_to(gateway)  # type: ignore[operator]
    old.send(request(stack, version="1.0"))
    status, _, payload = old.response()
    assert status == 200, payload
    assert old.closed_by_peer()
    closing = conn_to(gateway)  # type: ignore[operator]
    closing.send(request(stack, extra="Connection: close\r\n"))
    status, headers, _ = closing.response()
    assert status == 200 and headers.get("connection") == "close"
    assert closing.closed_by_peer()


@GATEWAYS
def test_body_over_the_limit_is_413_and_the_connection_survives(
    stack: Stack, conn_to: object, gateway: int
) -> None:
    conn = conn_to(gateway)  # type: ignore[operator]
    big = b'{"model":"x","messages":[],"pad":"' + b"a" * (300 * 1024) + b'"}'
    conn.send(chunked_request(stack, big, 65536))
    status, _, payload = conn.response()
    assert status == 413
    assert json.loads(payload)["error"]["code"] == "request_too_large"
    conn.send(request(stack))
    status, _, payload = conn.response()
    assert status == 200, payload


@GATEWAYS
def test_a_stream_then_a_request_on_the_same_connection(
    stack: Stack, conn_to: object, gateway: int
) -> None:
    conn = conn_to(gateway)  # type: ignore[operator]
    body = json.loads(BODY)
    body["stream"] = True
    conn.send(request(stack, json.dumps(body).encode()))
    status, headers, payload = conn.response()
    assert status == 200 and headers["content-type"] == "text/event-stream"
    assert headers["transfer-encoding"] == "chunked" and "x-request-id" in headers
    assert payload.endswith(b"data: [DONE]\n\n")
    conn.send(request(stack))
    assert conn.response()[0] == 200


@GATEWAYS
def test_other_methods_on_a_dispatch_route(stack: Stack, conn_to: object, gateway: int) -> None:
    conn = conn_to(gateway)  # type: ignore[operator]
    conn.send(b"GET /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n\r\n")
    status, _, payload = conn.response()
    assert status == 405
    assert json.loads(payload)["error"]["code"] == "method_not_allowed"
