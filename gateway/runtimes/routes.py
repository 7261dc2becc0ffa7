"""HTTP routes of personal runtimes and device pairing: decode, call a service, encode.

``/v1/personal-runtimes…`` (OpenAI-style JSON, the caller's API key or OAuth token with the
scope ``lattice:compute:personal_runtime:manage``, except ``…/bootstrap`` whose token is its
own credential) and ``/v1/oauth/…`` (RFC 8628, OAuth JSON), plus ``GET /device``, the page
the verification URI points at. See ``pairing.py`` and ``approvals.py`` for the rules.
"""

from __future__ import annotations

import html
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.handlers import BaseRouteHandler
from litestar.params import FromPath

from gateway.auth.principal import Principal, Scope
from gateway.errors import (
    AuthenticationFailed,
    InvalidRequest,
    PayloadTooLarge,
    PermissionDenied,
    RuntimeNotFound,
)
from gateway.http import json_response, read_json_object
from gateway.runtime import Gateway
from gateway.runtimes.approvals import DeviceApprovals
from gateway.runtimes.device_grants import DeviceGrantStore
from gateway.runtimes.pairing import DevicePairing, OAuthResponse, parse_form
from gateway.runtimes.protocol import (
    BootstrapRequest,
    BootstrapResponse,
    CreatedPersonalRuntime,
    CreateRuntimeRequest,
    DeviceDecision,
    DeviceDecisionRequest,
    PersonalRuntime,
    PersonalRuntimeList,
)
from gateway.runtimes.ratelimit import FixedWindow
from gateway.runtimes.records import RuntimeRecord, RuntimeStatus
from gateway.runtimes.user_codes import display_user_code, normalise_user_code

__all__ = ["runtime_object", "runtime_routes"]

_encoder = msgspec.json.Encoder()
_T = TypeVar("_T")
#: OAuth form bodies are a few short fields.
_MAX_FORM_BYTES = 8 * 1024
_DEVICE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Pair a Lattice runtime</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:40em;margin:3em auto;padding:0 1em;
line-height:1.5}}code{{background:#f3f3f3;padding:.1em .3em}}</style></head>
<body><h1>Pair a Lattice runtime</h1>
<p>A machine running <code>lattice daemon pair</code> shows a code of eight letters.
Approve it as the owner of the workspace the runtime should join:</p>
<pre><code>lattice runtimes approve {code}</code></pre>
<p>or call <code>POST /v1/personal-runtimes/device/approve</code> with
<code>{{"user_code": "{code}"}}</code> and a key holding the scope
<code>lattice:compute:personal_runtime:manage</code>. To refuse it:
<code>lattice runtimes deny {code}</code>.</p>
<p><strong>Only approve a code that you see on your own machine, from a pairing you
started.</strong> An approved runtime receives your workspace's requests.</p>
</body></html>
"""


def _seconds(ms: int | None) -> int | None:
    return None if ms is None else ms // 1000


def runtime_object(record: RuntimeRecord, status: RuntimeStatus) -> PersonalRuntime:
    """The public view of a runtime: no secret, no digest; times in Unix seconds."""
    return PersonalRuntime(
        id=record.id,
        name=record.name,
        status=status,
        created_at=record.created_ms // 1000,
        paired_at=_seconds(record.paired_ms),
        last_seen_at=_seconds(record.last_seen_ms),
        revoked_at=_seconds(record.revoked_ms),
        models=list(record.models),
        task_classes=list(record.task_classes),
        default_model=record.default_model,
        daemon_version=record.daemon_version,
    )


def _not_found(runtime_id: str) -> RuntimeNotFound:
    # The same template for an unknown id and another workspace's runtime.
    return RuntimeNotFound(
        f"The personal runtime '{runtime_id}' does not exist or you do not have access to it."
    )


def _oauth_response(result: OAuthResponse) -> Response[bytes]:
    headers = {k: v for k, v in result.headers if k.lower() != "content-type"}
    return Response(
        _encoder.encode(result.body),
        status_code=result.status,
        media_type="application/json",
        headers=headers,
    )


def _address(request: Request[Any, Any, Any]) -> str:
    """The client's address: the socket peer, or what a trusted proxy (``forwarded_allow_ips``)
    said in ``X-Forwarded-For`` (uvicorn rewrites the scope's client before we see it)."""
    client = request.client
    return client.host if client is not None else "unknown"


def runtime_routes(
    gw: Gateway,
    *,
    pairing: DevicePairing | None = None,
    approvals: DeviceApprovals | None = None,
) -> list[BaseRouteHandler]:
    """The routes, over ``gw.runtimes``; tests may pass services with their own clock and
    limits."""
    grants = DeviceGrantStore(gw.redis)
    pairing = pairing or DevicePairing(gw.runtimes, grants)
    approvals = approvals or DeviceApprovals(gw.runtimes, grants, FixedWindow(gw.redis))

    async def manager(request: Request[Any, Any, Any]) -> Principal:
        principal = await gw.authenticator.authenticate_headers(request.headers)
        if not principal.has(Scope.RUNTIME_MANAGE):
            raise PermissionDenied(
                f"Managing personal runtimes needs the scope '{Scope.RUNTIME_MANAGE}'.",
                code="insufficient_scopes",
            )
        return principal

    async def body_of(request: Request[Any, Any, Any], kind: type[_T]) -> _T:
        _, body = await read_json_object(request, gw.settings.max_body_bytes)
        try:
            return msgspec.convert(body, kind)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(str(exc), code="invalid_value") from None

    async def form_of(request: Request[Any, Any, Any]) -> dict[str, str] | OAuthResponse:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > _MAX_FORM_BYTES:
            raise PayloadTooLarge(f"The request body is larger than {_MAX_FORM_BYTES} bytes.")
        raw = await request.body()
        if len(raw) > _MAX_FORM_BYTES:
            raise PayloadTooLarge(f"The request body is larger than {_MAX_FORM_BYTES} bytes.")
        return parse_form(raw, request.headers.get("content-type"))

    # -- RFC 8628 ---------------------------------------------------------------------------

    @post("/v1/oauth/device_authorization", status_code=200)
    async def device_authorization(request: Request[Any, Any, Any]) -> Response[bytes]:
        form = await form_of(request)
        if isinstance(form, OAuthResponse):
            return _oauth_response(form)
        # Behind a proxy the request's own URL is the proxy's upstream, not what the user's
        # browser can open: the configured public URL wins.
        base = (gw.settings.public_url or str(request.base_url)).rstrip("/")
        return _oauth_response(await pairing.device_authorization(form, base + "/device"))

    @post("/v1/oauth/token", status_code=200)
    async def token(request: Request[Any, Any, Any]) -> Response[bytes]:
        form = await form_of(request)
        if isinstance(form, OAuthResponse):
            return _oauth_response(form)
        return _oauth_response(await pairing.token(form))

    @get("/device")
    async def device_page(request: Request[Any, Any, Any]) -> Response[bytes]:
        code = normalise_user_code(request.query_params.get("user_code") or "")
        shown = display_user_code(code) if code else "XXXX-XXXX"
        page = _DEVICE_PAGE.format(code=html.escape(shown))
        return Response(
            page.encode(),
            media_type="text/html; charset=utf-8",
            headers={
                "cache-control": "no-store",
                "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'",
                "x-frame-options": "DENY",
            },
        )

    @post("/v1/personal-runtimes/device/approve", status_code=200)
    async def device_approve(request: Request[Any, Any, Any]) -> Response[bytes]:
        principal = await manager(request)
        body = await body_of(request, DeviceDecisionRequest)
        record = await approvals.approve(
            principal.workspace, body.user_code, _address(request), body.name
        )
        decision = DeviceDecision(
            user_code=display_user_code(normalise_user_code(body.user_code) or body.user_code),
            status="approved",
            runtime=runtime_object(record, "unpaired"),
        )
        return json_response(_encoder.encode(decision))

    @post("/v1/personal-runtimes/device/deny", status_code=200)
    async def device_deny(request: Request[Any, Any, Any]) -> Response[bytes]:
        await manager(request)
        body = await body_of(request, DeviceDecisionRequest)
        shown = await approvals.deny(body.user_code, _address(request))
        return json_response(_encoder.encode(DeviceDecision(user_code=shown, status="denied")))

    # -- headless pairing -------------------------------------------------------------------

    @post("/v1/personal-runtimes", status_code=201)
    async def create_runtime(request: Request[Any, Any, Any]) -> Response[bytes]:
        principal = await manager(request)
        body = await body_of(request, CreateRuntimeRequest)
        record, bootstrap = await gw.runtimes.create(principal.workspace, body.name)
        view = runtime_object(record, "unpaired")
        created = CreatedPersonalRuntime(
            **msgspec.structs.asdict(view),
            bootstrap_token=bootstrap,
            bootstrap_expires_at=gw.runtimes.bootstrap_expires_ms(record) // 1000,
        )
        return json_response(_encoder.encode(created), 201)

    @post("/v1/personal-runtimes/bootstrap", status_code=200)
    async def bootstrap(request: Request[Any, Any, Any]) -> Response[bytes]:
        # No Authorization header: the one-time token is the credential.
        body = await body_of(request, BootstrapRequest)
        redeemed = await gw.runtimes.redeem_bootstrap(body.token)
        if redeemed is None:
            raise AuthenticationFailed(
                "Invalid, expired or already used bootstrap token.",
                code="invalid_bootstrap_token",
            )
        record, credential = redeemed
        out = BootstrapResponse(runtime_id=record.id, credential=credential)
        return json_response(_encoder.encode(out), headers={"cache-control": "no-store"})

    # -- listing and revocation -------------------------------------------------------------

    @get("/v1/personal-runtimes")
    async def list_runtimes(request: Request[Any, Any, Any]) -> Response[bytes]:
        principal = await manager(request)
        pairs = await gw.runtimes.list_with_status(principal.workspace)
        data = [runtime_object(record, status) for record, status in pairs]
        return json_response(_encoder.encode(PersonalRuntimeList(data=data)))

    @get("/v1/personal-runtimes/{runtime_id:str}")
    async def get_runtime(
        request: Request[Any, Any, Any], runtime_id: FromPath[str]
    ) -> Response[bytes]:
        principal = await manager(request)
        found = await gw.runtimes.get_with_status(principal.workspace, runtime_id)
        if found is None:
            raise _not_found(runtime_id)
        return json_response(_encoder.encode(runtime_object(*found)))

    @delete("/v1/personal-runtimes/{runtime_id:str}", status_code=200)
    async def revoke_runtime(
        request: Request[Any, Any, Any], runtime_id: FromPath[str]
    ) -> Response[bytes]:
        principal = await manager(request)
        record = await gw.runtimes.revoke(principal.workspace, runtime_id)
        if record is None:
            raise _not_found(runtime_id)
        return json_response(_encoder.encode(runtime_object(record, "revoked")))

    return [
        device_authorization,
        token,
        device_page,
        device_approve,
        device_deny,
        create_runtime,
        bootstrap,
        list_runtimes,
        get_runtime,
        revoke_runtime,
    ]
