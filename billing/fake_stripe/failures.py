"""Failure injection: what the next N matching requests suffer instead of an answer.

Armed by ``POST /_fake/fail`` (or :meth:`FakeStripeServer.fail`) with a :class:`FailurePlan`::

    {"mode": "500" | "429" | "timeout" | "reset" | "reset_after",
     "count": N, "retry_after": S, "paths": "/v1/billing", "hold_s": 30}

- ``500``: an ``api_error`` body with status 500.
- ``429``: Stripe's rate-limit answer (type ``invalid_request_error``, code ``rate_limit``)
  with a ``Retry-After: S`` header when ``retry_after`` is given.
- ``timeout``: the request is held until the client gives up (closes the connection) or
  ``hold_s`` passes, then the connection is dropped; nothing is answered.
- ``reset``: the TCP connection is aborted (RST) without an answer.
- ``reset_after`` (beyond the brief): the request IS executed and saved for idempotency, then
  the connection is aborted: the "Stripe did it but the answer was lost" case.

Every mode but ``reset_after`` happens in front of the API: the request never executes, so
no state changes and no idempotency record is saved. ``paths`` restricts a plan to request
paths starting with that prefix; control paths (``/_fake/...``) never fail. Plans queue up:
the oldest armed plan that matches serves first.

This module is pure bookkeeping; ``server.py`` carries out the failure on the socket.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = ["FailureInjector", "FailureMode", "FailurePlan", "failure_response"]

FailureMode = Literal["500", "429", "timeout", "reset", "reset_after"]


class FailurePlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    mode: FailureMode
    count: int = 1
    retry_after: float | None = None
    paths: str | None = None
    hold_s: float = 30.0

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("count must be >= 1")
        if self.hold_s < 0 or (self.retry_after is not None and self.retry_after < 0):
            raise ValueError("hold_s and retry_after must be >= 0")


class FailureInjector:
    """Armed plans and how many requests each still fails."""

    def __init__(self) -> None:
        self._armed: list[tuple[FailurePlan, list[int]]] = []
        self.injected = 0

    def arm(self, plan: FailurePlan) -> None:
        self._armed.append((plan, [plan.count]))

    def clear(self) -> None:
        """Disarm every plan and zero :attr:`injected`."""
        self._armed.clear()
        self.injected = 0

    def pending(self) -> int:
        """Requests still to be failed, over every plan."""
        return sum(left[0] for _, left in self._armed)

    def take(self, path: str) -> FailurePlan | None:
        """The plan that fails this request (consuming one of its count), or ``None``."""
        if not self._armed or path.startswith("/_fake/"):
            return None
        for index, (plan, left) in enumerate(self._armed):
            if plan.paths is None or path.startswith(plan.paths):
                left[0] -= 1
                if left[0] == 0:
                    del self._armed[index]
                self.injected += 1
                return plan
        return None


def failure_response(plan: FailurePlan) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, body and extra headers of an answering failure (``500`` or ``429``)."""
    if plan.mode == "429":
        headers = {}
        if plan.retry_after is not None:
            headers["Retry-After"] = f"{plan.retry_after:g}"
        body = {
            "error": {
                "type": "invalid_request_error",
                "code": "rate_limit",
                "message": "Too many requests hit the API too quickly (injected by the fake "
                "Stripe). We recommend an exponential backoff of your requests.",
            }
        }
        return 429, body, headers
    body = {
        "error": {
            "type": "api_error",
            "message": "An unknown error occurred (injected by the fake Stripe).",
        }
    }
    return 500, body, {}
