"""Redis keys owned by billing: the durable usage outbox and its consumer group."""

from __future__ import annotations

__all__ = ["USAGE_GROUP", "USAGE_STREAM"]

#: Redis stream of usage records (one entry per completed dispatch), consumed by the
#: billing worker through the consumer group below.
USAGE_STREAM = "lat:usage"
USAGE_GROUP = "billing"
