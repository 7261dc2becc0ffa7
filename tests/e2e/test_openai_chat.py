"""Chat completions through the official SDK: default and strict clients, sync and async,
streamed and not, validated against OpenAI's own schemas."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.e2e.conftest import Stack
from tests.openapi_schemas import validate

MODEL = "lovelace:llama-3.2-3b-instruct"
MESSAGES = [{"role": "user", "content": "Tell me about lattices."}]


@pytest.mark.parametrize("strict", [False, True])
def test_chat_non_streaming(stack: Stack, strict: bool) -> None:
    with stack.client(_strict_response_validation=strict) as client:
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12)
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens <= 12
    validate("CreateChatCompletionResponse", reply.model_dump(mode="json", exclude_unset=True))


def test_chat_raw_json_matches_openai_schema(stack: Stack) -> None:
    resp = httpx.post(
        stack.base_url + "/chat/completions",
        json={"model": MODEL, "messages": MESSAGES, "n": 2, "logprobs": True, "top_logprobs": 2},
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    assert resp.status_code == 200
    validate("CreateChatCompletionResponse", resp.json())


@pytest.mark.parametrize("strict", [False, True])
async def test_chat_async(stack: Stack, strict: bool) -> None:
    async with stack.async_client(_strict_response_validation=strict) as client:
        reply = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_n_and_logprobs(stack: Stack) -> None:
    with stack.client(_strict_response_validation=True) as client:
        reply = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, n=3, logprobs=True, top_logprobs=3, max_tokens=4
        )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        assert choice.finish_reason == "length"
        assert choice.logprobs is not None and choice.logprobs.content
        first = choice.logprobs.content[0]
        assert len(first.top_logprobs) == 3
        assert bytes(first.bytes or []).decode() == first.token


def test_max_completion_tokens_and_stop(stack: Stack) -> None:
    with stack.client() as client:
        reply = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_completion_tokens=2, seed=7
        )
        assert reply.choices[0].finish_reason == "length"
        again = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_completion_tokens=2, seed=7
        )
    assert again.choices[0].message.content == reply.choices[0].message.content


def test_every_chat_field_is_accepted(stack: Stack) -> None:
    with stack.client() as client:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello"}]},
            ],
            max_tokens=8,
            temperature=0.3,
            top_p=0.9,
            n=1,
            stop=["\n\n"],
            seed=1,
            presence_penalty=0.1,
            frequency_penalty=0.1,
            logit_bias={"50256": -100},
            logprobs=False,
            response_format={"type": "text"},
            tools=[
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "object"}},
                }
            ],
            tool_choice="none",
            parallel_tool_calls=False,
            user="u-1",
            metadata={"team": "search"},
        )
    assert reply.choices


@pytest.mark.parametrize("include_usage", [False, True])
def test_streaming(stack: Stack, include_usage: bool) -> None:
    options = {"include_usage": True} if include_usage else None
    with stack.client(_strict_response_validation=True) as client:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,
            stream_options=options,  # type: ignore[arg-type]
            max_tokens=6,
        )
        chunks = list(stream)
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert content[-1].choices[0].finish_reason == "length"
    usage_chunks = [c for c in chunks if not c.choices]
    if include_usage:
        assert len(usage_chunks) == 1 and usage_chunks[0].usage is not None
        assert usage_chunks[0].usage.completion_tokens == 6
        assert chunks[-1] is usage_chunks[0]
    else:
        assert usage_chunks == []
        assert all(c.usage is None for c in chunks)
    for chunk in chunks:
        validate(
            "CreateChatCompletionStreamResponse", chunk.model_dump(mode="json", exclude_unset=True)
        )


async def test_streaming_async_n2(stack: Stack) -> None:
    async with stack.async_client() as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, n=2, max_tokens=3
        )
        indexes = set()
        async for chunk in stream:
            for choice in chunk.choices:
                indexes.add(choice.index)
    assert indexes == {0, 1}


def test_stream_wire_format_ends_with_done(stack: Stack) -> None:
    with httpx.stream(
        "POST",
        stack.base_url + "/chat/completions",
        json={"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 3},
        headers={"Authorization": f"Bearer {stack.api_key}"},
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-request-id"]
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    for line in events[:-1]:
        assert line.startswith("data: ")
        chunk = json.loads(line[6:])
        assert chunk["object"] == "chat.completion.chunk"
        assert "usage" not in chunk
        validate("CreateChatCompletionStreamResponse", chunk)


def test_with_raw_response_headers(stack: Stack) -> None:
    with stack.client() as client:
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["x-lattice-dispatch-id"].startswith("dsp_")
    assert raw.parse().choices


def test_request_id_is_echoed(stack: Stack) -> None:
    resp = httpx.get(
        stack.base_url + "/models",
        headers={"Authorization": f"Bearer {stack.api_key}", "x-request-id": "trace-123"},
    )
    assert resp.headers["x-request-id"] == "trace-123"
