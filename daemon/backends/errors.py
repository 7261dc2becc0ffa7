"""Typed failures of a backend; the daemon sends them back as a dispatch error with the
status and OpenAI error envelope they carry::

    BackendError                 502 api_error / backend_error (a backend 5xx)
    ├── BackendUnavailable       502 api_error / backend_unavailable (unreachable, cut off)
    ├── BadBackendReply          502 api_error / bad_backend_reply (not JSON, not SSE, ...)
    ├── BackendTimeout           504 api_error / backend_timeout
    ├── BackendRejected          the backend's 4xx, passed through with its own error body
    ├── UnsupportedTask          400 invalid_request_error / unsupported_task
    ├── UnsupportedModel         404 invalid_request_error / model_not_found
    └── StreamingNotSupported    400 invalid_request_error / stream_not_supported

The envelope follows OpenAI's (``{"error": {message, type, param, code}}``,
https://platform.openai.com/docs/guides/error-codes).
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "BackendError",
    "BackendRejected",
    "BackendTimeout",
    "BackendUnavailable",
    "BadBackendReply",
    "StreamingNotSupported",
    "UnsupportedModel",
    "UnsupportedTask",
]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class BackendError(Exception):
    """A backend failure with the HTTP ``status`` and OpenAI ``code`` it is reported with."""

    status: int = 502
    type: str = "api_error"
    code: str = "backend_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        type: str | None = None,
        param: str | None = None,
        body: bytes | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        if type is not None:
            self.type = type
        self.param = param
        self._body = body

    def envelope(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    @property
    def body(self) -> bytes:
        """The error body to relay: the backend's own OpenAI error body when it sent one,
        else :meth:`envelope` as JSON."""
        return self._body if self._body is not None else _encode(self.envelope())


class BackendUnavailable(BackendError):
    code = "backend_unavailable"


class BadBackendReply(BackendError):
    code = "bad_backend_reply"


class BackendTimeout(BackendError):
    status = 504
    code = "backend_timeout"


class UnsupportedTask(BackendError):
    status = 400
    type = "invalid_request_error"
    code = "unsupported_task"


class UnsupportedModel(BackendError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class StreamingNotSupported(BackendError):
    status = 400
    type = "invalid_request_error"
    code = "stream_not_supported"


class BackendRejected(BackendError):
    """The backend refused the request (4xx): its status, and its body when that is an
    OpenAI error envelope, are passed through; anything else is wrapped in one."""

    type = "invalid_request_error"
    code = "backend_rejected"

    @classmethod
    def from_reply(cls, status: int, body: bytes) -> BackendRejected:
        error = _openai_error(body)
        if error is None:
            text = body[:200].decode("utf-8", "replace").strip()
            return cls(f"The backend answered {status}: {text or 'no detail'}", status=status)
        message = error.get("message")
        code, kind, param = error.get("code"), error.get("type"), error.get("param")
        return cls(
            message if isinstance(message, str) else f"The backend answered {status}.",
            status=status,
            code=code if isinstance(code, str) else None,
            type=kind if isinstance(kind, str) else None,
            param=param if isinstance(param, str) else None,
            body=body,
        )


def _openai_error(body: bytes) -> dict[str, Any] | None:
    """The ``error`` object of an OpenAI error envelope, if ``body`` is one."""
    try:
        data = _decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error
    return None
