"""The simulator's one exception: a refused request, rendered by the server as OpenAI's error
envelope ``{"error": {message, type, param, code}}`` with HTTP ``status``."""

from __future__ import annotations

__all__ = ["SimError"]


class SimError(Exception):
    """A request the simulator refuses, rendered as OpenAI's error envelope with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
