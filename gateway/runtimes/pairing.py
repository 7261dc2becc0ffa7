"""The device authorization and token endpoints of RFC 8628, on authlib's implementation.

authlib's server classes are synchronous and framework-agnostic; Redis is async here. The
bridge: every request first *loads* what authlib will ask for (the device grant), then runs
authlib's endpoint synchronously over that snapshot (no I/O inside), then *applies* the
writes authlib's callbacks recorded on the request (store the new grant, remember a poll,
issue the credential). The one write that must be exactly-once, issuing the credential, is a
Lua compare-and-set (``device_pair.lua``): if a concurrent poll consumed the grant first, this
poll answers ``invalid_grant`` instead of the token authlib built.

Protocol points (RFC 8628):

- §3.1/3.2: ``POST device_authorization`` with ``client_id=lattice-daemon`` (a public client,
  auth method ``none``) and an optional ``name`` returns ``device_code``, ``user_code``
  (§6.1 alphabet, ``XXXX-XXXX``), ``verification_uri``, ``verification_uri_complete``,
  ``expires_in`` and ``interval``;
- §3.4/3.5: the token endpoint answers ``authorization_pending`` until the user decides,
  ``slow_down`` (and 5 more seconds of ``interval`` from then on) to a poll that came sooner
  than the interval, ``access_denied``, ``expired_token``; an unknown or already used device
  code is ``invalid_grant`` (RFC 6749 §5.2). Errors are OAuth JSON, not the OpenAI envelope;
- on approval the token response carries the runtime credential as a Bearer
  ``access_token`` and the ``runtime_id``; there is no refresh token and no expiry: the
  credential lives until the runtime is revoked.
"""

from __future__ import annotations

import secrets
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from authlib.oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import (
    ClientMixin,
    InvalidGrantError,
    InvalidRequestError,
    OAuth2Error,
    OAuth2Request,
)
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc8628 import (
    DEVICE_CODE_GRANT_TYPE,
    DeviceAuthorizationEndpoint,
    DeviceCodeGrant,
    DeviceCredentialMixin,
)

from gateway import keys
from gateway.errors import InvalidRequest
from gateway.runtimes.device_grants import DeviceGrant, DeviceGrantStore, device_key
from gateway.runtimes.records import validate_runtime_name
from gateway.runtimes.store import RuntimeStore
from gateway.runtimes.user_codes import new_user_code, normalise_user_code

__all__ = [
    "CLIENT_ID",
    "DEVICE_CODE_GRANT_TYPE",
    "DevicePairing",
    "OAuthResponse",
    "PairingConfig",
    "oauth_error",
    "parse_form",
    "polled_too_soon",
]

#: The one OAuth client of the device flow: the daemon (a public client, RFC 6749 §2.1).
CLIENT_ID = "lattice-daemon"
#: RFC 8628 §3.5: "the interval MUST be increased by 5 seconds" on every ``slow_down``.
SLOW_DOWN_STEP_S = 5
#: authlib refuses plain-http request URIs outside loopback (RFC 6749 §3.1 wants TLS). The
#: gateway cannot see whether TLS ended at a load balancer in front of it, so transport
#: security is the deployment's job (as for API keys) and authlib gets a fixed https origin;
#: it uses the URI for nothing else.
_AUTHLIB_ORIGIN = "https://gateway.lattice.invalid"
#: A user code is 20^8 values; a collision with a live code regenerates it.
_USER_CODE_ATTEMPTS = 8


class PairingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``lifetime_s``: device and user code lifetime (§3.2 ``expires_in``); ``interval_s``:
    the polling interval granted (§3.2 ``interval``); ``poll_grace_ms``: how much sooner than
    the interval a poll may arrive before it earns ``slow_down`` (network jitter)."""

    lifetime_s: int = keys.DEVICE_CODE_LIFETIME_S
    interval_s: int = 5
    poll_grace_ms: int = 200


class OAuthResponse(msgspec.Struct, frozen=True):
    """What an OAuth endpoint answers: status, JSON body, headers (``no-store`` included)."""

    status: int
    body: dict[str, Any]
    headers: list[tuple[str, str]]


def polled_too_soon(last_poll_ms: int | None, interval_s: int, now_ms: int, grace_ms: int) -> bool:
    """RFC 8628 §3.5 ``slow_down``: did this poll come sooner than ``interval_s`` after the
    previous one (less ``grace_ms`` of tolerance)?"""
    if last_poll_ms is None:
        return False
    return now_ms - last_poll_ms < interval_s * 1000 - grace_ms


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def oauth_error(error: str, description: str, status: int = 400) -> OAuthResponse:
    """An RFC 6749 §5.2 error response."""
    return _error(OAuth2Error(description, status_code=status, error=error))


def parse_form(raw: bytes, content_type: str | None) -> dict[str, str] | OAuthResponse:
    """The fields of an ``application/x-www-form-urlencoded`` body (RFC 6749 §3.2, RFC 8628
    §3.1), else an ``invalid_request`` response: another content type, bad encoding, or a
    parameter sent twice ("parameters MUST NOT be included more than once", §3.2)."""
    base = (content_type or "").split(";", 1)[0].strip().lower()
    if base != "application/x-www-form-urlencoded":
        return oauth_error("invalid_request", "Send the parameters form-encoded.")
    try:
        pairs = urllib.parse.parse_qsl(
            raw.decode("ascii"), keep_blank_values=True, errors="strict", max_num_fields=32
        )
    except (UnicodeDecodeError, ValueError):
        return oauth_error("invalid_request", "The form body is malformed.")
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            return oauth_error("invalid_request", "A parameter is repeated.")
        form[name] = value
    return form


# -- authlib's models -----------------------------------------------------------------------


class _DaemonClient(ClientMixin):  # type: ignore[misc]
    """``lattice-daemon``: public (no secret), device code grant only, no refresh tokens."""

    def get_client_id(self) -> str:
        return CLIENT_ID

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return bool(method == "none")

    def check_client_secret(self, client_secret: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return bool(grant_type == DEVICE_CODE_GRANT_TYPE)

    def get_allowed_scope(self, scope: str) -> str:
        return ""


_CLIENT = _DaemonClient()


class _Request(OAuth2Request):  # type: ignore[misc]
    """A form POST as authlib sees it, with the pre-loaded grant and the writes to apply."""

    def __init__(
        self, path: str, form: Mapping[str, str], now_ms: int, grant: DeviceGrant | None
    ) -> None:
        super().__init__("POST", _AUTHLIB_ORIGIN + path, headers={})
        self.payload = BasicOAuth2Payload(dict(form))
        self._form = dict(form)
        self.now_ms = now_ms
        self.loaded = grant
        #: Set by the grant when it read a pending grant's poll: the interval now in force.
        self.poll_interval_s: int | None = None
        #: Set by ``save_token``: the token authlib built, to be stored before it is sent.
        self.issued: dict[str, Any] | None = None

    @property
    def form(self) -> dict[str, str]:
        return self._form

    @property
    def args(self) -> dict[str, str]:
        return {}


class _Credential(DeviceCredentialMixin):  # type: ignore[misc]
    def __init__(self, grant: DeviceGrant, now_ms: int) -> None:
        self.grant = grant
        self._now_ms = now_ms

    def get_client_id(self) -> str:
        return self.grant.client_id

    def get_scope(self) -> str:
        return ""

    def get_user_code(self) -> str:
        return self.grant.user_code

    def is_expired(self) -> bool:
        return self.grant.expired(self._now_ms)


class _DeviceCodeGrant(DeviceCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["none"]

    def query_device_credential(self, device_code: str) -> _Credential:
        grant = self.request.loaded
        if grant is None:
            # RFC 6749 §5.2: an unknown, used or revoked grant is invalid_grant.
            raise InvalidGrantError("Unknown or already used device code.")
        return _Credential(grant, self.request.now_ms)

    def query_user_grant(self, user_code: str) -> tuple[str | None, bool] | None:
        grant: DeviceGrant = self.request.loaded
        if grant.status == "approved" and grant.runtime_id is not None:
            return grant.runtime_id, True
        if grant.status == "denied":
            return None, False
        return None

    def should_slow_down(self, credential: _Credential) -> bool:
        grant = credential.grant
        slow = polled_too_soon(
            grant.last_poll_ms, grant.interval_s, self.request.now_ms, self.server.poll_grace_ms
        )
        self.request.poll_interval_s = grant.interval_s + (SLOW_DOWN_STEP_S if slow else 0)
        return slow


class _DeviceAuthorizationEndpoint(DeviceAuthorizationEndpoint):  # type: ignore[misc]
    """One instance per request: ``saved`` carries what authlib asked to store."""

    CLIENT_AUTH_METHODS = ["none"]

    def __init__(self, server: _Server, verification_uri: str, config: PairingConfig) -> None:
        super().__init__(server)
        self.EXPIRES_IN = config.lifetime_s
        self.INTERVAL = config.interval_s
        self._verification_uri = verification_uri
        self.saved: dict[str, Any] | None = None

    def generate_user_code(self) -> str:
        return new_user_code()

    def generate_device_code(self) -> str:
        return secrets.token_urlsafe(32)

    def get_verification_uri(self) -> str:
        return self._verification_uri

    def save_device_credential(
        self, client_id: str, scope: str | None, data: dict[str, Any]
    ) -> None:
        self.saved = {"client_id": client_id, **data}


def _bearer_credential(
    grant_type: str,
    client: ClientMixin,
    user: str | None = None,
    scope: str | None = None,
    expires_in: int | None = None,
    include_refresh_token: bool = True,
) -> dict[str, Any]:
    """authlib's token generator: the runtime credential as a Bearer token (no expiry, no
    refresh token: it lives until the runtime is revoked). ``user`` is the runtime id."""
    assert user is not None
    return {
        "access_token": RuntimeStore.mint_credential(user),
        "token_type": "Bearer",
        "runtime_id": user,
    }


class _Server(AuthorizationServer):  # type: ignore[misc]
    def __init__(self, poll_grace_ms: int) -> None:
        super().__init__()
        self.poll_grace_ms = poll_grace_ms
        self.register_grant(_DeviceCodeGrant)
        self.register_token_generator("default", _bearer_credential)

    def query_client(self, client_id: str) -> _DaemonClient | None:
        return _CLIENT if client_id == CLIENT_ID else None

    def create_oauth2_request(self, request: _Request) -> _Request:
        return request  # the route already built it

    def create_json_request(self, request: object) -> None:
        raise NotImplementedError("no JSON endpoints in the device flow")

    def handle_response(
        self, status: int, body: dict[str, Any], headers: list[tuple[str, str]]
    ) -> OAuthResponse:
        return OAuthResponse(status, dict(body), list(headers))

    def send_signal(self, name: str, *args: object, **kwargs: object) -> None:
        return None  # no signal listeners

    def save_token(self, token: dict[str, Any], request: _Request) -> None:
        request.issued = token


def _error(exc: OAuth2Error) -> OAuthResponse:
    status, body, headers = exc()
    return OAuthResponse(status, dict(body), list(headers))


class DevicePairing:
    """The two RFC 8628 endpoints as a service: form fields in, :class:`OAuthResponse` out."""

    def __init__(
        self,
        runtimes: RuntimeStore,
        grants: DeviceGrantStore,
        config: PairingConfig | None = None,
        *,
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        self.config = config or PairingConfig()
        self._runtimes = runtimes
        self._grants = grants
        self._clock = clock
        self._server = _Server(self.config.poll_grace_ms)

    async def device_authorization(
        self, form: Mapping[str, str], verification_uri: str
    ) -> OAuthResponse:
        """§3.1/3.2: register a pending grant and answer with its codes."""
        name = form.get("name")
        if name is not None:
            try:
                name = validate_runtime_name(name)
            except InvalidRequest as exc:
                return _error(InvalidRequestError(exc.message))
        now = self._clock()
        for _ in range(_USER_CODE_ATTEMPTS):
            request = _Request("/v1/oauth/device_authorization", form, now, None)
            endpoint = _DeviceAuthorizationEndpoint(self._server, verification_uri, self.config)
            try:
                response = self._server.handle_response(*endpoint(request))
            except OAuth2Error as exc:
                return _error(exc)
            saved = endpoint.saved
            assert saved is not None
            user_code = normalise_user_code(saved["user_code"])
            assert user_code is not None
            grant = DeviceGrant(
                device_key=device_key(saved["device_code"]),
                client_id=saved["client_id"],
                user_code=user_code,
                created_ms=now,
                expires_ms=now + saved["expires_in"] * 1000,
                interval_s=saved["interval"],
                name=name,
            )
            if await self._grants.create(grant, now):
                return response
        raise RuntimeError("could not allocate a free user code")  # 20^8 codes: unreachable

    async def token(self, form: Mapping[str, str]) -> OAuthResponse:
        """§3.4/3.5: answer one poll of the token endpoint."""
        code = form.get("device_code")
        key = device_key(code) if code else None
        grant = await self._grants.get(key) if key is not None else None
        now = self._clock()
        request = _Request("/v1/oauth/token", form, now, grant)
        response: OAuthResponse = self._server.create_token_response(request)
        if grant is None or key is None:
            return response
        if request.poll_interval_s is not None:
            await self._grants.record_poll(key, now, request.poll_interval_s)
        if request.issued is None:
            return response
        runtime_id = request.issued["runtime_id"]
        credential = request.issued["access_token"]
        if await self._runtimes.pair_device(key, runtime_id, credential) is None:
            # A concurrent poll consumed the grant, or the runtime was revoked meanwhile.
            return _error(InvalidGrantError("Unknown or already used device code."))
        return response
