"""Stripe's idempotency layer for POST requests (https://docs.stripe.com/api/idempotent_requests).

- The first request with an ``Idempotency-Key`` that the endpoint executes has its status
  and body saved; a later request with the same key and the same parameters gets that
  response again (with ``Idempotent-Replayed: true``) and changes nothing.
- The same key with other parameters, or on another endpoint, is refused: 400 with type
  ``idempotency_error``.
- Keys are kept 24 hours, then pruned: reusing a pruned key runs a new request.
- Stripe saves a response only once the endpoint began executing. This fake saves
  successful (2xx) responses only: its 4xx answers are all parameter validation, which
  Stripe does not save either, and its injected failures (``failures.py``) stand for
  failures in front of the API, which never reach the idempotency layer.

Keys are scoped by the caller's credential, as Stripe scopes them by account.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from billing.fake_stripe.errors import ApiError

__all__ = ["KEY_TTL_S", "MAX_KEY_LENGTH", "IdempotencyStore", "StoredResponse"]

KEY_TTL_S = 86_400
MAX_KEY_LENGTH = 255


class StoredResponse(NamedTuple):
    status: int
    body: bytes
    request_id: str


class _Record(NamedTuple):
    endpoint: str
    params: Any
    response: StoredResponse
    created: float


class IdempotencyStore:
    """Saved responses by ``(scope, key)``, pruned 24 h after they were saved."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._records: dict[tuple[str, str], _Record] = {}

    def __len__(self) -> int:
        self.prune()
        return len(self._records)

    def lookup(self, scope: str, key: str, endpoint: str, params: Any) -> StoredResponse | None:
        """The saved response to replay, ``None`` for a new key; raises the 400
        ``idempotency_error`` when the key was first used differently."""
        if len(key) > MAX_KEY_LENGTH:
            raise ApiError(
                400,
                f"Idempotency keys can be at most {MAX_KEY_LENGTH} characters long.",
                type="idempotency_error",
            )
        self.prune()
        record = self._records.get((scope, key))
        if record is None:
            return None
        if record.endpoint != endpoint:
            raise ApiError(
                400,
                "Keys for idempotent requests can only be used for the same endpoint they "
                f"were first used for ('{record.endpoint}' vs '{endpoint}'). Try using a key "
                f"other than '{key}' if you meant to execute a different request.",
                type="idempotency_error",
            )
        if record.params != params:
            raise ApiError(
                400,
                "Keys for idempotent requests can only be used with the same parameters they "
                f"were first used with. Try using a key other than '{key}' if you meant to "
                "execute a different request.",
                type="idempotency_error",
            )
        return record.response

    def save(
        self, scope: str, key: str, endpoint: str, params: Any, response: StoredResponse
    ) -> None:
        self._records[(scope, key)] = _Record(endpoint, params, response, self._clock())

    def prune(self) -> None:
        """Drop records older than :data:`KEY_TTL_S` (dict order is save order)."""
        horizon = self._clock() - KEY_TTL_S
        while self._records:
            first = next(iter(self._records))
            if self._records[first].created > horizon:
                return
            del self._records[first]

    def clear(self) -> None:
        self._records.clear()
