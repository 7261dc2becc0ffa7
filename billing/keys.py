"""Redis keys owned by billing: the durable usage outbox and its consumer group."""

from __future__ import annotations

__all__ = ["USAGE_GROUP", "USAGE_SPOOL_OFFSET_TTL_S", "USAGE_STREAM", "spool_offset"]

#: Redis stream of usage records (one entry per completed dispatch), consumed by the
#: billing worker through the consumer group below.
USAGE_STREAM = "lat:usage"
USAGE_GROUP = "billing"
#: Lifetime of a spool file's shipped offset, refreshed by every batch shipped from the file.
#: The shipper deletes the key once the file is fully shipped and deleted; the TTL only
#: collects the keys of files that vanished otherwise (a crash between the two deletions).
USAGE_SPOOL_OFFSET_TTL_S = 30 * 86_400


def spool_offset(name: str) -> str:
    """Byte offset up to which the frames of spool file ``name`` are in ``USAGE_STREAM``;
    advanced by ``usage_ship.lua`` in the same script as the XADDs (compare-and-set)."""
    return f"lat:usage:spool:{name}"
