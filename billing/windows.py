"""Pure logic of the billing worker: windows, segments, meter-event identifiers, retry delays.

Usage is billed per (workspace, meter, window). A record belongs to the window holding its
``finished_ms``: ``[start, start + window_s)`` with ``start`` a multiple of ``window_s`` seconds
since the epoch. A window is *due* once nothing was folded into it for ``grace`` and its end
is past: ``now > max(end, last fold) + grace`` (the ledger keeps ``max(end, last fold)`` as
the window's *ready* time), so a window is closed once, after its stragglers, even while a
backlog is drained.

A window's records are collected in numbered **segments**. Closing a window *seals* its
collecting segment (segment ``k``) and opens segment ``k + 1``: records that arrive later (a
late spool, a redelivery) go there and are sent as their own meter event, so a sealed
segment's total never changes while it is in flight, nothing is lost and nothing counted
twice. Each (window, meter, segment) is one Stripe meter event whose ``identifier``
(:func:`meter_identifier`) is a pure function of the four, so resending it after a crash is
de-duplicated by Stripe ("We will enforce uniqueness within a rolling period of at least 24
hours", Stripe API reference, Create a billing meter event, ``identifier``).

The ledger hash of a window (:mod:`billing.ledger`) holds, per segment ``i``: ``p:i`` the exact
pico-USD sum, ``n:i`` the record count, ``u:i:<unit>`` unit counts, ``s:i`` the status
(absent while collecting, ``sealed``, ``sent`` or ``dead``), and once settled ``c:i`` the
customer, ``v:i:<meter>`` the accepted value, ``id:i:<meter>`` the identifier, ``e:i`` the
error code of a dead segment. :func:`parse_window` reads it into a :class:`WindowState`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping
from typing import Literal, cast

import msgspec

from catalog.pricing import picousd_to_microusd

__all__ = [
    "COST_METER",
    "IDENTIFIER_MAX",
    "PlannedEvent",
    "Segment",
    "SegmentStatus",
    "WindowRef",
    "WindowState",
    "is_due",
    "meter_display_name",
    "meter_identifier",
    "parse_window",
    "plan_events",
    "ready_ms",
    "retry_delay",
    "segment_values",
    "unit_meter",
    "window_end",
    "window_start",
]

#: The one required meter: the cost in micro-USD, priced by Stripe at $0.000001 per unit.
COST_METER = "lattice_usage_microusd"
#: Stripe's limit on a meter event ``identifier`` (API reference: "Max length: 100").
IDENTIFIER_MAX = 100

SegmentStatus = Literal["collecting", "sealed", "sent", "dead"]


def unit_meter(unit: str) -> str:
    """The event name of the optional meter counting ``unit`` (e.g. ``prompt_tokens``)."""
    return f"lattice_usage_{unit}"


def meter_display_name(event_name: str) -> str:
    if event_name == COST_METER:
        return "Lattice usage (micro-USD)"
    return f"Lattice usage ({event_name.removeprefix('lattice_usage_')})"


def window_start(finished_ms: int, window_s: int) -> int:
    """Start (unix seconds) of the window holding an instant given in unix milliseconds."""
    if window_s <= 0:
        raise ValueError(f"window_s must be positive, not {window_s}")
    return (finished_ms // 1000) // window_s * window_s


def window_end(start: int, window_s: int) -> int:
    return start + window_s


def ready_ms(start: int, window_s: int, now_ms: int) -> int:
    """The ready time a fold at ``now_ms`` gives the window (its score in the open set, only
    ever raised): its end, or the fold itself for a late record."""
    return max(window_end(start, window_s) * 1000, now_ms)


def is_due(ready: int, now_ms: int, grace_ms: int) -> bool:
    """Whether a window ready at ``ready`` (ms) may be closed at ``now_ms``."""
    return now_ms > ready + grace_ms


def meter_identifier(workspace: str, meter: str, start: int, segment: int) -> str:
    """``lat-<workspace>-<meter>-<window_start>-<segment>``: deterministic, so a resend is a
    duplicate to Stripe. Past Stripe's 100 characters (a long workspace name) the readable
    form is replaced by ``lat-<sha256 of it, 40 hex>-<segment>``, still deterministic."""
    full = f"lat-{workspace}-{meter}-{start}-{segment}"
    if len(full) <= IDENTIFIER_MAX:
        return full
    return f"lat-{hashlib.sha256(full.encode()).hexdigest()[:40]}-{segment}"


class WindowRef(msgspec.Struct, frozen=True, order=True):
    """One workspace's window; ``member`` names it in the ledger's sorted sets."""

    start: int
    workspace: str

    @property
    def member(self) -> str:
        return f"{self.start}:{self.workspace}"

    @classmethod
    def parse(cls, member: str | bytes) -> WindowRef:
        text = member.decode() if isinstance(member, bytes) else member
        start, _, workspace = text.partition(":")
        return cls(int(start), workspace)


class Segment(msgspec.Struct, frozen=True):
    index: int
    picousd: int = 0
    records: int = 0
    units: dict[str, int] = {}
    status: SegmentStatus = "collecting"
    customer: str = ""
    #: meter → value Stripe accepted (settled segments only).
    accepted: dict[str, int] = {}
    identifiers: dict[str, str] = {}
    error: str = ""


class WindowState(msgspec.Struct, frozen=True):
    ref: WindowRef
    #: The segment new records go to.
    collecting: int
    segments: tuple[Segment, ...]

    def sealed(self) -> list[Segment]:
        """Segments sealed but not settled: to send (again)."""
        return [s for s in self.segments if s.status == "sealed"]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_window(ref: WindowRef, fields: Mapping[bytes, bytes] | Mapping[str, str]) -> WindowState:
    """A window's ledger hash (see module doc) as a :class:`WindowState`; unknown fields are
    ignored."""
    collecting = 0
    scalars: dict[int, dict[str, str]] = {}
    maps: dict[int, dict[str, dict[str, str]]] = {}
    for k, v in fields.items():
        key, value = _text(k), _text(v)
        kind, _, rest = key.partition(":")
        index, _, name = rest.partition(":")
        if kind == "cur":
            collecting = int(value)
        elif not index.isdigit():
            continue
        elif kind in ("p", "n", "s", "c", "e"):
            scalars.setdefault(int(index), {})[kind] = value
        elif kind in ("u", "v", "id") and name:
            maps.setdefault(int(index), {}).setdefault(kind, {})[name] = value
    segments = []
    for i in sorted(scalars.keys() | maps.keys()):
        one, many = scalars.get(i, {}), maps.get(i, {})
        status = one.get("s", "collecting")
        if status not in ("collecting", "sealed", "sent", "dead"):
            raise ValueError(f"window {ref.member}: segment {i} has status {status!r}")
        segments.append(
            Segment(
                index=i,
                picousd=int(one.get("p", 0)),
                records=int(one.get("n", 0)),
                units={u: int(n) for u, n in many.get("u", {}).items()},
                status=cast(SegmentStatus, status),  # checked just above
                customer=one.get("c", ""),
                accepted={m: int(n) for m, n in many.get("v", {}).items()},
                identifiers=dict(many.get("id", {})),
                error=one.get("e", ""),
            )
        )
    return WindowState(ref, collecting, tuple(segments))


def segment_values(segment: Segment, unit_meters: Iterable[str] = ()) -> dict[str, int]:
    """What a segment amounts to per meter: micro-USD for :data:`COST_METER` (the exact sum
    converted once, :func:`catalog.pricing.picousd_to_microusd`), counts for unit meters."""
    values = {COST_METER: picousd_to_microusd(segment.picousd)}
    for unit in unit_meters:
        values[unit_meter(unit)] = segment.units.get(unit, 0)
    return values


class PlannedEvent(msgspec.Struct, frozen=True):
    """A meter event to send for one (window, meter, segment)."""

    meter: str
    identifier: str
    value: int
    timestamp: int
    segment: int


def plan_events(
    ref: WindowRef, segment: Segment, unit_meters: Iterable[str] = ()
) -> list[PlannedEvent]:
    """The events that bill ``segment``: one per meter with a non-zero value (a zero-value
    segment needs none, and is settled without Stripe). The timestamp is the window start,
    so Stripe's summaries over ``[a, b)`` hold exactly the windows starting in it."""
    return [
        PlannedEvent(
            meter=meter,
            identifier=meter_identifier(ref.workspace, meter, ref.start, segment.index),
            value=value,
            timestamp=ref.start,
            segment=segment.index,
        )
        for meter, value in segment_values(segment, unit_meters).items()
        if value != 0
    ]


def retry_delay(
    failures: int,
    retry_after: float | None = None,
    *,
    base: float = 0.2,
    cap: float = 30.0,
    max_retry_after: float = 300.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before the next Stripe call after ``failures`` retryable failures in a
    row: exponential from ``base``, capped at ``cap``, with "equal jitter" (half to full) so
    several workers do not retry in step; never less than Stripe's ``Retry-After`` (itself
    bounded by ``max_retry_after`` against a bogus header)."""
    r = rng or random
    delay = min(cap, base * 2.0 ** max(0, failures - 1)) * r.uniform(0.5, 1.0)
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, max_retry_after))
    return delay
