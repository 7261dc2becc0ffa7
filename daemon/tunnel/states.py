"""The phases of a tunnel connection and the two roles."""

from __future__ import annotations

import enum
from typing import Literal

__all__ = ["Role", "State"]

Role = Literal["gateway", "daemon"]


class State(enum.Enum):
    """``OPENING`` (Hello/Welcome) → ``OPEN`` → ``CLOSED`` (no way back)."""

    OPENING = "opening"
    OPEN = "open"
    CLOSED = "closed"
