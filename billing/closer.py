"""Closing due windows: lock and seal, send one meter event per (window, meter, segment),
settle what Stripe answered (:class:`WindowCloser`, driven by
:class:`billing.worker.BillingWorker`).

- A due window is claimed (``SET NX PX`` lock and seal, one script, see ``ledger_claim.lua``);
  each sealed segment becomes meter events with deterministic identifiers
  (:func:`billing.windows.plan_events`); a segment with nothing to bill is settled at once.
- Workspaces map to Stripe customers through the ledger's hash (``find_or_create_customer``
  only for a workspace not mapped yet).
- Events go ``events_per_call`` at a time. A segment all of whose events Stripe accepted (or
  reported as duplicates of accepted ones) is settled ``sent``; one with an event refused for
  good (a deleted customer: ``resource_missing``) is settled ``dead``: its records go to the
  dead-letter stream. Either way its records are acknowledged in the same script.
- ``StripeRetryable`` pauses every Stripe call for :func:`billing.windows.retry_delay`
  (exponential, jittered, capped, never shorter than ``Retry-After``): the rest stays sealed
  and pending, its window locked by this worker until the lock expires, and is sent again
  after the pause under the same identifiers. A call refused as a whole
  (``StripePermanent``: a bad key, permissions, a wrong base URL) is a configuration problem:
  paused and retried the same way, logged as an error, never dead-lettered.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import msgspec

from billing.ledger import Ledger, Settlement
from billing.stripe_types import (
    MeterEvent,
    MeterEventResult,
    StripeApi,
    StripePermanent,
    StripeRetryable,
)
from billing.windows import (
    COST_METER,
    PlannedEvent,
    WindowRef,
    WindowState,
    meter_display_name,
    plan_events,
    retry_delay,
    unit_meter,
)

if TYPE_CHECKING:
    from billing.worker import StepReport, WorkerConfig

__all__ = ["WindowCloser"]

log = logging.getLogger(__name__)

#: HTTP statuses of a call refused for a reason that is ours, not the usage's (a bad or
#: restricted API key, a wrong base URL): paused and retried like an outage, never
#: dead-lettered.
_CONFIG_STATUSES = frozenset({401, 403, 404, 405})


class _Job(msgspec.Struct):
    """One sealed segment to send."""

    ref: WindowRef
    segment: int
    events: list[PlannedEvent]


class WindowCloser:
    """The sending half of a worker; ``token`` (the worker's consumer name) owns its locks."""

    def __init__(
        self,
        ledger: Ledger,
        stripe: StripeApi,
        config: WorkerConfig,
        *,
        token: str,
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.ledger = ledger
        self.stripe = stripe
        self.config = config
        self.token = token
        self._clock = clock
        self._rng = rng
        self._meters: dict[str, str] = {}
        self._failures = 0
        self._paused_until = 0.0
        #: Windows locked by this worker with a segment left to send.
        self.held: set[WindowRef] = set()

    @property
    def meters(self) -> list[str]:
        return [COST_METER, *(unit_meter(u) for u in self.config.unit_meters)]

    def pause_left(self) -> float:
        return max(0.0, self._paused_until - self._clock())

    def _failed(self, exc: StripeRetryable | StripePermanent, what: str) -> None:
        self._failures += 1
        retry_after = exc.retry_after_s if isinstance(exc, StripeRetryable) else None
        delay = retry_delay(
            self._failures,
            retry_after,
            base=self.config.backoff_base_s,
            cap=self.config.backoff_cap_s,
            rng=self._rng,
        )
        self._paused_until = self._clock() + delay
        # a permanent refusal of a whole call is a configuration problem someone must fix
        level = logging.ERROR if isinstance(exc, StripePermanent) else logging.WARNING
        log.log(
            level,
            "Stripe call failed; pausing",
            extra={
                "call": what,
                "error": exc.message,
                "failures": self._failures,
                "delay_s": delay,
            },
        )

    def _succeeded(self) -> None:
        if self._failures:
            log.info("Stripe calls resumed", extra={"failures": self._failures})
        self._failures = 0

    async def _ensure_meters(self) -> bool:
        for meter in self.meters:
            if meter in self._meters:
                continue
            try:
                self._meters[meter] = await self.stripe.ensure_meter(
                    event_name=meter, display_name=meter_display_name(meter)
                )
            except (StripeRetryable, StripePermanent) as exc:
                # a meter that cannot be created is a configuration problem: keep folding,
                # retry later, and let nothing be sent (nor dead-lettered) meanwhile
                self._failed(exc, "ensure_meter")
                return False
            self._succeeded()
        return True

    async def close_due(self, report: StepReport) -> None:
        """Close what is due now (see the module doc), adding to ``report``."""
        if self.pause_left() > 0 or not await self._ensure_meters():
            report.retry_in = self.pause_left()
            return
        c = self.config
        now_ms = int(self._clock() * 1000)
        due = await self.ledger.due(now_ms, int(c.grace_s * 1000), c.close_limit)
        states = await self.ledger.claim(due, self.token, c.lock_ms)
        self.held |= {s.ref for s in states}
        jobs: list[_Job] = []
        settlements: list[Settlement] = []
        for state in states:
            for seg in state.sealed():
                events = plan_events(state.ref, seg, c.unit_meters)
                if events:
                    jobs.append(_Job(state.ref, seg.index, events))
                else:  # nothing to bill (self-served, free): settled without Stripe
                    settlements.append(Settlement(state.ref, seg.index, "sent"))
        settlements += await self._send(jobs)
        self._mark_releases(states, settlements)
        report.acked += await self.ledger.settle(settlements, self.token)
        for s in settlements:
            if s.outcome == "sent":
                report.segments_sent += 1
                report.events_accepted += len(s.accepted)
            else:
                report.segments_dead += 1
        records = {(st.ref, seg.index): seg.records for st in states for seg in st.segments}
        report.dead_lettered += sum(
            records.get((s.ref, s.segment), 0) for s in settlements if s.outcome == "dead"
        )
        report.retry_in = self.pause_left() or None

    def _mark_releases(self, states: Sequence[WindowState], settlements: list[Settlement]) -> None:
        """Flag the last settlement of each window all of whose sealed segments are settled,
        so the lock goes with it; a window with a segment left for a retry keeps its lock."""
        last = {s.ref: i for i, s in enumerate(settlements)}
        settled = {(s.ref, s.segment) for s in settlements}
        for state in states:
            if all((state.ref, seg.index) in settled for seg in state.sealed()):
                self.held.discard(state.ref)
                if (i := last.get(state.ref)) is not None:
                    settlements[i] = msgspec.structs.replace(settlements[i], release=True)

    async def _send(self, jobs: list[_Job]) -> list[Settlement]:
        """Send the jobs' events; settlements for the segments Stripe answered for. Stops at
        the first retryable failure (the rest is sent after the pause)."""
        if not jobs:
            return []
        settlements: list[Settlement] = []
        # read the mapping every pass (one HMGET), so a relinked customer is used at once
        customers = await self.ledger.customers_of(sorted({j.ref.workspace for j in jobs}))
        for ws in sorted({j.ref.workspace for j in jobs} - customers.keys()):
            try:
                found = await self.stripe.find_or_create_customer(ws)
                customers[ws] = await self.ledger.set_customer(ws, found)
            except StripeRetryable as exc:
                self._failed(exc, "find_or_create_customer")
                return settlements
            except StripePermanent as exc:
                if exc.http_status in _CONFIG_STATUSES:
                    self._failed(exc, "find_or_create_customer")
                    return settlements
                code = exc.code or f"http_{exc.http_status}"
                for j in jobs:
                    if j.ref.workspace == ws:
                        settlements.append(self._dead(j, "", code, {}))
        sendable = [j for j in jobs if j.ref.workspace in customers]
        events = [
            MeterEvent(
                event_name=e.meter,
                identifier=e.identifier,
                customer_id=customers[j.ref.workspace],
                value=e.value,
                timestamp=e.timestamp,
            )
            for j in sendable
            for e in j.events
        ]
        results: dict[str, MeterEventResult] = {}
        step = max(1, self.config.events_per_call)
        for i in range(0, len(events), step):
            answered = await self._send_chunk(events[i : i + step])
            if answered is None:
                break
            results.update((r.identifier, r) for r in answered)
        for j in sendable:
            answers = [results.get(e.identifier) for e in j.events]
            accepted = {
                e.meter: (e.identifier, e.value)
                for e, r in zip(j.events, answers, strict=True)
                if r is not None and r.accepted
            }
            refused = [
                r.error_code for r in answers if r is not None and r.error_code and not r.accepted
            ]
            customer = customers[j.ref.workspace]
            if refused:
                settlements.append(self._dead(j, customer, refused[0] or "refused", accepted))
            elif len(accepted) == len(j.events):
                settlements.append(Settlement(j.ref, j.segment, "sent", customer, "", accepted))
        return settlements

    async def _send_chunk(self, events: list[MeterEvent]) -> list[MeterEventResult] | None:
        """One call; ``None`` after a failure of the call as a whole (pause set). Per-event
        refusals come back as results; a call refused as a whole (``StripePermanent``: bad
        key, permissions, a wrong base URL) condemns the configuration, not the usage, so
        it is paused and retried like an outage, never dead-lettered."""
        try:
            answered = await self.stripe.send_meter_events(events)
        except (StripeRetryable, StripePermanent) as exc:
            self._failed(exc, "send_meter_events")
            return None
        self._succeeded()
        return list(answered)

    def _dead(
        self, job: _Job, customer: str, code: str, accepted: dict[str, tuple[str, int]]
    ) -> Settlement:
        log.error(
            "usage refused by Stripe for good: moved to the dead-letter stream",
            extra={
                "workspace": job.ref.workspace,
                "window": job.ref.start,
                "segment": job.segment,
                "code": code,
                "customer": customer,
            },
        )
        return Settlement(job.ref, job.segment, "dead", customer, code, accepted)
