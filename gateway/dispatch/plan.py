"""Planning a dispatch: what the request asks for and who may serve it, decided before any
target is called (ARCHITECTURE.md, The shape, steps 2-4).

The targets of a plan, best first:

- ``lattice:personal:lat_…`` → that runtime only. It must belong to the caller's workspace;
  another workspace's runtime is answered exactly like one that does not exist (one lookup
  either way, the same 404 body). It never falls back to other capacity.
- a canonical model (``lovelace:…``, an alias, the default) → the workspace's online runtimes
  that advertise it, then the catalog's hosted offerings.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import msgspec

from catalog import errors as catalog_errors
from catalog.charges import effective_pricing
from catalog.model import Catalog, ModelEntry, Offering, Pricing, TaskClass
from catalog.resolve import Resolved, resolve_model
from catalog.schema import compile_input_schema
from gateway.auth.principal import Principal, Scope
from gateway.dispatch.admission import resolve_drop_params
from gateway.dispatch.codecs import CODECS, BuiltinCodec, check_body
from gateway.dispatch.runtime_target import RuntimeTarget
from gateway.errors import (
    InvalidRequest,
    ModelNotFound,
    NoCapacity,
    PermissionDenied,
    RelayUnavailable,
    RuntimeNotFound,
    TaskNotFound,
)
from gateway.ids import new_hex_id

__all__ = [
    "PERSONAL_PREFIX",
    "CatalogView",
    "Plan",
    "Planner",
    "RuntimeInfo",
    "RuntimeView",
    "Target",
    "WorkspaceView",
]

#: ``model`` values naming a personal runtime: ``lattice:personal:lat_<id>``.
PERSONAL_PREFIX = "lattice:personal:"

Target = Offering | RuntimeTarget


class CatalogView(Protocol):
    @property
    def current(self) -> Catalog: ...


class WorkspaceView(Protocol):
    async def get(self, name: str) -> Any: ...


class RuntimeInfo(Protocol):
    """What a connected daemon advertised (read-only)."""

    @property
    def id(self) -> str: ...
    @property
    def models(self) -> tuple[str, ...]: ...
    @property
    def task_classes(self) -> tuple[str, ...]: ...
    @property
    def default_model(self) -> str | None: ...


class RuntimeView(Protocol):
    async def find(self, workspace: str, runtime_id: str) -> RuntimeInfo | None:
        """The workspace's runtime, not revoked; ``None`` for any other (one Redis read)."""
        ...

    async def online(self, workspace: str) -> Sequence[RuntimeInfo]:
        """The workspace's runtimes with a tunnel open now (may be a second stale)."""
        ...

    def offering(self, model: str, runtime_id: str) -> Offering:
        """What serving ``model`` on one's own runtime costs (the catalog's pricing)."""
        ...


class Plan(msgspec.Struct):
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
    targets: tuple[Target, ...]
    #: The workspace opted in to logging request and response bodies.
    log_bodies: bool = False
    #: The catalog's pricing policy at planning time: the one in force for this dispatch.
    pricing: Pricing | None = None
    #: A spend reservation was made for this dispatch (billing.spend); it was metered.
    reserved: bool = False
    metered: bool = False


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _tags(body: dict[str, Any]) -> dict[str, str]:
    metadata = body.get("metadata")
    tags: dict[str, str] = (
        {k: v for k, v in metadata.items() if isinstance(v, str)}
        if isinstance(metadata, dict)
        else {}
    )
    extra = body.get("tags")
    if isinstance(extra, list):
        tags.update({f"tag:{t}": "1" for t in extra if isinstance(t, str)})
    return tags


class Planner:
    def __init__(
        self,
        *,
        catalog: CatalogView,
        workspaces: WorkspaceView,
        runtimes: RuntimeView | None,
        drop_params_default: bool,
    ) -> None:
        self._catalog = catalog
        self._workspaces = workspaces
        self._runtimes = runtimes
        self._drop_default = drop_params_default
        #: Resolutions of the current catalog version (pure in their inputs, and catalogs are
        #: immutable): resolving sorts offerings by exact price, too much for every request.
        self._resolved: dict[tuple[str | None, str, str | None], Resolved] = {}
        self._resolved_version = -1

    async def plan(self, task_name: str, body: dict[str, Any], principal: Principal) -> Plan:
        if not principal.has(Scope.INFERENCE):
            raise PermissionDenied(
                f"This credential lacks the scope '{Scope.INFERENCE}' required to run tasks."
            )
        cat = self._catalog.current
        task = cat.task_classes.get(task_name)
        if task is None:
            raise TaskNotFound(f"Unknown task class '{task_name}'.", param="task")
        codec = CODECS.get(task.codec) if task.codec else None
        self._check_input(task, codec, body)
        requested = body.get("model")
        if requested is not None and not isinstance(requested, str):
            raise InvalidRequest("'model' must be a string.", param="model", code="invalid_value")
        workspace = await self._workspaces.get(principal.workspace)
        if requested is not None and requested.startswith(PERSONAL_PREFIX):
            resolved, targets = await self._personal(cat, task, requested, principal)
        else:
            resolved = self._resolve_cached(cat, task, codec, requested, workspace)
            targets = await self._canonical(resolved, task, principal)
        stream = body.get("stream") is True
        if stream and not (codec.can_stream if codec else task.streams):
            raise InvalidRequest(
                f"The task '{task.name}' does not stream.", param="stream", code="invalid_value"
            )
        options = body.get("stream_options")
        display = requested if requested not in (None, "", "default") else resolved.model.id
        return Plan(
            task=task,
            codec=codec,
            resolved=resolved,
            display_model=str(display),
            stream=stream,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            drop=resolve_drop_params(
                body, getattr(workspace, "drop_params", None), self._drop_default
            ),
            dispatch_id="dsp_" + new_hex_id(),
            started_ms=_now_ms(),
            tags=_tags(body),
            targets=targets,
            pricing=effective_pricing(cat),
            log_bodies=getattr(workspace, "log_bodies", False) is True,
        )

    @staticmethod
    def _check_input(task: TaskClass, codec: BuiltinCodec | None, body: dict[str, Any]) -> None:
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
            raise NoCapacity(f"No capacity serves the task class '{task.name}' yet.")

    def _resolve_cached(
        self,
        cat: Catalog,
        task: TaskClass,
        codec: BuiltinCodec | None,
        requested: str | None,
        workspace: Any,
    ) -> Resolved:
        if cat.version != self._resolved_version or len(self._resolved) > 4096:
            self._resolved.clear()
            self._resolved_version = cat.version
        key = (requested, task.name, getattr(workspace, "default_model", None))
        found = self._resolved.get(key)
        if found is None:  # errors are not cached: they raise every time
            found = self._resolved[key] = self._resolve(cat, task, codec, requested, workspace)
        return found

    @staticmethod
    def _resolve(
        cat: Catalog,
        task: TaskClass,
        codec: BuiltinCodec | None,
        requested: str | None,
        workspace: Any,
    ) -> Resolved:
        ws_default = getattr(workspace, "default_model", None)
        try:
            return resolve_model(cat, requested, task.name, ws_default)
        except catalog_errors.UnknownModel:
            if requested in (None, "", "default") and codec is None:
                raise NoCapacity(f"No capacity serves the task class '{task.name}' yet.") from None
            raise ModelNotFound(
                f"The model '{requested}' does not exist or you do not have access to it.",
                param="model",
            ) from None
        except catalog_errors.ModelTaskMismatch:
            raise InvalidRequest(
                f"The model '{requested}' does not serve the task '{task.name}'.",
                param="model",
                code="model_not_supported",
            ) from None

    async def _canonical(
        self, resolved: Resolved, task: TaskClass, principal: Principal
    ) -> tuple[Target, ...]:
        """The workspace's online runtimes advertising the model first, then hosted
        offerings. A pin to a provider (``@acme``) leaves runtimes out."""
        targets: list[Target] = []
        if self._runtimes is not None and resolved.provider is None:
            model_id = resolved.model.id
            for runtime in await self._runtimes.online(principal.workspace):
                if model_id in runtime.models and task.name in runtime.task_classes:
                    offering = self._runtimes.offering(model_id, runtime.id)
                    targets.append(RuntimeTarget(offering, runtime.id, model_id))
        targets.extend(o for o in resolved.offerings if o.upstream is not None)
        if not targets:
            raise NoCapacity(
                f"No capacity is serving '{resolved.model.id}' for '{task.name}' right now."
            )
        return tuple(targets)

    @staticmethod
    def _personal_model(cat: Catalog, task: TaskClass, runtime: RuntimeInfo) -> str | None:
        """The runtime's default model if it serves ``task``, else the first advertised
        catalog model that does (embeddings on a runtime whose default is a chat model),
        else the default (a local-only model the catalog cannot vouch for)."""
        candidates = [m for m in (runtime.default_model, *runtime.models) if m]
        for model_id in candidates:
            entry = cat.models.get(model_id)
            if entry is not None and task.name in entry.task_classes:
                return model_id
        return candidates[0] if candidates else None

    async def _personal(
        self, cat: Catalog, task: TaskClass, requested: str, principal: Principal
    ) -> tuple[Resolved, tuple[Target, ...]]:
        runtime_id = requested[len(PERSONAL_PREFIX) :]
        runtime = (
            await self._runtimes.find(principal.workspace, runtime_id)
            if self._runtimes is not None and runtime_id
            else None
        )
        if runtime is None:
            raise RuntimeNotFound(
                f"The personal runtime '{runtime_id}' does not exist or you do not have "
                "access to it.",
                param="model",
            )
        model_id = self._personal_model(cat, task, runtime)
        if model_id is None:
            raise RelayUnavailable(
                f"The personal runtime '{runtime_id}' has not connected yet; start its daemon."
            )
        if runtime.task_classes and task.name not in runtime.task_classes:
            raise InvalidRequest(
                f"The personal runtime '{runtime_id}' does not serve the task '{task.name}'.",
                param="model",
                code="model_not_supported",
            )
        model = cat.models.get(model_id) or ModelEntry(
            id=model_id, task_classes=runtime.task_classes or (task.name,), owned_by="personal"
        )
        assert self._runtimes is not None
        offering = self._runtimes.offering(model_id, runtime_id)
        resolved = Resolved(model=model, requested=requested, task=task)
        return resolved, (RuntimeTarget(offering, runtime_id, model_id, pinned=True),)
