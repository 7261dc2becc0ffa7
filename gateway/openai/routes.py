"""The OpenAI-compatible surface's read routes: models and task classes.

The dispatch routes themselves (``POST /v1/tasks/{task}`` and its aliases) are served by
:mod:`gateway.openai.dispatch_app`, in front of Litestar.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.handlers import BaseRouteHandler

from gateway.auth.principal import Principal, Scope
from gateway.errors import ModelNotFound, PermissionDenied
from gateway.http import json_response
from gateway.openai.protocol import ModelList, ModelObject
from gateway.runtime import Gateway

__all__ = ["openai_routes"]

_encoder = msgspec.json.Encoder()


def openai_routes(gw: Gateway) -> list[BaseRouteHandler]:
    async def authenticate(request: Request[Any, Any, Any]) -> Principal:
        return await gw.authenticator.authenticate_headers(request.headers)

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
        list_models,
        retrieve_model,
        list_tasks,
    ]
