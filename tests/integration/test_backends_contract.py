"""One contract, every backend: the in-process simulator (:class:`SimBackend`) and a local
OpenAI-compatible server (:class:`OpenAICompatBackend` against the real simulator over
loopback HTTP), streamed and not. Both run the same deterministic engine, so they must also
give the same answers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from daemon.backends import (
    Backend,
    BackendRejected,
    OpenAICompatBackend,
    SimBackend,
    StreamingNotSupported,
    UnsupportedModel,
    UnsupportedTask,
)
from daemon.backends.mapping import ModelMap
from daemon.sim.app import SimConfig
from daemon.sim.server import SimThread

LLAMA = "lovelace:llama-3.2-3b-instruct"
MINILM = "lovelace:all-minilm-l6-v2"
CHAT = "chat-completion"
LEGACY = "text-completion"
EMBED = "embedding"
SIM_MAP = ModelMap.from_pairs(
    ["llama-3.2-3b-instruct=llama-3.2-3b-instruct", "all-minilm-l6-v2=all-minilm-l6-v2"]
)


def chat_body(**extra: Any) -> bytes:
    body: dict[str, Any] = {
        "model": "whatever-the-gateway-sent",
        "messages": [{"role": "user", "content": "Tell me about tunnels"}],
        "seed": 7,
    }
    body.update(extra)
    return json.dumps(body).encode()


def legacy_body(**extra: Any) -> bytes:
    return json.dumps({"model": "x", "prompt": "Once upon a time", "seed": 3, **extra}).encode()


@pytest.fixture(scope="module")
def sim_server() -> Iterator[SimThread]:
    with SimThread(SimConfig()) as server:
        yield server


@pytest.fixture(params=["sim", "openai"])
async def backend(request: pytest.FixtureRequest, sim_server: SimThread) -> AsyncIterator[Backend]:
    b: Backend
    if request.param == "sim":
        b = SimBackend()
    else:
        b = OpenAICompatBackend(sim_server.base_url, model_map=SIM_MAP)
    await b.describe()
    yield b
    await b.aclose()


async def collect(backend: Backend, task: str, model: str, body: bytes) -> list[dict[str, Any]]:
    return [json.loads(p) async for p in backend.stream(task, model, body)]


def text_of(chunks: list[dict[str, Any]]) -> str:
    out = []
    for chunk in chunks:
        for choice in chunk["choices"]:
            out.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
    return "".join(out)


# -- the contract ------------------------------------------------------------------------------


async def test_describe(backend: Backend) -> None:
    adv = await backend.describe()
    assert set(adv.task_classes) == {CHAT, LEGACY, EMBED}
    assert adv.models == (LLAMA, MINILM)
    assert adv.default_model == LLAMA
    assert adv.concurrency == 256


async def test_chat(backend: Backend) -> None:
    reply = await backend.call(CHAT, LLAMA, chat_body(stream=True))  # call() never streams
    assert reply.status == 200
    data = json.loads(reply.body)
    assert data["object"] == "chat.completion"
    assert data["model"] == "llama-3.2-3b-instruct"  # the local name: the gateway re-labels
    assert data["choices"][0]["message"]["content"]
    assert data["usage"]["completion_tokens"] > 0


async def test_chat_stream(backend: Backend) -> None:
    whole = json.loads((await backend.call(CHAT, LLAMA, chat_body())).body)
    body = chat_body(stream_options={"include_usage": True})
    chunks = await collect(backend, CHAT, LLAMA, body)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert text_of(chunks) == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


async def test_text_completion(backend: Backend) -> None:
    whole = json.loads((await backend.call(LEGACY, LLAMA, legacy_body(max_tokens=12))).body)
    assert whole["object"] == "text_completion"
    chunks = await collect(backend, LEGACY, LLAMA, legacy_body(max_tokens=12))
    assert text_of(chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


async def test_embedding(backend: Backend) -> None:
    body = json.dumps({"model": "x", "input": ["a b", "c"], "dimensions": 8}).encode()
    data = json.loads((await backend.call(EMBED, MINILM, body)).body)
    assert [len(d["embedding"]) for d in data["data"]] == [8, 8]
    with pytest.raises(StreamingNotSupported) as info:
        await collect(backend, EMBED, MINILM, body)
    assert info.value.status == 400


async def test_default_model_by_its_advertised_name(backend: Backend) -> None:
    adv = await backend.describe()
    assert adv.default_model is not None
    reply = await backend.call(CHAT, adv.default_model, chat_body())
    assert reply.status == 200


async def test_refusals(backend: Backend) -> None:
    with pytest.raises(UnsupportedModel) as model:
        await backend.call(CHAT, "lovelace:unknown", chat_body())
    assert (model.value.status, model.value.code) == (404, "model_not_found")
    with pytest.raises(UnsupportedModel):
        await collect(backend, CHAT, "llama-3.2-3b-instruct", chat_body())  # local, not default
    with pytest.raises(UnsupportedTask) as task:
        await backend.call("image-generation", LLAMA, b"{}")
    assert task.value.status == 400
    # Wrong kind of model: the backend's own 400, passed through.
    with pytest.raises(BackendRejected) as kind:
        await backend.call(EMBED, LLAMA, json.dumps({"model": "x", "input": "a"}).encode())
    assert kind.value.status == 400
    assert "not an embedding model" in json.loads(kind.value.body)["error"]["message"]


async def test_invalid_body_is_the_backends_400(backend: Backend) -> None:
    for body in [chat_body(n=0), b"not json", chat_body(messages=[])]:
        with pytest.raises(BackendRejected) as info:
            await backend.call(CHAT, LLAMA, body)
        assert info.value.status == 400
        assert json.loads(info.value.body)["error"]["type"] == "invalid_request_error"
    with pytest.raises(BackendRejected) as streamed:
        await collect(backend, CHAT, LLAMA, chat_body(n=0))
    assert streamed.value.param == "n"


async def test_closing_a_stream_early(backend: Backend) -> None:
    body = chat_body(ignore_eos=True, max_tokens=500, sim_token_delay_ms=5)
    stream = backend.stream(CHAT, LLAMA, body)
    first = [await anext(stream), await anext(stream)]
    assert json.loads(first[1])["choices"][0]["delta"]["content"]
    started = time.monotonic()
    await stream.aclose()
    assert time.monotonic() - started < 0.5
    # The backend is still usable.
    assert (await backend.call(CHAT, LLAMA, chat_body())).status == 200


async def test_many_concurrent_streams(backend: Backend) -> None:
    async def one(i: int) -> str:
        return text_of(await collect(backend, CHAT, LLAMA, chat_body(seed=i % 4)))

    texts = await asyncio.gather(*(one(i) for i in range(64)))
    assert all(texts) and len(set(texts)) == 4


# -- both backends agree -----------------------------------------------------------------------


async def test_in_process_and_http_agree(sim_server: SimThread) -> None:
    sim = SimBackend()
    http = OpenAICompatBackend(sim_server.base_url, model_map=SIM_MAP)
    try:
        for task, model, body in [
            (CHAT, LLAMA, chat_body(n=2, logprobs=True, top_logprobs=2)),
            (LEGACY, LLAMA, legacy_body(echo=True, logprobs=1)),
            (EMBED, MINILM, json.dumps({"model": "x", "input": "hi"}).encode()),
        ]:
            a = json.loads((await sim.call(task, model, body)).body)
            b = json.loads((await http.call(task, model, body)).body)
            for d in (a, b):
                d.pop("id", None)
                d.pop("created", None)
            assert a == b, task
        a_chunks = await collect(sim, CHAT, LLAMA, chat_body())
        b_chunks = await collect(http, CHAT, LLAMA, chat_body())
        assert text_of(a_chunks) == text_of(b_chunks)
        assert len(a_chunks) == len(b_chunks)
    finally:
        await http.aclose()


async def test_sim_token_delay_paces_streams() -> None:
    slow = SimBackend(token_delay_ms=10)
    started = time.monotonic()
    chunks = await collect(slow, CHAT, LLAMA, chat_body(max_tokens=6))
    elapsed = time.monotonic() - started
    assert text_of(chunks)
    assert elapsed >= 0.05  # 6 decode steps, 5 of them after a 10 ms wait
    started = time.monotonic()
    await collect(slow, CHAT, LLAMA, chat_body(max_tokens=6, sim_token_delay_ms=0))
    assert time.monotonic() - started < 0.05  # a request may override it
    started = time.monotonic()
    await slow.call(CHAT, LLAMA, chat_body(max_tokens=6))
    assert time.monotonic() - started >= 0.05  # non-streamed answers take as long
