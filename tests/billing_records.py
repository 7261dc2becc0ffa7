"""Usage records for the billing worker's tests and benchmark, written into the usage stream
exactly as the spool shipper writes them (``usage_ship.lua``: ``XADD lat:usage * r <msgpack>``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec
import redis.asyncio as aioredis

from billing.keys import USAGE_STREAM
from billing.usage import UsageRecord, encode_record
from tests.usage_records import record

__all__ = ["add_records", "usage"]


def usage(
    i: int,
    *,
    workspace: str,
    finished_ms: int,
    cost_picousd: int,
    units: dict[str, int] | None = None,
) -> UsageRecord:
    """Record ``i`` (dispatch ``dsp_<i>``) of ``workspace``, finished at ``finished_ms``."""
    return msgspec.structs.replace(
        record(i),
        workspace=workspace,
        finished_ms=finished_ms,
        started_ms=finished_ms - 5,
        cost_picousd=cost_picousd,
        units=units if units is not None else {"prompt_tokens": i % 50, "completion_tokens": 1},
    )


async def add_records(
    redis: aioredis.Redis, records: Iterable[UsageRecord], chunk: int = 2000
) -> list[str]:
    """XADD each record under field ``r``; returns the entry ids, in order."""
    ids: list[str] = []
    batch: Sequence[UsageRecord] = []
    items = list(records)
    for start in range(0, len(items), chunk):
        batch = items[start : start + chunk]
        async with redis.pipeline(transaction=False) as pipe:
            for r in batch:
                pipe.xadd(USAGE_STREAM, {"r": encode_record(r)})
            ids += [i.decode() if isinstance(i, bytes) else i for i in await pipe.execute()]
    return ids
