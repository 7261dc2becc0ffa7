"""The simulator's engine: deterministic, OpenAI-shaped, and pure (no server here)."""

from __future__ import annotations

import array
import base64
import math

import msgspec
import pytest

from daemon.sim.engine import (
    NATURAL_LENGTH,
    VOCABULARY,
    SimEngine,
    SimError,
    embed,
    generate,
)
from daemon.sim.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    Usage,
)
from tests.openapi_schemas import validate, validate_completion_chunk

MODEL = "llama-3.2-3b-instruct"
EMBED = "all-minilm-l6-v2"
engine = SimEngine()


def chat_req(**fields: object) -> ChatCompletionRequest:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], **fields}
    return msgspec.convert(body, ChatCompletionRequest)


def completion_req(**fields: object) -> CompletionRequest:
    return msgspec.convert({"model": MODEL, "prompt": "Once upon", **fields}, CompletionRequest)


def as_json(struct: msgspec.Struct) -> object:
    return msgspec.json.decode(msgspec.json.encode(struct))


# -- generate ---------------------------------------------------------------------------------


def test_generate_is_deterministic_and_depends_on_every_input() -> None:
    base = generate(MODEL, "hello", seed=1, index=0)
    assert generate(MODEL, "hello", seed=1, index=0) == base
    others = [
        generate(MODEL, "hello", seed=2, index=0),
        generate(MODEL, "hello", seed=1, index=1),
        generate(MODEL, "hello!", seed=1, index=0),
        generate("other-model", "hello", seed=1, index=0),
    ]
    assert all(o.tokens != base.tokens for o in others)


def test_tokens_are_vocabulary_words_with_a_leading_space_after_the_first() -> None:
    gen = generate(MODEL, "hello")
    assert gen.finish_reason == "stop"
    assert NATURAL_LENGTH[0] <= len(gen.tokens) <= NATURAL_LENGTH[1]
    assert not gen.tokens[0].startswith(" ")
    assert gen.tokens[0].lower() in VOCABULARY
    assert all(t.startswith(" ") and t[1:] in VOCABULARY for t in gen.tokens[1:])


def test_max_tokens_gives_a_prefix_and_finish_length() -> None:
    full = generate(MODEL, "hello")
    short = generate(MODEL, "hello", max_tokens=3)
    assert short.tokens == full.tokens[:3]
    assert short.finish_reason == "length"
    assert generate(MODEL, "hello", max_tokens=len(full.tokens)).finish_reason == "stop"
    assert generate(MODEL, "hello", max_tokens=0).tokens == []


def test_ignore_eos_and_min_tokens_extend_to_the_limit() -> None:
    gen = generate(MODEL, "hello", max_tokens=200, ignore_eos=True)
    assert len(gen.tokens) == 200
    assert gen.finish_reason == "length"
    assert len(generate(MODEL, "hello", min_tokens=40).tokens) == 40


def test_stop_sequence_cuts_the_text_before_it() -> None:
    full = generate(MODEL, "hello")
    stop = full.tokens[3]
    gen = generate(MODEL, "hello", stop=["never-there", stop])
    assert gen.finish_reason == "stop"
    assert stop not in gen.text
    assert full.text.startswith(gen.text)
    assert gen.text == full.text[: full.text.index(stop)]


def test_stop_sequence_inside_a_token_keeps_the_part_before_it() -> None:
    full = generate(MODEL, "hello", max_tokens=5)
    word = full.tokens[2]
    stop = word[2:]
    gen = generate(MODEL, "hello", max_tokens=5, stop=[stop])
    assert gen.text == full.text[: full.text.index(stop)]
    assert gen.finish_reason == "stop"


def test_logprobs_do_not_change_the_text_and_have_k_distinct_alternatives() -> None:
    plain = generate(MODEL, "hello")
    gen = generate(MODEL, "hello", top_logprobs=5)
    assert gen.tokens == plain.tokens
    assert gen.logprobs is not None and gen.top is not None
    for token, logprob, top in zip(gen.tokens, gen.logprobs, gen.top, strict=True):
        assert logprob <= 0
        assert top[0] == (token, logprob)
        assert len({t for t, _ in top}) == 5
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)


# -- chat ---------------------------------------------------------------------------------------


def test_chat_response_shape_and_usage() -> None:
    req = chat_req(
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "two words"},
                    {"type": "image_url", "image_url": {"url": "x"}},
                ],
            },
        ]
    )
    out = engine.chat(req, id="chatcmpl-1", created=7)
    body = as_json(out)
    validate("CreateChatCompletionResponse", body)
    assert out.usage.prompt_tokens == 2 + 3 + 2 + 3
    assert out.usage.completion_tokens == len((out.choices[0].message.content or "").split())
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.model == MODEL and out.id == "chatcmpl-1" and out.created == 7
    assert out.system_fingerprint
    message = body["choices"][0]["message"]  # type: ignore[index]
    assert message["role"] == "assistant" and message["refusal"] is None


def test_chat_is_deterministic_and_seed_changes_it() -> None:
    def text(**f: object) -> str | None:
        return engine.chat(chat_req(**f), id="x", created=0).choices[0].message.content

    assert text(seed=3) == text(seed=3)
    assert text(seed=3) != text(seed=4)


def test_chat_n_choices_are_indexed_and_differ() -> None:
    out = engine.chat(chat_req(n=3), id="x", created=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) == 3


def test_chat_max_completion_tokens_wins_over_max_tokens() -> None:
    out = engine.chat(chat_req(max_tokens=2, max_completion_tokens=4), id="x", created=0)
    assert out.usage.completion_tokens == 4
    assert out.choices[0].finish_reason == "length"


def test_chat_logprobs_shape() -> None:
    out = engine.chat(chat_req(logprobs=True, top_logprobs=3), id="x", created=0)
    body = as_json(out)
    validate("CreateChatCompletionResponse", body)
    logprobs = body["choices"][0]["logprobs"]  # type: ignore[index]
    assert logprobs["refusal"] is None
    content = logprobs["content"]
    assert "".join(e["token"] for e in content) == out.choices[0].message.content
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 3
        for alt in entry["top_logprobs"]:
            assert set(alt) == {"token", "logprob", "bytes"}
    assert engine.chat(chat_req(), id="x", created=0).choices[0].logprobs is None


def test_chat_stream_matches_the_full_response() -> None:
    req = chat_req(n=2, logprobs=True, top_logprobs=1, stream_options={"include_usage": True})
    full = engine.chat(req, id="x", created=0)
    steps = list(engine.chat_stream(req, id="x", created=0))
    chunks = [as_json(c) for step in steps for c in step]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)  # type: ignore[index]
    first = [c for c in steps[0]]
    assert [c.choices[0].delta.role for c in first] == ["assistant", "assistant"]
    assert [c.choices[0].delta.content for c in first] == ["", ""]
    *body, last = chunks
    assert last["choices"] == [] and last["usage"] == as_json(full.usage)  # type: ignore[index]
    assert all(c["usage"] is None for c in body)  # type: ignore[index]
    for choice in full.choices:
        mine = [c["choices"][0] for c in body if c["choices"][0]["index"] == choice.index]  # type: ignore[index]
        text = "".join(c["delta"].get("content") or "" for c in mine)
        assert text == choice.message.content
        assert [c["finish_reason"] for c in mine][-1] == choice.finish_reason
        assert mine[-1]["delta"] == {}
        tokens = [e["token"] for c in mine if c["logprobs"] for e in c["logprobs"]["content"]]
        assert "".join(tokens) == text


def test_chat_stream_without_include_usage_has_no_usage_key() -> None:
    for step in engine.chat_stream(chat_req(), id="x", created=0):
        for chunk in step:
            assert "usage" not in as_json(chunk)  # type: ignore[operator]


def test_forced_tool_choice_makes_a_deterministic_tool_call() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                },
            },
        }
    ]
    choice = {"type": "function", "function": {"name": "weather"}}
    req = chat_req(tools=tools, tool_choice=choice)
    out = engine.chat(req, id="x", created=0)
    validate("CreateChatCompletionResponse", as_json(out))
    assert out.choices[0].finish_reason == "tool_calls"
    calls = out.choices[0].message.tool_calls
    assert isinstance(calls, list)
    args = msgspec.json.decode(calls[0].function.arguments)
    assert isinstance(args["city"], str) and isinstance(args["days"], int)
    assert engine.chat(req, id="x", created=0) == out
    chunks = [as_json(c) for s in engine.chat_stream(req, id="x", created=0) for c in s]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    with pytest.raises(SimError):
        engine.chat(
            chat_req(tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}}),
            id="x",
            created=0,
        )


def test_unknown_model_and_wrong_kind() -> None:
    with pytest.raises(SimError) as info:
        engine.chat(chat_req(model="gpt-9"), id="x", created=0)
    assert (info.value.status, info.value.code, info.value.param) == (
        404,
        "model_not_found",
        "model",
    )
    with pytest.raises(SimError) as info:
        engine.chat(chat_req(model=EMBED), id="x", created=0)
    assert info.value.status == 400
    with pytest.raises(SimError):
        engine.embeddings(EmbeddingRequest(model=MODEL, input="x"))


# -- legacy completions ----------------------------------------------------------------------


def test_completion_defaults_to_16_tokens_max() -> None:
    out = engine.completion(completion_req(ignore_eos=True), id="cmpl-1", created=0)
    validate("CreateCompletionResponse", as_json(out))
    assert out.object == "text_completion"
    assert isinstance(out.usage, Usage) and out.usage.completion_tokens == 16
    assert out.choices[0].finish_reason == "length"


def test_completion_echo_suffix_and_logprobs_offsets() -> None:
    req = completion_req(echo=True, suffix="<END>", logprobs=2, max_tokens=5)
    out = engine.completion(req, id="x", created=0)
    validate("CreateCompletionResponse", as_json(out))
    choice = out.choices[0]
    assert choice.text.startswith("Once upon") and choice.text.endswith("<END>")
    lp = choice.logprobs
    assert lp is not None
    assert "".join(lp.tokens) == choice.text.removesuffix("<END>")
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        assert choice.text[offset : offset + len(token)] == token
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert isinstance(out.usage, Usage) and out.usage.prompt_tokens == 2


def test_completion_prompt_lists_and_token_arrays() -> None:
    out = engine.completion(completion_req(prompt=["a b", "c"], n=2), id="x", created=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert isinstance(out.usage, Usage) and out.usage.prompt_tokens == 3
    assert out.choices[0].text != out.choices[1].text
    tokens = engine.completion(completion_req(prompt=[1, 2, 3]), id="x", created=0)
    assert len(tokens.choices) == 1 and isinstance(tokens.usage, Usage)
    assert tokens.usage.prompt_tokens == 3
    arrays = engine.completion(completion_req(prompt=[[1, 2], [3]]), id="x", created=0)
    assert len(arrays.choices) == 2
    with pytest.raises(SimError):
        engine.completion(completion_req(prompt=["a", 1]), id="x", created=0)


def test_completion_stream_matches_the_full_response() -> None:
    req = completion_req(
        prompt=["Once upon", "a time"],
        n=2,
        echo=True,
        suffix="!",
        logprobs=1,
        stream_options={"include_usage": True},
    )
    full = engine.completion(req, id="x", created=0)
    chunks = [as_json(c) for s in engine.completion_stream(req, id="x", created=0) for c in s]
    for chunk in chunks:
        validate_completion_chunk(chunk)
    *body, last = chunks
    assert isinstance(full.usage, Usage)
    assert last["choices"] == [] and last["usage"] == as_json(full.usage)  # type: ignore[index]
    for choice in full.choices:
        mine = [c["choices"][0] for c in body if c["choices"][0]["index"] == choice.index]  # type: ignore[index]
        assert "".join(c["text"] for c in mine) == choice.text
        assert mine[-1]["finish_reason"] == choice.finish_reason
        assert all(c["finish_reason"] is None for c in mine[:-1])


# -- embeddings -------------------------------------------------------------------------------


def test_embeddings_are_deterministic_unit_vectors() -> None:
    out = engine.embeddings(EmbeddingRequest(model=EMBED, input=["hello world", "bye"]))
    validate("CreateEmbeddingResponse", as_json(out))
    vectors = [d.embedding for d in out.data]
    assert [d.index for d in out.data] == [0, 1]
    for v in vectors:
        assert isinstance(v, list) and len(v) == 384
        assert math.isclose(math.hypot(*v), 1.0, abs_tol=1e-6)
    assert vectors[0] != vectors[1]
    again = engine.embeddings(EmbeddingRequest(model=EMBED, input="hello world"))
    assert again.data[0].embedding == vectors[0]
    assert out.usage.prompt_tokens == out.usage.total_tokens == 3


def test_embedding_dimensions_truncate_and_renormalise() -> None:
    full = embed("k", 384)
    short = embed("k", 384, 8)
    assert len(short) == 8
    assert math.isclose(math.hypot(*short), 1.0, abs_tol=1e-6)
    ratio = short[0] / full[0]
    assert all(
        math.isclose(s, f * ratio, rel_tol=1e-4) for s, f in zip(short, full[:8], strict=False)
    )
    with pytest.raises(SimError):
        engine.embeddings(EmbeddingRequest(model=EMBED, input="x", dimensions=385))


def test_embedding_base64_is_little_endian_float32_of_the_same_vector() -> None:
    floats = engine.embeddings(EmbeddingRequest(model=EMBED, input="x", dimensions=16))
    b64 = engine.embeddings(
        EmbeddingRequest(model=EMBED, input="x", dimensions=16, encoding_format="base64")
    )
    encoded = b64.data[0].embedding
    assert isinstance(encoded, str)
    decoded = array.array("f", base64.b64decode(encoded)).tolist()  # as the OpenAI SDK does
    assert decoded == floats.data[0].embedding


def test_embedding_token_inputs() -> None:
    one = engine.embeddings(EmbeddingRequest(model=EMBED, input=[1, 2, 3]))
    assert len(one.data) == 1 and one.usage.prompt_tokens == 3
    two = engine.embeddings(EmbeddingRequest(model=EMBED, input=[[1, 2, 3], [4]]))
    assert len(two.data) == 2 and two.data[0].embedding == one.data[0].embedding
    with pytest.raises(SimError):
        engine.embeddings(EmbeddingRequest(model=EMBED, input=""))
    with pytest.raises(SimError):
        engine.embeddings(EmbeddingRequest(model=EMBED, input=[]))


def test_models_list_shape() -> None:
    body = as_json(engine.list_models())
    validate("ListModelsResponse", body)
    assert [m["id"] for m in body["data"]] == [MODEL, EMBED]  # type: ignore[index]


def test_requests_are_tolerant_but_checked() -> None:
    tools = [{"type": "custom", "custom": {"name": "grammar"}}]
    req = chat_req(
        tools=tools,
        tool_choice={"type": "allowed_tools", "allowed_tools": {}},
        temperature=0,
        top_k=3,
        user="u",
        response_format={"type": "text"},
    )
    assert engine.chat(req, id="x", created=0).choices[0].finish_reason == "stop"
    with pytest.raises(SimError) as info:
        engine.chat(chat_req(messages=[]), id="x", created=0)
    assert info.value.param == "messages"
    with pytest.raises(msgspec.ValidationError):
        chat_req(n=0)
