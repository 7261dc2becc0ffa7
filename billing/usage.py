"""Usage records and the durable outbox they are appended to.

One record per dispatch (ARCHITECTURE.md, Meter). The gateway appends it to the Redis stream
``billing.keys.USAGE_STREAM`` before it finishes the caller's response, so a record exists
for every response a caller saw; the billing worker consumes the stream through a consumer
group and acknowledges a record only after Stripe accepted it.
"""

from __future__ import annotations

import asyncio
from typing import Literal, Protocol

import msgspec
from redis.asyncio import Redis

from billing.keys import USAGE_STREAM

__all__ = [
    "DiscardingOutbox",
    "RedisUsageOutbox",
    "UsageOutbox",
    "UsageRecord",
    "decode_record",
    "encode_record",
]


class UsageRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What one dispatch used and cost. Money is integers: ``prices`` are micro-USD per
    ``price_per`` units; ``cost_picousd`` is exact, ``cost_microusd`` rounded half up."""

    dispatch_id: str
    request_id: str
    workspace: str
    task: str
    model: str
    offering: str
    provider: str
    units: dict[str, int]
    prices: dict[str, int]
    price_per: int
    cost_picousd: int
    cost_microusd: int
    started_ms: int
    finished_ms: int
    status: Literal["completed", "cancelled", "failed"] = "completed"
    key_id: str | None = None
    client_id: str | None = None
    subject: str | None = None
    tags: dict[str, str] = {}
    units_estimated: bool = False


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(UsageRecord)


def encode_record(record: UsageRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(data: bytes) -> UsageRecord:
    return _decoder.decode(data)


class UsageOutbox(Protocol):
    async def append(self, record: UsageRecord) -> str: ...


class DiscardingOutbox:
    """Drops every record: for measuring what metering costs (``LATTICE_METERING=0``)."""

    async def append(self, record: UsageRecord) -> str:
        return ""


class RedisUsageOutbox:
    """Appends records to the usage stream (XADD; Redis persists it with the AOF).

    Group commit: records appended while a write is in flight are sent together in the next
    pipelined round trip, so under load one Redis round trip carries many records; each
    caller still returns only once *its* record is in Redis. Writes run in a task of the
    outbox, so a caller that is cancelled (a client that went away) cannot cancel the write
    of its record.
    """

    def __init__(self, redis: Redis, *, max_batch: int = 256) -> None:
        self._redis = redis
        self._max_batch = max_batch
        self._pending: list[tuple[bytes, asyncio.Future[str]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def append(self, record: UsageRecord) -> str:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append((encode_record(record), future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_pending(), name="lattice-usage-outbox")
        return await asyncio.shield(future)

    async def _write_pending(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for data, _ in batch:
                            pipe.xadd(USAGE_STREAM, {"r": data})
                        ids = await pipe.execute()
                except Exception as exc:  # every waiter learns of the failure
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), entry_id in zip(batch, ids, strict=True):
                    if not future.done():
                        future.set_result(
                            entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                        )
        finally:
            self._writer = None
