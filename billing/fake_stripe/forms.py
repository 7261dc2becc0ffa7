"""Stripe's v1 form encoding, decoded: ``a[b][c]=v`` nests, ``a[]=v`` and ``a[0]=v`` list.

Stripe v1 takes ``application/x-www-form-urlencoded`` bodies (and query strings for GET and
DELETE) with nested keys (https://docs.stripe.com/api/metadata, ``metadata[key]=value``;
stripe-python's ``_api_encode`` writes lists as ``items[0][price]``). Every leaf stays a
string, as on the wire: each endpoint converts and validates its own parameters.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from billing.fake_stripe.errors import ApiError

__all__ = ["decode_form"]

_KEY = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_PART = re.compile(r"\[([^\[\]]*)\]")


def decode_form(raw: str) -> dict[str, Any]:
    """Nested params of one form body or query string; 400 ``parameter_invalid`` on keys
    that contradict each other (``a=1&a[b]=2``) or are malformed (``a[b``)."""
    out: dict[str, Any] = {}
    for name, value in parse_qsl(raw, keep_blank_values=True, strict_parsing=False):
        match = _KEY.match(name)
        if match is None:
            raise ApiError(400, f"Invalid parameter name: {name}", param=name)
        parts = [match.group(1), *_PART.findall(match.group(2))]
        _assign(out, parts, value, name)
    return _lists(out)  # type: ignore[no-any-return]


def _assign(node: dict[str, Any], parts: list[str], value: str, name: str) -> None:
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "":  # ``a[]=v``: append to a list (only as the last part)
            if not last:
                raise ApiError(400, f"Invalid parameter name: {name}", param=name)
            bucket = node.setdefault("", [])
            bucket.append(value)
            return
        if last:
            if part in node:
                raise ApiError(400, f"Received duplicate parameter: {name}", param=name)
            node[part] = value
            return
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ApiError(400, f"Invalid parameter nesting: {name}", param=name)
        node = child


def _lists(node: Any) -> Any:
    """Turn ``{"": [..]}`` and ``{"0": .., "1": ..}`` nodes into lists, recursively."""
    if not isinstance(node, dict):
        return node
    if set(node) == {""}:
        return list(node[""])
    items = {key: _lists(value) for key, value in node.items()}
    if items and all(key.isdigit() for key in items):
        return [items[key] for key in sorted(items, key=int)]
    return items
