"""The one generic dispatch: authenticate → resolve → admit → route → dispatch → relay →
meter (ARCHITECTURE.md, The shape). Every surface (``/v1/chat/completions``, …) is a thin
alias of :meth:`DispatchService.dispatch`; a service never sees an HTTP request, only a
:class:`TaskCall`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any, Protocol

import anyio
import msgspec

from billing.usage import UsageOutbox
from catalog import errors as catalog_errors
from catalog.model import Catalog, Offering, TaskClass
from catalog.resolve import Resolved, effective_params, resolve_model
from catalog.schema import compile_input_schema
from gateway.auth.principal import Principal, Scope
from gateway.dispatch.admission import admit_params, resolve_drop_params
from gateway.dispatch.codecs import CODECS, BuiltinCodec, check_body
from gateway.dispatch.metering import build_record, estimate_tokens, meter_units
from gateway.dispatch.relay import DONE, StreamRelay, UpstreamStreamError, error_event
from gateway.dispatch.upstream import UpstreamClient
from gateway.errors import (
    InvalidRequest,
    LatticeError,
    ModelNotFound,
    NoCapacity,
    PermissionDenied,
    TaskNotFound,
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
_RETRYABLE = (UpstreamError, UpstreamTimeout)


class CatalogView(Protocol):
    @property
    def current(self) -> Catalog: ...


class WorkspaceView(Protocol):
    async def get(self, name: str) -> Any: ...


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


class _Plan(msgspec.Struct):
    """Everything decided before the first target is called."""

    task: TaskClass
    codec: BuiltinCodec | None
    resolved: Resolved
    display_model: str
    stream: bool
    include_usage: bool
    drop: bool
    dispatch_id: str
    started_ms: int
    tags: dict[str, str]
    #: The workspace opted in to logging request and response bodies.
    log_bodies: bool = False


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


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
    ) -> None:
        self._catalog = catalog
        self._workspaces = workspaces
        self._upstreams = upstreams
        self._outbox = outbox
        self._idempotency = idempotency
        self._metrics = metrics
        self._drop_default = drop_params_default

    # -- planning (no I/O but the workspace read) -------------------------------------

    async def _plan(self, call: TaskCall) -> _Plan:
        if not call.principal.has(Scope.INFERENCE):
            raise PermissionDenied(
                f"This credential lacks the scope '{Scope.INFERENCE}' required to run tasks."
            )
        cat = self._catalog.current
        task = cat.task_classes.get(call.task)
        if task is None:
            raise TaskNotFound(f"Unknown task class '{call.task}'.", param="task")
        body = call.body
        codec = CODECS.get(task.codec) if task.codec else None
        if codec is not None:
            check_body(codec, body)
        elif task.input_schema is not None:
            error = compile_input_schema(task.input_schema).first_error(body)
            if error is not None:
                path, message = error
                raise InvalidRequest(
                    f"Invalid value at '{path}': {message}", param=path, code="invalid_value"
                )
        elif task.codec is not None:
            raise NoCapacity(f"No capacity serves the task class '{call.task}' yet.")

        workspace = await self._workspaces.get(call.principal.workspace)
        requested = body.get("model")
        if requested is not None and not isinstance(requested, str):
            raise InvalidRequest("'model' must be a string.", param="model", code="invalid_value")
        ws_default = getattr(workspace, "default_model", None)
        try:
            resolved = resolve_model(cat, requested, call.task, ws_default)
        except catalog_errors.UnknownModel:
            if requested in (None, "", "default") and codec is None:
                raise NoCapacity(f"No capacity serves the task class '{call.task}' yet.") from None
            raise ModelNotFound(
                f"The model '{requested}' does not exist or you do not have access to it.",
                param="model",
            ) from None
        except catalog_errors.ModelTaskMismatch:
            raise InvalidRequest(
                f"The model '{requested}' does not serve the task '{call.task}'.",
                param="model",
                code="model_not_supported",
            ) from None
        if not resolved.offerings:
            raise NoCapacity(
                f"No capacity is serving '{resolved.model.id}' for '{call.task}' right now."
            )
        stream = body.get("stream") is True
        if stream and not (codec.can_stream if codec else task.streams):
            raise InvalidRequest(
                f"The task '{call.task}' does not stream.", param="stream", code="invalid_value"
            )
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        metadata = body.get("metadata")
        tags = (
            {k: v for k, v in metadata.items() if isinstance(v, str)}
            if isinstance(metadata, dict)
            else {}
        )
        display = requested if requested not in (None, "", "default") else resolved.model.id
        return _Plan(
            task=task,
            codec=codec,
            resolved=resolved,
            display_model=str(display),
            stream=stream,
            include_usage=include_usage,
            drop=resolve_drop_params(
                body, getattr(workspace, "drop_params", None), self._drop_default
            ),
            dispatch_id="dsp_" + uuid.uuid4().hex,
            started_ms=_now_ms(),
            tags=tags,
            log_bodies=getattr(workspace, "log_bodies", False) is True,
        )

    def _upstream_body(self, plan: _Plan, call: TaskCall, offering: Offering) -> bytes:
        core = plan.codec.core_fields if plan.codec else frozenset(call.body)
        body, dropped = admit_params(
            call.body,
            core=core,
            supported=effective_params(plan.resolved.model, offering),
            drop=plan.drop,
        )
        if dropped:
            log.info("dropped unsupported parameters", extra={"dropped": dropped})
        upstream = offering.upstream
        if upstream is not None and plan.codec is not None:
            model_id = plan.resolved.model.id
            body["model"] = upstream.model or model_id.removeprefix("lovelace:")
        if plan.stream:
            body["stream_options"] = {"include_usage": True}
        return _encoder.encode(body)

    # -- the dispatch ------------------------------------------------------------------

    async def dispatch(self, call: TaskCall) -> JsonOutcome | StreamOutcome:
        plan = await self._plan(call)
        if plan.log_bodies:  # only ever for a workspace that opted in
            log.info("request body", extra={"dispatch_id": plan.dispatch_id, "body": call.body})
        if plan.stream:
            return await self._dispatch_stream(call, plan)
        key = call.idempotency_key
        if key is None:
            return await self._dispatch_once(call, plan)
        ws = call.principal.workspace
        digest = body_digest(call.task, call.raw)
        stored = await self._idempotency.begin(ws, key, digest)
        if stored is not None:
            return JsonOutcome(stored.body, stored.status, {"idempotent-replayed": "true"})
        try:
            outcome = await self._dispatch_once(call, plan)
        except BaseException:
            await self._idempotency.abandon(ws, key)
            raise
        await self._idempotency.complete(ws, key, digest, outcome.status, outcome.body)
        return outcome

    def _path(self, plan: _Plan, offering: Offering) -> str:
        upstream = offering.upstream
        assert upstream is not None
        if upstream.path:
            return upstream.path
        if plan.codec is not None:
            return plan.codec.upstream_path
        return f"/tasks/{plan.task.name}"

    def _targets(self, plan: _Plan) -> list[Offering]:
        return [o for o in plan.resolved.offerings if o.upstream is not None]

    async def _dispatch_once(self, call: TaskCall, plan: _Plan) -> JsonOutcome:
        last: LatticeError | None = None
        for offering in self._targets(plan):
            assert offering.upstream is not None
            body = self._upstream_body(plan, call, offering)
            try:
                resp = await self._upstreams.post(
                    offering.upstream, self._path(plan, offering), body
                )
            except _RETRYABLE as exc:
                self._metrics.upstream_errors.labels(offering.id, exc.code or "").inc()
                last = exc
                continue
            return await self._finish_json(call, plan, offering, resp.body)
        self._metrics.dispatches.labels(plan.task.name, "failed").inc()
        raise last or NoCapacity("No capacity is serving this request right now.")

    async def _finish_json(
        self, call: TaskCall, plan: _Plan, offering: Offering, raw: bytes
    ) -> JsonOutcome:
        try:
            result = _decoder.decode(raw)
        except msgspec.DecodeError:
            raise UpstreamError("The upstream answered with invalid JSON.") from None
        if not isinstance(result, dict):
            raise UpstreamError("The upstream answered with an unexpected shape.")
        usage = result.get("usage")
        if plan.codec is not None and "model" in result:
            result["model"] = plan.display_model
        units, estimated = meter_units(plan.task.meter, usage if isinstance(usage, dict) else None)
        if estimated and plan.codec is not None:
            units = self._estimate(plan, call, units, result)
        await self._meter(call, plan, offering, units, estimated, "completed")
        if plan.log_bodies:
            log.info("response body", extra={"dispatch_id": plan.dispatch_id, "body": result})
        return JsonOutcome(
            _encoder.encode(result) if plan.codec is not None else raw,
            200,
            {"x-lattice-dispatch-id": plan.dispatch_id},
        )

    async def _dispatch_stream(self, call: TaskCall, plan: _Plan) -> StreamOutcome:
        last: LatticeError | None = None
        for offering in self._targets(plan):
            assert offering.upstream is not None
            body = self._upstream_body(plan, call, offering)
            upstream = self._upstreams.stream(offering.upstream, self._path(plan, offering), body)
            try:
                first = await anext(upstream)
            except StopAsyncIteration:
                first = None
            except _RETRYABLE as exc:
                self._metrics.upstream_errors.labels(offering.id, exc.code or "").inc()
                await upstream.aclose()
                last = exc
                continue
            except BaseException:
                await upstream.aclose()
                raise
            return StreamOutcome(
                self._relay(call, plan, offering, first, upstream),
                {"x-lattice-dispatch-id": plan.dispatch_id},
            )
        self._metrics.dispatches.labels(plan.task.name, "failed").inc()
        raise last or NoCapacity("No capacity is serving this request right now.")

    async def _relay(
        self,
        call: TaskCall,
        plan: _Plan,
        offering: Offering,
        first: bytes | None,
        upstream: AsyncGenerator[bytes, None],
    ) -> AsyncGenerator[bytes, None]:
        relay = StreamRelay(plan.display_model, plan.include_usage)
        status = "cancelled"
        try:
            if first is not None:
                event = relay.relay(first)
                if event is not None:
                    yield event
                async for payload in upstream:
                    event = relay.relay(payload)
                    if event is not None:
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
                units, estimated = meter_units(plan.task.meter, relay.usage)
                if estimated:
                    units = self._estimate_stream(plan, call, units, relay)
                await self._meter(call, plan, offering, units, estimated, status)

    # -- metering ----------------------------------------------------------------------

    @staticmethod
    def _prompt_text(body: dict[str, Any]) -> str:
        parts: list[str] = []
        for message in body.get("messages") or ():
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
        for key in ("prompt", "input"):
            value = body.get(key)
            if isinstance(value, str):
                parts.append(value)
            elif isinstance(value, list):
                parts.extend(v for v in value if isinstance(v, str))
        return " ".join(parts)

    def _estimate(
        self, plan: _Plan, call: TaskCall, units: dict[str, int], result: dict[str, Any]
    ) -> dict[str, int]:
        out = dict(units)
        if "prompt_tokens" in out and not out["prompt_tokens"]:
            out["prompt_tokens"] = estimate_tokens(self._prompt_text(call.body))
        if "completion_tokens" in out and not out["completion_tokens"]:
            text = ""
            for choice in result.get("choices") or ():
                if isinstance(choice, dict):
                    msg = choice.get("message")
                    text += str(msg.get("content") or "") if isinstance(msg, dict) else ""
                    text += str(choice.get("text") or "")
            out["completion_tokens"] = estimate_tokens(text)
        return out

    def _estimate_stream(
        self, plan: _Plan, call: TaskCall, units: dict[str, int], relay: StreamRelay
    ) -> dict[str, int]:
        out = dict(units)
        if "prompt_tokens" in out and not out["prompt_tokens"]:
            out["prompt_tokens"] = estimate_tokens(self._prompt_text(call.body))
        if "completion_tokens" in out and not out["completion_tokens"]:
            out["completion_tokens"] = (relay.delivered_chars + 3) // 4
        return out

    async def _meter(
        self,
        call: TaskCall,
        plan: _Plan,
        offering: Offering,
        units: dict[str, int],
        estimated: bool,
        status: str,
    ) -> None:
        p = call.principal
        record = build_record(
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
        )
        self._metrics.dispatches.labels(plan.task.name, status).inc()
        await self._outbox.append(record)
