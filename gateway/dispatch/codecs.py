"""Built-in request codecs: how each built-in task class's body is checked and forwarded.

A codec names the request Struct that validates the body, the fields that are the request
itself (never dropped by ``drop_params``), and the path an OpenAI-compatible upstream serves
it on.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.errors import InvalidRequest
from gateway.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    text_input_error,
)

__all__ = ["CODECS", "BuiltinCodec", "check_body", "validation_param"]


class BuiltinCodec(msgspec.Struct, frozen=True):
    name: str
    request_type: type[Any]
    #: Fields that are the request itself: never subject to ``drop_params``.
    core_fields: frozenset[str]
    #: Path under an OpenAI-compatible upstream's base URL (``…/v1``).
    upstream_path: str
    can_stream: bool
    object_name: str


CODECS: dict[str, BuiltinCodec] = {
    "openai.chat": BuiltinCodec(
        "openai.chat",
        ChatCompletionRequest,
        frozenset({"model", "messages", "stream", "drop_params"}),
        "/chat/completions",
        True,
        "chat.completion",
    ),
    "openai.completion": BuiltinCodec(
        "openai.completion",
        CompletionRequest,
        frozenset({"model", "prompt", "stream", "drop_params"}),
        "/completions",
        True,
        "text_completion",
    ),
    "openai.embedding": BuiltinCodec(
        "openai.embedding",
        EmbeddingRequest,
        frozenset({"model", "input", "drop_params"}),
        "/embeddings",
        False,
        "list",
    ),
}


def validation_param(exc: msgspec.ValidationError) -> str | None:
    """The parameter a msgspec validation error is about (``$.messages[0].role`` →
    ``messages[0].role``)."""
    text = str(exc)
    marker = "at `$"
    at = text.rfind(marker)
    if at < 0:
        return None
    path = text[at + len(marker) : text.rfind("`")]
    return path.lstrip(".") or None


def check_body(codec: BuiltinCodec, body: dict[str, Any]) -> Any:
    """Validate ``body`` against the codec's request type; 400 naming the field if not."""
    try:
        parsed = msgspec.convert(body, codec.request_type)
    except msgspec.ValidationError as exc:
        param = validation_param(exc)
        message = str(exc)
        if message.startswith("Object missing required field"):
            field = message.split("`")[1] if "`" in message else None
            if field:
                param = f"{param}.{field}" if param else field
            message = f"Missing required parameter: '{param}'."
        else:
            message = f"Invalid value for '{param}': {message}" if param else message
        raise InvalidRequest(message, param=param, code="invalid_value") from None
    for field in ("prompt", "input"):
        if field in body:
            problem = text_input_error(body[field])
            if problem:
                raise InvalidRequest(
                    f"Invalid value for '{field}': {problem}.", param=field, code="invalid_value"
                )
    return parsed
