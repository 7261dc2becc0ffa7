"""The simulator over real HTTP (uvicorn on a loopback port), called with the official SDK."""

from __future__ import annotations

import array
import base64
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from daemon.sim.app import SimConfig
from daemon.sim.server import SimThread
from gateway.redis_server import free_port
from tests.openapi_schemas import validate, validate_completion_chunk

MODEL = "llama-3.2-3b-instruct"
EMBED = "all-minilm-l6-v2"
KEY = "sim-test-key"
MESSAGES: list[Any] = [{"role": "user", "content": "Tell me about tunnels"}]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimThread]:
    with SimThread(SimConfig(), port=free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def keyed() -> Iterator[SimThread]:
    with SimThread(SimConfig(api_key=KEY)) as server:
        yield server


@pytest.fixture
def client(sim: SimThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.base_url, api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture
def strict(sim: SimThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=sim.base_url, api_key="unused", max_retries=0, _strict_response_validation=True
    ) as c:
        yield c


@pytest.fixture
def http(sim: SimThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url + "/") as c:
        yield c


def sse(response: httpx.Response) -> list[Any]:
    """The JSON events of an SSE body, checking the framing and the final ``[DONE]``."""
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["cache-control"] == "no-cache"
    frames = response.text.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    assert all(f.startswith("data: ") for f in frames[:-1])
    return [json.loads(f.removeprefix("data: ")) for f in frames[:-2]]


# -- models, chat ------------------------------------------------------------------------------


def test_models_list(strict: openai.OpenAI, http: httpx.Client) -> None:
    ids = [m.id for m in strict.models.list()]
    assert ids == [MODEL, EMBED]
    raw = http.get("models")
    assert raw.headers["content-type"] == "application/json"
    validate("ListModelsResponse", raw.json())
    assert raw.json()["data"][0]["owned_by"] == "lattice-sim"


def test_chat_strict_sdk_and_schema(strict: openai.OpenAI, http: httpx.Client) -> None:
    out = strict.chat.completions.create(model=MODEL, messages=MESSAGES, seed=5)
    assert out.id.startswith("chatcmpl-") and out.model == MODEL
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content
    assert out.choices[0].finish_reason == "stop" and out.system_fingerprint
    assert out.usage is not None and out.usage.prompt_tokens == 4 + 3
    again = strict.chat.completions.create(model=MODEL, messages=MESSAGES, seed=5)
    assert again.choices[0].message.content == out.choices[0].message.content
    raw = http.post("chat/completions", json={"model": MODEL, "messages": MESSAGES, "seed": 5})
    validate("CreateChatCompletionResponse", raw.json())
    assert raw.json()["choices"][0]["message"]["content"] == out.choices[0].message.content


def test_chat_n_logprobs_and_stop(strict: openai.OpenAI) -> None:
    out = strict.chat.completions.create(
        model=MODEL, messages=MESSAGES, n=3, logprobs=True, top_logprobs=2, max_tokens=4
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    for choice in out.choices:
        assert choice.finish_reason == "length"
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert len(choice.logprobs.content) == 4
        assert all(len(e.top_logprobs) == 2 for e in choice.logprobs.content)
        assert "".join(e.token for e in choice.logprobs.content) == choice.message.content
    first = out.choices[0].message.content
    assert first is not None
    stop = first.split()[2]
    cut = strict.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, stop=[stop])
    assert cut.choices[0].message.content == first[: first.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_stream_matches_non_stream(strict: openai.OpenAI, http: httpx.Client) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "n": 2, "seed": 1}
    full = strict.chat.completions.create(**kwargs)
    texts = {0: "", 1: ""}
    finish: dict[int, str | None] = {}
    usage = None
    with strict.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    ) as stream:
        for chunk in stream:
            assert chunk.object == "chat.completion.chunk" and chunk.id.startswith("chatcmpl-")
            if not chunk.choices:
                usage = chunk.usage
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
                if choice.finish_reason:
                    finish[choice.index] = choice.finish_reason
    assert texts == {c.index: c.message.content for c in full.choices}
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert usage == full.usage
    raw = http.post(
        "chat/completions",
        json={
            **kwargs,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 1,
            "stream_options": {"include_usage": True},
        },
    )
    events = sse(raw)
    for event in events:
        validate("CreateChatCompletionStreamResponse", event)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] > 0


async def test_async_client_chat_and_stream(sim: SimThread) -> None:
    async with openai.AsyncOpenAI(
        base_url=sim.base_url, api_key="unused", max_retries=0, _strict_response_validation=True
    ) as client:
        full = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        text = ""
        async with stream:
            async for chunk in stream:
                for choice in chunk.choices:
                    text += choice.delta.content or ""
        assert text == full.choices[0].message.content
        legacy = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
        assert legacy.choices[0].finish_reason == "length"


# -- legacy completions ------------------------------------------------------------------------


def test_completions(strict: openai.OpenAI, http: httpx.Client) -> None:
    out = strict.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        echo=True,
        logprobs=2,
        max_tokens=5,
        extra_body={
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.1,
            "dry_multiplier": 0.8,
            "grammar": "root ::= x",
            "truncate_sequence": True,
        },
    )
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    choice = out.choices[0]
    assert choice.text.startswith("Once upon a time") and choice.finish_reason == "length"
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    assert "".join(choice.logprobs.tokens) == choice.text
    assert out.usage is not None and out.usage.completion_tokens == 5
    raw = http.post("completions", json={"model": MODEL, "prompt": ["a", "b"], "n": 2})
    validate("CreateCompletionResponse", raw.json())
    assert [c["index"] for c in raw.json()["choices"]] == [0, 1, 2, 3]


def test_completions_stream(client: openai.OpenAI, http: httpx.Client) -> None:
    full = client.completions.create(model=MODEL, prompt="Hi", suffix="!", max_tokens=6)
    with client.completions.create(
        model=MODEL, prompt="Hi", suffix="!", max_tokens=6, stream=True
    ) as stream:
        text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text == full.choices[0].text
    raw = http.post(
        "completions",
        json={
            "model": MODEL,
            "prompt": "Hi",
            "stream": True,
            "logprobs": 1,
            "stream_options": {"include_usage": True},
        },
    )
    events = sse(raw)
    for event in events:
        validate_completion_chunk(event)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["prompt_tokens"] == 1


# -- embeddings --------------------------------------------------------------------------------


def test_embeddings_float_and_base64(
    strict: openai.OpenAI, client: openai.OpenAI, http: httpx.Client
) -> None:
    floats = strict.embeddings.create(
        model=EMBED, input=["hello", "world"], encoding_format="float"
    )
    assert [len(d.embedding) for d in floats.data] == [384, 384]
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 2
    # The SDK's default asks for base64 and decodes it (a strict client cannot: the raw field
    # is a string where its model says list[float], against OpenAI as well).
    default = client.embeddings.create(model=EMBED, input=["hello", "world"])
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    b64 = client.embeddings.create(
        model=EMBED, input="hello", encoding_format="base64", dimensions=32
    )
    encoded = b64.data[0].embedding
    assert isinstance(encoded, str)
    assert len(array.array("f", base64.b64decode(encoded))) == 32
    raw = http.post("embeddings", json={"model": EMBED, "input": [[1, 2], [3]]})
    validate("CreateEmbeddingResponse", raw.json())
    assert raw.json()["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


# -- errors ------------------------------------------------------------------------------------


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-nope", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    validate("ErrorResponse", info.value.response.json())
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")


def test_unknown_path_is_404_envelope(http: httpx.Client) -> None:
    for response in (http.get("nothing"), http.post("responses", json={})):
        assert response.status_code == 404
        validate("ErrorResponse", response.json())
    assert http.get("chat/completions").status_code == 405


def test_bad_requests_are_400(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, n="two")  # type: ignore[call-overload]
    assert info.value.param == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages="hi")  # type: ignore[arg-type]
    for body in (b"{not json", b"[]", b'{"model": "x"}'):
        response = http.post("chat/completions", content=body)
        assert response.status_code == 400
        validate("ErrorResponse", response.json())


def test_api_key_is_enforced(keyed: SimThread) -> None:
    with openai.OpenAI(base_url=keyed.base_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
        assert info.value.code == "invalid_api_key"
        validate("ErrorResponse", info.value.response.json())
    with httpx.Client() as http:
        assert http.get(keyed.base_url + "/models").status_code == 401
    with openai.OpenAI(base_url=keyed.base_url, api_key=KEY, max_retries=0) as good:
        assert [m.id for m in good.models.list()] == [MODEL, EMBED]


# -- streaming behaviour -----------------------------------------------------------------------


def test_disconnect_mid_stream_stops_generation(sim: SimThread, client: openai.OpenAI) -> None:
    stats = sim.app.stats
    cancelled, sent = stats.streams_cancelled, stats.chunks_sent
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        max_tokens=2000,
        extra_body={"ignore_eos": True, "sim_token_delay_ms": 5},
    )
    with stream:
        for i, _ in enumerate(stream):
            if i == 3:
                break
    deadline = time.monotonic() + 5
    while stats.streams_cancelled == cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stats.streams_cancelled == cancelled + 1
    assert stats.chunks_sent - sent < 100  # far from the 2000 tokens asked for


def test_token_delay_paces_the_stream(client: openai.OpenAI) -> None:
    start = time.monotonic()
    arrivals = []
    with client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        max_tokens=5,
        extra_body={"sim_token_delay_ms": 30},
    ) as stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 5
    assert arrivals[-1] >= 0.15
    assert arrivals[-1] - arrivals[0] >= 0.1  # each token was flushed as it was produced


def test_server_wide_token_delay() -> None:
    with (
        SimThread(SimConfig(token_delay_ms=25)) as slow,
        openai.OpenAI(base_url=slow.base_url, api_key="x", max_retries=0) as c,
    ):
        start = time.monotonic()
        with c.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, max_tokens=4
        ) as stream:
            list(stream)
        assert time.monotonic() - start >= 0.1
        start = time.monotonic()
        c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
        assert time.monotonic() - start >= 0.1  # a full answer waits for its 4 decode steps


# -- the CLI -----------------------------------------------------------------------------------


def test_main_serves_and_announces() -> None:
    port = free_port()
    code = "import sys; from daemon.sim.server import main; sys.exit(main(sys.argv[1:]))"
    argv = [
        sys.executable,
        "-c",
        code,
        "--port",
        str(port),
        "--model",
        "tiny-sim",
        "--embedding-model",
        "tiny-embed",
        "--embedding-dim",
        "8",
        "--api-key",
        KEY,
    ]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == (
                f"lattice sim: simulated OpenAI-compatible backend on http://127.0.0.1:{port}/v1"
            )
            with openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0
            ) as c:
                assert [m.id for m in c.models.list()] == ["tiny-sim", "tiny-embed"]
                out = c.embeddings.create(model="tiny-embed", input="x", encoding_format="float")
                assert len(out.data[0].embedding) == 8
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 0
