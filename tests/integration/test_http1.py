"""daemon.http1 against real loopback servers that write hand-made responses."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from catalog.model import Upstream
from daemon.http1 import (
    ConnectError,
    ConnectTimeout,
    Http1Client,
    HttpClientError,
    ReadTimeout,
    RemoteProtocolError,
)
from daemon.http1.connection import Connection
from gateway.dispatch.upstream import UpstreamClient
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.redis_server import free_port

Handler = Callable[["Server", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One request (head, body), or None when the client closed the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length)
    return head, body


class Server:
    """asyncio.start_server on loopback running ``handler`` per connection; counts them."""

    def __init__(self, handler: Handler, ssl_ctx: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_ctx = ssl_ctx
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.eof = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_ctx else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)  # type: ignore[arg-type]
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self.tasks.discard(task)  # type: ignore[arg-type]

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


def keep_alive(*responses: bytes) -> Handler:
    """Answer each request on a connection with the next response, cycling."""

    async def handler(srv: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        i = 0
        while (req := await read_request(reader)) is not None:
            srv.requests.append(req)
            w.write(responses[i % len(responses)])
            await w.drain()
            i += 1
        srv.eof.set()

    return handler


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@pytest.fixture
async def client() -> Any:
    http = Http1Client()
    yield http
    await http.close()


async def test_content_length_body_and_request_format(client: Http1Client) -> None:
    async with Server(keep_alive(ok(b'{"a":1}', b"X-Thing: one\r\nx-thing: two\r\n"))) as srv:
        resp = await client.request(
            "POST", srv.url + "/v1/chat?x=1", b"hello", [(b"Content-Type", b"text/plain")]
        )
        async with resp:
            assert resp.status == 200
            assert resp.headers["content-length"] == "7"
            assert resp.headers["x-thing"] == "one, two"
            assert await resp.read() == b'{"a":1}'
    head, body = srv.requests[0]
    assert body == b"hello"
    assert head == (
        b"POST /v1/chat?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 5\r\n"
        b"Connection: keep-alive\r\nContent-Type: text/plain\r\n\r\n" % srv.port
    )


async def test_chunked_body_across_writes(client: Http1Client) -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
            await w.drain()
            await asyncio.sleep(0.01)
            w.write(b"lo\r\n6\r\n world\r\n0\r\n\r\n")
            await w.drain()

    async with Server(handler) as srv:
        for _ in range(3):
            resp = await client.request("GET", srv.url + "/")
            assert await resp.read() == b"hello world"
            resp.close()
        assert srv.connections == 1  # a chunked body read to its end leaves a reusable conn


async def test_read_until_close_body(client: Http1Client) -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await w.drain()
        await asyncio.sleep(0.01)
        w.write(b"part two")
        await w.drain()

    async with Server(handler) as srv:
        for _ in range(2):
            async with await client.request("GET", srv.url + "/") as resp:
                assert await resp.read() == b"part one, part two"
        assert srv.connections == 2
        assert client.idle_count("http", "127.0.0.1", srv.port) == 0


async def test_keep_alive_reuses_one_connection(client: Http1Client) -> None:
    async with Server(keep_alive(ok(b"pong"))) as srv:
        for _ in range(100):
            async with await client.request("POST", srv.url + "/ping", b"x") as resp:
                assert await resp.read() == b"pong"
        assert srv.connections == 1
        assert len(srv.requests) == 100
        assert client.idle_count("http", "127.0.0.1", srv.port) == 1


async def test_concurrent_requests_use_separate_connections(client: Http1Client) -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            await asyncio.sleep(0.05)
            w.write(ok(b"slow"))
            await w.drain()

    async def one() -> bytes:
        async with await client.request("GET", srv.url + "/") as resp:
            return await resp.read()

    async with Server(handler) as srv:
        assert await asyncio.gather(*(one() for _ in range(5))) == [b"slow"] * 5
        assert srv.connections == 5
        assert await asyncio.gather(*(one() for _ in range(5))) == [b"slow"] * 5
        assert srv.connections == 5  # the second wave found five idle connections


async def test_connection_close_is_honoured(client: Http1Client) -> None:
    async with Server(keep_alive(ok(b"bye", b"Connection: close\r\n"))) as srv:
        for _ in range(3):
            async with await client.request("GET", srv.url + "/") as resp:
                assert await resp.read() == b"bye"
        assert srv.connections == 3
        assert client.idle_count("http", "127.0.0.1", srv.port) == 0


async def test_idle_connection_closed_by_server_is_discarded(client: Http1Client) -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        w.write(ok(b"once"))
        await w.drain()  # then close it while it sits idle in the client's pool

    async with Server(handler) as srv:
        for _ in range(2):
            async with await client.request("GET", srv.url + "/") as resp:
                assert await resp.read() == b"once"
            await asyncio.sleep(0.05)
            assert client.idle_count("http", "127.0.0.1", srv.port) == 0
        assert srv.connections == 2


async def test_stale_reused_connection_is_retried_once(client: Http1Client) -> None:
    # the server answers the first request of each connection and drops the connection on
    # the second one without a byte, as when a keep-alive timeout races with a new request
    async def handler(srv: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await read_request(reader)
        assert req is not None
        srv.requests.append(req)
        w.write(ok(b"fresh"))
        await w.drain()
        if (req := await read_request(reader)) is not None:
            srv.requests.append(req)

    async with Server(handler) as srv:
        for _ in range(3):
            async with await client.request("POST", srv.url + "/", b"body") as resp:
                assert await resp.read() == b"fresh"
        # 1st: fresh conn; 2nd: reused conn dropped -> retried on a fresh one; 3rd likewise
        assert srv.connections == 3
        assert len(srv.requests) == 5


async def test_fresh_connection_closed_before_answer_is_not_retried(client: Http1Client) -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with Server(handler) as srv:
        with pytest.raises(RemoteProtocolError):
            await client.request("POST", srv.url + "/", b"x")
        assert srv.connections == 1


@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Len",
    ],
)
async def test_server_closing_mid_response(client: Http1Client, partial: bytes) -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        w.write(partial)
        await w.drain()

    async with Server(handler) as srv:
        with pytest.raises(RemoteProtocolError):
            async with await client.request("GET", srv.url + "/") as resp:
                await resp.read()
        assert client.idle_count("http", "127.0.0.1", srv.port) == 0


@pytest.mark.parametrize(
    "garbage",
    [b"HTTX/1.1 200 OK\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n", b"\x00\x01\x02 nonsense\r\n\r\n"],
)
async def test_malformed_status_line(client: Http1Client, garbage: bytes) -> None:
    async with Server(keep_alive(garbage)) as srv:
        with pytest.raises(RemoteProtocolError):
            await client.request("GET", srv.url + "/")


async def test_malformed_chunk_mid_body(client: Http1Client) -> None:
    bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    async with Server(keep_alive(bad)) as srv:
        with pytest.raises(RemoteProtocolError):
            async with await client.request("GET", srv.url + "/") as resp:
                await resp.read()


async def test_connect_refused(client: Http1Client) -> None:
    with pytest.raises(ConnectError) as info:
        await client.request("GET", f"http://127.0.0.1:{free_port()}/")
    assert not isinstance(info.value, TimeoutError)


async def test_connect_timeout_is_a_timeout() -> None:
    assert issubclass(ConnectTimeout, TimeoutError)
    assert issubclass(ConnectTimeout, ConnectError)
    assert issubclass(ReadTimeout, TimeoutError)
    assert issubclass(ReadTimeout, HttpClientError)


async def test_read_timeout_on_head_and_on_body(client: Http1Client) -> None:
    async def silent(srv: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    async with Server(silent) as srv:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ReadTimeout):
            await client.request("GET", srv.url + "/", timeout_read=0.2)
        assert 0.15 < loop.time() - started < 1.0
        with pytest.raises(TimeoutError):
            await client.request("GET", srv.url + "/", timeout_total=0.2)

    async def stalls(srv: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await w.drain()
        await asyncio.sleep(10)

    async with Server(stalls) as srv:
        resp = await client.request("GET", srv.url + "/", timeout_read=0.2)
        with pytest.raises(ReadTimeout):
            await resp.read()
        resp.close()
        assert client.idle_count("http", "127.0.0.1", srv.port) == 0


async def test_cancelled_request_closes_its_connection(client: Http1Client) -> None:
    async def silent(srv: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        assert await reader.read(1) == b""
        srv.eof.set()

    async with Server(silent) as srv:
        task = asyncio.create_task(client.request("GET", srv.url + "/"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(srv.eof.wait(), 1.0)


async def test_abandoned_stream_closes_the_socket_promptly(client: Http1Client) -> None:
    async def endless(srv: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        eof = asyncio.create_task(reader.read(1))
        try:
            while not eof.done():
                w.write(b"9\r\ndata: x\n\n\r\n")
                await w.drain()
                await asyncio.wait({eof}, timeout=0.01)
            assert eof.result() == b""
            srv.eof.set()
        finally:
            eof.cancel()

    async with Server(endless) as srv:
        resp = await client.request("POST", srv.url + "/stream", b"{}")
        chunks = resp.iter_chunks()
        assert b"data: x" in await anext(chunks)
        assert b"data: x" in await anext(chunks)
        resp.close()
        await asyncio.wait_for(srv.eof.wait(), 1.0)
        assert client.idle_count("http", "127.0.0.1", srv.port) == 0


async def test_flow_control_bounds_memory() -> None:
    total = 10 * 1024 * 1024
    limit = 256 * 1024
    finished = asyncio.Event()

    async def firehose(srv: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"x" * 65536
        for _ in range(total // len(block)):
            w.write(block)
            await w.drain()
        finished.set()
        await read_request(reader)

    client = Http1Client(buffer_limit=limit)
    try:
        async with Server(firehose) as srv:
            resp = await client.request("GET", srv.url + "/big")
            conn = resp._conn
            assert isinstance(conn, Connection)
            await asyncio.sleep(0.3)  # a consumer that does not read
            assert conn._paused
            assert not finished.is_set()  # the server is blocked by TCP back-pressure
            # one read of the transport can land on top of the limit, never more
            assert limit < conn._buffered <= limit + 512 * 1024
            received = 0
            async for chunk in resp.iter_chunks():
                received += len(chunk)
                assert conn._buffered <= limit + 512 * 1024
            assert received == total
            assert finished.is_set()
            assert not conn._paused
            assert client.idle_count("http", "127.0.0.1", srv.port) == 1
    finally:
        await client.close()


async def test_iter_lines(client: Http1Client) -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"li", b"ne 1\r\nline", b" 2\n\nline 3\r", b"\nlast"):
            w.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await w.drain()
            await asyncio.sleep(0.005)
        w.write(b"0\r\n\r\n")
        await w.drain()
        await read_request(reader)

    async with Server(handler) as srv:
        async with await client.request("GET", srv.url + "/") as resp:
            lines = [line async for line in resp.iter_lines()]
        assert lines == [b"line 1", b"line 2", b"", b"line 3", b"last"]


async def test_informational_response_is_skipped(client: Http1Client) -> None:
    answer = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok(b"final")
    async with Server(keep_alive(answer)) as srv:
        for _ in range(2):
            async with await client.request("GET", srv.url + "/") as resp:
                assert resp.status == 200
                assert "link" not in resp.headers
                assert await resp.read() == b"final"
        assert srv.connections == 1


async def test_head_request(client: Http1Client) -> None:
    async with Server(keep_alive(b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n")) as srv:
        resp = await client.request("HEAD", srv.url + "/")
        async with resp:
            assert resp.status == 200
            assert resp.headers["content-length"] == "42"
            assert await resp.read() == b""


async def test_header_injection_rejected(client: Http1Client) -> None:
    with pytest.raises(ValueError):
        await client.request("GET", "http://127.0.0.1:1/", headers={"X": "a\r\nEvil: 1"})


# -- TLS ---------------------------------------------------------------------------------


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_https(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))

    client = Http1Client(ssl_context=trusting)
    default = Http1Client()
    try:
        async with Server(keep_alive(ok(b"secret")), ssl_ctx=server_ctx) as srv:
            for _ in range(3):
                async with await client.request("POST", srv.url + "/v1", b"{}") as resp:
                    assert await resp.read() == b"secret"
            assert srv.connections == 1
            assert client.idle_count("https", "127.0.0.1", srv.port) == 1
            head = srv.requests[0][0]
            assert b"Host: 127.0.0.1:%d\r\n" % srv.port in head
            # the default context verifies certificates: a self-signed one is refused
            with pytest.raises(ConnectError):
                await default.request("GET", srv.url + "/")
            assert default._ssl().verify_mode == ssl.CERT_REQUIRED
            assert default._ssl().check_hostname
    finally:
        await client.close()
        await default.close()


# -- UpstreamClient over http1 -------------------------------------------------------------


def _upstream(url: str, **extra: Any) -> Upstream:
    return Upstream(base_url=url + "/v1", api_key="k", timeout_s=1.0, **extra)


async def test_upstream_client_sse_and_errors() -> None:
    events = (
        b': comment\n\ndata: {"a":1}\n\nevent: x\ndata: line1\ndata:line2\r\n\r\ndata: [DONE]\n\n'
    )

    async def handler(srv: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            srv.requests.append(req)
            if b"/v1/teapot" in req[0]:
                w.write(ok(b'{"error":{"message":"no tea"}}').replace(b"200 OK", b"500 Err"))
            elif b"Accept: text/event-stream" in req[0]:
                w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                w.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(events), events))
            else:
                w.write(ok(b'{"ok":true}'))
            await w.drain()

    upstreams = UpstreamClient()
    try:
        async with Server(handler) as srv:
            up = _upstream(srv.url)
            resp = await upstreams.post(up, "/chat/completions", b"{}")
            assert (resp.status, resp.body) == (200, b'{"ok":true}')
            assert b"Authorization: Bearer k\r\n" in srv.requests[0][0]
            payloads = [p async for p in upstreams.stream(up, "/chat/completions", b"{}")]
            assert payloads == [b'{"a":1}', b"line1\nline2"]
            with pytest.raises(UpstreamError) as info:
                await upstreams.post(up, "/teapot", b"{}")
            assert info.value.code == "upstream_error"
            assert srv.connections == 1
        with pytest.raises(UpstreamError) as info:
            await upstreams.post(_upstream(f"http://127.0.0.1:{free_port()}"), "/x", b"{}")
        assert info.value.code == "upstream_unreachable"
    finally:
        await upstreams.close()


async def test_upstream_client_timeout() -> None:
    async def silent(srv: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    upstreams = UpstreamClient()
    try:
        async with Server(silent) as srv:
            up = Upstream(base_url=srv.url, timeout_s=0.2)
            with pytest.raises(UpstreamTimeout):
                await upstreams.post(up, "/x", b"{}")
            gen = upstreams.stream(up, "/x", b"{}")
            with pytest.raises(UpstreamTimeout):
                await anext(gen)
            await gen.aclose()
    finally:
        await upstreams.close()


# -- the same scenarios on uvloop (the production loop) ----------------------------------


def test_scenarios_under_uvloop(tmp_path: Path) -> None:
    with_client: list[Callable[[Http1Client], Awaitable[None]]] = [
        test_content_length_body_and_request_format,
        test_chunked_body_across_writes,
        test_read_until_close_body,
        test_keep_alive_reuses_one_connection,
        test_concurrent_requests_use_separate_connections,
        test_connection_close_is_honoured,
        test_idle_connection_closed_by_server_is_discarded,
        test_stale_reused_connection_is_retried_once,
        test_fresh_connection_closed_before_answer_is_not_retried,
        test_malformed_chunk_mid_body,
        test_connect_refused,
        test_read_timeout_on_head_and_on_body,
        test_cancelled_request_closes_its_connection,
        test_abandoned_stream_closes_the_socket_promptly,
        test_iter_lines,
        test_informational_response_is_skipped,
        test_head_request,
    ]

    async def main() -> None:
        for scenario in with_client:
            client = Http1Client()
            try:
                await scenario(client)
            finally:
                await client.close()
        client = Http1Client()
        try:
            await test_server_closing_mid_response(
                client, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab"
            )
            await test_malformed_status_line(client, b"HTTX/1.1 200 OK\r\n\r\n")
        finally:
            await client.close()
        await test_flow_control_bounds_memory()
        await test_https(tmp_path)
        await test_upstream_client_sse_and_errors()
        await test_upstream_client_timeout()

    errors: list[BaseException] = []

    def run() -> None:
        try:
            uvloop.run(main())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert not thread.is_alive()
    if errors:
        raise errors[0]
