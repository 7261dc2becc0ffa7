"""The one error type of the fake: a Stripe error response.

Stripe answers every failure with an HTTP status and one ``error`` object
(https://docs.stripe.com/api/errors)::

    {"error": {"type": "invalid_request_error", "code": "resource_missing",
               "message": "No such customer: 'cus_x'", "param": "id"}}

``type`` is ``invalid_request_error``, ``api_error``, ``card_error`` or ``idempotency_error``
on v1 (v2 adds types such as ``temporary_session_expired``); ``code`` and ``param`` are left
out when Stripe has none, as Stripe does.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError", "missing"]


class ApiError(Exception):
    """A Stripe error: ``status`` plus the fields of the ``error`` object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


def missing(kind: str, object_id: str, param: str = "id") -> ApiError:
    """Stripe's 404 for an unknown object id (``No such customer: 'cus_x'``)."""
    return ApiError(404, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)
