"""The OpenAI-compatible surface: thin aliases over the one generic dispatch.

``POST /v1/tasks/{task}`` is the dispatch path; ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/embeddings`` (and any ``alias_path`` a catalog task class
declares) call it with their task class.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.handlers import BaseRouteHandler

from gateway.auth.principal import Principal, Scope
from gateway.dispatch.service import JsonOutcome, TaskCall
from gateway.errors import ModelNotFound, NotFound, PermissionDenied
from gateway.http import json_response, read_json_object, request_id
from gateway.openai.protocol import ModelList, ModelObject
from gateway.runtime import Gateway
from gateway.sse import EventStream

__all__ = ["openai_routes"]

_encoder = msgspec.json.Encoder()


def openai_routes(gw: Gateway) -> list[BaseRouteHandler]:
    async def authenticate(request: Request[Any, Any, Any]) -> Principal:
        return await gw.authenticator.authenticate_headers(request.headers)

    async def run(request: Request[Any, Any, Any], task: str) -> Response[Any]:
        principal = await authenticate(request)
        raw, body = await read_json_object(request, gw.settings.max_body_bytes)
        call = TaskCall(
            task=task,
            raw=raw,
            body=body,
            principal=principal,
            request_id=request_id(request),
            idempotency_key=request.headers.get("idempotency-key"),
        )
        outcome = await gw.service.dispatch(call)
        if isinstance(outcome, JsonOutcome):
            return json_response(outcome.body, outcome.status, outcome.headers)
        return EventStream(outcome.events, outcome.headers)

    @post("/v1/chat/completions", status_code=200)
    async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
        return await run(request, "chat-completion")

    @post("/v1/completions", status_code=200)
    async def completions(request: Request[Any, Any, Any]) -> Response[Any]:
        return await run(request, "text-completion")

    @post("/v1/embeddings", status_code=200)
    async def embeddings(request: Request[Any, Any, Any]) -> Response[Any]:
        return await run(request, "embedding")

    @post("/v1/tasks/{task:str}", status_code=200)
    async def tasks_dispatch(request: Request[Any, Any, Any], task: str) -> Response[Any]:
        return await run(request, task)

    @post("/v1/{path:path}", status_code=200)
    async def alias_dispatch(request: Request[Any, Any, Any], path: str) -> Response[Any]:
        """Task classes added by catalog write may declare their own alias path."""
        full = "/v1" + path
        for task in gw.catalog.current.task_classes.values():
            if task.alias_path == full:
                return await run(request, task.name)
        await authenticate(request)
        raise NotFound(f"Invalid URL (POST {full})", code="unknown_url")

    def model_objects(principal: Principal) -> list[ModelObject]:
        if not (principal.has(Scope.CATALOG_READ) or principal.has(Scope.INFERENCE)):
            raise PermissionDenied(
                f"This credential lacks the scope '{Scope.CATALOG_READ}' to read the catalog."
            )
        cat = gw.catalog.current
        out = [ModelObject(m.id, m.created, m.owned_by) for m in cat.models.values()]
        for alias, target in cat.aliases.items():
            model = cat.models.get(target.split("@", 1)[0])
            if model is not None:
                out.append(ModelObject(alias, model.created, model.owned_by))
        return out

    @get("/v1/models")
    async def list_models(request: Request[Any, Any, Any]) -> Response[bytes]:
        principal = await authenticate(request)
        return json_response(_encoder.encode(ModelList(model_objects(principal))))

    @get("/v1/models/{model_id:path}")
    async def retrieve_model(request: Request[Any, Any, Any], model_id: str) -> Response[bytes]:
        principal = await authenticate(request)
        wanted = model_id.lstrip("/")
        for obj in model_objects(principal):
            if obj.id == wanted:
                return json_response(_encoder.encode(obj))
        raise ModelNotFound(
            f"The model '{wanted}' does not exist or you do not have access to it.",
            param="model",
        )

    @get("/v1/tasks")
    async def list_tasks(request: Request[Any, Any, Any]) -> Response[bytes]:
        await authenticate(request)
        cat = gw.catalog.current
        data = [
            {
                "id": t.name,
                "object": "task_class",
                "description": t.description,
                "alias_path": t.alias_path,
                "streams": t.streams,
                "meter": {"units": list(t.meter.units), "source": t.meter.source},
                "input_schema": t.input_schema,
                "codec": t.codec,
            }
            for t in cat.task_classes.values()
        ]
        return json_response(
            _encoder.encode({"object": "list", "data": data, "catalog_version": cat.version})
        )

    return [
        chat_completions,
        completions,
        embeddings,
        tasks_dispatch,
        alias_dispatch,
        list_models,
        retrieve_model,
        list_tasks,
    ]
