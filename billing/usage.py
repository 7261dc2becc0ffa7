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

from catalog.model import ServingKind

__all__ = [
    "DiscardingOutbox",
    "UsageOutbox",
    "UsageRecord",
    "decode_record",
    "encode_record",
]


class UsageRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What one dispatch used and cost. Money is integers: ``prices`` are micro-USD per
    ``price_per`` units; ``cost_picousd`` is exact, ``cost_microusd`` rounded half up.

    ``cost_*`` is what the workspace pays (:class:`catalog.charges.Charge`
    ``customer_picousd``), split into ``provider_earnings_picousd``, earned by the serving
    party ``serving_id`` (the offering's provider: ``hosted``, a marketplace provider id, or
    ``runtime:<lat_id>``), and ``platform_picousd``, the operator's. ``prices`` are the base
    prices applied: the platform fee for self-served dispatches, else the offering's (before
    any marketplace margin). Records from before the split decode with ``serving_id = ""``
    (read as ``provider``) and zero earnings.
    """

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
    serving_kind: ServingKind = "hosted"
    serving_id: str = ""
    provider_earnings_picousd: int = 0
    platform_picousd: int = 0

    @property
    def serving_party(self) -> str:
        """Who earns from this dispatch: ``serving_id``, or ``provider`` on older records."""
        return self.serving_id or self.provider


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(UsageRecord)


def encode_record(record: UsageRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(data: bytes) -> UsageRecord:
    return _decoder.decode(data)


class UsageOutbox(Protocol):
    async def append(self, record: UsageRecord) -> str: ...

    def checkpoint(self, record: UsageRecord) -> None:
        """What a stream in flight is billed should this process die before ``append``."""
        ...


class DiscardingOutbox:
    """Drops every record: for measuring what metering costs (``LATTICE_METERING=0``)."""

    async def append(self, record: UsageRecord) -> str:
        return ""

    def checkpoint(self, record: UsageRecord) -> None:
        return None
