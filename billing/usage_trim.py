"""Bounding the usage stream (``billing.keys.USAGE_STREAM``): trim what every consumer is done with.

Every dispatch's record is XADDed to the stream and read by consumer groups (``billing``, the
Stripe worker; ``ledger``, the usage ledger in every gateway; ``earnings``, the providers'
ledger), each created at id ``0``. Nothing else reads old entries: ``lattice billing status``
reads the entries *after* the ``billing`` group's last-delivered id, and the billing scripts
(``ledger_fold.lua``, ``ledger_settle.lua``) XRANGE only entries still pending in that group;
reconcile and ``GET /v1/usage`` read ledgers, not the stream. So an entry may go once every
group that will ever read it has acknowledged it, and :class:`UsageTrimmer` removes exactly
those that are also older than a retention period (kept for people debugging).

The decision (:func:`decide_trim`, pure). A group's *safe point* is its smallest pending id
if any entry is pending, else the id right after its last-delivered id: every entry below it
was delivered to the group and is no longer pending, that is acknowledged. The trim point
(``XTRIM MINID``: entries with smaller ids go) is the minimum over the required groups' safe
points and the retention floor ``<now_ms - retain_ms>-0``; nothing is trimmed while a
required group is missing (it would be created at id 0 and read from the stream's start).
Ids are ``<ms>-<seq>`` compared as integer pairs (:class:`StreamId`), never as strings:
``10-0`` comes after ``9-5``.

Why a pass is safe although its reads are not atomic with the XTRIM (``XINFO GROUPS``, then
``XPENDING`` for groups with pending entries, then ``XTRIM``; consumers keep reading and
acknowledging meanwhile, and other workers run their own trimmer). For one group, let ``L``
be the last-delivered id XINFO showed and ``P`` the smallest pending id XPENDING showed
after it (none if nothing was pending at either read). The safe point taken is
``min(P, L + 1)``, or ``L + 1`` without ``P``. At the moment of the XTRIM:

- an entry *undelivered* to the group has an id above ``L``: the group hands out entries in
  id order (XREADGROUP ``>`` only moves the last-delivered id forward) and a new entry gets an
  id above every existing one. This is the race: an entry a consumer reads between our XINFO
  and our XTRIM becomes pending, but its id is above ``L`` too, so it is kept;
- an entry *pending* in the group was either pending at the XPENDING (id ``>= P``; without
  ``P`` there was none) or delivered after the XINFO (id ``> L``, as above). Acknowledging
  (XACK) and reclaiming (XCLAIM, XAUTOCLAIM) only shrink the pending list or move entries
  between consumers; nothing makes an acknowledged entry pending again.

So nothing pending or undelivered for a required group is below the trim point when XTRIM
runs. Each pass is safe on its own, so several workers may trim at once without a lock. What
this rests on: no one moves a group back (``XGROUP SETID``), uses ``XCLAIM … FORCE`` or
deletes a consumer holding pending entries (Lattice's consumers delete only empty ones); and
a group must be in the required list (``--usage-groups``) to be waited for: a missing one
stops trimming, one not listed is not protected.

The trim is exact (``XTRIM MINID = <id>``, Redis >= 6.2), so tests are deterministic; entries
are freed a listpack node at a time, so even a large first trim is cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, NamedTuple

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from billing.keys import EARNINGS_GROUP, LEDGER_GROUP, USAGE_GROUP, USAGE_STREAM

__all__ = [
    "DEFAULT_GROUPS",
    "DEFAULT_RETAIN_S",
    "GroupState",
    "StreamId",
    "TrimDecision",
    "TrimReport",
    "UsageTrimmer",
    "decide_trim",
    "trimming",
]

log = logging.getLogger(__name__)

#: Every consumer group of the usage stream (the billing worker, the usage ledger, earnings).
DEFAULT_GROUPS = (USAGE_GROUP, LEDGER_GROUP, EARNINGS_GROUP)
#: Acknowledged entries are kept this long anyway (seconds).
DEFAULT_RETAIN_S = 7 * 86_400
_SEQ_MAX = 2**64 - 1
#: How long stopping waits for a pass in progress before cancelling it.
_STOP_WAIT_S = 5.0


class StreamId(NamedTuple):
    """A stream entry id ``<ms>-<seq>``; tuples compare numerically, field by field."""

    ms: int
    seq: int

    @classmethod
    def parse(cls, text: str | bytes) -> StreamId:
        raw = text.decode() if isinstance(text, bytes) else text
        ms, _, seq = raw.partition("-")
        return cls(int(ms), int(seq or 0))

    def next(self) -> StreamId:
        """The smallest id above this one."""
        if self.seq == _SEQ_MAX:
            return StreamId(self.ms + 1, 0)
        return StreamId(self.ms, self.seq + 1)

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


class GroupState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One required group as XINFO GROUPS and XPENDING showed it."""

    name: str
    exists: bool
    last_delivered: StreamId = StreamId(0, 0)
    #: The smallest pending id; ``None`` when nothing is pending.
    min_pending: StreamId | None = None

    def safe_point(self) -> StreamId:
        """Every entry below this was delivered to the group and acknowledged."""
        after = self.last_delivered.next()
        if self.min_pending is None:
            return after
        # Read at once, min_pending <= last_delivered; min() keeps it safe if they were not.
        return min(self.min_pending, after)


class TrimDecision(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``minid``: trim to it (``XTRIM MINID``), or ``None`` with the ``reason``."""

    minid: StreamId | None
    reason: str
    #: What set the trim point: a group's name or ``"retention"`` (empty if none).
    bound: str = ""
    #: Required groups missing from the stream (nothing is trimmed then).
    missing: tuple[str, ...] = ()


class TrimReport(msgspec.Struct, frozen=True):
    """What one :meth:`UsageTrimmer.run_once` decided, and how many entries XTRIM removed."""

    decision: TrimDecision
    trimmed: int = 0


def decide_trim(
    groups: Sequence[GroupState], *, floor: StreamId, first: StreamId | None
) -> TrimDecision:
    """The MINID to trim the stream to: the minimum of the groups' safe points and the
    retention ``floor``; ``None`` when a group is missing or nothing is below it (``first``
    is the stream's first id, ``None`` when it is empty)."""
    missing = tuple(g.name for g in groups if not g.exists)
    if missing:
        noun = "group" if len(missing) == 1 else "groups"
        return TrimDecision(None, f"{noun} {', '.join(missing)} missing", missing=missing)
    minid, bound = floor, "retention"
    for g in groups:
        point = g.safe_point()
        if point < minid:
            minid, bound = point, g.name
    if first is None or minid <= first:
        return TrimDecision(None, "nothing to trim", bound=bound)
    return TrimDecision(minid, f"below {minid} (bound: {bound})", bound=bound)


class UsageTrimmer:
    """Trims ``USAGE_STREAM`` below what every group in ``groups`` acknowledged and what is
    older than ``retain_s`` (see the module doc). ``clock``: unix seconds."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        groups: Iterable[str] = DEFAULT_GROUPS,
        retain_s: float = DEFAULT_RETAIN_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.groups = tuple(dict.fromkeys(groups))
        if not self.groups:
            raise ValueError("the usage trimmer needs at least one consumer group")
        if retain_s < 0:
            raise ValueError("retain_s must not be negative")
        self._redis = redis
        self._retain_ms = int(retain_s * 1000)
        self._clock = clock
        #: The reason last warned about (a warning is logged once per distinct reason).
        self._warned: str | None = None
        self.trimmed = 0

    async def run_once(self) -> TrimReport:
        """One pass: read the groups, decide, XTRIM. Raises ``RedisError``."""
        floor = StreamId(max(0, int(self._clock() * 1000) - self._retain_ms), 0)
        head: Any = await self._redis.xrange(USAGE_STREAM, "-", "+", count=1)
        if not head:
            return TrimReport(TrimDecision(None, "nothing to trim (empty stream)"))
        first = StreamId.parse(head[0][0])
        decision = decide_trim(await self._states(), floor=floor, first=first)
        self._warn(decision)
        if decision.minid is None:
            return TrimReport(decision)
        trimmed = int(
            await self._redis.xtrim(USAGE_STREAM, minid=str(decision.minid), approximate=False)
        )
        self.trimmed += trimmed
        log.debug(
            "usage stream trimmed",
            extra={"trimmed": trimmed, "minid": str(decision.minid), "bound": decision.bound},
        )
        return TrimReport(decision, trimmed)

    async def _states(self) -> list[GroupState]:
        # XINFO GROUPS first, XPENDING after: the order the module doc's argument relies on.
        infos: Any = await self._redis.xinfo_groups(USAGE_STREAM)
        seen = {_text(g["name"]): g for g in infos}
        busy = [name for name in self.groups if name in seen and int(seen[name]["pending"])]
        mins: dict[str, StreamId] = {}
        if busy:
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in busy:
                    pipe.xpending(USAGE_STREAM, name)
                summaries: list[Any] = await pipe.execute()
            for name, summary in zip(busy, summaries, strict=True):
                if summary["pending"] and summary["min"] is not None:
                    mins[name] = StreamId.parse(summary["min"])
        return [
            GroupState(
                name,
                True,
                StreamId.parse(seen[name]["last-delivered-id"]),
                mins.get(name),
            )
            if name in seen
            else GroupState(name, False)
            for name in self.groups
        ]

    def _warn(self, decision: TrimDecision) -> None:
        if not decision.missing:
            self._warned = None
        elif decision.reason != self._warned:
            self._warned = decision.reason
            log.warning(
                "the usage stream is not trimmed: a required consumer group is missing",
                extra={"reason": decision.reason, "groups": ",".join(self.groups)},
            )

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        """A pass now and every ``interval_s`` until ``stop`` is set; Redis errors are logged
        and the pass is tried again at the next interval."""
        while not stop.is_set():
            try:
                await self.run_once()
            except RedisError as exc:
                log.warning(
                    "Redis error while trimming the usage stream", extra={"error": repr(exc)}
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
        log.info("usage trimmer stopped", extra={"trimmed": self.trimmed})


@contextlib.asynccontextmanager
async def trimming(trimmer: UsageTrimmer | None, interval_s: float) -> AsyncIterator[None]:
    """Run ``trimmer`` (if any) in the background for the body; on exit it is stopped (a pass
    in progress may finish, within a few seconds)."""
    if trimmer is None:
        yield
        return
    stop = asyncio.Event()
    task = asyncio.create_task(trimmer.run(stop, interval_s), name="usage-trim")
    try:
        yield
    finally:
        stop.set()
        done, _ = await asyncio.wait({task}, timeout=_STOP_WAIT_S)
        if not done:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
