"""The one generic dispatch: authenticate → resolve → admit → route → dispatch → relay →
meter (ARCHITECTURE.md, The shape). Every surface (``/v1/chat/completions``, …) is a thin
alias of :meth:`DispatchService.dispatch`; a service never sees an HTTP request, only a
:class:`TaskCall`. Planning (who may serve the request) lives in :mod:`.plan`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import anyio
import msgspec

from billing.estimate import max_estimate_picousd
from billing.spend import QUOTA_MESSAGE, QuotaExceeded, SpendGuard
from billing.usage import UsageOutbox, UsageRecord
from catalog.model import Offering
from catalog.resolve import effective_params
from gateway.auth.principal import Principal
from gateway.dispatch.admission import admit_params
from gateway.dispatch.estimates import estimate_result_units, estimate_stream_units
from gateway.dispatch.metering import build_record, meter_units
from gateway.dispatch.plan import (
    CatalogView,
    Plan,
    Planner,
    RuntimeView,
    Target,
    WorkspaceView,
)
from gateway.dispatch.relay import DONE, StreamRelay, UpstreamStreamError, error_event
from gateway.dispatch.runtime_target import RuntimeCaller, RuntimeTarget
from gateway.dispatch.upstream import UpstreamClient
from gateway.errors import (
    InsufficientQuota,
    LatticeError,
    NoCapacity,
    RelayUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.idempotency import IdempotencyStore, body_digest
from gateway.metrics import Metrics

__all__ = ["DispatchService", "JsonOutcome", "StreamOutcome", "TaskCall"]

log = logging.getLogger("lattice.dispatch")

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()

#: Failures after which the next target is tried (nothing reached the caller yet).
_RETRYABLE = (UpstreamError, UpstreamTimeout, RelayUnavailable)


class TaskCall(msgspec.Struct, frozen=True):
    task: str
    raw: bytes
    body: dict[str, Any]
    principal: Principal
    request_id: str
    idempotency_key: str | None = None


class JsonOutcome(msgspec.Struct):
    body: bytes
    status: int = 200
    headers: dict[str, str] = {}


class StreamOutcome(msgspec.Struct):
    events: AsyncGenerator[bytes, None]
    headers: dict[str, str] = {}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _offering(target: Target) -> Offering:
    return target.offering if isinstance(target, RuntimeTarget) else target


def _stop_after(target: Target) -> bool:
    """Whether a failure of ``target`` is the answer rather than a reason to try the next
    target: a request aimed at a personal runtime never falls back to other capacity."""
    return isinstance(target, RuntimeTarget) and target.pinned


class DispatchService:
    def __init__(
        self,
        *,
        catalog: CatalogView,
        workspaces: WorkspaceView,
        upstreams: UpstreamClient,
        outbox: UsageOutbox,
        idempotency: IdempotencyStore,
        metrics: Metrics,
        drop_params_default: bool = True,
        runtimes: RuntimeView | None = None,
        runtime_caller: RuntimeCaller | None = None,
        spend: SpendGuard | None = None,
    ) -> None:
        self._spend = spend
        self._planner = Planner(
            catalog=catalog,
            workspaces=workspaces,
            runtimes=runtimes if runtime_caller is not None else None,
            drop_params_default=drop_params_default,
        )
        self._upstreams = upstreams
        self._runtime_caller = runtime_caller
        self._outbox = outbox
        self._idempotency = idempotency
        self._metrics = metrics

    def _target_body(self, plan: Plan, call: TaskCall, target: Target) -> bytes:
        offering = _offering(target)
        core = plan.codec.core_fields if plan.codec else frozenset(call.body)
        body, dropped = admit_params(
            call.body,
            core=core,
            supported=effective_params(plan.resolved.model, offering),
            drop=plan.drop,
        )
        if dropped:
            log.info("dropped unsupported parameters", extra={"dropped": dropped})
        if plan.codec is not None:
            if isinstance(target, RuntimeTarget):
                body["model"] = target.model  # the daemon maps it to its local name
            elif offering.upstream is not None:
                model_id = plan.resolved.model.id
                body["model"] = offering.upstream.model or model_id.removeprefix("lovelace:")
        if plan.stream:
            body["stream_options"] = {"include_usage": True}
        return _encoder.encode(body)

    # -- the dispatch ------------------------------------------------------------------

    async def dispatch(self, call: TaskCall) -> JsonOutcome | StreamOutcome:
        plan = await self._planner.plan(call.task, call.body, call.principal)
        if plan.log_bodies:  # only ever for a workspace that opted in
            log.info("request body", extra={"dispatch_id": plan.dispatch_id, "body": call.body})
        if plan.stream:
            await self._admit(call, plan)
            try:
                return await self._dispatch_stream(call, plan)
            except BaseException:
                await self._release(call, plan)
                raise
        key = call.idempotency_key
        if key is None:
            await self._admit(call, plan)
            try:
                return await self._dispatch_once(call, plan)
            except BaseException:
                await self._release(call, plan)
                raise
        ws = call.principal.workspace
        digest = body_digest(call.task, call.raw)
        stored = await self._idempotency.begin(ws, key, digest)
        if stored is not None:
            return JsonOutcome(stored.body, stored.status, {"idempotent-replayed": "true"})
        try:
            await self._admit(call, plan)
            outcome = await self._dispatch_once(call, plan)
        except BaseException:
            await self._release(call, plan)
            await self._idempotency.abandon(ws, key)
            raise
        await self._idempotency.complete(ws, key, digest, outcome.status, outcome.body)
        return outcome

    async def _admit(self, call: TaskCall, plan: Plan) -> None:
        """Reserve the request's estimated cost against its workspace's spend limit and
        credit (billing.spend): 429 insufficient_quota before any upstream work."""
        if self._spend is None or self._spend.known_unlimited(call.principal.workspace):
            return
        model = plan.resolved.model
        estimate = max_estimate_picousd(
            plan.task.meter,
            (_offering(t) for t in plan.targets),
            call.body,
            model.max_output_tokens,
            model.context_length,
        )
        try:
            plan.reserved = await self._spend.admit(
                call.principal.workspace,
                reservation_id=plan.dispatch_id,
                estimate_picousd=estimate,
                now_ms=plan.started_ms,
            )
        except QuotaExceeded:
            raise InsufficientQuota(QUOTA_MESSAGE) from None

    async def _release(self, call: TaskCall, plan: Plan) -> None:
        """Give back the reservation of a dispatch that ended before it was metered."""
        if plan.reserved and not plan.metered and self._spend is not None:
            plan.reserved = False
            with anyio.CancelScope(shield=True):
                await self._spend.release(call.principal.workspace, reservation_id=plan.dispatch_id)

    def _path(self, plan: Plan, offering: Offering) -> str:
        upstream = offering.upstream
        assert upstream is not None
        if upstream.path:
            return upstream.path
        if plan.codec is not None:
            return plan.codec.upstream_path
        return f"/tasks/{plan.task.name}"

    async def _post(self, plan: Plan, target: Target, body: bytes) -> bytes:
        if isinstance(target, RuntimeTarget):
            assert self._runtime_caller is not None
            return await self._runtime_caller.post(target, plan.task.name, plan.dispatch_id, body)
        assert target.upstream is not None
        resp = await self._upstreams.post(target.upstream, self._path(plan, target), body)
        return resp.body

    def _open_stream(self, plan: Plan, target: Target, body: bytes) -> AsyncGenerator[bytes, None]:
        if isinstance(target, RuntimeTarget):
            assert self._runtime_caller is not None
            return self._runtime_caller.stream(target, plan.task.name, plan.dispatch_id, body)
        assert target.upstream is not None
        return self._upstreams.stream(target.upstream, self._path(plan, target), body)

    async def _dispatch_once(self, call: TaskCall, plan: Plan) -> JsonOutcome:
        last: LatticeError | None = None
        for target in plan.targets:
            try:
                raw = await self._post(plan, target, self._target_body(plan, call, target))
            except _RETRYABLE as exc:
                self._metrics.upstream_errors.labels(_offering(target).id, exc.code or "").inc()
                if _stop_after(target):
                    self._metrics.count_dispatch(plan.task.name, "failed")
                    raise
                last = exc
                continue
            return await self._finish_json(call, plan, _offering(target), raw)
        self._metrics.count_dispatch(plan.task.name, "failed")
        raise last or NoCapacity("No capacity is serving this request right now.")

    async def _finish_json(
        self, call: TaskCall, plan: Plan, offering: Offering, raw: bytes
    ) -> JsonOutcome:
        try:
            result = _decoder.decode(raw)
        except (msgspec.DecodeError, RecursionError):
            raise UpstreamError("The upstream answered with invalid JSON.") from None
        if not isinstance(result, dict):
            raise UpstreamError("The upstream answered with an unexpected shape.")
        usage = result.get("usage")
        if plan.codec is not None and "model" in result:
            result["model"] = plan.display_model
        units, estimated = meter_units(plan.task.meter, usage if isinstance(usage, dict) else None)
        if estimated and plan.codec is not None:
            units = estimate_result_units(units, call.body, result)
        await self._meter(call, plan, offering, units, estimated, "completed")
        if plan.log_bodies:
            log.info("response body", extra={"dispatch_id": plan.dispatch_id, "body": result})
        return JsonOutcome(
            _encoder.encode(result) if plan.codec is not None else raw,
            200,
            {"x-lattice-dispatch-id": plan.dispatch_id},
        )

    async def _dispatch_stream(self, call: TaskCall, plan: Plan) -> StreamOutcome:
        last: LatticeError | None = None
        for target in plan.targets:
            upstream = self._open_stream(plan, target, self._target_body(plan, call, target))
            try:
                first = await anext(upstream)
            except StopAsyncIteration:
                first = None
            except _RETRYABLE as exc:
                self._metrics.upstream_errors.labels(_offering(target).id, exc.code or "").inc()
                await upstream.aclose()
                if _stop_after(target):
                    self._metrics.count_dispatch(plan.task.name, "failed")
                    raise
                last = exc
                continue
            except BaseException:
                await upstream.aclose()
                raise
            return StreamOutcome(
                self._relay(call, plan, _offering(target), first, upstream),
                {"x-lattice-dispatch-id": plan.dispatch_id},
            )
        self._metrics.count_dispatch(plan.task.name, "failed")
        raise last or NoCapacity("No capacity is serving this request right now.")

    async def _relay(
        self,
        call: TaskCall,
        plan: Plan,
        offering: Offering,
        first: bytes | None,
        upstream: AsyncGenerator[bytes, None],
    ) -> AsyncGenerator[bytes, None]:
        relay = StreamRelay(plan.display_model, plan.include_usage)
        status = "cancelled"

        def checkpoint() -> None:
            # Before the event goes out: if this process dies from here on, what the caller
            # got is billed (billing/spool_checkpoints.py).
            units, estimated = self._units_so_far(call, plan, relay)
            self._outbox.checkpoint(self._record(call, plan, offering, units, estimated, "failed"))

        try:
            if first is not None:
                event = relay.relay(first)
                if event is not None:
                    checkpoint()
                    yield event
                async for payload in upstream:
                    event = relay.relay(payload)
                    if event is not None:
                        checkpoint()
                        yield event
            status = "completed"
            yield DONE
        except LatticeError as exc:
            status = "failed"
            self._metrics.upstream_errors.labels(offering.id, exc.code or "").inc()
            yield error_event(exc)
        except UpstreamStreamError as exc:
            status = "failed"
            yield error_event(UpstreamError(f"The upstream failed mid-stream: {exc}"))
        finally:
            # A disconnected caller cancels this generator: closing the upstream stops the
            # upstream work at once; what was delivered is still metered, shielded from the
            # cancellation so the record is written.
            with anyio.CancelScope(shield=True):
                await upstream.aclose()
                units, estimated = self._units_so_far(call, plan, relay)
                await self._meter(call, plan, offering, units, estimated, status)

    # -- metering ----------------------------------------------------------------------

    @staticmethod
    def _units_so_far(
        call: TaskCall, plan: Plan, relay: StreamRelay
    ) -> tuple[dict[str, int], bool]:
        units, estimated = meter_units(plan.task.meter, relay.usage)
        if estimated:
            units = estimate_stream_units(units, call.body, relay.delivered_chars)
        return units, estimated

    def _record(
        self,
        call: TaskCall,
        plan: Plan,
        offering: Offering,
        units: dict[str, int],
        estimated: bool,
        status: str,
    ) -> UsageRecord:
        p = call.principal
        return build_record(
            dispatch_id=plan.dispatch_id,
            request_id=call.request_id,
            principal_fields={
                "workspace": p.workspace,
                "key_id": p.key_id,
                "client_id": p.client_id,
                "subject": p.subject,
            },
            task=plan.task.name,
            model=plan.resolved.model.id,
            offering=offering,
            units=units,
            estimated=estimated,
            started_ms=plan.started_ms,
            finished_ms=_now_ms(),
            status=status,
            tags=plan.tags,
            pricing=plan.pricing,
            # A personal runtime only ever serves its own workspace; marketplace daemons
            # will compare their workspace with the caller's here.
            same_workspace=offering.kind == "runtime",
        )

    async def _meter(
        self,
        call: TaskCall,
        plan: Plan,
        offering: Offering,
        units: dict[str, int],
        estimated: bool,
        status: str,
    ) -> None:
        record = self._record(call, plan, offering, units, estimated, status)
        self._metrics.count_dispatch(plan.task.name, status)
        await self._outbox.append(record)
        plan.metered = True
        if plan.reserved and self._spend is not None:
            self._spend.settle_in_background(record)
