"""When and where the daemon dials again: exponential backoff with full jitter, a cap, and a
round-robin over the gateway URLs it was given. Pure (the randomness is injected).

Full jitter — sleep a uniform random time in ``[0, min(cap, base * multiplier**attempt)]`` —
is the variant that spreads a crowd of clients best after an outage ("Exponential Backoff
And Jitter", AWS Architecture Blog, 2015): a gateway restart does not get every daemon back
in the same instant.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import msgspec

__all__ = ["Backoff", "ReconnectPolicy", "backoff_delay"]


class Backoff(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Backoff terms, in seconds."""

    base_s: float = 0.5
    cap_s: float = 30.0
    multiplier: float = 2.0


def backoff_delay(attempt: int, backoff: Backoff, rand: Callable[[], float]) -> float:
    """The delay before retry number ``attempt`` (0-based): full jitter under
    ``min(cap_s, base_s * multiplier**attempt)``; ``rand()`` is uniform in ``[0, 1)``."""
    exponent = min(max(attempt, 0), 64)  # no float overflow however long the outage
    ceiling = min(backoff.cap_s, backoff.base_s * backoff.multiplier**exponent)
    return rand() * ceiling


class ReconnectPolicy:
    """Which gateway URL to dial next, and how long to wait first.

    Every dial moves to the next URL (a gateway that went away is not dialled twice in a row
    when there is another). Failed dials grow the backoff; a connection that stayed up for
    ``stable_after_s`` resets it, so a daemon that loses a long-lived tunnel redials within
    ``base_s``, while one whose tunnel keeps dropping at once still backs off.
    """

    def __init__(
        self,
        urls: Sequence[str],
        backoff: Backoff | None = None,
        *,
        rand: Callable[[], float] = random.random,
        stable_after_s: float = 10.0,
    ) -> None:
        if not urls:
            raise ValueError("at least one gateway URL is needed")
        self.urls = tuple(urls)
        self.backoff = backoff or Backoff()
        self.attempt = 0
        self._next = 0
        self._rand = rand
        self._stable_after_s = stable_after_s

    def next_url(self) -> str:
        """The URL to dial now (round-robin)."""
        url = self.urls[self._next % len(self.urls)]
        self._next += 1
        return url

    def failed(self) -> float:
        """A dial failed: the delay before the next one."""
        delay = backoff_delay(self.attempt, self.backoff, self._rand)
        self.attempt += 1
        return delay

    def lost(self, lasted_s: float) -> float:
        """An established tunnel ended after ``lasted_s``: the delay before redialling."""
        if lasted_s >= self._stable_after_s:
            self.attempt = 0
        return self.failed()
