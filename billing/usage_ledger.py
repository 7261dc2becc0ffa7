"""The usage ledger: per-workspace daily aggregates of the usage stream, behind
``GET /v1/usage``, and the spend settlement of every record.

A consumer of ``USAGE_STREAM`` in its own consumer group (``LEDGER_GROUP``, created with
MKSTREAM at id 0, so it starts from the oldest record kept). Any number of processes may run
it (a background task in each gateway is fine): the group hands each entry to one consumer,
and entries a dead consumer held are reclaimed with XAUTOCLAIM after ``claim_idle_ms``.

Each batch is applied by one script (``spend.lua`` followed by ``usage_ledger.lua``) that,
atomically, settles each record's spend (:mod:`billing.spend`), adds the batch's summed
aggregates and acknowledges its entries. A record is counted once per dispatch id however
often it is delivered: its day's id set (``keys.ledger_ids``, kept ``LEDGER_DEDUP_TTL_S``)
is checked first, and a batch holding records counted before is sent again without them.
That covers a consumer applying entries another one reclaimed meanwhile, a dispatch that
reached the stream twice (a spool adopter that died half-way, ``billing.spool_checkpoints``)
and duplicates inside one batch. Only distinct records are ever sent, so the per-batch sums
are exact.

Throughput: about 15,000 records a second on one core (batches of 500, five workspaces).

Aggregates: one hash per workspace and UTC day of the record's ``finished_ms``
(``keys.ledger_day``), exact integers, by day, model, key (``key_id``, or the OAuth app's
``client_id``) and tag (each ``key=value`` of the record's tags). Field names are JSON
arrays ``[dimension, a, b, metric, unit]`` (:func:`field_name`):

    ["d", "", "", "requests", ""]                  the day's dispatches
    ["m", <model>, "", "cost", ""]                 pico-USD for one model
    ["k", "key" | "client" | "", <id>, "units", <unit>]
    ["t", <tag key>, <tag value>, "requests", ""]
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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

from billing import keys
from billing.spend import SPEND_LUA, month_of
from billing.spool import backoff_delay
from billing.usage import UsageRecord, decode_record

__all__ = [
    "MAX_TAGS",
    "UsageLedger",
    "aggregate_fields",
    "build_batch",
    "day_of",
    "field_name",
    "parse_field",
]

log = logging.getLogger("lattice.usage_ledger")

_LEDGER_LUA = (
    SPEND_LUA
    + "\n"
    + (importlib.resources.files("billing").joinpath("usage_ledger.lua").read_text())
)
#: Tags counted per record (OpenAI's ``metadata`` allows 16 pairs).
MAX_TAGS = 16

_encoder = msgspec.json.Encoder()
_field_decoder = msgspec.json.Decoder(tuple[str, str, str, str, str])


def day_of(ms: int) -> str:
    """The UTC day ``YYYY-MM-DD`` of a Unix time in milliseconds."""
    t = time.gmtime(ms // 1000)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"


@functools.lru_cache(maxsize=65_536)
def field_name(dim: str, a: str, b: str, metric: str, unit: str = "") -> str:
    """The day-hash field of one dimension's metric (a JSON array, see the module doc)."""
    return _encoder.encode([dim, a, b, metric, unit]).decode()


def parse_field(field: bytes | str) -> tuple[str, str, str, str, str]:
    """``(dimension, a, b, metric, unit)`` of a field name; ``msgspec.DecodeError`` if bad."""
    return _field_decoder.decode(field)


def _groups(record: UsageRecord) -> list[tuple[str, str, str]]:
    if record.key_id:
        key = ("k", "key", record.key_id)
    elif record.client_id:
        key = ("k", "client", record.client_id)
    else:
        key = ("k", "", "")
    tags = sorted(record.tags.items())[:MAX_TAGS]
    return [("d", "", ""), ("m", record.model, ""), key, *(("t", k, v) for k, v in tags)]


def aggregate_fields(record: UsageRecord) -> dict[str, int]:
    """The day-hash fields one record adds to, and by how much."""
    out: dict[str, int] = {}
    for dim, a, b in _groups(record):
        out[field_name(dim, a, b, "requests")] = 1
        out[field_name(dim, a, b, "cost")] = record.cost_picousd
        for unit, count in record.units.items():
            out[field_name(dim, a, b, "units", unit)] = count
    return out


class _KeyTable:
    """The script's KEYS: the stream first, then each key once, named by its Lua index."""

    def __init__(self) -> None:
        self.keys = [keys.USAGE_STREAM]
        self._index: dict[str, int] = {}
        self.expire: dict[int, int] = {}

    def ref(self, key: str, ttl_s: int | None = None) -> int:
        index = self._index.get(key)
        if index is None:
            self.keys.append(key)
            index = self._index[key] = len(self.keys)  # Lua counts from 1
        if ttl_s is not None:
            self.expire[index] = ttl_s
        return index


def build_batch(records: Sequence[UsageRecord], ack: Sequence[str]) -> tuple[list[str], bytes]:
    """The ledger script's KEYS and its JSON batch (ARGV[4]) counting ``records`` (distinct
    dispatch ids) and acknowledging the stream entries ``ack`` (pure). The records'
    aggregates are summed here, so the script adds each field once per batch."""
    table = _KeyTable()
    rows: list[list[Any]] = []
    sums: dict[tuple[int, str], int] = {}
    for r in records:
        ws, day = r.workspace, day_of(r.finished_ms)
        day_key = table.ref(keys.ledger_day(ws, day), keys.LEDGER_DAY_TTL_S)
        for name, delta in aggregate_fields(r).items():
            sums[day_key, name] = sums.get((day_key, name), 0) + delta
        rows.append(
            [
                table.ref(keys.ledger_ids(ws, day), keys.LEDGER_DEDUP_TTL_S),
                table.ref(keys.spend_account(ws)),
                table.ref(keys.spend_reservations(ws)),
                table.ref(keys.spend_deadlines(ws)),
                table.ref(keys.spend_settled(ws)),
                table.ref(keys.spend_month(ws, month_of(r.finished_ms))),
                r.dispatch_id,
                str(r.cost_picousd),
            ]
        )
    incr: list[int | str] = []
    for (index, name), total in sums.items():
        incr += (index, name, str(total))
    batch = {
        "ack": list(ack),
        "records": rows,
        "incr": incr,
        "expire": [[index, ttl] for index, ttl in table.expire.items()],
        "month_ttl": keys.SPEND_MONTH_TTL_S,
    }
    return table.keys, _encoder.encode(batch)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class UsageLedger:
    """The ledger's consumer (module doc). Counters: ``counted``, ``duplicates``,
    ``corrupt`` (entries that are not usage records: acknowledged, logged), ``reclaimed``."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        consumer: str | None = None,
        batch: int = 500,
        block_ms: int = 1000,
        claim_idle_ms: int = 60_000,
        prune_interval_s: float = 300.0,
        prune_idle_ms: int = 3_600_000,
        linger_s: float = 0.1,
    ) -> None:
        if not 1 <= batch <= 4000:  # XACK takes the ids through Lua's unpack (C stack)
            raise ValueError("batch must be between 1 and 4000")
        self._redis = redis
        self._script = redis.register_script(_LEDGER_LUA)
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._batch = batch
        self._block_ms = block_ms
        #: After a pass that applied something, wait this long so that the next pass takes
        #: a batch: the ledger runs inside gateway processes, and a Redis round trip per
        #: record would be CPU taken from requests (the totals may lag by this much).
        self._linger_s = linger_s
        self._claim_idle_ms = claim_idle_ms
        self._prune_interval_s = prune_interval_s
        self._prune_idle_ms = prune_idle_ms
        self._group_ready = False
        #: read this consumer's own pending entries first (at start, after an error)
        self._recover = True
        self._claim_cursor = "0-0"
        self._task: asyncio.Task[None] | None = None
        self.counted = 0
        self.duplicates = 0
        self.corrupt = 0
        self.reclaimed = 0

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing, reading from id 0."""
        try:
            await self._redis.xgroup_create(
                keys.USAGE_STREAM, keys.LEDGER_GROUP, id="0", mkstream=True
            )
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):  # Redis's reply: the group exists
                raise
        self._group_ready = True

    async def run_once(self, *, block_ms: int | None = None) -> int:
        """Apply what is there: this consumer's own pending entries (after a start or an
        error), entries idle past ``claim_idle_ms`` in dead consumers, then new entries
        (waiting up to ``block_ms`` for some; ``None``: not at all). Returns how many
        entries were processed."""
        if not self._group_ready:
            await self.ensure_group()
        done = 0
        if self._recover:
            entries = await self._read("0", None)
            done += await self._apply(entries)
            self._recover = len(entries) >= self._batch
        done += await self._reclaim()
        done += await self._apply(await self._read(">", block_ms))
        return done

    async def _read(self, start: str, block_ms: int | None) -> list[tuple[Any, Any]]:
        try:
            reply: Any = await self._redis.xreadgroup(
                keys.LEDGER_GROUP,
                self.consumer,
                {keys.USAGE_STREAM: start},
                count=self._batch,
                block=block_ms,
            )
        except ResponseError as exc:
            if str(exc).startswith("NOGROUP"):  # the stream was deleted: start again
                self._group_ready = False
            raise
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3
            return [e for batch in reply.values() for e in batch[0]]
        return [e for _, batch in reply for e in batch]

    async def _reclaim(self) -> int:
        reply = await self._redis.xautoclaim(
            keys.USAGE_STREAM,
            keys.LEDGER_GROUP,
            self.consumer,
            self._claim_idle_ms,
            start_id=self._claim_cursor,
            count=self._batch,
        )
        self._claim_cursor = _text(reply[0])
        entries = [e for e in reply[1] if e[0] is not None]
        self.reclaimed += len(entries)
        return await self._apply(entries)

    async def _apply(self, entries: list[tuple[Any, Any]]) -> int:
        if not entries:
            return 0
        records: list[UsageRecord] = []
        ack: list[str] = []
        for entry_id, fields in entries:
            ack.append(_text(entry_id))
            payload = fields.get(b"r", fields.get("r")) if fields else None
            try:
                if payload is None:
                    raise msgspec.DecodeError("no 'r' field")
                records.append(decode_record(payload))
            except msgspec.DecodeError as exc:
                self.corrupt += 1
                log.error(
                    "usage stream entry is not a usage record; skipped",
                    extra={"entry": _text(entry_id), "error": str(exc)},
                )
        unique: dict[str, UsageRecord] = {}
        for record in records:
            unique.setdefault(record.dispatch_id, record)
        self.duplicates += len(records) - len(unique)
        while True:
            script_keys, batch = build_batch(list(unique.values()), ack)
            applied, detail = await self._script(
                keys=script_keys, args=["ledger", 0, keys.LEDGER_GROUP, batch]
            )
            if int(applied):
                self.counted += int(detail)
                return len(entries)
            # Some were counted before: send the batch again without them.
            before = len(unique)
            for dispatch_id in detail:
                unique.pop(_text(dispatch_id), None)
            assert len(unique) < before, "the script names only records it was sent"
            self.duplicates += before - len(unique)

    async def prune_consumers(self) -> int:
        """Delete consumers (not this one) that hold nothing and were idle past
        ``prune_idle_ms``: dead processes' names. Returns how many."""
        pruned = 0
        for info in await self._redis.xinfo_consumers(keys.USAGE_STREAM, keys.LEDGER_GROUP):
            name = _text(info["name"])
            if (
                name == self.consumer
                or int(info["pending"])
                or (int(info["idle"]) < self._prune_idle_ms)
            ):
                continue
            await self._redis.xgroup_delconsumer(keys.USAGE_STREAM, keys.LEDGER_GROUP, name)
            pruned += 1
        return pruned

    # -- the background loop ---------------------------------------------------------------

    async def run(self) -> None:
        """Apply records until cancelled, backing off while Redis is unavailable."""
        loop = asyncio.get_running_loop()
        next_prune = loop.time() + self._prune_interval_s
        failures = 0
        while True:
            try:
                if await self.run_once(block_ms=self._block_ms) and self._linger_s:
                    await asyncio.sleep(self._linger_s)
                if loop.time() >= next_prune:
                    next_prune = loop.time() + self._prune_interval_s
                    await self.prune_consumers()
            except (RedisError, OSError) as exc:
                failures += 1
                self._recover = True
                if failures == 1:
                    log.warning("usage ledger paused", extra={"error": repr(exc)})
                await asyncio.sleep(backoff_delay(failures))
                continue
            if failures:
                log.info("usage ledger resumed", extra={"failures": failures})
                failures = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="lattice-usage-ledger")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
