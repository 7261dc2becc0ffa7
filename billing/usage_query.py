"""Reading the usage ledger (:mod:`billing.usage_ledger`): one workspace's usage per day,
grouped by day, model, key or tag, as rows or CSV.

Only keys built from the given workspace's name are read, so a caller that passes its own
workspace can never see another's usage, whatever key id or tag it asks about.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, get_args

import msgspec
import redis.asyncio as aioredis

from billing import keys
from billing.usage_ledger import parse_field
from catalog.pricing import picousd_to_microusd

__all__ = [
    "MAX_DAYS",
    "GroupBy",
    "UsageQuery",
    "UsageRow",
    "days_between",
    "microusd_text",
    "parse_day",
    "render_csv",
    "rows_from_days",
]

GroupBy = Literal["day", "model", "key", "tag"]
GROUPS: tuple[str, ...] = get_args(GroupBy)
#: The longest range one query may span.
MAX_DAYS = 366

_DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DIMENSION = {"day": "d", "model": "m", "key": "k", "tag": "t"}


class UsageRow(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One day's usage of one group: ``model``, ``key_id``/``client_id`` or
    ``tag_key``/``tag_value`` is set by the grouping. ``units`` per meter unit."""

    day: str
    requests: int
    cost_picousd: int
    cost_microusd: int
    units: dict[str, int]
    model: str | None = None
    key_id: str | None = None
    client_id: str | None = None
    tag_key: str | None = None
    tag_value: str | None = None


def parse_day(text: str) -> dt.date:
    """A ``YYYY-MM-DD`` date; ``ValueError`` for anything else."""
    if not isinstance(text, str) or not _DAY_RE.match(text):
        raise ValueError(f"not a YYYY-MM-DD date: {text!r}")
    return dt.date.fromisoformat(text)


def days_between(start: dt.date, end: dt.date) -> list[str]:
    """Every day from ``start`` to ``end`` inclusive; ``ValueError`` if the range is empty
    or longer than :data:`MAX_DAYS`."""
    count = (end - start).days + 1
    if count < 1:
        raise ValueError("the end day is before the start day")
    if count > MAX_DAYS:
        raise ValueError(f"a usage query spans at most {MAX_DAYS} days")
    return [(start + dt.timedelta(days=i)).isoformat() for i in range(count)]


def _row(
    day: str, dim: str, a: str, b: str, totals: dict[str, int], units: dict[str, int]
) -> UsageRow:
    cost = totals.get("cost", 0)
    extra: dict[str, Any] = {}
    if dim == "m":
        extra["model"] = a
    elif dim == "k":
        if a == "key":
            extra["key_id"] = b
        elif a == "client":
            extra["client_id"] = b
    elif dim == "t":
        extra["tag_key"], extra["tag_value"] = a, b
    return UsageRow(
        day=day,
        requests=totals.get("requests", 0),
        cost_picousd=cost,
        cost_microusd=picousd_to_microusd(cost),
        units=dict(sorted(units.items())),
        **extra,
    )


def rows_from_days(
    days: Sequence[str], hashes: Sequence[Mapping[Any, Any]], group_by: GroupBy
) -> list[UsageRow]:
    """Rows of one grouping from the day hashes of ``days`` (pure). Days without usage give
    no row; rows are sorted by day, then group."""
    dim = _DIMENSION[group_by]
    rows: list[UsageRow] = []
    for day, fields in zip(days, hashes, strict=True):
        groups: dict[tuple[str, str], tuple[dict[str, int], dict[str, int]]] = {}
        for raw, value in fields.items():
            try:
                f_dim, a, b, metric, unit = parse_field(raw)
            except msgspec.DecodeError:
                continue  # not a field this version writes
            if f_dim != dim:
                continue
            totals, units = groups.setdefault((a, b), ({}, {}))
            if metric == "units":
                units[unit] = int(value)
            else:
                totals[metric] = int(value)
        rows.extend(_row(day, dim, a, b, *groups[(a, b)]) for a, b in sorted(groups))
    return rows


class UsageQuery:
    """Reads one workspace's ledger days (one pipelined round trip per query)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def usage(
        self, workspace: str, *, start_day: dt.date, end_day: dt.date, group_by: GroupBy
    ) -> list[UsageRow]:
        if group_by not in GROUPS:
            raise ValueError(f"group_by must be one of {', '.join(GROUPS)}")
        days = days_between(start_day, end_day)
        async with self._redis.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hgetall(keys.ledger_day(workspace, day))
            hashes = await pipe.execute()
        return rows_from_days(days, hashes, group_by)


def microusd_text(microusd: int) -> str:
    """Micro-USD as a decimal USD string (``1234567`` → ``"1.234567"``), exact."""
    sign = "-" if microusd < 0 else ""
    whole, frac = divmod(abs(microusd), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


_GROUP_COLUMNS: dict[str, tuple[str, ...]] = {
    "day": (),
    "model": ("model",),
    "key": ("key_id", "client_id"),
    "tag": ("tag_key", "tag_value"),
}
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: str) -> str:
    # A cell a spreadsheet would run as a formula is quoted (OWASP, CSV injection).
    return "'" + value if value.startswith(_FORMULA_START) else value


def render_csv(rows: Iterable[UsageRow], group_by: GroupBy) -> str:
    """CSV with a header: ``day``, the group's columns, ``requests``, ``cost_usd``
    (micro-USD precision), ``cost_picousd`` (exact), then one ``units.<unit>`` column per
    unit seen (sorted; empty when a row has none of it)."""
    rows = list(rows)
    group_cols = _GROUP_COLUMNS[group_by]
    unit_names = sorted({u for row in rows for u in row.units})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")  # RFC 4180 line breaks
    writer.writerow(
        ["day", *group_cols, "requests", "cost_usd", "cost_picousd"]
        + [f"units.{u}" for u in unit_names]
    )
    for row in rows:
        groups = [_cell(getattr(row, col) or "") for col in group_cols]
        units = [str(row.units[u]) if u in row.units else "" for u in unit_names]
        writer.writerow(
            [
                row.day,
                *groups,
                str(row.requests),
                microusd_text(row.cost_microusd),
                str(row.cost_picousd),
                *units,
            ]
        )
    return out.getvalue()
