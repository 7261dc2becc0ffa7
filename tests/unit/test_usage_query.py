"""Usage rows, CSV, the route's parameter checks and USD parsing (pure)."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.usage import UsageRecord
from billing.usage_ledger import aggregate_fields
from billing.usage_query import (
    MAX_DAYS,
    days_between,
    microusd_text,
    parse_day,
    render_csv,
    rows_from_days,
)
from gateway.cli.usage_commands import format_table, usd_to_microusd
from gateway.errors import InvalidRequest
from gateway.usage_routes import usage_params

TODAY = dt.date(2025, 3, 17)


def record(model: str, key_id: str | None, client_id: str | None, cost: int) -> UsageRecord:
    return UsageRecord(
        dispatch_id="d",
        request_id="r",
        workspace="w",
        task="t",
        model=model,
        offering="o",
        provider="p",
        units={"prompt_tokens": 1},
        prices={},
        price_per=1,
        cost_picousd=cost,
        cost_microusd=0,
        started_ms=0,
        finished_ms=0,
        key_id=key_id,
        client_id=client_id,
        tags={"a": "1"},
    )


def day_hash(*records: UsageRecord) -> dict[bytes, bytes]:
    out: dict[str, int] = {}
    for r in records:
        for field, delta in aggregate_fields(r).items():
            out[field] = out.get(field, 0) + delta
    return {k.encode(): str(v).encode() for k, v in out.items()}


def test_rows_group_and_sort() -> None:
    h = day_hash(record("m2", None, "app", 10), record("m1", "k1", None, 5))
    h[b"garbage"] = b"1"  # unknown fields are ignored
    rows = rows_from_days(["2025-01-01", "2025-01-02"], [h, {}], "model")
    assert [(r.model, r.cost_picousd, r.units) for r in rows] == [
        ("m1", 5, {"prompt_tokens": 1}),
        ("m2", 10, {"prompt_tokens": 1}),
    ]
    keys = rows_from_days(["2025-01-01"], [h], "key")
    assert [(r.key_id, r.client_id) for r in keys] == [(None, "app"), ("k1", None)]
    (day,) = rows_from_days(["2025-01-01"], [h], "day")
    assert (day.requests, day.cost_picousd, day.cost_microusd) == (2, 15, 0)


def test_csv_of_each_grouping_and_formula_cells() -> None:
    h = day_hash(record("=cmd", "k1", None, 2_500_000))
    for group_by, header in [
        ("day", "day,requests,cost_usd,cost_picousd,units.prompt_tokens"),
        ("model", "day,model,requests,cost_usd,cost_picousd,units.prompt_tokens"),
        ("key", "day,key_id,client_id,requests,cost_usd,cost_picousd,units.prompt_tokens"),
        ("tag", "day,tag_key,tag_value,requests,cost_usd,cost_picousd,units.prompt_tokens"),
    ]:
        text = render_csv(rows_from_days(["2025-01-01"], [h], group_by), group_by)  # type: ignore[arg-type]
        assert text.split("\r\n")[0] == header
    model = render_csv(rows_from_days(["2025-01-01"], [h], "model"), "model")
    assert model.split("\r\n")[1] == "2025-01-01,'=cmd,1,0.000003,2500000,1"
    assert render_csv([], "day") == "day,requests,cost_usd,cost_picousd\r\n"
    table = format_table(rows_from_days(["2025-01-01"], [h], "key"), "key")
    assert table.splitlines()[1].split() == ["2025-01-01", "k1", "1", "0.000003", "prompt_tokens=1"]


def test_days() -> None:
    assert parse_day("2024-02-29") == dt.date(2024, 2, 29)
    for bad in ("2023-02-29", "2024-2-1", "20240201", " 2024-02-01", "2024-02-01T00:00"):
        with pytest.raises(ValueError):
            parse_day(bad)
    assert days_between(dt.date(2024, 12, 31), dt.date(2025, 1, 1)) == ["2024-12-31", "2025-01-01"]
    with pytest.raises(ValueError):
        days_between(dt.date(2025, 1, 2), dt.date(2025, 1, 1))
    start = dt.date(2024, 1, 1)
    assert len(days_between(start, start + dt.timedelta(days=MAX_DAYS - 1))) == MAX_DAYS
    with pytest.raises(ValueError):
        days_between(start, start + dt.timedelta(days=MAX_DAYS))


def test_usage_params_defaults_and_errors() -> None:
    p = usage_params({}, TODAY)
    assert (p.start, p.end, p.group_by, p.format) == (dt.date(2025, 3, 1), TODAY, "day", "json")
    p = usage_params({"end": "2025-01-15", "group_by": "tag", "format": "csv"}, TODAY)
    assert (p.start, p.end, p.group_by, p.format) == (
        dt.date(2025, 1, 1),
        dt.date(2025, 1, 15),
        "tag",
        "csv",
    )
    with pytest.raises(InvalidRequest) as err:
        usage_params({"group_by": "nope"}, TODAY)
    assert err.value.param == "group_by" and err.value.status == 400


def test_usd_to_microusd_is_exact() -> None:
    assert usd_to_microusd("25") == 25_000_000
    assert usd_to_microusd("12.50") == 12_500_000
    assert usd_to_microusd("$0.000001") == 1
    assert usd_to_microusd("0.1") == 100_000  # 0.1 is not a float here
    assert usd_to_microusd("-5.25", signed=True) == -5_250_000
    for bad in ("-5", "1.0000001", "1e3", "nan", "inf", "1,000", "", "12.", ".5", "0x10"):
        with pytest.raises(ValueError):
            usd_to_microusd(bad)


@given(st.integers(-(10**15), 10**15))
def test_microusd_text_round_trips(micro: int) -> None:
    assert usd_to_microusd(microusd_text(micro), signed=True) == micro
