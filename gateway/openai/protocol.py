"""Wire types of the OpenAI surface (requests the gateway validates).

Requests are tolerant: unknown fields never crash decoding (they are dropped or rejected by
the ``drop_params`` policy later, not here). Every field OpenAI documents is typed so that a
wrong type is a 400 naming the field. References:
https://platform.openai.com/docs/api-reference/chat/create,
https://platform.openai.com/docs/api-reference/completions/create,
https://platform.openai.com/docs/api-reference/embeddings/create.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "EmbeddingRequest",
    "ErrorBody",
    "ErrorEnvelope",
    "ModelList",
    "ModelObject",
    "StreamOptions",
    "TextInput",
    "text_input_error",
]

Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
Stop = str | list[str] | None
#: A string, a list of strings, one token array, or a list of token arrays. msgspec unions
#: allow one array type, so the list's items are a union; :func:`text_input_error` checks
#: that a list does not mix its kinds.
TextInput = str | list[str | int | list[int]]


def text_input_error(value: object) -> str | None:
    """Why ``value`` (already a :data:`TextInput`) is not one of the four accepted shapes."""
    if isinstance(value, str):
        return None
    assert isinstance(value, list)
    if not value:
        return "must not be empty"
    kinds = {type(item) for item in value}
    if len(kinds) > 1:
        return "must be a string, a list of strings, a token array or a list of token arrays"
    if kinds == {list} and any(not item for item in value):
        return "token arrays must not be empty"
    return None


class StreamOptions(msgspec.Struct, omit_defaults=True):
    include_usage: bool | UnsetType = UNSET
    include_obfuscation: bool | UnsetType = UNSET


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | UnsetType = UNSET
    tool_calls: list[dict[str, Any]] | UnsetType = UNSET
    tool_call_id: str | UnsetType = UNSET
    refusal: str | UnsetType | None = UNSET


class ChatCompletionRequest(msgspec.Struct, omit_defaults=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    model: str | UnsetType | None = UNSET
    max_tokens: PositiveInt | UnsetType | None = UNSET
    max_completion_tokens: PositiveInt | UnsetType | None = UNSET
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | UnsetType | None = UNSET
    top_p: Probability | UnsetType | None = UNSET
    n: Annotated[int, Meta(ge=1, le=128)] | UnsetType | None = UNSET
    stop: Stop | UnsetType = UNSET
    seed: int | UnsetType | None = UNSET
    presence_penalty: Penalty | UnsetType | None = UNSET
    frequency_penalty: Penalty | UnsetType | None = UNSET
    logit_bias: dict[str, float] | UnsetType | None = UNSET
    logprobs: bool | UnsetType | None = UNSET
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | UnsetType | None = UNSET
    response_format: dict[str, Any] | UnsetType | None = UNSET
    tools: list[dict[str, Any]] | UnsetType | None = UNSET
    tool_choice: str | dict[str, Any] | UnsetType | None = UNSET
    parallel_tool_calls: bool | UnsetType | None = UNSET
    user: str | UnsetType | None = UNSET
    metadata: dict[str, str] | UnsetType | None = UNSET
    stream: bool | UnsetType | None = UNSET
    stream_options: StreamOptions | UnsetType | None = UNSET
    drop_params: bool | UnsetType = UNSET


class CompletionRequest(msgspec.Struct, omit_defaults=True):
    prompt: TextInput
    model: str | UnsetType | None = UNSET
    max_tokens: Annotated[int, Meta(ge=0)] | UnsetType | None = UNSET
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | UnsetType | None = UNSET
    top_p: Probability | UnsetType | None = UNSET
    n: Annotated[int, Meta(ge=1, le=128)] | UnsetType | None = UNSET
    best_of: Annotated[int, Meta(ge=0, le=20)] | UnsetType | None = UNSET
    stop: Stop | UnsetType = UNSET
    seed: int | UnsetType | None = UNSET
    echo: bool | UnsetType | None = UNSET
    suffix: str | UnsetType | None = UNSET
    presence_penalty: Penalty | UnsetType | None = UNSET
    frequency_penalty: Penalty | UnsetType | None = UNSET
    logit_bias: dict[str, float] | UnsetType | None = UNSET
    logprobs: Annotated[int, Meta(ge=0, le=5)] | UnsetType | None = UNSET
    user: str | UnsetType | None = UNSET
    stream: bool | UnsetType | None = UNSET
    stream_options: StreamOptions | UnsetType | None = UNSET
    # Extended sampling fields accepted by open engines (vLLM, llama.cpp, KoboldCpp, …).
    top_k: int | UnsetType | None = UNSET
    min_p: Probability | UnsetType | None = UNSET
    repetition_penalty: Annotated[float, Meta(ge=0.0)] | UnsetType | None = UNSET
    dry_multiplier: Annotated[float, Meta(ge=0.0)] | UnsetType | None = UNSET
    dry_base: Annotated[float, Meta(ge=0.0)] | UnsetType | None = UNSET
    dry_allowed_length: Annotated[int, Meta(ge=0)] | UnsetType | None = UNSET
    dry_penalty_last_n: int | UnsetType | None = UNSET
    dry_sequence_breakers: list[str] | UnsetType | None = UNSET
    grammar: str | UnsetType | None = UNSET
    truncate_sequence: bool | UnsetType | None = UNSET
    drop_params: bool | UnsetType = UNSET


class EmbeddingRequest(msgspec.Struct, omit_defaults=True):
    input: TextInput
    model: str | UnsetType | None = UNSET
    encoding_format: Literal["float", "base64"] | UnsetType = UNSET
    dimensions: PositiveInt | UnsetType | None = UNSET
    user: str | UnsetType | None = UNSET
    drop_params: bool | UnsetType = UNSET


class ModelObject(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelObject]
    object: str = "list"


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody
