"""Legacy completions, embeddings, models and task listing through the official SDK."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import pytest

from tests.e2e.conftest import Stack
from tests.openapi_schemas import validate

LLAMA = "lovelace:llama-3.2-3b-instruct"
MINILM = "lovelace:all-minilm-l6-v2"


@pytest.mark.parametrize("strict", [False, True])
def test_completion(stack: Stack, strict: bool) -> None:
    with stack.client(_strict_response_validation=strict) as client:
        reply = client.completions.create(
            model=LLAMA,
            prompt="Once upon a time",
            max_tokens=5,
            echo=True,
            suffix="THE END",
            logprobs=2,
        )
    text = reply.choices[0].text
    assert text.startswith("Once upon a time") and text.endswith("THE END")
    assert reply.choices[0].logprobs is not None
    validate("CreateCompletionResponse", reply.model_dump(mode="json", exclude_unset=True))


def test_completion_extended_sampling_fields(stack: Stack) -> None:
    with stack.client() as client:
        reply = client.completions.create(
            model=LLAMA,
            prompt=["a", "b"],
            max_tokens=3,
            best_of=1,
            extra_body={
                "top_k": 40,
                "min_p": 0.05,
                "repetition_penalty": 1.1,
                "dry_multiplier": 0.8,
                "dry_base": 1.75,
                "dry_allowed_length": 2,
                "dry_penalty_last_n": -1,
                "dry_sequence_breakers": ["\n"],
                "grammar": "root ::= [a-z]+",
                "truncate_sequence": False,
            },
        )
    assert len(reply.choices) == 2


def test_completion_streaming(stack: Stack) -> None:
    # Default client only: the SDK's Completion type declares finish_reason non-null, while
    # OpenAI's own legacy streams (and ours) send null until a choice finishes, so strict
    # validation rejects every real legacy stream.
    with stack.client() as client:
        chunks = list(
            client.completions.create(
                model=LLAMA,
                prompt="x",
                max_tokens=4,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


@pytest.mark.parametrize("encoding", ["float", "base64", None])
def test_embeddings(stack: Stack, encoding: str | None) -> None:
    kwargs = {"encoding_format": encoding} if encoding else {}
    # The SDK asks for base64 by default and decodes it after validating, so its strict mode
    # can only judge float responses (it rejects OpenAI's own base64 answers the same way).
    with stack.client(_strict_response_validation=encoding == "float") as client:
        result = client.embeddings.create(model=MINILM, input=["one", "two"], **kwargs)
    assert [d.index for d in result.data] == [0, 1]
    if encoding == "base64":  # the SDK hands base64 back undecoded when asked explicitly
        raw = base64.b64decode(result.data[0].embedding)  # type: ignore[arg-type]
        vector = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    else:
        vector = result.data[0].embedding
    assert len(vector) == 384
    assert math.isclose(math.sqrt(sum(v * v for v in vector)), 1.0, rel_tol=1e-4)
    assert result.usage.prompt_tokens > 0


def test_embeddings_token_arrays_and_dimensions(stack: Stack) -> None:
    with stack.client() as client:
        result = client.embeddings.create(model=MINILM, input=[[1, 2, 3], [4, 5]], dimensions=64)
        single = client.embeddings.create(model=MINILM, input=[1, 2, 3])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 64
    assert len(single.data) == 1


def test_embeddings_raw_schema(stack: Stack) -> None:
    resp = httpx.post(
        stack.base_url + "/embeddings",
        json={"model": MINILM, "input": "hello", "encoding_format": "float"},
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    validate("CreateEmbeddingResponse", resp.json())


def test_models(stack: Stack) -> None:
    with stack.client(_strict_response_validation=True) as client:
        models = client.models.list()
        ids = [m.id for m in models]
        one = client.models.retrieve(LLAMA)
    assert LLAMA in ids and MINILM in ids
    assert one.id == LLAMA and one.object == "model"
    resp = httpx.get(
        stack.base_url + "/models", headers={"Authorization": f"Bearer {stack.api_key}"}
    )
    validate("ListModelsResponse", resp.json())


def test_tasks_listing(stack: Stack) -> None:
    resp = httpx.get(
        stack.base_url + "/tasks", headers={"Authorization": f"Bearer {stack.api_key}"}
    )
    names = {t["id"] for t in resp.json()["data"]}
    assert {"chat-completion", "text-completion", "embedding", "audio-transcription"} <= names


def test_generic_task_path_equals_alias(stack: Stack) -> None:
    body = {"model": LLAMA, "messages": [{"role": "user", "content": "x"}], "seed": 3}
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    via_alias = httpx.post(stack.base_url + "/chat/completions", json=body, headers=headers).json()
    via_task = httpx.post(
        stack.base_url + "/tasks/chat-completion", json=body, headers=headers
    ).json()
    assert via_alias["choices"] == via_task["choices"]


def test_no_model_uses_the_default(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    for body in ({}, {"model": "default"}):
        resp = httpx.post(
            stack.base_url + "/chat/completions",
            json={**body, "messages": [{"role": "user", "content": "x"}]},
            headers=headers,
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == LLAMA


def test_workspace_default_model(stack: Stack) -> None:
    key = stack.new_key("defaults-ws")
    stack.apply_catalog({"aliases": {"my-default": LLAMA}})
    resp = stack.admin("PATCH", "/admin/v1/workspaces/defaults-ws", {"default_model": "my-default"})
    assert resp.status_code == 200, resp.text
    import time

    time.sleep(0.6)  # the workspace cache is at most 0.5 s old
    out = httpx.post(
        stack.base_url + "/chat/completions",
        json={"messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert out.status_code == 200, out.text
    assert out.json()["model"] == "lovelace:llama-3.2-3b-instruct"


def test_health_and_metrics(stack: Stack) -> None:
    assert httpx.get(stack.gateways[0] + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(stack.gateways[0] + "/readyz")
    assert ready.status_code == 200 and ready.json()["catalog_version"] >= 1
    metrics = httpx.get(stack.gateways[0] + "/metrics").text
    assert "lattice_requests_total" in metrics
    assert "lattice_request_duration_seconds_bucket" in metrics
    assert "lattice_requests_in_flight" in metrics
    assert "lattice_upstream_errors_total" in metrics
