"""The slice of Stripe's search query language the fake understands, for customers.

Stripe's grammar (https://docs.stripe.com/search#search-query-language) joins clauses with
``AND`` / ``OR``; a clause is ``field:value`` with the value in single or double quotes, and a
quote inside is escaped with a backslash. Supported here: exact-match clauses on ``email``,
``name`` and ``metadata['key']`` joined by ``AND``. Anything else is a 400 on ``query``.
"""

from __future__ import annotations

import re

from billing.fake_stripe.errors import ApiError

__all__ = ["parse_customer_query"]

_QUOTED = r"""(?:'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*")"""
_CLAUSE = re.compile(
    rf"\s*(?:(?P<field>email|name)|metadata\[(?P<key>{_QUOTED})\])\s*:\s*(?P<value>{_QUOTED})"
    r"\s*(?P<more>AND\s+|$)"
)
_ESCAPE = re.compile(r"\\(.)")

Clause = tuple[str, str | None, str]


def parse_customer_query(query: str) -> list[Clause]:
    """``[(field, metadata key or None, value), ...]`` of a query; 400 if unsupported."""
    clauses: list[Clause] = []
    position = 0
    while True:
        match = _CLAUSE.match(query, position)
        if match is None:
            raise ApiError(
                400,
                f"Unsupported search query (the fake Stripe supports field:'value' clauses on "
                f"email, name and metadata['key'] joined by AND): {query}",
                param="query",
            )
        value = _unquote(match.group("value"))
        if match.group("field"):
            clauses.append((match.group("field"), None, value))
        else:
            clauses.append(("metadata", _unquote(match.group("key")), value))
        position = match.end()
        if not match.group("more"):
            return clauses


def _unquote(quoted: str) -> str:
    return _ESCAPE.sub(r"\1", quoted[1:-1])
