"""Pure logic of the billing worker (billing/windows.py): window math, deterministic meter-event
identifiers, segment parsing and planning, retry delays; and reconcile's pure parts."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.reconcile import aligned_range, ledger_rows, parse_since
from billing.windows import (
    COST_METER,
    IDENTIFIER_MAX,
    Segment,
    WindowRef,
    is_due,
    meter_identifier,
    parse_window,
    plan_events,
    ready_ms,
    retry_delay,
    segment_values,
    unit_meter,
    window_end,
    window_start,
)

# -- window math ----------------------------------------------------------------------------


def test_window_start_floors_to_the_window() -> None:
    assert window_start(0, 60) == 0
    assert window_start(59_999, 60) == 0
    assert window_start(60_000, 60) == 60
    assert window_start(1_700_000_123_456, 60) == 1_700_000_100
    assert window_start(1_700_000_123_456, 5) == 1_700_000_120
    assert window_end(1_700_000_100, 60) == 1_700_000_160


def test_window_start_rejects_a_non_positive_window() -> None:
    with pytest.raises(ValueError):
        window_start(1000, 0)


@given(st.integers(min_value=0, max_value=2**45), st.sampled_from([1, 2, 5, 10, 30, 60, 300, 3600]))
def test_every_instant_is_in_exactly_its_window(ms: int, window_s: int) -> None:
    start = window_start(ms, window_s)
    assert start % window_s == 0
    assert start * 1000 <= ms < window_end(start, window_s) * 1000


def test_a_window_is_due_after_its_end_or_last_fold_plus_grace() -> None:
    end_ms = 120_000
    # folded during the window: ready at its end
    assert ready_ms(60, 60, now_ms=90_000) == end_ms
    assert not is_due(end_ms, now_ms=end_ms + 10_000, grace_ms=10_000)
    assert is_due(end_ms, now_ms=end_ms + 10_001, grace_ms=10_000)
    # a late record (folded after the end) pushes readiness to the fold
    assert ready_ms(60, 60, now_ms=500_000) == 500_000
    assert not is_due(500_000, now_ms=505_000, grace_ms=10_000)


# -- identifiers ----------------------------------------------------------------------------


def test_identifier_is_deterministic_and_readable() -> None:
    ident = meter_identifier("acme", COST_METER, 1_700_000_100, 0)
    assert ident == "lat-acme-lattice_usage_microusd-1700000100-0"
    assert meter_identifier("acme", COST_METER, 1_700_000_100, 0) == ident


def test_identifiers_differ_by_every_part() -> None:
    base = ("acme", COST_METER, 1_700_000_100, 0)
    variants = [
        ("acme2", COST_METER, 1_700_000_100, 0),
        ("acme", unit_meter("prompt_tokens"), 1_700_000_100, 0),
        ("acme", COST_METER, 1_700_000_160, 0),
        ("acme", COST_METER, 1_700_000_100, 1),
    ]
    idents = {meter_identifier(*base)} | {meter_identifier(*v) for v in variants}
    assert len(idents) == 5


def test_long_identifiers_are_hashed_within_stripes_limit() -> None:
    ws = "w" * 64  # the longest workspace name the gateway accepts
    ident = meter_identifier(ws, unit_meter("completion_tokens"), 1_700_000_100, 3)
    assert len(ident) <= IDENTIFIER_MAX
    assert ident.startswith("lat-") and ident.endswith("-3")
    assert ident == meter_identifier(ws, unit_meter("completion_tokens"), 1_700_000_100, 3)
    assert ident != meter_identifier(ws, unit_meter("completion_tokens"), 1_700_000_100, 4)


@given(
    st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True),
    st.integers(0, 10**10),
    st.integers(0, 1000),
)
def test_identifiers_always_fit(ws: str, start: int, seg: int) -> None:
    assert len(meter_identifier(ws, COST_METER, start, seg)) <= IDENTIFIER_MAX


# -- segments -------------------------------------------------------------------------------


def test_window_member_round_trips() -> None:
    ref = WindowRef(1_700_000_100, "team.a-1")
    assert ref.member == "1700000100:team.a-1"
    assert WindowRef.parse(ref.member.encode()) == ref


def ledger_hash() -> dict[bytes, bytes]:
    """A window with a sent segment 0, a sealed segment 1, and records collecting in 2."""
    return {
        b"cur": b"2",
        b"p:0": b"2500000",
        b"n:0": b"3",
        b"u:0:prompt_tokens": b"30",
        b"s:0": b"sent",
        b"c:0": b"cus_1",
        b"v:0:lattice_usage_microusd": b"3",
        b"id:0:lattice_usage_microusd": b"lat-acme-lattice_usage_microusd-60-0",
        b"p:1": b"400000",
        b"n:1": b"1",
        b"u:1:prompt_tokens": b"4",
        b"s:1": b"sealed",
        b"p:2": b"7",
        b"n:2": b"1",
    }


def test_parse_window_reads_each_segment() -> None:
    state = parse_window(WindowRef(60, "acme"), ledger_hash())
    assert state.collecting == 2
    s0, s1, s2 = state.segments
    assert (s0.status, s0.picousd, s0.records, s0.customer) == ("sent", 2_500_000, 3, "cus_1")
    assert s0.accepted == {COST_METER: 3}
    assert s0.units == {"prompt_tokens": 30}
    assert s0.identifiers[COST_METER] == "lat-acme-lattice_usage_microusd-60-0"
    assert (s1.status, s2.status) == ("sealed", "collecting")
    assert [s.index for s in state.sealed()] == [1]


def test_parse_window_rejects_an_unknown_status() -> None:
    with pytest.raises(ValueError):
        parse_window(WindowRef(60, "acme"), {b"cur": b"0", b"s:0": b"lost"})


def test_segment_value_is_the_exact_sum_converted_once() -> None:
    # three records of 0.4 micro-USD: 1.2 micro-USD -> 1, not 0 + 0 + 0
    seg = Segment(index=0, picousd=3 * 400_000, records=3, units={"prompt_tokens": 9})
    assert segment_values(seg) == {COST_METER: 1}
    assert segment_values(seg, ["prompt_tokens", "completion_tokens"]) == {
        COST_METER: 1,
        unit_meter("prompt_tokens"): 9,
        unit_meter("completion_tokens"): 0,
    }


def test_plan_events_skips_zero_values_and_uses_the_window_start() -> None:
    ref = WindowRef(120, "acme")
    seg = Segment(index=2, picousd=2_600_000, records=2, units={"prompt_tokens": 5})
    events = plan_events(ref, seg, ["prompt_tokens", "completion_tokens"])
    assert [(e.meter, e.value) for e in events] == [
        (COST_METER, 3),
        (unit_meter("prompt_tokens"), 5),
    ]
    assert all(e.timestamp == 120 and e.segment == 2 for e in events)
    assert events[0].identifier == "lat-acme-lattice_usage_microusd-120-2"
    # a free window needs no event at all
    assert plan_events(ref, Segment(index=0, picousd=400_000, records=1)) == []


# -- retry delays ---------------------------------------------------------------------------


def test_retry_delay_grows_is_capped_and_jittered() -> None:
    rng = random.Random(7)
    delays = [retry_delay(n, base=0.2, cap=5.0, rng=rng) for n in range(1, 12)]
    assert 0.1 <= delays[0] <= 0.2
    assert all(d <= 5.0 for d in delays)
    assert delays[-1] >= 2.5  # capped at 5, half-to-full jitter
    assert len(set(delays)) == len(delays)


def test_retry_delay_honours_retry_after_within_reason() -> None:
    rng = random.Random(1)
    assert retry_delay(1, 7.0, base=0.2, cap=5.0, rng=rng) == 7.0
    assert retry_delay(1, 10_000.0, base=0.2, cap=5.0, max_retry_after=300.0, rng=rng) == 300.0
    assert retry_delay(1, 0.0, base=0.2, cap=5.0, rng=rng) <= 0.2


# -- reconcile's pure parts -----------------------------------------------------------------


def test_parse_since_forms() -> None:
    now = 1_700_000_000.5
    assert parse_since("24h", now) == 1_700_000_000 - 86_400
    assert parse_since("30m", now) == 1_700_000_000 - 1800
    assert parse_since("1699990000", now) == 1_699_990_000
    assert parse_since("2023-11-14", now) == 1_699_920_000
    assert parse_since("2023-11-14T22:13:20+00:00", now) == 1_700_000_000
    with pytest.raises(ValueError):
        parse_since("yesterday", now)


def test_aligned_range_widens_to_minutes() -> None:
    assert aligned_range(125, 185) == (120, 240)
    assert aligned_range(120, 180) == (120, 180)


def test_ledger_rows_split_accepted_pending_and_dead() -> None:
    sent = parse_window(WindowRef(60, "acme"), ledger_hash())
    dead = parse_window(
        WindowRef(120, "gone"),
        {
            b"cur": b"1",
            b"p:0": b"5000000",
            b"n:0": b"2",
            b"s:0": b"dead",
            b"c:0": b"cus_9",
            b"e:0": b"resource_missing",
        },
    )
    rows = {(r.customer, r.meter): r for r in ledger_rows([sent, dead], {"acme": "cus_1"})}
    acme = rows[("cus_1", COST_METER)]
    # segment 0 sent (3), segment 1 sealed (0.4 -> 0), segment 2 collecting (7 pico -> 0)
    assert (acme.folded, acme.accepted, acme.pending, acme.dead) == (3, 3, 0, 0)
    assert acme.records == 5 and acme.workspaces == ["acme"]
    gone = rows[("cus_9", COST_METER)]
    assert (gone.folded, gone.accepted, gone.dead) == (5, 0, 5)
