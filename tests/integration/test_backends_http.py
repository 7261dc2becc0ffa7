"""The HTTP backends against real loopback servers: detection, failures (unreachable,
timeouts, 4xx passed through, 5xx, wrong content), SSE quirks, the per-task HTTP mapping,
composition and :func:`build_backends`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web

from daemon.backends import (
    BackendError,
    BackendRejected,
    BackendSpec,
    BackendTimeout,
    BackendUnavailable,
    BadBackendReply,
    CompositeBackend,
    HttpTaskBackend,
    OpenAICompatBackend,
    SimBackend,
    StreamingNotSupported,
    UnsupportedTask,
    build_backends,
    detect,
)
from daemon.backends.http_client import HttpTimeouts
from daemon.backends.mapping import ModelMap
from daemon.sim.app import SimConfig
from daemon.sim.engine import SimModel
from daemon.sim.server import SimThread
from gateway.redis_server import free_port

LLAMA = "lovelace:llama-3.2-3b-instruct"
CHAT_BODY = json.dumps(
    {"model": "x", "messages": [{"role": "user", "content": "hi"}], "seed": 1}
).encode()
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Scripted:
    """A tiny aiohttp server on loopback whose routes each test sets."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.seen: list[tuple[str, bytes, dict[str, str]]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append((request.path, body, dict(request.headers)))
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            return web.json_response({"error": {"message": "no route"}}, status=404)
        return await handler(request)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    server = Scripted()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
def sim_server() -> Iterator[SimThread]:
    with SimThread(SimConfig(), port=free_port()) as server:
        yield server


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def models_route(*ids: str) -> Handler:
    async def handler(_: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": [{"id": i} for i in ids]})

    return handler


def fixed(status: int, body: bytes, content_type: str = "application/json") -> Handler:
    async def handler(_: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, content_type=content_type)

    return handler


def sse_route(*writes: bytes, stall: float = 0.0) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for data in writes:
            await resp.write(data)
            await asyncio.sleep(0.005)
        if stall:
            await asyncio.sleep(stall)
        await resp.write_eof()
        return resp

    return handler


def openai_at(server: Scripted, **kwargs: Any) -> OpenAICompatBackend:
    kwargs.setdefault("model_map", ModelMap.from_pairs([f"{LLAMA}=local-llama"]))
    return OpenAICompatBackend(server.url, **kwargs)


# -- detection ---------------------------------------------------------------------------------


async def test_detect_finds_openai_servers_only(sim_server: SimThread, scripted: Scripted) -> None:
    scripted.routes[("GET", "/v1/models")] = fixed(200, b"<html>not an API</html>", "text/html")
    closed = free_port()
    found = await detect(ports=(closed, port_of(sim_server.base_url), scripted.port))
    assert [(s.base_url, s.models) for s in found] == [
        (sim_server.base_url, ("llama-3.2-3b-instruct", "all-minilm-l6-v2"))
    ]


async def test_detect_is_bounded_by_its_timeout(scripted: Scripted) -> None:
    async def hang(_: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.json_response({"data": []})

    scripted.routes[("GET", "/v1/models")] = hang
    started = time.monotonic()
    assert await detect(ports=(scripted.port,), timeout=0.2) == []
    assert time.monotonic() - started < 1.0


async def test_detect_with_an_api_key() -> None:
    with SimThread(SimConfig(api_key="k")) as keyed:
        port = port_of(keyed.base_url)
        assert await detect(ports=(port,)) == []  # 401 is not a model list
        assert [s.models for s in await detect(ports=(port,), api_key="k")] == [
            ("llama-3.2-3b-instruct", "all-minilm-l6-v2")
        ]
        backend = OpenAICompatBackend(keyed.base_url, api_key="k")
        try:
            adv = await backend.describe()
            assert adv.models == () and adv.default_model == "llama-3.2-3b-instruct"
            reply = await backend.call("chat-completion", "llama-3.2-3b-instruct", CHAT_BODY)
            assert reply.status == 200  # the local-only default, by its local name
        finally:
            await backend.aclose()


# -- the OpenAI-compatible backend: what it sends, how it fails ---------------------------------


async def test_request_rewriting(scripted: Scripted) -> None:
    scripted.routes[("GET", "/v1/models")] = models_route("local-llama")
    scripted.routes[("POST", "/v1/chat/completions")] = fixed(200, b'{"ok":true}')
    scripted.routes[("POST", "/v1/embeddings")] = fixed(200, b'{"ok":true}')
    backend = openai_at(scripted, api_key="secret")
    try:
        adv = await backend.describe()
        assert adv.models == (LLAMA,) and adv.default_model == LLAMA
        body = json.dumps(
            {"model": LLAMA, "messages": [], "stream": True, "stream_options": {"x": 1}}
        ).encode()
        assert (await backend.call("chat-completion", LLAMA, body)).body == b'{"ok":true}'
        path, sent, headers = scripted.seen[-1]
        assert path == "/v1/chat/completions"
        assert json.loads(sent) == {"model": "local-llama", "messages": []}
        assert headers["Authorization"] == "Bearer secret"
        await backend.call("embedding", LLAMA, b'{"model":"m","input":"a"}')
        assert json.loads(scripted.seen[-1][1]) == {"model": "local-llama", "input": "a"}
        with pytest.raises(BackendRejected) as info:
            await backend.call("chat-completion", LLAMA, b"[1]")
        assert info.value.status == 400
    finally:
        await backend.aclose()


async def test_stream_asks_for_a_stream_and_parses_quirky_sse(scripted: Scripted) -> None:
    scripted.routes[("POST", "/v1/completions")] = sse_route(
        b": ping\r\n\r\n",
        b'data: {"a":',
        b'1}\r\n\r\ndata: {"b":\r\ndata: 2}\r',
        b"\n\r\nevent: x\ndata: [DONE]\n\n",
        b'data: {"after": "done"}\n\n',
    )
    backend = openai_at(scripted)
    try:
        got = [p async for p in backend.stream("text-completion", LLAMA, b'{"prompt":"p"}')]
        assert got == [b'{"a":1}', b'{"b":\n2}']
        assert json.loads(scripted.seen[-1][1]) == {
            "prompt": "p",
            "model": "local-llama",
            "stream": True,
        }
        assert scripted.seen[-1][2]["Accept"] == "text/event-stream"
    finally:
        await backend.aclose()


async def test_unreachable(scripted: Scripted) -> None:
    backend = OpenAICompatBackend(f"http://127.0.0.1:{free_port()}", model_map=ModelMap({"x": "x"}))
    try:
        for attempt in (
            backend.describe(),
            backend.call("chat-completion", "lovelace:x", CHAT_BODY),
            anext(backend.stream("chat-completion", "lovelace:x", CHAT_BODY)),
        ):
            with pytest.raises(BackendUnavailable) as info:
                await attempt
            assert (info.value.status, info.value.code) == (502, "backend_unavailable")
    finally:
        await backend.aclose()


async def test_timeouts(scripted: Scripted) -> None:
    async def slow(_: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2)
        return web.json_response({})

    scripted.routes[("POST", "/v1/chat/completions")] = slow
    scripted.routes[("POST", "/v1/completions")] = sse_route(b'data: {"a":1}\n\n', stall=2)
    backend = openai_at(scripted, timeouts=HttpTimeouts(request_s=0.2))
    try:
        with pytest.raises(BackendTimeout) as info:
            await backend.call("chat-completion", LLAMA, CHAT_BODY)
        assert (info.value.status, info.value.code) == (504, "backend_timeout")
        stream = backend.stream("text-completion", LLAMA, b"{}")
        assert await anext(stream) == b'{"a":1}'
        with pytest.raises(BackendTimeout):
            await anext(stream)  # silent for longer than the timeout mid-stream
    finally:
        await backend.aclose()


async def test_status_mapping(scripted: Scripted) -> None:
    envelope = (
        b'{"error":{"message":"too many","type":"rate_limit_error","param":null,"code":"rl"}}'
    )
    backend = openai_at(scripted)
    cases: list[tuple[Handler, type[BackendError], int, str]] = [
        (fixed(429, envelope), BackendRejected, 429, "rl"),
        (fixed(422, b"prompt too long", "text/plain"), BackendRejected, 422, "backend_rejected"),
        (fixed(500, b'{"error":{"message":"oom"}}'), BackendError, 502, "backend_error"),
        (fixed(503, b"loading"), BackendError, 502, "backend_error"),
        (fixed(200, b"<html>", "text/html"), BadBackendReply, 502, "bad_backend_reply"),
    ]
    try:
        for handler, kind, status, code in cases:
            scripted.routes[("POST", "/v1/chat/completions")] = handler
            for attempt in (
                backend.call("chat-completion", LLAMA, CHAT_BODY),
                anext(backend.stream("chat-completion", LLAMA, CHAT_BODY)),
            ):
                with pytest.raises(kind) as info:
                    await attempt
                assert (info.value.status, info.value.code) == (status, code)
            if status == 429:
                assert info.value.body == envelope  # passed through byte for byte
    finally:
        await backend.aclose()


async def test_closing_a_stream_stops_the_server(sim_server: SimThread) -> None:
    backend = OpenAICompatBackend(sim_server.base_url, default_model="llama-3.2-3b-instruct")
    await backend.describe()
    stats = sim_server.app.stats
    before = stats.streams_cancelled
    body = json.dumps(
        {
            "model": "x",
            "messages": [{"role": "user", "content": "long"}],
            "ignore_eos": True,
            "max_tokens": 2000,
            "sim_token_delay_ms": 5,
        }
    ).encode()
    try:
        stream = backend.stream("chat-completion", "llama-3.2-3b-instruct", body)
        await anext(stream)
        await anext(stream)
        await stream.aclose()
        deadline = time.monotonic() + 2
        while stats.streams_cancelled == before and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert stats.streams_cancelled == before + 1
    finally:
        await backend.aclose()


# -- the per-task HTTP mapping -----------------------------------------------------------------


async def test_http_task(scripted: Scripted) -> None:
    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return web.json_response({"created": 1, "data": [{"b64_json": "AAAA"}], "got": body})

    scripted.routes[("POST", "/generate")] = generate
    scripted.routes[("POST", "/bad")] = fixed(400, b'{"error":{"message":"no prompt"}}')
    backend = HttpTaskBackend(
        {"image-generation": scripted.url + "/generate", "broken": scripted.url + "/bad"},
        model_map=ModelMap.from_pairs(["lovelace:sdxl-turbo=sdxl-turbo"]),
    )
    try:
        adv = await backend.describe()
        assert adv.task_classes == ("image-generation", "broken")
        assert adv.models == ("lovelace:sdxl-turbo",) and adv.default_model is None
        body = json.dumps({"model": "lovelace:sdxl-turbo", "prompt": "a cat"}).encode()
        reply = await backend.call("image-generation", "lovelace:sdxl-turbo", body)
        assert reply.status == 200
        assert json.loads(reply.body)["got"] == {"model": "sdxl-turbo", "prompt": "a cat"}
        raw = b'{"prompt": "no model field"}'
        await backend.call("image-generation", "lovelace:sdxl-turbo", raw)
        assert scripted.seen[-1][1] == raw  # sent as the gateway validated it
        with pytest.raises(BackendRejected) as info:
            await backend.call("broken", "lovelace:sdxl-turbo", b"{}")
        assert info.value.status == 400
        with pytest.raises(StreamingNotSupported):
            await anext(backend.stream("image-generation", "lovelace:sdxl-turbo", body))
        with pytest.raises(UnsupportedTask):
            await backend.call("audio-transcription", "lovelace:sdxl-turbo", body)
    finally:
        await backend.aclose()
    with pytest.raises(ValueError):
        HttpTaskBackend({"x": "file:///etc/passwd"})


# -- composition and building ------------------------------------------------------------------


async def test_composite_routes_by_task_and_model(
    sim_server: SimThread, scripted: Scripted
) -> None:
    scripted.routes[("POST", "/generate")] = fixed(200, b'{"image":true}')
    other = SimBackend(models=(SimModel("qwen-2.5-0.5b"),), default_model="qwen-2.5-0.5b")
    composite = CompositeBackend(
        [
            OpenAICompatBackend(
                sim_server.base_url,
                model_map=ModelMap({"llama-3.2-3b-instruct": "llama-3.2-3b-instruct"}),
            ),
            other,
            HttpTaskBackend({"image-generation": scripted.url + "/generate"}),
            OpenAICompatBackend(f"http://127.0.0.1:{free_port()}"),  # down: left out
        ],
        concurrency=32,
    )
    try:
        adv = await composite.describe()
        assert adv.task_classes == (
            "chat-completion",
            "text-completion",
            "embedding",
            "image-generation",
        )
        assert adv.models == (LLAMA, "lovelace:qwen-2.5-0.5b")
        assert adv.default_model == LLAMA and adv.concurrency == 32
        a = json.loads((await composite.call("chat-completion", LLAMA, CHAT_BODY)).body)
        b = json.loads(
            (await composite.call("chat-completion", "lovelace:qwen-2.5-0.5b", CHAT_BODY)).body
        )
        assert (a["model"], b["model"]) == ("llama-3.2-3b-instruct", "qwen-2.5-0.5b")
        image = await composite.call("image-generation", "lovelace:any", b"{}")
        assert image.body == b'{"image":true}'
        chunks = [p async for p in composite.stream("chat-completion", LLAMA, CHAT_BODY)]
        assert len(chunks) > 2
        with pytest.raises(UnsupportedTask):
            await composite.call("audio-transcription", LLAMA, b"{}")
    finally:
        await composite.aclose()


async def test_build_backends(sim_server: SimThread, scripted: Scripted) -> None:
    sim_port = port_of(sim_server.base_url)
    closed = free_port()
    pairs = ("llama-3.2-3b-instruct=llama-3.2-3b-instruct",)
    # auto: the detected local server...
    built = await build_backends(BackendSpec(detect_ports=(closed, sim_port), model_map=pairs))
    try:
        assert [type(b) for b in built.backends] == [OpenAICompatBackend]
        assert (await built.describe()).models == (LLAMA,)
    finally:
        await built.aclose()
    # ...else the simulator, with the per-task endpoints next to it.
    spec = BackendSpec(
        detect_ports=(closed,),
        task_urls={"image-generation": scripted.url + "/generate"},
        concurrency=8,
        sim_token_delay_ms=1,
    )
    built = await build_backends(spec)
    try:
        assert [type(b) for b in built.backends] == [SimBackend, HttpTaskBackend]
        adv = await built.describe()
        assert "image-generation" in adv.task_classes and adv.concurrency == 8
    finally:
        await built.aclose()
    # openai: a given URL, or a detected one, or an error.
    built = await build_backends(BackendSpec(kind="openai", base_url=sim_server.base_url))
    assert [type(b) for b in built.backends] == [OpenAICompatBackend]
    await built.aclose()
    with pytest.raises(BackendUnavailable):
        await build_backends(BackendSpec(kind="openai", detect_ports=(closed,)))
    built = await build_backends(BackendSpec(kind="sim", detect_ports=(sim_port,)))
    assert [type(b) for b in built.backends] == [SimBackend]
    await built.aclose()
    with pytest.raises(ValueError):
        await build_backends(BackendSpec(kind="sim", model_map=("bad",)))
