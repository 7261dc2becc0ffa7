"""SessionTicker: one clock for every tunnel of a process, ticking each session once per
interval, a share of them at a time."""

from __future__ import annotations

import asyncio

import pytest

from gateway.tunnel.ticker import SessionTicker


class Session:
    def __init__(self, fail: bool = False) -> None:
        self.ticks: list[float] = []
        self.fail = fail

    def tick(self, now: float) -> None:
        self.ticks.append(now)
        if self.fail:
            raise RuntimeError("broken session")


async def test_every_session_is_ticked_once_per_interval() -> None:
    ticker = SessionTicker(0.05, slots=5)
    sessions = [Session() for _ in range(12)]
    for session in sessions:
        ticker.add(session)
    ticker.add(sessions[0])  # adding twice changes nothing
    assert len(ticker) == 12
    await asyncio.sleep(0.26)
    counts = [len(s.ticks) for s in sessions]
    assert all(4 <= c <= 6 for c in counts), counts
    # Spread over the slots: no slot ticks much more than its share at once.
    first_ticks = sorted({s.ticks[0] for s in sessions})
    assert len(first_ticks) == 5
    await ticker.aclose()


async def test_discarded_sessions_stop_and_the_task_ends_when_empty() -> None:
    ticker = SessionTicker(0.02, slots=2)
    a, b = Session(), Session()
    ticker.add(a)
    ticker.add(b)
    await asyncio.sleep(0.05)
    ticker.discard(a)
    ticker.discard(a)  # idempotent
    seen = len(a.ticks)
    await asyncio.sleep(0.05)
    assert len(a.ticks) == seen and len(b.ticks) > seen - 1
    ticker.discard(b)
    await asyncio.sleep(0.05)
    assert ticker._task is None  # nothing to tick: no timer left running
    ticker.add(a)  # starts again
    await asyncio.sleep(0.05)
    assert len(a.ticks) > seen
    await ticker.aclose()


async def test_a_failing_session_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    ticker = SessionTicker(0.02, slots=1)
    broken, fine = Session(fail=True), Session()
    ticker.add(broken)
    ticker.add(fine)
    await asyncio.sleep(0.07)
    assert len(fine.ticks) >= 2 and len(broken.ticks) >= 2
    assert "tunnel tick failed" in caplog.text
    await ticker.aclose()


def test_bad_terms_are_refused() -> None:
    with pytest.raises(ValueError):
        SessionTicker(0)
    with pytest.raises(ValueError):
        SessionTicker(1.0, slots=0)
