"""Wire types of the simulated OpenAI-compatible backend ("lattice sim").

Requests are tolerant, as OpenAI's public surface is: unknown fields (``temperature``,
``top_k``, ``min_p``, ``repetition_penalty``, ``dry_*``, ``grammar``, ``truncate_sequence``,
``user``, …) are ignored, while the fields the simulator reads are type-checked, so a wrong
type is a 400, not a crash. Responses mirror OpenAI's shapes field for field, including the
explicit ``null``s the official SDKs expect (``refusal``, ``logprobs``, ``finish_reason``);
fields OpenAI leaves out are ``UNSET`` (msgspec never encodes an ``UNSET`` field).

Reference: https://platform.openai.com/docs/api-reference (chat, completions, embeddings,
models) and the OpenAPI description in ``shared/openai-openapi``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

__all__ = [
    "ChatChoice",
    "ChatChunk",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionRequest",
    "ChatDelta",
    "ChatLogprobs",
    "ChatMessage",
    "ChatMessageOut",
    "Completion",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "ContentPart",
    "EmbeddingData",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "EmbeddingUsage",
    "ErrorBody",
    "ErrorResponse",
    "FunctionCall",
    "FunctionChoice",
    "FunctionDef",
    "ModelCard",
    "ModelList",
    "StreamOptions",
    "TokenLogprob",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolChoice",
    "TopLogprob",
    "Usage",
]

# n is capped so that one request cannot make the simulator allocate without bound.
ChoiceCount = Annotated[int, Meta(ge=1, le=128)]
TokenLimit = Annotated[int, Meta(ge=0)]
Stop = str | list[str] | None
# A prompt or an embedding input: a string, a token array, or a list of either.
TextOrTokens = str | list[str | int | list[int]]

# ---------------------------------------------------------------------------------------------
# Requests (tolerant: unknown fields are ignored)
# ---------------------------------------------------------------------------------------------


class ContentPart(Struct):
    """One part of a message's content; only ``{"type": "text"}`` parts carry text."""

    type: str
    text: str | None = None


class ChatMessage(Struct):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(Struct):
    include_usage: bool | None = None


class FunctionDef(Struct):
    name: str
    parameters: dict[str, object] | None = None


class Tool(Struct):
    function: FunctionDef | None = None  # None for non-function (e.g. custom) tools
    type: str = "function"


class FunctionChoice(Struct):
    name: str


class ToolChoice(Struct):
    function: FunctionChoice | None = None  # None for e.g. {"type": "allowed_tools", ...}
    type: str = "function"


class ChatCompletionRequest(Struct):
    """``POST /v1/chat/completions``; ``sim_token_delay_ms`` is a simulator extension, and
    ``ignore_eos`` / ``min_tokens`` follow vLLM's extensions (generate up to the limit)."""

    model: str
    messages: list[ChatMessage]
    n: ChoiceCount = 1
    stop: Stop = None
    max_tokens: TokenLimit | None = None
    max_completion_tokens: TokenLimit | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: str | ToolChoice | None = None
    ignore_eos: bool | None = None
    min_tokens: TokenLimit | None = None
    sim_token_delay_ms: Annotated[float, Meta(ge=0)] | None = None


class CompletionRequest(Struct):
    """``POST /v1/completions`` (legacy); ``max_tokens`` defaults to 16 as in OpenAI."""

    model: str
    prompt: TextOrTokens = ""
    n: ChoiceCount = 1
    best_of: int | None = None
    stop: Stop = None
    max_tokens: TokenLimit | None = 16
    echo: bool | None = None
    suffix: str | None = None
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None
    min_tokens: TokenLimit | None = None
    sim_token_delay_ms: Annotated[float, Meta(ge=0)] | None = None


class EmbeddingRequest(Struct):
    """``POST /v1/embeddings``."""

    model: str
    input: TextOrTokens
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    encoding_format: Literal["float", "base64"] | None = None


# ---------------------------------------------------------------------------------------------
# Responses (exact OpenAI shapes; kw_only so fields keep OpenAI's order)
# ---------------------------------------------------------------------------------------------


class Usage(Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct, kw_only=True):
    content: list[TokenLogprob] | None
    refusal: None = None


class FunctionCall(Struct, kw_only=True):
    name: str
    arguments: str


class ToolCall(Struct, kw_only=True):
    id: str
    type: str = "function"
    function: FunctionCall


class ToolCallDelta(Struct, kw_only=True):
    index: int
    id: str
    type: str = "function"
    function: FunctionCall


class ChatMessageOut(Struct, kw_only=True):
    role: str = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | UnsetType = UNSET
    annotations: list[object] | UnsetType = UNSET


class ChatChoice(Struct, kw_only=True):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str


class ChatCompletion(Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(Struct, kw_only=True):
    """A chunk's delta: only the fields that are set are sent (``UNSET`` is never emitted)."""

    role: str | UnsetType = UNSET
    content: str | UnsetType | None = UNSET
    refusal: UnsetType | None = UNSET
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET


class ChatChunkChoice(Struct, kw_only=True):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatChunk(Struct, kw_only=True):
    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    # UNSET unless stream_options.include_usage: then null on every chunk but the last.
    usage: Usage | UnsetType | None = UNSET


class CompletionLogprobs(Struct, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(Struct, kw_only=True):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(Struct, kw_only=True):
    """A ``text_completion``; streamed chunks share this shape (as in OpenAI)."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | UnsetType | None = UNSET


class EmbeddingData(Struct, kw_only=True):
    object: str = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingUsage(Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(Struct, kw_only=True):
    object: str = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


class ErrorBody(Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Struct, kw_only=True):
    error: ErrorBody
