"""Typed errors of the gateway; one handler renders them in the caller's format.

Each class carries its HTTP status, its OpenAI error ``type`` and a default ``code`` as
class attributes, so raising code never picks a status by hand::

    LatticeError                      500 api_error
    ├── InvalidRequest                400 invalid_request_error
    │   └── UnsupportedParameter      400 invalid_request_error / unsupported_parameter
    ├── AuthenticationFailed          401 invalid_request_error / invalid_api_key
    ├── PermissionDenied              403 permission_error / insufficient_scopes
    ├── NotFound                      404 invalid_request_error / not_found
    │   ├── ModelNotFound             404 … / model_not_found
    │   ├── TaskNotFound              404 … / task_not_found
    │   ├── RuntimeNotFound           404 … / personal_lattice_not_found
    │   └── UserCodeNotFound          404 … / user_code_not_found
    ├── MethodNotAllowed              405 invalid_request_error / method_not_allowed
    ├── RequestTimeout                408 invalid_request_error / request_timeout
    ├── Conflict                      409 invalid_request_error / idempotency_key_reused
    ├── PayloadTooLarge               413 invalid_request_error / request_too_large
    ├── UnsupportedMediaType          415 invalid_request_error / unsupported_media_type
    ├── Unprocessable                 422 invalid_request_error / unprocessable_entity
    ├── RateLimited                   429 rate_limit_error / rate_limit_exceeded (+ retry_after)
    ├── InsufficientQuota             429 insufficient_quota / insufficient_quota
    ├── UpstreamError                 502 api_error / upstream_error
    ├── ServiceUnavailable            503 api_error / service_unavailable
    │   ├── NoCapacity                503 api_error / no_capacity
    │   └── RelayUnavailable          503 … / personal_lattice_relay_unavailable
    └── UpstreamTimeout               504 api_error / upstream_timeout
        └── ExecutionTimeout          504 … / personal_lattice_execution_timeout

The wording of OpenAI's own envelope is followed (``error.message``, ``error.type``,
``error.param``, ``error.code``; https://platform.openai.com/docs/guides/error-codes).
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "Conflict",
    "ExecutionTimeout",
    "InsufficientQuota",
    "InvalidRequest",
    "LatticeError",
    "MethodNotAllowed",
    "ModelNotFound",
    "NoCapacity",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "RateLimited",
    "RelayUnavailable",
    "RequestTimeout",
    "RuntimeNotFound",
    "ServiceUnavailable",
    "TaskNotFound",
    "Unprocessable",
    "UnsupportedMediaType",
    "UnsupportedParameter",
    "UpstreamError",
    "UpstreamTimeout",
    "UserCodeNotFound",
]


class LatticeError(Exception):
    """Base of every error the gateway renders to a caller."""

    status: int = 500
    type: str = "api_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def envelope(self) -> dict[str, dict[str, str | None]]:
        """OpenAI's error envelope for this error."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(LatticeError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"


class AuthenticationFailed(LatticeError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(LatticeError):
    status = 403
    type = "permission_error"
    code = "insufficient_scopes"


class NotFound(LatticeError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class TaskNotFound(NotFound):
    code = "task_not_found"


class RuntimeNotFound(NotFound):
    """A personal runtime that does not exist or belongs to another workspace (the two are
    answered identically)."""

    code = "personal_lattice_not_found"


class UserCodeNotFound(NotFound):
    """No pending device authorization (RFC 8628) has this user code."""

    code = "user_code_not_found"


class MethodNotAllowed(LatticeError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(LatticeError):
    """The request did not arrive in time (RFC 9110 §15.5.9). The front door's protocol
    answers it and closes the connection (gateway/front/protocol.py): what is left of the
    request would otherwise be read as the next one."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class Conflict(LatticeError):
    status = 409
    type = "invalid_request_error"
    code = "idempotency_key_reused"


class PayloadTooLarge(LatticeError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(LatticeError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class Unprocessable(LatticeError):
    status = 422
    type = "invalid_request_error"
    code = "unprocessable_entity"


class RateLimited(LatticeError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class InsufficientQuota(LatticeError):
    """The workspace's monthly spend limit or prepaid credit does not cover the request:
    OpenAI's 429 ``insufficient_quota`` (its SDKs raise ``RateLimitError``; retrying does
    not help until the limit or credit changes)."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class UpstreamError(LatticeError):
    status = 502
    type = "api_error"
    code = "upstream_error"


class ServiceUnavailable(LatticeError):
    status = 503
    type = "api_error"
    code = "service_unavailable"


class NoCapacity(ServiceUnavailable):
    code = "no_capacity"


class RelayUnavailable(ServiceUnavailable):
    """The personal runtime named by the request has no tunnel open right now."""

    code = "personal_lattice_relay_unavailable"


class UpstreamTimeout(LatticeError):
    status = 504
    type = "api_error"
    code = "upstream_timeout"


class ExecutionTimeout(UpstreamTimeout):
    """A personal runtime gave no result within the dispatch's deadline."""

    code = "personal_lattice_execution_timeout"
