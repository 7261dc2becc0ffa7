"""The billing ledger in Redis: windows of usage folded from the stream, sealed, settled.

All multi-key steps are Lua scripts (``ledger_*.lua``), each atomic:

- :meth:`Ledger.fold` (``ledger_fold.lua``): one batch of stream entries into their windows;
  idempotent per dispatch id, so a redelivered or reclaimed entry is a no-op.
- :meth:`Ledger.claim` (``ledger_claim.lua``): lock a due window and seal its collecting
  segment (see :mod:`billing.windows`).
- :meth:`Ledger.settle` (``ledger_settle.lua``): mark a sealed segment sent (or dead) and
  acknowledge its records in the same step.

Records are acknowledged (XACK) only by ``settle``, after Stripe accepted their segment, or
by ``fold`` for duplicates and undecodable entries (the latter copied to the dead-letter
stream first). Keys come from :mod:`billing.keys`.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from billing import keys
from billing.windows import WindowRef, WindowState, parse_window, ready_ms, window_start

__all__ = [
    "Billed",
    "FoldResult",
    "Ledger",
    "Settlement",
    "StreamEntry",
    "decode_billed",
    "parse_entries",
]

_RECORD_FIELD = b"r"  # the field usage_ship.lua writes each msgpack record under


def _script(name: str) -> str:
    return importlib.resources.files("billing").joinpath(name).read_text()


class Billed(msgspec.Struct, frozen=True):
    """The part of a :class:`billing.usage.UsageRecord` billing reads. A projection that
    ignores other fields, so a newer gateway adding a field to the record does not turn a
    worker of the previous release into a dead-letter machine during a rolling upgrade."""

    dispatch_id: str
    workspace: str
    cost_picousd: int
    units: dict[str, int]
    finished_ms: int


_billed_decoder = msgspec.msgpack.Decoder(Billed)


def decode_billed(data: bytes) -> Billed:
    return _billed_decoder.decode(data)


class StreamEntry(msgspec.Struct, frozen=True):
    """One entry read from the usage stream: its id and its record (``None`` when the entry
    is damaged; ``error`` then says how)."""

    id: str
    record: Billed | None
    error: str = ""


def parse_entries(
    raw: Iterable[tuple[bytes | str, Mapping[bytes, bytes] | None]],
) -> list[StreamEntry]:
    """Entries as redis-py returns them (XREADGROUP / XCLAIM) into :class:`StreamEntry`."""
    out = []
    for entry_id, fields in raw:
        eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        payload = fields.get(_RECORD_FIELD) if fields else None
        if payload is None:
            out.append(StreamEntry(eid, None, "missing_record"))
            continue
        try:
            out.append(StreamEntry(eid, decode_billed(payload)))
        except (msgspec.DecodeError, msgspec.ValidationError):
            out.append(StreamEntry(eid, None, "undecodable_record"))
    return out


class FoldResult(msgspec.Struct, frozen=True):
    new: int = 0
    duplicates: int = 0
    dead: int = 0
    redelivered: int = 0


class Ledger:
    """Redis access of the billing worker, reconcile and status (one instance per client)."""

    def __init__(self, redis: aioredis.Redis, *, window_s: int = 60) -> None:
        self.redis = redis
        self.window_s = window_s
        self._fold = redis.register_script(_script("ledger_fold.lua"))
        self._claim = redis.register_script(_script("ledger_claim.lua"))
        self._settle = redis.register_script(_script("ledger_settle.lua"))
        self._unlock = redis.register_script(_script("ledger_unlock.lua"))

    # -- the stream ------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        """Create the consumer group reading the usage stream from its start (MKSTREAM)."""
        try:
            await self.redis.xgroup_create(
                keys.USAGE_STREAM, keys.USAGE_GROUP, id="0", mkstream=True
            )
        except ResponseError:
            # BUSYGROUP, most likely (another worker made it): check, rather than match the text
            groups = await self.redis.xinfo_groups(keys.USAGE_STREAM)
            if not any(_text(g["name"]) == keys.USAGE_GROUP for g in groups):
                raise

    async def read(self, consumer: str, count: int, block_ms: int | None) -> list[StreamEntry]:
        """New entries for ``consumer`` (XREADGROUP ``>``); they stay pending until settled."""
        reply: Any = await self.redis.xreadgroup(
            keys.USAGE_GROUP, consumer, {keys.USAGE_STREAM: ">"}, count=count, block=block_ms
        )
        if not reply:
            return []
        return parse_entries(reply[0][1])

    async def dead_consumers(self, me: str, idle_ms: int) -> list[tuple[str, int]]:
        """(name, pending) of the group's other consumers idle for longer than ``idle_ms``: a
        live worker reads at least every second (XREADGROUP BLOCK), which resets its idle
        time, so these are dead (killed, crashed) or stuck."""
        out = []
        consumers: Any = await self.redis.xinfo_consumers(keys.USAGE_STREAM, keys.USAGE_GROUP)
        for c in consumers:
            name = _text(c["name"])
            if name != me and int(c["idle"]) > idle_ms:
                out.append((name, int(c["pending"])))
        return out

    async def claim_from(
        self, dead: str, me: str, idle_ms: int, count: int
    ) -> tuple[int, list[StreamEntry]]:
        """Move up to ``count`` entries pending on consumer ``dead`` to ``me`` (XCLAIM with a
        minimum idle time, so two reclaiming workers cannot both take an entry). Returns how
        many were pending on it (at most ``count``) and the entries claimed."""
        pending: Any = await self.redis.xpending_range(
            keys.USAGE_STREAM, keys.USAGE_GROUP, min="-", max="+", count=count, consumername=dead
        )
        ids = [p["message_id"] for p in pending]
        if not ids:
            return 0, []
        claimed: Any = await self.redis.xclaim(
            keys.USAGE_STREAM, keys.USAGE_GROUP, me, idle_ms, ids
        )
        return len(ids), parse_entries(claimed)

    async def forget_consumer(self, name: str) -> None:
        """Delete a dead consumer once nothing is pending on it (keeps XINFO short)."""
        for c in await self.redis.xinfo_consumers(keys.USAGE_STREAM, keys.USAGE_GROUP):
            if _text(c["name"]) == name and int(c["pending"]) == 0:
                await self.redis.xgroup_delconsumer(keys.USAGE_STREAM, keys.USAGE_GROUP, name)

    # -- fold ------------------------------------------------------------------------------

    async def fold(self, entries: Sequence[StreamEntry], now_ms: int) -> FoldResult:
        """Fold a batch into the ledger in one script (see ``ledger_fold.lua``)."""
        if not entries:
            return FoldResult()
        by_window: dict[WindowRef, list[tuple[str, Billed]]] = {}
        bad: list[str] = []
        for e in entries:
            if e.record is None:
                bad += [e.id, e.error]
                continue
            ref = WindowRef(window_start(e.record.finished_ms, self.window_s), e.record.workspace)
            by_window.setdefault(ref, []).append((e.id, e.record))
        win_keys: list[str] = []
        args: list[Any] = [keys.USAGE_GROUP, len(bad) // 2, *bad, len(by_window)]
        for ref, records in by_window.items():
            win_keys += [
                keys.billing_window(ref.start, ref.workspace),
                keys.billing_window_ids(ref.start, ref.workspace),
            ]
            totals: dict[str, int] = {}
            for _, r in records:
                for unit, n in r.units.items():
                    totals[unit] = totals.get(unit, 0) + n
            args += [
                ref.member,
                ref.start,
                ready_ms(ref.start, self.window_s, now_ms),
                len(records),
                sum(r.cost_picousd for _, r in records),
                len(totals),
            ]
            for unit, n in totals.items():
                args += [unit, n]
            for entry_id, r in records:
                args += [r.dispatch_id, entry_id, r.cost_picousd, len(r.units)]
                for unit, n in r.units.items():
                    args += [unit, n]
        reply = await self._fold(
            keys=[
                keys.USAGE_STREAM,
                keys.USAGE_DEAD_STREAM,
                keys.BILLING_OPEN_WINDOWS,
                keys.BILLING_WINDOWS,
                *win_keys,
            ],
            args=args,
        )
        new, dups, dead, again = (int(x) for x in reply)
        return FoldResult(new, dups, dead, again)

    # -- close -----------------------------------------------------------------------------

    async def due(self, now_ms: int, grace_ms: int, limit: int) -> list[WindowRef]:
        """Open windows ready (no fold for ``grace_ms``, end past) at ``now_ms``, oldest first."""
        members: Any = await self.redis.zrangebyscore(
            keys.BILLING_OPEN_WINDOWS, "-inf", f"({now_ms - grace_ms}", start=0, num=limit
        )
        return [WindowRef.parse(m) for m in members]

    async def claim(self, refs: Sequence[WindowRef], token: str, lock_ms: int) -> list[WindowState]:
        """Lock and seal each window (one pipelined round trip); windows another worker holds
        are left out. The states returned may have no sealed segment (nothing to send)."""
        if not refs:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for ref in refs:
                await self._claim(
                    keys=[
                        keys.billing_window(ref.start, ref.workspace),
                        keys.billing_window_lock(ref.start, ref.workspace),
                        keys.BILLING_OPEN_WINDOWS,
                    ],
                    args=[token, lock_ms, ref.member],
                    client=pipe,
                )
            replies = await pipe.execute()
        return [
            parse_window(ref, _pairs(reply))
            for ref, reply in zip(refs, replies, strict=True)
            if reply is not None
        ]

    async def settle(
        self,
        settlements: Sequence[Settlement],
        token: str,
    ) -> int:
        """Apply settlements (one pipelined round trip); returns records acknowledged."""
        if not settlements:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for s in settlements:
                ref = s.ref
                args: list[Any] = [
                    keys.USAGE_GROUP,
                    ref.member,
                    token,
                    s.segment,
                    s.outcome,
                    s.customer,
                    s.error,
                    keys.BILLING_DEDUP_TTL_S,
                    keys.BILLING_LEDGER_TTL_S,
                    "1" if s.release else "0",
                    len(s.accepted),
                ]
                for meter, (identifier, value) in s.accepted.items():
                    args += [meter, identifier, value]
                await self._settle(
                    keys=[
                        keys.billing_window(ref.start, ref.workspace),
                        keys.billing_window_ids(ref.start, ref.workspace),
                        keys.USAGE_STREAM,
                        keys.USAGE_DEAD_STREAM,
                        keys.BILLING_OPEN_WINDOWS,
                        keys.billing_window_lock(ref.start, ref.workspace),
                    ],
                    args=args,
                    client=pipe,
                )
            replies = await pipe.execute()
        return sum(int(r) for r in replies)

    async def unlock(self, refs: Iterable[WindowRef], token: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for ref in refs:
                await self._unlock(
                    keys=[keys.billing_window_lock(ref.start, ref.workspace)],
                    args=[token],
                    client=pipe,
                )
            await pipe.execute()

    # -- customers -------------------------------------------------------------------------

    async def customer(self, workspace: str) -> str | None:
        value = await self.redis.hget(keys.BILLING_CUSTOMERS, workspace)
        return None if value is None else _text(value)

    async def customers_of(self, workspaces: Sequence[str]) -> dict[str, str]:
        """The mapped customer of each of ``workspaces`` that has one (one HMGET)."""
        if not workspaces:
            return {}
        found: Any = await self.redis.hmget(keys.BILLING_CUSTOMERS, list(workspaces))
        return {ws: _text(c) for ws, c in zip(workspaces, found, strict=True) if c is not None}

    async def set_customer(self, workspace: str, customer_id: str) -> str:
        """Map ``workspace`` to ``customer_id`` unless it is mapped already (HSETNX: a relink
        written meanwhile wins); returns the mapping now in force."""
        if await self.redis.hsetnx(keys.BILLING_CUSTOMERS, workspace, customer_id):
            return customer_id
        return await self.customer(workspace) or customer_id

    async def customers(self) -> dict[str, str]:
        raw = await self.redis.hgetall(keys.BILLING_CUSTOMERS)
        return {_text(k): _text(v) for k, v in raw.items()}

    # -- reading the ledger ----------------------------------------------------------------

    async def windows(self, start: int, end: int, *, page: int = 500) -> list[WindowState]:
        """Every window of the ledger starting in ``[start, end)`` (unix seconds)."""
        members: Any = await self.redis.zrangebyscore(keys.BILLING_WINDOWS, start, f"({end}")
        refs = [WindowRef.parse(m) for m in members]
        return await self.states(refs, page=page)

    async def states(self, refs: Sequence[WindowRef], *, page: int = 500) -> list[WindowState]:
        out: list[WindowState] = []
        for i in range(0, len(refs), page):
            chunk = refs[i : i + page]
            async with self.redis.pipeline(transaction=False) as pipe:
                for ref in chunk:
                    pipe.hgetall(keys.billing_window(ref.start, ref.workspace))
                replies = await pipe.execute()
            out += [parse_window(r, h) for r, h in zip(chunk, replies, strict=True) if h]
        return out

    async def open_windows(self) -> list[tuple[WindowRef, int]]:
        """(window, ready ms) of every window with unsent usage."""
        pairs: Any = await self.redis.zrange(keys.BILLING_OPEN_WINDOWS, 0, -1, withscores=True)
        return [(WindowRef.parse(m), int(score)) for m, score in pairs]

    async def trim(self, now_s: int) -> int:
        """Drop index entries of windows older than the ledger's TTL (their hashes expired)."""
        return int(
            await self.redis.zremrangebyscore(
                keys.BILLING_WINDOWS, "-inf", f"({now_s - keys.BILLING_LEDGER_TTL_S}"
            )
        )


class Settlement(msgspec.Struct, frozen=True):
    """What Stripe said about one sealed segment: ``sent`` with every event accepted, or
    ``dead`` with a permanent ``error`` (``accepted`` then lists what Stripe did take)."""

    ref: WindowRef
    segment: int
    outcome: str  # "sent" | "dead"
    customer: str = ""
    error: str = ""
    #: meter → (identifier, value) of the events Stripe accepted.
    accepted: dict[str, tuple[str, int]] = {}
    #: Release the window's lock afterwards (the last settlement of the window in a pass).
    release: bool = False


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))
