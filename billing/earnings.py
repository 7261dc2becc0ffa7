"""The provider earnings ledger: what every serving party earned, per UTC day, exactly.

Every usage record names who served the dispatch (``UsageRecord.serving_party``: ``hosted``
or another hosted offering's provider, a marketplace provider id, ``runtime:<lat_id>``) and
what it earned (``provider_earnings_picousd``, split off the customer's cost by
:func:`catalog.charges.charge`). :class:`EarningsConsumer` reads the usage stream
(``billing.keys.USAGE_STREAM``) through its own consumer group, ``earnings`` — beside the
billing worker's, so each sees every record — and adds each record's earnings to its party's
ledger (``billing.keys.earnings_ledger``): pico-USD and a dispatch count per UTC day of the
dispatch's end. Those day lines are the statement; their sum is what a party earned.

Exactly once, per stream entry and per dispatch: one script per batch
(``earnings_accrue.lua``) acknowledges each entry and accrues it in the same atomic step, only
if the acknowledgement removed it from the group's pending list; so an entry redelivered to
another consumer (its first reader died, the entry was reclaimed with ``XAUTOCLAIM``) counts
once. A dispatch id is also remembered for ``EARNINGS_SEEN_TTL_S``, so a second entry of the
same dispatch is not counted again. A consumer that dies leaves its entries pending; any
consumer reclaims entries idle longer than ``min_idle_ms`` on its next step.

Money stays integers: a day line is a 64-bit Redis integer of pico-USD (up to $9.2 million
per party and day); totals are summed in Python, unbounded.

Note for whoever trims the usage stream: entries must not be trimmed before this group has
acknowledged them (``XINFO GROUPS`` gives each group's last delivered id and pending count).
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from billing.keys import (
    EARNINGS_GROUP,
    EARNINGS_PARTIES,
    EARNINGS_SEEN_TTL_S,
    USAGE_STREAM,
    earnings_ledger,
    earnings_seen,
)
from billing.usage import UsageRecord, decode_record

__all__ = ["DayLine", "EarningsConsumer", "EarningsLedger", "StepResult", "utc_day"]

log = logging.getLogger(__name__)

_ACCRUE_LUA = importlib.resources.files("billing").joinpath("earnings_accrue.lua").read_text()
#: The stream entry field holding the msgpack record (``usage_ship.lua``).
_RECORD_FIELD = b"r"
_PICO = "pico:"
_COUNT = "n:"


def utc_day(ms: int) -> str:
    """``YYYY-MM-DD`` (UTC) of a unix time in milliseconds: the statement line it falls in."""
    return time.strftime("%Y-%m-%d", time.gmtime(ms // 1000))


class DayLine(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One statement line: a serving party's earnings on one UTC day."""

    day: str
    earned_picousd: int
    dispatches: int


class StepResult(msgspec.Struct, frozen=True):
    """What one :meth:`EarningsConsumer.run_once` did: entries ``accrued``; ``duplicates``
    (a dispatch already accrued, acknowledged without counting); ``stale`` (acknowledged by
    another consumer first); ``undecodable`` (acknowledged, logged, nothing accrued)."""

    accrued: int = 0
    duplicates: int = 0
    stale: int = 0
    undecodable: int = 0

    @property
    def entries(self) -> int:
        return self.accrued + self.duplicates + self.stale + self.undecodable

    def __add__(self, other: StepResult) -> StepResult:
        return StepResult(
            self.accrued + other.accrued,
            self.duplicates + other.duplicates,
            self.stale + other.stale,
            self.undecodable + other.undecodable,
        )


class EarningsLedger:
    """Reads the ledger the consumer writes. Stateless; share one per process."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def parties(self) -> list[str]:
        """Every serving party that has a ledger, sorted."""
        members: Any = await self._redis.smembers(EARNINGS_PARTIES)
        return sorted(_text(m) for m in members)

    async def lines(self, party: str, *, since: str | None = None) -> list[DayLine]:
        """``party``'s day lines, oldest first; from day ``since`` (``YYYY-MM-DD``) on."""
        raw: dict[Any, Any] = await self._redis.hgetall(earnings_ledger(party))
        pico: dict[str, int] = {}
        count: dict[str, int] = {}
        for field, value in raw.items():
            name = _text(field)
            if name.startswith(_PICO):
                pico[name.removeprefix(_PICO)] = int(value)
            elif name.startswith(_COUNT):
                count[name.removeprefix(_COUNT)] = int(value)
        days = sorted(set(pico) | set(count))
        return [
            DayLine(day=d, earned_picousd=pico.get(d, 0), dispatches=count.get(d, 0))
            for d in days
            if since is None or d >= since
        ]

    async def earned_picousd(self, party: str) -> int:
        """Everything ``party`` earned so far, in pico-USD."""
        return sum(line.earned_picousd for line in await self.lines(party))


class EarningsConsumer:
    """Accrues usage records into the earnings ledger (module docstring).

    ``run_once()`` makes one step: reclaim entries other consumers left pending for longer
    than ``min_idle_ms``, then read new ones (waiting up to ``block_ms``; ``None``: not at
    all), up to ``batch`` of each, and accrue them. ``run()`` repeats it until cancelled,
    backing off while Redis is unavailable.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        consumer: str | None = None,
        batch: int = 500,
        min_idle_ms: int = 60_000,
        seen_ttl_s: int = EARNINGS_SEEN_TTL_S,
    ) -> None:
        self._redis = redis
        self._accrue = redis.register_script(_ACCRUE_LUA)
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._batch = batch
        self._min_idle_ms = min_idle_ms
        self._seen_ttl_s = seen_ttl_s
        self._claim_cursor = "0-0"
        self._group_ready = False
        self.totals = StepResult()

    async def ensure_group(self) -> None:
        """Create the ``earnings`` group (and the stream) if missing; it starts at id 0, so
        the records already in the stream are accrued too."""
        try:
            await self._redis.xgroup_create(USAGE_STREAM, EARNINGS_GROUP, id="0", mkstream=True)
        except ResponseError:
            # BUSYGROUP: it exists. Told apart by asking, not by the error's text.
            groups = await self._redis.xinfo_groups(USAGE_STREAM)
            if not any(_text(g["name"]) == EARNINGS_GROUP for g in groups):
                raise
        self._group_ready = True

    async def run_once(self, *, block_ms: int | None = None) -> StepResult:
        if not self._group_ready:
            await self.ensure_group()
        result = await self._reclaim()
        read: Any = await self._redis.xreadgroup(
            EARNINGS_GROUP,
            self.consumer,
            {USAGE_STREAM: ">"},
            count=self._batch,
            block=block_ms,
        )
        for _stream, entries in read or ():
            result += await self._process(entries)
        self.totals += result
        return result

    async def run(self, *, block_ms: int = 1000, idle_s: float = 0.05) -> None:
        failures = 0
        while True:
            try:
                step = await self.run_once(block_ms=block_ms)
                failures = 0
            except RedisError as exc:
                failures += 1
                delay = min(5.0, 0.1 * 2**failures)
                log.warning("earnings: Redis unavailable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            if not step.entries:
                await asyncio.sleep(idle_s)

    async def _reclaim(self) -> StepResult:
        reply: Any = await self._redis.xautoclaim(
            USAGE_STREAM,
            EARNINGS_GROUP,
            self.consumer,
            min_idle_time=self._min_idle_ms,
            start_id=self._claim_cursor,
            count=self._batch,
        )
        self._claim_cursor = _text(reply[0])
        # Entries trimmed from the stream while pending come back without fields (Redis 6.2)
        # or in reply[2] (7.0+, already dropped from the pending list by XAUTOCLAIM).
        return await self._process([e for e in reply[1] if e[1] is not None])

    async def _process(self, entries: Sequence[tuple[Any, Any]]) -> StepResult:
        if not entries:
            return StepResult()
        keys: list[str] = [USAGE_STREAM, EARNINGS_PARTIES]
        args: list[str | int] = [EARNINGS_GROUP, self._seen_ttl_s]
        bad: list[str] = []
        for entry_id, fields in entries:
            record = _decode(entry_id, fields)
            if record is None:
                bad.append(_text(entry_id))
                continue
            party = record.serving_party
            keys += [earnings_seen(record.dispatch_id), earnings_ledger(party)]
            args += [
                _text(entry_id),
                party,
                utc_day(record.finished_ms),
                str(record.provider_earnings_picousd),
            ]
        result = StepResult(undecodable=len(bad))
        if bad:
            await self._redis.xack(USAGE_STREAM, EARNINGS_GROUP, *bad)
        if len(keys) > 2:
            reply: Any = await self._accrue(keys=keys, args=args)
            accrued, duplicates, stale = reply
            result += StepResult(int(accrued), int(duplicates), int(stale))
        return result


def _decode(entry_id: Any, fields: Any) -> UsageRecord | None:
    raw = fields.get(_RECORD_FIELD) if isinstance(fields, dict) else None
    try:
        record = decode_record(raw) if isinstance(raw, bytes) else None
    except msgspec.DecodeError:
        record = None
    if record is None or record.provider_earnings_picousd < 0:
        log.error("earnings: usage entry %s cannot be accrued; skipped", _text(entry_id))
        return None
    return record


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
