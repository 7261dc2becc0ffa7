"""Filling in usage a backend did not report (pure): what was delivered is billed, so a
missing count is estimated from the text (≈ 4 characters a token) and flagged as such."""

from __future__ import annotations

from typing import Any

from gateway.dispatch.metering import estimate_tokens

__all__ = ["estimate_result_units", "estimate_stream_units", "prompt_text"]


def prompt_text(body: dict[str, Any]) -> str:
    """The text of a request's prompt: chat messages (string or text parts), ``prompt`` or
    ``input``."""
    parts: list[str] = []
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
    for key in ("prompt", "input"):
        value = body.get(key)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts.extend(v for v in value if isinstance(v, str))
    return " ".join(parts)


def _with_prompt(units: dict[str, int], body: dict[str, Any]) -> dict[str, int]:
    out = dict(units)
    if "prompt_tokens" in out and not out["prompt_tokens"]:
        out["prompt_tokens"] = estimate_tokens(prompt_text(body))
    return out


def estimate_result_units(
    units: dict[str, int], body: dict[str, Any], result: dict[str, Any]
) -> dict[str, int]:
    """``units`` with zero token counts replaced by estimates from the request and the
    complete result."""
    out = _with_prompt(units, body)
    if "completion_tokens" in out and not out["completion_tokens"]:
        text = ""
        for choice in result.get("choices") or ():
            if isinstance(choice, dict):
                msg = choice.get("message")
                text += str(msg.get("content") or "") if isinstance(msg, dict) else ""
                text += str(choice.get("text") or "")
        out["completion_tokens"] = estimate_tokens(text)
    return out


def estimate_stream_units(
    units: dict[str, int], body: dict[str, Any], delivered_chars: int
) -> dict[str, int]:
    """Like :func:`estimate_result_units` for a stream that delivered ``delivered_chars``
    characters of text before it ended (possibly cut short)."""
    out = _with_prompt(units, body)
    if "completion_tokens" in out and not out["completion_tokens"]:
        out["completion_tokens"] = (delivered_chars + 3) // 4
    return out
