"""Reading request parameters the way Stripe validates them, and Stripe's list pages.

Every failure is the 400 Stripe returns for it (``parameter_missing``,
``parameter_unknown``, ``parameter_invalid_integer``, ...; https://docs.stripe.com/error-codes),
with ``param`` naming the parameter in Stripe's bracket notation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from billing.fake_stripe.errors import ApiError

__all__ = [
    "check_known",
    "list_page",
    "metadata",
    "optional_int",
    "optional_str",
    "required_int",
    "required_str",
]

_INTEGER = re.compile(r"-?\d+")
#: Stripe's metadata limits (https://docs.stripe.com/api/metadata).
MAX_METADATA_KEYS = 50
MAX_METADATA_KEY = 40
MAX_METADATA_VALUE = 500


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


def check_known(params: dict[str, Any], allowed: Iterable[str]) -> None:
    known = {*allowed, "expand"}
    for name in params:
        if name not in known:
            raise ApiError(
                400, f"Received unknown parameter: {name}", code="parameter_unknown", param=name
            )


def optional_str(params: dict[str, Any], name: str, param: str | None = None) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(
            400, f"Invalid string: {name}", code="parameter_invalid", param=param or name
        )
    return value


def required_str(params: dict[str, Any], name: str, param: str | None = None) -> str:
    value = optional_str(params, name, param)
    if not value:
        raise ApiError(
            400,
            f"Missing required param: {param or name}.",
            code="parameter_missing",
            param=param or name,
        )
    return value


def optional_int(params: dict[str, Any], name: str, param: str | None = None) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        return int(value)
    raise ApiError(
        400, f"Invalid integer: {value}", code="parameter_invalid_integer", param=param or name
    )


def required_int(params: dict[str, Any], name: str, param: str | None = None) -> int:
    value = optional_int(params, name, param)
    if value is None:
        raise ApiError(
            400,
            f"Missing required param: {param or name}.",
            code="parameter_missing",
            param=param or name,
        )
    return value


def metadata(params: dict[str, Any], previous: dict[str, str] | None = None) -> dict[str, str]:
    """``metadata[k]=v`` merged over ``previous``; an empty value unsets a key (Stripe)."""
    raw = params.get("metadata")
    result = dict(previous or {})
    if raw == "":  # ``metadata=`` clears every key
        return {}
    if raw is None:
        return result
    if not isinstance(raw, dict):
        raise ApiError(400, "Invalid metadata: must be a hash", param="metadata")
    for key, value in raw.items():
        if not isinstance(value, str):
            raise ApiError(
                400, "Invalid metadata value: must be a string", param=f"metadata[{key}]"
            )
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise ApiError(
                400,
                f"Metadata keys are limited to {MAX_METADATA_KEY} characters and values to "
                f"{MAX_METADATA_VALUE}.",
                param=f"metadata[{key}]",
            )
        if value:
            result[key] = value
        else:
            result.pop(key, None)
    if len(result) > MAX_METADATA_KEYS:
        raise ApiError(400, f"Metadata is limited to {MAX_METADATA_KEYS} keys.", param="metadata")
    return result


def list_page(
    newest_first: Sequence[_HasId], params: dict[str, Any], url: str, kind: str
) -> dict[str, Any]:
    """One page of a Stripe list (``object: list``), newest first, with ``limit`` (1..100,
    default 10) and the ``starting_after`` / ``ending_before`` cursors."""
    limit = optional_int(params, "limit")
    limit = 10 if limit is None else limit
    if not 1 <= limit <= 100:
        raise ApiError(400, "This value must be between 1 and 100.", param="limit")
    after = optional_str(params, "starting_after")
    before = optional_str(params, "ending_before")
    ids = [item.id for item in newest_first]
    if after is not None:
        start = _cursor(ids, after, "starting_after", kind) + 1
        data = newest_first[start : start + limit]
        has_more = start + limit < len(ids)
    elif before is not None:
        end = _cursor(ids, before, "ending_before", kind)
        data = newest_first[max(0, end - limit) : end]
        has_more = end - limit > 0
    else:
        data = newest_first[:limit]
        has_more = limit < len(ids)
    return {"object": "list", "data": list(data), "has_more": has_more, "url": url}


def _cursor(ids: list[str], cursor: str, param: str, kind: str) -> int:
    try:
        return ids.index(cursor)
    except ValueError:
        raise ApiError(
            400, f"No such {kind}: '{cursor}'", code="resource_missing", param=param
        ) from None
