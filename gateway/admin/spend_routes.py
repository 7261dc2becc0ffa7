"""The operator's spend controls for a workspace (``/admin/v1/workspaces/{name}/…``):

- ``PUT …/spend-limit`` ``{"monthly_limit_microusd": int | null}``: set or remove the
  monthly spend limit;
- ``POST …/credit`` ``{"amount_microusd": int, "grant_id": str}``: add prepaid credit (a
  negative amount corrects one), idempotent per ``grant_id`` (409 ``grant_id_reused`` for
  the same id with another amount);
- ``GET …/spend``: the workspace's spend this month.

Every route needs the ``lattice:admin`` scope, like :mod:`gateway.admin.routes`, and answers
the workspace's spend (:func:`gateway.usage_routes.spend_body`). A change is published as
``workspace-changed:<name>``, so every gateway process drops its cached "no limits" fact at
once (:meth:`billing.spend.SpendGuard.invalidate`).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from litestar import Request, Response, get, post, put
from litestar.handlers import BaseRouteHandler
from litestar.params import FromPath

from billing.spend import GrantConflict, SpendGuard
from gateway import keys
from gateway.auth.principal import Principal, Scope
from gateway.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from gateway.http import json_response, read_json_object
from gateway.runtime import Gateway
from gateway.usage_routes import spend_body

__all__ = ["MAX_AMOUNT_MICROUSD", "spend_admin_routes"]

_encoder = msgspec.json.Encoder()
#: Largest limit or grant accepted ($1,000,000): keeps pico-USD sums far inside 64 bits.
MAX_AMOUNT_MICROUSD = 10**12
_GRANT_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _amount(body: dict[str, Any], name: str, *, nullable: bool, signed: bool) -> int | None:
    if name not in body:
        raise InvalidRequest(f"Missing '{name}'.", param=name, code="missing_required_parameter")
    value = body[name]
    if value is None and nullable:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(
            f"'{name}' must be an integer (micro-USD).", param=name, code="invalid_value"
        )
    low = -MAX_AMOUNT_MICROUSD if signed else 0
    if not low <= value <= MAX_AMOUNT_MICROUSD or (signed and value == 0):
        raise InvalidRequest(
            f"'{name}' must be {'a non-zero integer' if signed else 'an integer'} between "
            f"{low} and {MAX_AMOUNT_MICROUSD}.",
            param=name,
            code="invalid_value",
        )
    return value


def _no_unknown(body: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise InvalidRequest(f"Unknown field '{unknown[0]}'.", param=unknown[0])


def spend_admin_routes(gw: Gateway) -> list[BaseRouteHandler]:
    spend = SpendGuard(gw.redis)

    async def admin(request: Request[Any, Any, Any]) -> Principal:
        principal = await gw.authenticator.authenticate_headers(request.headers)
        if not principal.has(Scope.ADMIN):
            raise PermissionDenied(f"The admin API needs the scope '{Scope.ADMIN}'.")
        return principal

    async def existing(name: str) -> str:
        if await gw.workspaces.get(name) is None:
            raise NotFound(f"Workspace {name!r} not found.", code="workspace_not_found")
        return name

    async def answer(name: str) -> Response[bytes]:
        return json_response(_encoder.encode(spend_body(await spend.state(name))))

    async def changed(name: str) -> None:
        await gw.redis.publish(keys.EVENTS_CHANNEL, f"workspace-changed:{name}")

    @put("/admin/v1/workspaces/{name:str}/spend-limit", status_code=200)
    async def spend_limit(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[bytes]:
        await admin(request)
        _, body = await read_json_object(request, gw.settings.max_body_bytes)
        _no_unknown(body, {"monthly_limit_microusd"})
        limit = _amount(body, "monthly_limit_microusd", nullable=True, signed=False)
        await spend.set_limit(await existing(name), limit)
        await changed(name)
        return await answer(name)

    @post("/admin/v1/workspaces/{name:str}/credit", status_code=200)
    async def credit(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[bytes]:
        await admin(request)
        _, body = await read_json_object(request, gw.settings.max_body_bytes)
        _no_unknown(body, {"amount_microusd", "grant_id"})
        amount = _amount(body, "amount_microusd", nullable=False, signed=True)
        assert amount is not None
        grant_id = body.get("grant_id")
        if not isinstance(grant_id, str) or not _GRANT_ID_RE.match(grant_id):
            raise InvalidRequest(
                "'grant_id' must be 1-128 characters A-Z, a-z, 0-9, '.', '_', ':' or '-'.",
                param="grant_id",
                code="invalid_value",
            )
        try:
            added = await spend.add_credit(await existing(name), amount, grant_id=grant_id)
        except GrantConflict:
            raise Conflict(
                f"The grant id '{grant_id}' was already used with another amount.",
                param="grant_id",
                code="grant_id_reused",
            ) from None
        await changed(name)
        state = spend_body(await spend.state(name))
        return json_response(_encoder.encode({**state, "grant_id": grant_id, "added": added}))

    @get("/admin/v1/workspaces/{name:str}/spend")
    async def spend_show(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[bytes]:
        await admin(request)
        return await answer(await existing(name))

    return [spend_limit, credit, spend_show]
