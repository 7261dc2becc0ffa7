"""The usage stream's trim decision (billing/usage_trim.py), pure: stream ids compared as numbers,
each group's safe point, the minimum with the retention floor, missing groups; a hypothesis
property that nothing pending or undelivered in any group is ever below the MINID; and the
trimmer's flags of ``lattice billing run`` (billing/cli.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.cli import build_parser, worker_config
from billing.keys import EARNINGS_GROUP, LEDGER_GROUP, USAGE_GROUP
from billing.usage_trim import (
    DEFAULT_GROUPS,
    DEFAULT_RETAIN_S,
    GroupState,
    StreamId,
    TrimDecision,
    decide_trim,
)


def sid(text: str) -> StreamId:
    return StreamId.parse(text)


# -- stream ids ----------------------------------------------------------------------------


def test_ids_compare_as_numbers_not_strings() -> None:
    assert sid("10-0") > sid("9-5")
    assert sid("1700000000000-10") > sid("1700000000000-9")
    assert "10-0" < "9-5"  # what comparing the strings would get wrong
    assert sid(b"12-3") == StreamId(12, 3)
    assert sid("12") == StreamId(12, 0)
    assert str(StreamId(1700000000000, 7)) == "1700000000000-7"


def test_next_id() -> None:
    assert StreamId(5, 1).next() == StreamId(5, 2)
    assert StreamId(5, 2**64 - 1).next() == StreamId(6, 0)


# -- the decision --------------------------------------------------------------------------

FAR = StreamId(10**15, 0)  # a retention floor that bounds nothing


def group(name: str, last: str, pending: str | None = None) -> GroupState:
    return GroupState(name, True, sid(last), sid(pending) if pending else None)


def test_safe_point_is_the_smallest_pending_id_else_after_the_last_delivered() -> None:
    assert group("g", "9-5").safe_point() == StreamId(9, 6)
    assert group("g", "10-0", pending="9-5").safe_point() == StreamId(9, 5)
    assert GroupState("g", True).safe_point() == StreamId(0, 1)  # created at 0, read nothing
    # inconsistent reads (a pending id above the last delivered) stay safe
    assert group("g", "5-0", pending="7-0").safe_point() == StreamId(5, 1)


def test_trim_point_is_the_minimum_over_groups_and_the_floor() -> None:
    groups = [
        group(USAGE_GROUP, "20-0", pending="12-0"),
        group(LEDGER_GROUP, "30-4"),
        group(EARNINGS_GROUP, "9-9"),
    ]
    d = decide_trim(groups, floor=FAR, first=sid("1-0"))
    assert (d.minid, d.bound) == (StreamId(9, 10), EARNINGS_GROUP)
    d = decide_trim(groups, floor=StreamId(8, 0), first=sid("1-0"))
    assert (d.minid, d.bound) == (StreamId(8, 0), "retention")
    d = decide_trim(groups[:2], floor=FAR, first=sid("1-0"))
    assert (d.minid, d.bound) == (StreamId(12, 0), USAGE_GROUP)


def test_a_missing_group_means_no_trim() -> None:
    groups = [group(USAGE_GROUP, "20-0"), GroupState(EARNINGS_GROUP, False)]
    d = decide_trim(groups, floor=FAR, first=sid("1-0"))
    assert d == TrimDecision(None, "group earnings missing", missing=(EARNINGS_GROUP,))
    both = [GroupState(USAGE_GROUP, False), GroupState(LEDGER_GROUP, False)]
    d = decide_trim(both, floor=FAR, first=sid("1-0"))
    assert (d.minid, d.reason) == (None, "groups billing, ledger missing")


def test_nothing_to_trim() -> None:
    groups = [group(USAGE_GROUP, "20-0", pending="5-0")]
    assert decide_trim(groups, floor=FAR, first=sid("5-0")).minid is None
    assert decide_trim(groups, floor=FAR, first=sid("6-0")).reason == "nothing to trim"
    assert decide_trim(groups, floor=FAR, first=None).minid is None
    assert decide_trim(groups, floor=StreamId(3, 0), first=sid("4-0")).minid is None
    assert decide_trim(groups, floor=FAR, first=sid("4-9")).minid == StreamId(5, 0)


# -- the safety property -------------------------------------------------------------------

# Small ms values and seqs so that ids cross digit boundaries ("9-5" < "10-0"); Redis never
# gives an entry the id 0-0 (a group created at "0" has delivered nothing).
ids = st.builds(StreamId, st.integers(0, 120), st.integers(0, 12)).filter(
    lambda i: i != StreamId(0, 0)
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[StreamId], list[tuple[int, set[StreamId]]], StreamId]:
    """The stream's entries (sorted ids), per group (how many it was delivered, which of those
    are pending) and a retention floor."""
    entries = sorted(draw(st.sets(ids, min_size=1, max_size=40)))
    groups = []
    for _ in range(draw(st.integers(1, 4))):
        delivered = draw(st.integers(0, len(entries)))
        pending = draw(st.sets(st.sampled_from(entries[:delivered]))) if delivered else set()
        groups.append((delivered, pending))
    return entries, groups, draw(ids)


def states(entries: list[StreamId], groups: list[tuple[int, set[StreamId]]]) -> list[GroupState]:
    return [
        GroupState(
            f"g{k}",
            True,
            entries[delivered - 1] if delivered else StreamId(0, 0),
            min(pending) if pending else None,
        )
        for k, (delivered, pending) in enumerate(groups)
    ]


@given(streams())
def test_nothing_pending_or_undelivered_is_below_the_minid(
    case: tuple[list[StreamId], list[tuple[int, set[StreamId]]], StreamId],
) -> None:
    entries, groups, floor = case
    d = decide_trim(states(entries, groups), floor=floor, first=entries[0])
    if d.minid is None:
        return
    assert d.minid > entries[0] and d.minid <= floor
    trimmed = [e for e in entries if e < d.minid]
    assert trimmed, "a MINID is returned only when something goes"
    for delivered, pending in groups:
        needed = pending | set(entries[delivered:])
        assert all(e >= d.minid for e in needed)
    # ...and it is the largest such point: the first entry kept is needed, or the floor's
    kept = [e for e in entries if e >= d.minid]
    if kept and d.bound != "retention":
        blocking = [p for p in (_first_needed(entries, g) for g in groups) if p is not None]
        assert min(blocking) == kept[0]


def _first_needed(entries: list[StreamId], group: tuple[int, set[StreamId]]) -> StreamId | None:
    delivered, pending = group
    needed = pending | set(entries[delivered:])
    return min(needed) if needed else None


@given(
    st.lists(
        st.tuples(ids, st.one_of(st.none(), ids)),
        min_size=1,
        max_size=4,
    ),
    ids,
    st.one_of(st.none(), ids),
)
def test_any_group_state_never_drops_a_pending_or_undelivered_id(
    raw: list[tuple[StreamId, StreamId | None]], floor: StreamId, first: StreamId | None
) -> None:
    """Even for states no consistent read gives (pending above last delivered)."""
    groups = [GroupState(f"g{k}", True, last, p) for k, (last, p) in enumerate(raw)]
    d = decide_trim(groups, floor=floor, first=first)
    if d.minid is None:
        return
    assert first is not None and d.minid > first and d.minid <= floor
    for g in groups:
        assert d.minid <= g.last_delivered.next()  # nothing undelivered goes
        if g.min_pending is not None:
            assert d.minid <= g.min_pending  # nothing pending goes


# -- the flags of `lattice billing run` ----------------------------------------------------


def test_trim_flags_default_on(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LATTICE_USAGE_TRIM", "LATTICE_USAGE_RETAIN_S", "LATTICE_USAGE_GROUPS"):
        monkeypatch.delenv(name, raising=False)
    config = worker_config(build_parser().parse_args(["billing", "run"]))
    assert config.trim_usage is True
    assert config.usage_retain_s == DEFAULT_RETAIN_S == 7 * 86_400
    assert config.usage_groups == DEFAULT_GROUPS == ("billing", "ledger", "earnings")
    assert config.trim_interval_s == 60.0


def test_trim_flags_from_the_environment_and_the_command_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LATTICE_USAGE_TRIM", "false")
    monkeypatch.setenv("LATTICE_USAGE_RETAIN_S", "3600")
    monkeypatch.setenv("LATTICE_USAGE_GROUPS", "billing, ledger")
    config = worker_config(build_parser().parse_args(["billing", "run"]))
    assert (config.trim_usage, config.usage_retain_s) == (False, 3600.0)
    assert config.usage_groups == ("billing", "ledger")
    args = ["billing", "run", "--trim-usage", "--usage-groups", "billing", "--trim-interval-s", "5"]
    config = worker_config(build_parser().parse_args(args))
    assert (config.trim_usage, config.usage_groups, config.trim_interval_s) == (
        True,
        ("billing",),
        5.0,
    )
    monkeypatch.setenv("LATTICE_USAGE_TRIM", "TRUE")
    config = worker_config(build_parser().parse_args(["billing", "run", "--no-trim-usage"]))
    assert config.trim_usage is False


def test_bad_trim_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATTICE_USAGE_TRIM", "maybe")
    with pytest.raises(SystemExit):
        worker_config(build_parser().parse_args(["billing", "run"]))
    monkeypatch.delenv("LATTICE_USAGE_TRIM")
    with pytest.raises(SystemExit):
        worker_config(build_parser().parse_args(["billing", "run", "--usage-groups", " , "]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["billing", "run", "--usage-retain-s", "-1"])
    with pytest.raises(SystemExit):
        worker_config(build_parser().parse_args(["billing", "run", "--trim-interval-s", "0"]))
    # no groups are needed when trimming is off
    args = ["billing", "run", "--no-trim-usage", "--usage-groups", ""]
    assert worker_config(build_parser().parse_args(args)).trim_usage is False
