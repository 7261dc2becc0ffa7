"""Pairing this machine with a gateway: the device flow (RFC 8628) or a bootstrap token.

Device flow (``lattice daemon pair --gateway URL [--name NAME]``):

1. ``POST /v1/oauth/device_authorization`` (form: ``client_id=lattice-daemon``, ``name``);
2. show the user code and the verification URI (§3.3) — the workspace owner approves it with
   ``lattice runtimes approve CODE``;
3. poll ``POST /v1/oauth/token`` every ``interval`` seconds (§3.4), 5 seconds more after each
   ``slow_down`` (§3.5), until a token, ``access_denied``, ``expired_token`` or an unknown
   code (``invalid_grant``) ends it.

Bootstrap (``lattice daemon pair --gateway URL --token lbt_…``): ``POST
/v1/personal-runtimes/bootstrap`` redeems the one-time token once.

Either way the result is stored with :func:`daemon.config.save_credentials` (mode 0600).
HTTP is the stdlib's (urllib): the daemon does not import the gateway. The poll decision is a
pure function (:func:`poll_outcome`); time is only ``sleep``, which tests replace.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from daemon.config import RuntimeCredentials, save_credentials

__all__ = [
    "CLIENT_ID",
    "DEVICE_CODE_GRANT_TYPE",
    "DeviceCode",
    "PairingError",
    "PollOutcome",
    "normalise_gateway_url",
    "pair",
    "pair_with_device_code",
    "poll_outcome",
    "redeem_bootstrap_token",
]

CLIENT_ID = "lattice-daemon"
DEVICE_CODE_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
#: RFC 8628 §3.5: on ``slow_down`` "the interval MUST be increased by 5 seconds".
SLOW_DOWN_STEP_S = 5
#: Consecutive failed polls (network errors, 5xx) tolerated before giving up.
_MAX_TRANSIENT_FAILURES = 5


class PairingError(Exception):
    """Pairing ended without a credential; the message says why and what to do."""


class DeviceCode(msgspec.Struct, frozen=True):
    """RFC 8628 §3.2 device authorization response."""

    device_code: str
    user_code: str
    verification_uri: str
    expires_in: int
    interval: int = 5
    verification_uri_complete: str | None = None


class PollOutcome(msgspec.Struct, frozen=True):
    """What to do after one poll: ``done`` with a credential, ``wait`` ``interval`` seconds
    and poll again, or ``fail`` with a message."""

    action: str  # "done" | "wait" | "fail"
    interval: int = 0
    runtime_id: str | None = None
    credential: str | None = None
    message: str | None = None


_AGAIN = "Run `lattice daemon pair` again for a new code."


def poll_outcome(status: int, body: Any, interval: int) -> PollOutcome:
    """Decide from one token-endpoint answer (RFC 8628 §3.5); ``status`` 0 means the
    gateway could not be reached. Pure."""
    if not isinstance(body, dict):
        body = {}
    if status == 200:
        token, runtime_id = body.get("access_token"), body.get("runtime_id")
        if isinstance(token, str) and isinstance(runtime_id, str):
            return PollOutcome("done", interval, runtime_id=runtime_id, credential=token)
        return PollOutcome("fail", message="The gateway's token response lacks a credential.")
    error = body.get("error")
    if error == "authorization_pending":
        return PollOutcome("wait", interval)
    if error == "slow_down":
        return PollOutcome("wait", interval + SLOW_DOWN_STEP_S)
    if error == "access_denied":
        return PollOutcome(
            "fail",
            message="Pairing was denied: the code was refused (or burned after too "
            "many attempts). " + _AGAIN,
        )
    if error == "expired_token":
        return PollOutcome("fail", message="The code expired before it was approved. " + _AGAIN)
    if error == "invalid_grant":
        return PollOutcome(
            "fail",
            message="The gateway does not know this pairing request (unknown or already used "
            "device code). " + _AGAIN,
        )
    if status == 0 or status >= 500:
        return PollOutcome("wait", interval, message="transient")
    description = body.get("error_description") or ""
    return PollOutcome(
        "fail", message=f"Pairing failed: {error or f'HTTP {status}'} {description}".strip()
    )


def normalise_gateway_url(url: str) -> str:
    """``https://host[:port][/prefix]`` without a trailing ``/`` or ``/v1``."""
    url = url.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PairingError(f"Not a gateway URL: {url!r} (expected http(s)://host[:port]).")
    return url.removesuffix("/v1")


def _post(url: str, data: bytes, content_type: str, timeout: float) -> tuple[int, Any]:
    """POST and return ``(status, decoded JSON or None)``; status 0 if unreachable."""
    request = urllib.request.Request(  # noqa: S310 - the user's own gateway URL
        url, data=data, method="POST", headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def _post_form(url: str, fields: dict[str, str], timeout: float) -> tuple[int, Any]:
    data = urllib.parse.urlencode(fields).encode()
    return _post(url, data, "application/x-www-form-urlencoded", timeout)


def _show(code: DeviceCode, out: Callable[[str], None]) -> None:
    minutes = max(1, code.expires_in // 60)
    out(f"To pair this machine, approve the code  {code.user_code}")
    out(f"  as the workspace owner:  lattice runtimes approve {code.user_code}")
    out(f"  instructions:            {code.verification_uri_complete or code.verification_uri}")
    out(f"Waiting for approval (the code expires in {minutes} minutes)...")


def pair_with_device_code(
    gateway: str,
    name: str | None = None,
    *,
    sleep: Callable[[float], None] = time.sleep,
    out: Callable[[str], None] = print,
    on_code: Callable[[DeviceCode], None] | None = None,
    timeout: float = 30.0,
) -> tuple[str, str]:
    """Run the device flow against ``gateway``; ``(runtime_id, credential)`` on approval,
    else :class:`PairingError`. ``on_code`` replaces the printed instructions."""
    base = normalise_gateway_url(gateway)
    fields = {"client_id": CLIENT_ID}
    if name:
        fields["name"] = name
    status, body = _post_form(base + "/v1/oauth/device_authorization", fields, timeout)
    if status == 0:
        raise PairingError(f"Cannot reach the gateway at {base}.")
    if status != 200:
        detail = f"HTTP {status}"
        if isinstance(body, dict):
            detail = body.get("error_description") or body.get("error") or detail
        raise PairingError(f"The gateway refused to start pairing: {detail}.")
    try:
        code = msgspec.convert(body, DeviceCode)
    except msgspec.ValidationError as exc:
        raise PairingError(f"Unexpected device authorization response: {exc}") from None
    if on_code is not None:
        on_code(code)
    else:
        _show(code, out)
    interval = max(1, code.interval)
    waited = 0.0
    failures = 0
    poll = {
        "grant_type": DEVICE_CODE_GRANT_TYPE,
        "device_code": code.device_code,
        "client_id": CLIENT_ID,
    }
    while True:
        # §3.4: wait at least `interval` seconds between polls, the first one included.
        sleep(interval)
        waited += interval
        outcome = poll_outcome(*_post_form(base + "/v1/oauth/token", poll, timeout), interval)
        if outcome.action == "done":
            assert outcome.runtime_id is not None and outcome.credential is not None
            return outcome.runtime_id, outcome.credential
        if outcome.action == "fail":
            raise PairingError(outcome.message or "Pairing failed.")
        failures = failures + 1 if outcome.message == "transient" else 0
        if failures >= _MAX_TRANSIENT_FAILURES:
            raise PairingError(f"Lost contact with the gateway at {base} while waiting.")
        if waited > code.expires_in + interval:
            raise PairingError("The code expired before it was approved. " + _AGAIN)
        interval = outcome.interval


def redeem_bootstrap_token(gateway: str, token: str, *, timeout: float = 30.0) -> tuple[str, str]:
    """Redeem a one-time bootstrap token: ``(runtime_id, credential)``, else
    :class:`PairingError`."""
    base = normalise_gateway_url(gateway)
    data = json.dumps({"token": token.strip()}).encode()
    status, body = _post(
        base + "/v1/personal-runtimes/bootstrap", data, "application/json", timeout
    )
    if status == 0:
        raise PairingError(f"Cannot reach the gateway at {base}.")
    if status == 401:
        raise PairingError(
            "The bootstrap token is invalid, expired or already used; ask for a new one "
            "(lattice runtimes create --name NAME)."
        )
    if status != 200 or not isinstance(body, dict):
        raise PairingError(f"The gateway refused the bootstrap token (HTTP {status}).")
    runtime_id, credential = body.get("runtime_id"), body.get("credential")
    if not isinstance(runtime_id, str) or not isinstance(credential, str):
        raise PairingError("The gateway's bootstrap response lacks a credential.")
    return runtime_id, credential


def pair(
    gateways: Sequence[str],
    *,
    name: str | None = None,
    token: str | None = None,
    directory: Path | None = None,
    sleep: Callable[[float], None] = time.sleep,
    out: Callable[[str], None] = print,
    on_code: Callable[[DeviceCode], None] | None = None,
) -> tuple[RuntimeCredentials, Path]:
    """Pair with the first gateway (bootstrap if ``token`` else the device flow) and store
    the credentials for all of ``gateways``; returns them and the file's path."""
    if not gateways:
        raise PairingError("No gateway: pass --gateway URL or set LATTICE_GATEWAY_URL.")
    urls = tuple(dict.fromkeys(normalise_gateway_url(g) for g in gateways))
    if token is not None:
        runtime_id, credential = redeem_bootstrap_token(urls[0], token)
    else:
        runtime_id, credential = pair_with_device_code(
            urls[0], name or socket.gethostname(), sleep=sleep, out=out, on_code=on_code
        )
    creds = RuntimeCredentials(gateway_urls=urls, runtime_id=runtime_id, credential=credential)
    return creds, save_credentials(creds, directory)
