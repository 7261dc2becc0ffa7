"""``lattice billing run``: usage records from the Redis stream to Stripe meter events.

One step (:meth:`BillingWorker.run_once`, what tests drive):

1. every ``reclaim_every_s`` (and at start): entries pending on *dead* consumers of the group
   are XCLAIMed and folded again; folding is idempotent, so a worker killed mid-batch loses
   nothing and counts nothing twice. Dead means idle (XINFO CONSUMERS) for longer than
   ``dead_consumer_ms``: a live worker calls XREADGROUP at least every ``block_ms``, which
   resets its idle time. Entries are taken per dead consumer (XPENDING, then XCLAIM with a
   minimum idle time) rather than with XAUTOCLAIM, which cannot tell a dead consumer's
   entries from a live one's: a live worker keeps its entries pending for a whole window
   (they are acknowledged once Stripe accepted it), so their idle time says nothing.
2. XREADGROUP (consumer ``<host>-<pid>-<random>``) a batch of ``batch`` new entries and fold
   it into the ledger with one script (:meth:`billing.ledger.Ledger.fold`); the entries stay
   pending.
3. close the due windows (:class:`billing.closer.WindowCloser`): lock, seal, send, settle;
   records are acknowledged only with their segment's settlement, after Stripe accepted it
   (or refused it for good: then they are in the dead-letter stream ``lat:usage:dead``).

:meth:`BillingWorker.run` loops over steps until SIGTERM/SIGINT (the step in progress
finishes; the window locks held are released). Beside the loop, unless ``trim_usage`` is off,
a :class:`billing.usage_trim.UsageTrimmer` trims the usage stream every ``trim_interval_s``
below what every group of ``usage_groups`` acknowledged and older than ``usage_retain_s``.
Dependencies are a Redis client and a :class:`billing.stripe_api.StripeApi`; the clock is
injectable (``clock``, unix seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import signal
import socket
import time
from collections.abc import Callable, Sequence

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from billing.closer import WindowCloser
from billing.ledger import FoldResult, Ledger, StreamEntry
from billing.stripe_types import StripeApi
from billing.usage_trim import DEFAULT_GROUPS, DEFAULT_RETAIN_S, UsageTrimmer, trimming
from billing.windows import retry_delay

__all__ = ["BillingWorker", "StepReport", "WorkerConfig", "consumer_name"]

log = logging.getLogger(__name__)


class WorkerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    window_s: int = 60
    grace_s: float = 10.0
    #: Entries per XREADGROUP, folded by one script.
    batch: int = 1000
    #: XREADGROUP BLOCK when idle; bounds how late a window closes, and keeps the consumer's
    #: idle time (what other workers read as liveness) small.
    block_ms: int = 1000
    #: Meter events per ``send_meter_events`` call (Stripe's v2 meter event stream takes up to
    #: 100 per request).
    events_per_call: int = 100
    #: Windows closed per step.
    close_limit: int = 1000
    #: Window lock lifetime: longer than a send call may take.
    lock_ms: int = 60_000
    dead_consumer_ms: int = 60_000
    reclaim_every_s: float = 15.0
    backoff_base_s: float = 0.2
    backoff_cap_s: float = 30.0
    #: Units (e.g. ``prompt_tokens``) also billed on their own meter, ``lattice_usage_<unit>``.
    unit_meters: tuple[str, ...] = ()
    #: Trim the usage stream (:mod:`billing.usage_trim`) below what every group in
    #: ``usage_groups`` acknowledged and older than ``usage_retain_s``.
    trim_usage: bool = True
    usage_retain_s: float = DEFAULT_RETAIN_S
    usage_groups: tuple[str, ...] = DEFAULT_GROUPS
    trim_interval_s: float = 60.0


class StepReport(msgspec.Struct):
    """What one step (or, summed, a worker's lifetime) did; counts of stream entries unless
    named otherwise."""

    read: int = 0
    reclaimed: int = 0
    folded: int = 0
    duplicates: int = 0
    redelivered: int = 0
    dead_lettered: int = 0
    acked: int = 0
    #: Segments settled as sent / dead, and meter events Stripe accepted.
    segments_sent: int = 0
    segments_dead: int = 0
    events_accepted: int = 0
    #: Seconds until Stripe may be called again (a retryable failure is being waited out).
    retry_in: float | None = None

    def add(self, other: StepReport) -> None:
        for name in self.__struct_fields__:
            if name != "retry_in":
                setattr(self, name, getattr(self, name) + getattr(other, name))
        self.retry_in = other.retry_in


def consumer_name() -> str:
    """``<host>-<pid>-<random>``: a fresh consumer per process, so a restarted worker never
    mistakes a dead one's pending entries for its own."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class BillingWorker:
    def __init__(
        self,
        redis: aioredis.Redis,
        stripe: StripeApi,
        config: WorkerConfig | None = None,
        *,
        consumer: str | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config or WorkerConfig()
        self.ledger = Ledger(redis, window_s=self.config.window_s)
        self.stripe = stripe
        self.consumer = consumer or consumer_name()
        self._clock = clock
        self._rng = rng or random.Random()
        self._group_ready = False
        self._next_reclaim = 0.0
        self.closer = WindowCloser(
            self.ledger, stripe, self.config, token=self.consumer, clock=clock, rng=self._rng
        )
        self.totals = StepReport()
        c = self.config
        self.trimmer = (
            UsageTrimmer(redis, groups=c.usage_groups, retain_s=c.usage_retain_s, clock=clock)
            if c.trim_usage
            else None
        )

    # -- the step --------------------------------------------------------------------------

    async def run_once(self, *, block_ms: int | None = None) -> StepReport:
        """Reclaim (when due), read and fold one batch (waiting up to ``block_ms`` for one;
        ``None``: no wait), then close due windows. Raises ``RedisError``; Stripe errors are
        handled (paused, retried, dead-lettered)."""
        report = StepReport()
        if not self._group_ready:
            await self.ledger.ensure_group()
            self._group_ready = True
        if self._clock() >= self._next_reclaim:
            await self._reclaim(report)
            self._next_reclaim = self._clock() + self.config.reclaim_every_s
        entries = await self.ledger.read(self.consumer, self.config.batch, block_ms)
        report.read = len(entries)
        await self._fold(entries, report)
        await self.closer.close_due(report)
        self.totals.add(report)
        return report

    async def _fold(self, entries: Sequence[StreamEntry], report: StepReport) -> None:
        if not entries:
            return
        result: FoldResult = await self.ledger.fold(entries, int(self._clock() * 1000))
        report.folded += result.new
        report.duplicates += result.duplicates
        report.redelivered += result.redelivered
        report.dead_lettered += result.dead
        report.acked += result.duplicates + result.dead
        if result.dead:
            log.error(
                "undecodable usage entries moved to the dead-letter stream",
                extra={"entries": result.dead},
            )

    async def _reclaim(self, report: StepReport) -> None:
        c = self.config
        for name, pending in await self.ledger.dead_consumers(self.consumer, c.dead_consumer_ms):
            log.info(
                "reclaiming a dead consumer's entries", extra={"consumer": name, "pending": pending}
            )
            while True:
                asked, entries = await self.ledger.claim_from(
                    name, self.consumer, c.dead_consumer_ms, c.batch
                )
                report.reclaimed += len(entries)
                await self._fold(entries, report)
                if asked < c.batch or len(entries) < asked:
                    break
            await self.ledger.forget_consumer(name)
        await self.ledger.trim(int(self._clock()))

    # -- the loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None, *, handle_signals: bool = True) -> None:
        """Step until ``stop`` is set (or SIGTERM/SIGINT when ``handle_signals``); a step in
        progress finishes first. Redis errors are logged and retried with backoff."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "billing worker started",
            extra={"consumer": self.consumer, "config": msgspec.to_builtins(self.config)},
        )
        try:
            async with trimming(self.trimmer, self.config.trim_interval_s):
                await self._loop(stop)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            await self.aclose()
            log.info("billing worker stopped", extra={"totals": msgspec.to_builtins(self.totals)})

    async def _loop(self, stop: asyncio.Event) -> None:
        failures = 0
        block: int | None = None
        while not stop.is_set():
            try:
                report = await self.run_once(block_ms=block)
            except RedisError as exc:
                failures += 1
                log.warning("Redis error in the billing worker", extra={"error": repr(exc)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), retry_delay(failures, rng=self._rng))
                continue
            failures = 0
            block = None if report.read >= self.config.batch else self._idle_block_ms()

    def _idle_block_ms(self) -> int:
        pause = self.closer.pause_left()
        block = self.config.block_ms
        if pause > 0:
            block = min(block, max(1, int(pause * 1000) + 1))
        return block

    async def aclose(self) -> None:
        """Release the window locks this worker holds (other workers need not wait them out)."""
        if self.closer.held:
            with contextlib.suppress(RedisError):
                await self.ledger.unlock(self.closer.held, self.consumer)
            self.closer.held.clear()


if __name__ == "__main__":  # python -m billing.worker [flags of `lattice billing run`]
    import sys

    from billing.cli import main

    sys.exit(main(["run", *sys.argv[1:]]))
