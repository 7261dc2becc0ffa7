"""A small, valid usage record for tests (importable by subprocess scripts too)."""

from __future__ import annotations

from billing.usage import UsageRecord


def record(i: int) -> UsageRecord:
    return UsageRecord(
        dispatch_id=f"dsp_{i}",
        request_id=f"req_{i}",
        workspace="w",
        task="chat-completion",
        model="lovelace:m",
        offering="o",
        provider="hosted",
        units={"prompt_tokens": i, "completion_tokens": 1},
        prices={"prompt_tokens": 1, "completion_tokens": 1},
        price_per=1_000_000,
        cost_picousd=i + 1,
        cost_microusd=0,
        started_ms=1,
        finished_ms=2,
    )
