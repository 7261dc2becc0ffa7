"""Re-shaping a relayed OpenAI stream for the caller (pure; no I/O).

Upstreams are always asked for ``stream_options.include_usage`` so that every stream can
be metered; the caller gets the usage chunk (``choices: []``) and ``usage`` keys only when
it asked for them, exactly as OpenAI sends them
(https://platform.openai.com/docs/api-reference/chat-streaming).
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.errors import LatticeError

__all__ = ["DONE", "StreamRelay", "error_event", "sse"]

DONE = b"data: [DONE]\n\n"

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def error_event(exc: LatticeError) -> bytes:
    """The event that ends a stream which failed after its first byte (the status line has
    been sent, so the error travels in the body, as OpenAI's own streams do)."""
    return sse(_encoder.encode(exc.envelope()))


class StreamRelay:
    """Turns upstream chunk payloads into the caller's SSE events and keeps what metering
    needs: the upstream's usage, and the text delivered so far (to estimate usage when a
    stream is cut short)."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        self.usage: dict[str, Any] | None = None
        self.delivered_chars = 0
        self.delivered_chunks = 0

    def relay(self, payload: bytes) -> bytes | None:
        """The SSE event for one upstream payload, or ``None`` to send nothing."""
        try:
            chunk = _decoder.decode(payload)
        except (msgspec.DecodeError, RecursionError):
            return None  # a malformed upstream event is skipped, not passed on
        if not isinstance(chunk, dict):
            return None
        if "error" in chunk and "choices" not in chunk:
            err = chunk.get("error")
            message = err.get("message") if isinstance(err, dict) else str(err)
            raise UpstreamStreamError(str(message or "upstream error"))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    self._count(choice)
        if "model" in chunk:
            chunk["model"] = self.model
        if not self.include_usage:
            if choices == [] and usage is not None:
                return None  # the usage chunk the caller did not ask for
            chunk.pop("usage", None)
        self.delivered_chunks += 1
        return sse(_encoder.encode(chunk))

    def _count(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if isinstance(text, str):
            self.delivered_chars += len(text)


class UpstreamStreamError(Exception):
    """The upstream sent an error event in the middle of a stream."""
