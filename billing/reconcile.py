"""``lattice billing reconcile`` and ``lattice billing status``: the ledger against Stripe.

Reconcile, per (customer, meter), over the windows starting in ``[since, until)`` (both
aligned to minutes, as Stripe's meter event summaries require):

- ``folded``: the raw usage folded from the stream, each segment's exact pico-USD sum
  converted once (what the ledger owes Stripe);
- ``accepted``: what the ledger records Stripe accepted (sent segments, and the accepted
  part of dead ones); ``pending``: folded, not yet settled; ``dead``: refused for good (see
  the dead-letter stream);
- ``stripe``: ``meter_total`` over the same range (every meter event carries its window's
  start as its timestamp, so both sides select the same windows);
- ``difference = accepted - stripe``; the total difference is the sum of their absolute
  values, zero when all is well (the exit code is 0 then, 1 otherwise).

Stripe aggregates meter events asynchronously ("Meter events are aggregated asynchronously
so the meter event summaries provide an eventually consistent view", API reference, Meter
Event Summary): right after sending, a real Stripe may lag for a few minutes.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from billing import keys
from billing.ledger import Ledger, decode_billed
from billing.stripe_types import StripeApi, StripePermanent
from billing.windows import (
    COST_METER,
    Segment,
    WindowRef,
    WindowState,
    meter_display_name,
    segment_values,
)

__all__ = [
    "DeadLetterGroup",
    "OpenWindow",
    "ReconcileReport",
    "ReconcileRow",
    "StatusReport",
    "aligned_range",
    "ledger_rows",
    "parse_since",
    "reconcile",
    "render_reconcile",
    "render_status",
    "status",
]

_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_since(text: str, now: float) -> int:
    """Unix seconds from ``24h``/``30m``/``7d`` (before ``now``), a unix timestamp, or an ISO
    8601 date or date-time (UTC unless it carries an offset)."""
    text = text.strip()
    if m := _RELATIVE.match(text):
        return int(now) - int(m.group(1)) * _UNIT_S[m.group(2)]
    if text.isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"not a time: {text!r} (use 24h, a unix time or an ISO date)") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp())


def aligned_range(since: int, until: int) -> tuple[int, int]:
    """``[since, until)`` widened to whole minutes (Stripe: "Must be aligned with minute
    boundaries", List billing meter event summaries)."""
    return since // 60 * 60, -(-until // 60) * 60


class ReconcileRow(msgspec.Struct):
    customer: str
    meter: str
    workspaces: list[str]
    segments: int = 0
    records: int = 0
    folded: int = 0
    accepted: int = 0
    pending: int = 0
    dead: int = 0
    stripe: int = 0
    difference: int = 0
    #: Why Stripe could not give this row's total (e.g. ``resource_missing`` for a deleted
    #: customer); the row is then unverified, not equal.
    stripe_error: str = ""


class ReconcileReport(msgspec.Struct):
    since: int
    until: int
    rows: list[ReconcileRow]
    total_difference: int
    dead_letters: int
    unverified: int = 0

    @property
    def ok(self) -> bool:
        """Every row verified against Stripe, and equal."""
        return self.total_difference == 0 and self.unverified == 0


def _meters_of(segment: Segment, unit_meters: Iterable[str]) -> dict[str, int]:
    """Folded value per meter: the configured ones, and any the segment was billed on."""
    units = set(unit_meters)
    for meter in segment.accepted:
        if meter != COST_METER:
            units.add(meter.removeprefix("lattice_usage_"))
    return segment_values(segment, sorted(units))


def ledger_rows(
    states: Iterable[WindowState],
    customers: Mapping[str, str],
    unit_meters: Iterable[str] = (),
) -> list[ReconcileRow]:
    """The ledger side of the report (pure): one row per (customer, meter). A segment not
    yet settled is attributed to the workspace's current customer (``""`` if none yet)."""
    unit_meters = tuple(unit_meters)
    rows: dict[tuple[str, str], ReconcileRow] = {}
    for state in states:
        ws = state.ref.workspace
        for seg in state.segments:
            customer = seg.customer or customers.get(ws, "")
            for meter, folded in _meters_of(seg, unit_meters).items():
                row = rows.get((customer, meter))
                if row is None:
                    row = rows[(customer, meter)] = ReconcileRow(customer, meter, [])
                if ws not in row.workspaces:
                    row.workspaces.append(ws)
                row.segments += 1
                row.records += seg.records
                row.folded += folded
                accepted = seg.accepted.get(meter, 0)
                if seg.status == "sent":
                    row.accepted += accepted
                elif seg.status == "dead":
                    row.accepted += accepted
                    row.dead += folded - accepted
                else:
                    row.pending += folded
    return [rows[k] for k in sorted(rows)]


async def reconcile(
    ledger: Ledger,
    stripe: StripeApi,
    since: int,
    until: int,
    *,
    unit_meters: Sequence[str] = (),
) -> ReconcileReport:
    """Compare the ledger with Stripe over ``[since, until)`` (widened to minutes)."""
    start, end = aligned_range(since, until)
    states = await ledger.windows(start, end)
    rows = ledger_rows(states, await ledger.customers(), unit_meters)
    meter_ids: dict[str, str] = {}
    for meter in sorted({r.meter for r in rows} | {COST_METER}):
        meter_ids[meter] = await stripe.ensure_meter(
            event_name=meter, display_name=meter_display_name(meter)
        )
    for row in rows:
        if row.customer:
            try:
                row.stripe = await stripe.meter_total(
                    meter_ids[row.meter], row.customer, start, end
                )
            except StripePermanent as exc:
                row.stripe_error = exc.code or f"http_{exc.http_status}"
                continue
        row.difference = row.accepted - row.stripe
    dead = int(await ledger.redis.xlen(keys.USAGE_DEAD_STREAM))
    total = sum(abs(r.difference) for r in rows)
    unverified = sum(1 for r in rows if r.stripe_error)
    return ReconcileReport(start, end, rows, total, dead, unverified)


def _iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def render_reconcile(report: ReconcileReport) -> str:
    lines = [f"reconcile {_iso(report.since)} .. {_iso(report.until)}", ""]
    lines += _table(
        [
            "customer",
            "meter",
            "workspaces",
            "records",
            "folded",
            "accepted",
            "pending",
            "dead",
            "stripe",
            "difference",
        ],
        (
            [
                r.customer or "(none yet)",
                r.meter,
                ",".join(r.workspaces),
                r.records,
                r.folded,
                r.accepted,
                r.pending,
                r.dead,
                r.stripe_error or r.stripe,
                "?" if r.stripe_error else r.difference,
            ]
            for r in report.rows
        ),
    )
    lines += ["", f"total difference: {report.total_difference}"]
    for r in report.rows:
        if r.stripe_error:
            lines.append(f"unverified: {r.customer} {r.meter}: Stripe said {r.stripe_error}")
    if report.dead_letters:
        lines.append(
            f"dead letters: {report.dead_letters} records (lattice billing status shows them)"
        )
    return "\n".join(lines)


# -- status --------------------------------------------------------------------------------


class DeadLetterGroup(msgspec.Struct):
    workspace: str
    code: str
    records: int
    windows: list[str]


class OpenWindow(msgspec.Struct):
    workspace: str
    start: int
    ready_ms: int
    segments: int
    records: int
    picousd: int


class StatusReport(msgspec.Struct):
    stream_length: int
    pending: int
    unread: int
    consumers: list[dict[str, str | int]]
    open_windows: int
    oldest_open: list[OpenWindow]
    dead_letters: int
    dead_letter_groups: list[DeadLetterGroup]


async def status(ledger: Ledger, *, show: int = 20, scan: int = 10_000) -> StatusReport:
    """Pending records, open windows and dead letters (``lattice billing status``); counts of
    unread entries and dead-letter groups look at up to ``scan`` entries."""
    length, pending, unread, consumers = await _stream_status(ledger, scan)
    opened = await ledger.open_windows()
    dead_total, groups = await _dead_letters(ledger, scan)
    return StatusReport(
        stream_length=length,
        pending=pending,
        unread=unread,
        consumers=consumers,
        open_windows=len(opened),
        oldest_open=await _oldest_open(ledger, opened[:show]),
        dead_letters=dead_total,
        dead_letter_groups=groups,
    )


async def _stream_status(
    ledger: Ledger, scan: int
) -> tuple[int, int, int, list[dict[str, str | int]]]:
    r = ledger.redis
    if not await r.exists(keys.USAGE_STREAM):
        return 0, 0, 0, []
    length = int(await r.xlen(keys.USAGE_STREAM))
    groups: Any = await r.xinfo_groups(keys.USAGE_STREAM)
    group = next((g for g in groups if _text(g["name"]) == keys.USAGE_GROUP), None)
    if group is None:
        return length, 0, length, []
    # Redis 6.2 has no group lag: count what follows the last delivered id (up to `scan`)
    after: Any = await r.xrange(
        keys.USAGE_STREAM, f"({_text(group['last-delivered-id'])}", "+", count=scan
    )
    members: Any = await r.xinfo_consumers(keys.USAGE_STREAM, keys.USAGE_GROUP)
    consumers: list[dict[str, str | int]] = [
        {"name": _text(c["name"]), "pending": int(c["pending"]), "idle_ms": int(c["idle"])}
        for c in members
    ]
    return length, int(group["pending"]), len(after), consumers


async def _oldest_open(ledger: Ledger, opened: list[tuple[WindowRef, int]]) -> list[OpenWindow]:
    states = {s.ref: s for s in await ledger.states([ref for ref, _ in opened])}
    out = []
    for ref, ready in opened:
        state = states.get(ref)
        segments = state.segments if state else ()
        unsent = [s for s in segments if s.status in ("collecting", "sealed")]
        out.append(
            OpenWindow(
                workspace=ref.workspace,
                start=ref.start,
                ready_ms=ready,
                segments=len(unsent),
                records=sum(s.records for s in unsent),
                picousd=sum(s.picousd for s in unsent),
            )
        )
    return out


async def _dead_letters(ledger: Ledger, scan: int) -> tuple[int, list[DeadLetterGroup]]:
    """The dead-letter stream's length, and its last ``scan`` entries by workspace and code."""
    r = ledger.redis
    total = int(await r.xlen(keys.USAGE_DEAD_STREAM))
    entries: Any = await r.xrevrange(keys.USAGE_DEAD_STREAM, count=scan)
    groups: dict[tuple[str, str], DeadLetterGroup] = {}
    for _, fields in entries:
        f = {_text(k): v for k, v in fields.items()}
        window = _text(f.get("window", b""))
        workspace = WindowRef.parse(window).workspace if window else _workspace_of(f.get("r"))
        code = _text(f.get("code", b""))
        g = groups.setdefault((workspace, code), DeadLetterGroup(workspace, code, 0, []))
        g.records += 1
        if window and window not in g.windows:
            g.windows.append(window)
    return total, sorted(groups.values(), key=lambda g: (-g.records, g.workspace))


def _workspace_of(payload: bytes | None) -> str:
    if payload is None:
        return "?"
    try:
        return decode_billed(payload).workspace
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "?"


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def render_status(report: StatusReport) -> str:
    lines = [
        f"usage stream: {report.stream_length} entries, {report.pending} pending "
        f"(read, not yet accepted by Stripe), {report.unread} unread",
    ]
    for c in report.consumers:
        lines.append(f"  consumer {c['name']}: {c['pending']} pending, idle {c['idle_ms']} ms")
    lines += ["", f"open windows: {report.open_windows}"]
    if report.oldest_open:
        lines += _table(
            ["workspace", "window", "ready", "segments", "records", "pico-USD"],
            (
                [
                    w.workspace,
                    _iso(w.start),
                    _iso(w.ready_ms // 1000),
                    w.segments,
                    w.records,
                    w.picousd,
                ]
                for w in report.oldest_open
            ),
        )
    lines += ["", f"dead letters: {report.dead_letters} records in {keys.USAGE_DEAD_STREAM}"]
    if report.dead_letter_groups:
        lines += _table(
            ["workspace", "code", "records", "windows"],
            (
                [g.workspace, g.code, g.records, ",".join(g.windows[:5])]
                for g in report.dead_letter_groups
            ),
        )
    return "\n".join(lines)
