"""Usage records and the outbox protocol they are appended through.

One record per dispatch (ARCHITECTURE.md, Meter). The gateway appends it to an outbox before
it finishes the caller's response, so a record exists for every response a caller saw; the
outbox in service is :class:`billing.spool.SpoolOutbox`, which lands each record in the Redis
stream ``billing.keys.USAGE_STREAM`` exactly once. The billing worker consumes that stream
through a consumer group and acknowledges a record only after Stripe accepted it.
"""

from __future__ import annotations

from typing import Literal, Protocol

import msgspec

__all__ = [
    "DiscardingOutbox",
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
