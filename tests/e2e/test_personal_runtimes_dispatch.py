"""Dispatch to personal runtimes with real parts: ``lattice serve`` processes on one Redis,
real ``lattice daemon run`` processes (the in-process simulator backend), the official
``openai`` SDK as the client.

The module's runtime (``online``) is served by a daemon connected to the stack's SECOND
gateway; requests reach either process. ``offline`` is a runtime of another workspace whose
daemon connected once (so it advertised what it serves) and was stopped.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.e2e.conftest import PERSONAL_PREFIX, PairedRuntime, RuntimeFactory, Stack
from tests.openapi_schemas import validate, validate_completion_chunk

LLAMA = "lovelace:llama-3.2-3b-instruct"
MESSAGES: Any = [{"role": "user", "content": "Tell me about lattices."}]


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json", exclude_unset=True)


@pytest.fixture(scope="module")
def online(stack: Stack, runtimes: RuntimeFactory) -> Iterator[PairedRuntime]:
    runtime = runtimes.pair(stack, name="e2e-online")
    runtime.start([stack.gateways[1]])
    yield runtime
    runtime.stop()


@pytest.fixture(scope="module")
def offline(stack: Stack, runtimes: RuntimeFactory) -> PairedRuntime:
    runtime = runtimes.pair(stack, name="e2e-offline", gateway=0)
    runtime.start([stack.gateways[1]])
    assert runtime.stop() == 0  # SIGTERM: drained, clean exit
    runtime.wait_status("offline")
    return runtime


def _ghost_like(runtime_id: str) -> str:
    """An id of the same shape as ``runtime_id`` that no runtime has."""
    body = runtime_id.removeprefix("lat_")
    return "lat_" + secrets.token_hex(len(body))[: len(body)]


# -- 1. the official SDK, model="lattice:personal:lat_…" ------------------------------------


def test_openai_sdk_runs_on_the_personal_runtime(stack: Stack, online: PairedRuntime) -> None:
    with online.client(gateway=1, _strict_response_validation=True) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=online.model, messages=MESSAGES, max_tokens=8
        )
        reply = raw.parse()
        assert raw.headers["x-lattice-dispatch-id"].startswith("dsp_")
        assert reply.model == online.model and reply.object == "chat.completion"
        assert reply.choices[0].message.content
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
        validate("CreateChatCompletionResponse", _dump(reply))

        chunks = list(
            client.chat.completions.create(
                model=online.model,
                messages=MESSAGES,
                max_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        content = [c for c in chunks if c.choices]
        assert content[0].choices[0].delta.role == "assistant"
        assert content[-1].choices[0].finish_reason == "length"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
        for chunk in chunks:
            assert chunk.model == online.model
            validate("CreateChatCompletionStreamResponse", _dump(chunk))

        completion = client.completions.create(model=online.model, prompt="Once", max_tokens=4)
        assert completion.model == online.model and completion.choices[0].text
        validate("CreateCompletionResponse", _dump(completion))

        vectors = client.embeddings.create(
            model=online.model, input=["one", "two"], encoding_format="float"
        )
        assert vectors.model == online.model
        assert [d.index for d in vectors.data] == [0, 1] and len(vectors.data[0].embedding) == 384
        validate("CreateEmbeddingResponse", _dump(vectors))

    # Legacy streams: default client (the SDK's Completion type rejects finish_reason null).
    with online.client(gateway=1) as client:
        legacy = list(
            client.completions.create(model=online.model, prompt="x", max_tokens=3, stream=True)
        )
    assert "".join(c.choices[0].text for c in legacy if c.choices)
    for piece in legacy:
        assert piece.model == online.model
        validate_completion_chunk(_dump(piece))


# -- 2. daemon on the second process, requests to the first ----------------------------------


async def test_requests_to_the_other_process_are_relayed(
    stack: Stack, online: PairedRuntime
) -> None:
    assert online.holder() is not None  # held by gateway 1: the daemon knows no other URL
    with online.client(gateway=0, _strict_response_validation=True) as client:
        reply = client.chat.completions.create(model=online.model, messages=MESSAGES)
        assert reply.model == online.model and reply.choices[0].message.content
        chunks = list(
            client.chat.completions.create(
                model=online.model, messages=MESSAGES, max_tokens=40, stream=True
            )
        )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].choices[0].finish_reason in ("stop", "length")
    # Many concurrent streams over the one tunnel, through the other process.
    async with online.async_client(gateway=0) as aclient:

        async def one(i: int) -> int:
            stream = await aclient.chat.completions.create(
                model=online.model, messages=MESSAGES, max_tokens=5 + i % 3, stream=True
            )
            return len([c async for c in stream if c.choices and c.choices[0].delta.content])

        counts = await asyncio.gather(*(one(i) for i in range(16)))
    assert all(count > 0 for count in counts)


# -- 3. canonical models: the workspace's runtime first, hosted when it is offline -----------


def test_canonical_model_prefers_the_online_runtime(
    stack: Stack, online: PairedRuntime, offline: PairedRuntime
) -> None:
    with online.client(gateway=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=LLAMA, messages=MESSAGES, max_tokens=4
        )
        streamed = client.chat.completions.with_raw_response.create(
            model=LLAMA, messages=MESSAGES, max_tokens=4, stream=True
        )
        chunks = list(streamed.parse())
    assert raw.parse().model == LLAMA and all(c.model == LLAMA for c in chunks)
    for resp in (raw, streamed):
        [record] = stack.usage_records(resp.headers["x-lattice-dispatch-id"])
        # The usage record names the offering that served it: the runtime's own.
        assert record.offering == f"runtime:{online.id}" == record.provider
        assert record.workspace == online.workspace and record.model == LLAMA

    # The other workspace's only runtime is offline: hosted capacity serves the model...
    with offline.client(gateway=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=LLAMA, messages=MESSAGES, max_tokens=4
        )
        assert raw.parse().model == LLAMA
        [record] = stack.usage_records(raw.headers["x-lattice-dispatch-id"])
        assert not record.offering.startswith("runtime:") and record.provider != record.offering
        # ...but a request aimed at the runtime never falls back to it.
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as err:
                client.chat.completions.create(
                    model=offline.model, messages=MESSAGES, stream=stream
                )
            assert err.value.status_code == 503
            assert err.value.code == "personal_lattice_relay_unavailable"


# -- 4. unknown and foreign runtimes: one answer ---------------------------------------------


def test_unknown_and_foreign_runtimes_are_the_same_404(
    stack: Stack, online: PairedRuntime, offline: PairedRuntime
) -> None:
    ghost = _ghost_like(online.id)
    assert len(ghost) == len(online.id)
    for gateway in (0, 1):
        with offline.client(gateway=gateway) as client:  # another workspace's key
            for stream in (False, True):
                answers = []
                for runtime_id in (online.id, ghost):
                    started = time.monotonic()
                    with pytest.raises(openai.NotFoundError) as err:
                        client.chat.completions.create(
                            model=PERSONAL_PREFIX + runtime_id, messages=MESSAGES, stream=stream
                        )
                    assert time.monotonic() - started < 1.0
                    assert err.value.code == "personal_lattice_not_found"
                    assert err.value.status_code == 404
                    answers.append(err.value.response.content)
                foreign, unknown = answers
                assert b"req_" not in foreign  # no request id in the body to tell them apart
                assert foreign == unknown.replace(ghost.encode(), online.id.encode())
                assert online.id.encode() in foreign


# -- 5. offline: 503 at once -------------------------------------------------------------------


def test_offline_runtime_is_503_at_once(stack: Stack, offline: PairedRuntime) -> None:
    assert offline.status() == "offline"
    for gateway in (0, 1):
        with offline.client(gateway=gateway) as client:
            for stream in (False, True):
                started = time.monotonic()
                with pytest.raises(openai.APIStatusError) as err:
                    client.chat.completions.create(
                        model=offline.model, messages=MESSAGES, stream=stream
                    )
                elapsed = time.monotonic() - started
                assert err.value.status_code == 503, err.value.response.text
                assert err.value.code == "personal_lattice_relay_unavailable"
                # At once (a lookup of the presence key), not at a timeout.
                assert elapsed < 0.75, f"answered after {elapsed:.2f} s, not at once"


# -- 10. two workspaces ------------------------------------------------------------------------


def test_workspaces_cannot_use_list_see_or_revoke_each_others_runtimes(
    stack: Stack, online: PairedRuntime, offline: PairedRuntime
) -> None:
    pairs = ((online, offline), (offline, online))
    for owner, other in pairs:
        for gateway in (0, 1):
            listed = stack.call("GET", "/v1/personal-runtimes", other.key, gateway=gateway)
            assert listed.status_code == 200
            assert [r["id"] for r in listed.json()["data"]] == [other.id]
            for method in ("GET", "DELETE"):
                resp = stack.call(
                    method, f"/v1/personal-runtimes/{owner.id}", other.key, gateway=gateway
                )
                assert resp.status_code == 404
                assert resp.json()["error"]["code"] == "personal_lattice_not_found"
            with other.client(gateway=gateway) as client, pytest.raises(openai.NotFoundError):
                client.chat.completions.create(model=owner.model, messages=MESSAGES)
    # Nothing of the above touched the online runtime: its owner still uses it...
    assert online.status() == "reachable"
    with online.client(gateway=0) as client:
        assert client.chat.completions.create(model=online.model, messages=MESSAGES).choices
    # ...and the other workspace's canonical requests never run on it.
    with offline.client(gateway=0) as client:
        raw = client.chat.completions.with_raw_response.create(model=LLAMA, messages=MESSAGES)
    [record] = stack.usage_records(raw.headers["x-lattice-dispatch-id"])
    assert record.workspace == offline.workspace
    assert not record.offering.startswith("runtime:")
