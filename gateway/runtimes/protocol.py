"""Wire types of the personal-runtime API and of device pairing (msgspec only: stays light).

``/v1/personal-runtimes…`` speaks JSON in OpenAI's style (objects carry ``object``, lists are
``{"object": "list", "data": [...]}``, times are Unix seconds, errors use the OpenAI
envelope). ``/v1/oauth/…`` speaks OAuth: form-encoded requests, RFC 8628 / RFC 6749 JSON
responses and errors (``{"error", "error_description"}``).

Request bodies are tolerant (unknown fields are ignored), responses are exact.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "BootstrapRequest",
    "BootstrapResponse",
    "CreateRuntimeRequest",
    "CreatedPersonalRuntime",
    "DeviceAuthorizationResponse",
    "DeviceDecision",
    "DeviceDecisionRequest",
    "OAuthErrorResponse",
    "PersonalRuntime",
    "PersonalRuntimeList",
    "RuntimeStatus",
    "TokenResponse",
]

RuntimeStatus = Literal["unpaired", "reachable", "offline", "revoked"]


class PersonalRuntime(msgspec.Struct, kw_only=True):
    """``GET /v1/personal-runtimes/{id}``. Times are Unix seconds or ``null``."""

    id: str
    object: Literal["personal_runtime"] = "personal_runtime"
    name: str
    status: RuntimeStatus
    created_at: int
    paired_at: int | None
    last_seen_at: int | None
    revoked_at: int | None
    models: list[str]
    task_classes: list[str]
    default_model: str | None
    daemon_version: str | None


class CreatedPersonalRuntime(PersonalRuntime, kw_only=True):
    """``POST /v1/personal-runtimes`` (201): the new runtime and its one-time bootstrap token
    (shown only here; redeem it with ``POST /v1/personal-runtimes/bootstrap``)."""

    bootstrap_token: str
    bootstrap_expires_at: int


class PersonalRuntimeList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[PersonalRuntime]


class CreateRuntimeRequest(msgspec.Struct):
    name: str


class BootstrapRequest(msgspec.Struct):
    token: str


class BootstrapResponse(msgspec.Struct, kw_only=True):
    """The runtime credential, returned once: the daemon stores it (mode 0600)."""

    runtime_id: str
    credential: str


class DeviceDecisionRequest(msgspec.Struct):
    """``POST /v1/personal-runtimes/device/approve`` (``name`` overrides the daemon's) and
    ``…/device/deny`` (``name`` ignored)."""

    user_code: str
    name: str | None = None


class DeviceDecision(msgspec.Struct, kw_only=True):
    object: Literal["device_authorization"] = "device_authorization"
    user_code: str
    status: Literal["approved", "denied"]
    runtime: PersonalRuntime | None = None


class DeviceAuthorizationResponse(msgspec.Struct, kw_only=True):
    """RFC 8628 §3.2."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str
    expires_in: int
    interval: int


class TokenResponse(msgspec.Struct, kw_only=True):
    """RFC 6749 §5.1 with the runtime id: ``access_token`` is the runtime credential."""

    access_token: str
    token_type: Literal["Bearer"]
    runtime_id: str


class OAuthErrorResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """RFC 6749 §5.2; ``error`` is one of RFC 8628 §3.5's codes on the token endpoint."""

    error: str
    error_description: str | None = None
