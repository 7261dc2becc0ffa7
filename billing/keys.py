"""Redis keys owned by billing: the durable usage outbox and its consumer group."""

from __future__ import annotations

__all__ = ["USAGE_GROUP", "USAGE_SEEN_TTL_S", "USAGE_STREAM", "usage_seen"]

#: Redis stream of usage records (one entry per completed dispatch), consumed by the
#: billing worker through the consumer group below.
USAGE_STREAM = "lat:usage"
USAGE_GROUP = "billing"
#: How long the spool shipper remembers that a dispatch's record is in the stream: a batch
#: shipped again within this window (a crash between XADD and the offset write) adds nothing.
USAGE_SEEN_TTL_S = 86_400


def usage_seen(dispatch_id: str) -> str:
    """Marker set (NX, with ``USAGE_SEEN_TTL_S``) when a dispatch's record enters the stream."""
    return f"lat:usage:seen:{dispatch_id}"
