"""``GET /v1/usage`` and ``GET /v1/usage/spend``: a workspace's own usage and spend.

Both need the scope ``lattice:compute:usage:read`` (403 ``insufficient_scopes`` otherwise)
and only ever show the caller's workspace: the workspace comes from the credential, never
from the request, and the ledger is read by workspace (:mod:`billing.usage_query`).

``GET /v1/usage?start=YYYY-MM-DD&end=YYYY-MM-DD&group_by=day|model|key|tag&format=json|csv``
(defaults: the current UTC month up to today, ``day``, ``json``). Days are UTC; a range is
at most :data:`billing.usage_query.MAX_DAYS` days. A bad parameter is a 400 naming it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, cast

import msgspec
from litestar import Request, Response, get
from litestar.handlers import BaseRouteHandler

from billing.spend import SpendGuard, SpendState
from billing.usage_query import GROUPS, GroupBy, UsageQuery, days_between, parse_day, render_csv
from gateway.auth.principal import Principal, Scope
from gateway.errors import InvalidRequest, PermissionDenied
from gateway.http import json_response
from gateway.runtime import Gateway

__all__ = ["UsageParams", "spend_body", "usage_params", "usage_routes"]

_encoder = msgspec.json.Encoder()
_FORMATS = ("json", "csv")


class UsageParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    start: dt.date
    end: dt.date
    group_by: GroupBy
    format: str


def _day(params: Mapping[str, str], name: str, default: dt.date) -> dt.date:
    text = params.get(name)
    if text is None:
        return default
    try:
        return parse_day(text)
    except ValueError:
        raise InvalidRequest(
            f"Invalid '{name}': expected a date as YYYY-MM-DD.", param=name, code="invalid_value"
        ) from None


def usage_params(params: Mapping[str, str], today: dt.date) -> UsageParams:
    """The query's parameters, validated (pure); :class:`InvalidRequest` names a bad one."""
    end = _day(params, "end", today)
    start = _day(params, "start", end.replace(day=1))
    try:
        days_between(start, end)
    except ValueError as exc:
        raise InvalidRequest(
            f"Invalid 'start': {exc}.", param="start", code="invalid_value"
        ) from None
    group_by = params.get("group_by", "day")
    if group_by not in GROUPS:
        raise InvalidRequest(
            f"Invalid 'group_by': use one of {', '.join(GROUPS)}.",
            param="group_by",
            code="invalid_value",
        )
    fmt = params.get("format", "json")
    if fmt not in _FORMATS:
        raise InvalidRequest(
            "Invalid 'format': use json or csv.", param="format", code="invalid_value"
        )
    return UsageParams(start, end, cast(GroupBy, group_by), fmt)


def spend_body(state: SpendState) -> dict[str, Any]:
    """The JSON of a workspace's spend (``/v1/usage/spend`` and the admin API)."""
    return {
        "object": "spend",
        "workspace": state.workspace,
        "month": state.month,
        "monthly_limit_microusd": state.monthly_limit_microusd,
        "spent_microusd": state.spent_microusd,
        "reserved_microusd": state.reserved_microusd,
        "credit_enabled": state.credit_enabled,
        "credit_balance_microusd": state.credit_microusd if state.credit_enabled else None,
        "spent_picousd": state.spent_picousd,
        "reserved_picousd": state.reserved_picousd,
        "credit_balance_picousd": state.credit_picousd if state.credit_enabled else None,
    }


def usage_routes(gw: Gateway) -> list[BaseRouteHandler]:
    ledger = UsageQuery(gw.redis)
    spend = SpendGuard(gw.redis)

    async def reader(request: Request[Any, Any, Any]) -> Principal:
        principal = await gw.authenticator.authenticate_headers(request.headers)
        if not principal.has(Scope.USAGE_READ):
            raise PermissionDenied(
                f"This credential lacks the scope '{Scope.USAGE_READ}' required to read usage."
            )
        return principal

    @get("/v1/usage")
    async def usage(request: Request[Any, Any, Any]) -> Response[bytes]:
        principal = await reader(request)
        today = dt.datetime.now(dt.UTC).date()
        p = usage_params(dict(request.query_params), today)
        rows = await ledger.usage(
            principal.workspace, start_day=p.start, end_day=p.end, group_by=p.group_by
        )
        if p.format == "csv":
            name = f"usage-{p.start}-{p.end}-{p.group_by}.csv"
            return Response(
                render_csv(rows, p.group_by).encode(),
                media_type="text/csv; charset=utf-8",
                headers={"content-disposition": f'attachment; filename="{name}"'},
            )
        body = {
            "object": "list",
            "workspace": principal.workspace,
            "start": p.start.isoformat(),
            "end": p.end.isoformat(),
            "group_by": p.group_by,
            "data": rows,
        }
        return json_response(_encoder.encode(body))

    @get("/v1/usage/spend")
    async def usage_spend(request: Request[Any, Any, Any]) -> Response[bytes]:
        principal = await reader(request)
        return json_response(_encoder.encode(spend_body(await spend.state(principal.workspace))))

    return [usage, usage_spend]
