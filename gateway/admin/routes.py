"""The operator's admin API (``/admin/v1/…``), used by the ``lattice`` command line.

Every route needs a key with the ``lattice:admin`` scope. Errors use the same OpenAI
envelope as ``/v1``. Catalog writes are validated before they are stored; an invalid write
is a 400 whose ``param`` names the bad field, and the live catalog stays as it was.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec
from litestar import Request, Response, delete, get, patch, post, put
from litestar.handlers import BaseRouteHandler

from catalog.errors import CatalogError
from catalog.loader import catalog_from_dict, merge_catalog
from catalog.model import Catalog
from gateway import keys
from gateway.auth.principal import Principal, Scope
from gateway.errors import InvalidRequest, NotFound, PermissionDenied
from gateway.http import json_response, read_json_object
from gateway.runtime import Gateway

__all__ = ["admin_routes", "redact_catalog"]

_encoder = msgspec.json.Encoder()
_OFFERING_INDEX = re.compile(r"^offerings\[(\d+)\](.*)$")


class CatalogWrite(msgspec.Struct, forbid_unknown_fields=True):
    catalog: dict[str, Any]
    mode: Literal["merge", "replace"] = "merge"
    expected_version: int | None = None


class AliasWrite(msgspec.Struct, forbid_unknown_fields=True):
    target: str


class WorkspaceWrite(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    default_model: str | None = None
    drop_params: bool | None = None
    log_bodies: bool | None = None
    allow_marketplace: bool | None = None


class WorkspacePatch(msgspec.Struct, forbid_unknown_fields=True):
    default_model: str | None = None
    drop_params: bool | None = None
    log_bodies: bool | None = None
    allow_marketplace: bool | None = None


class KeyWrite(msgspec.Struct, forbid_unknown_fields=True):
    workspace: str
    name: str | None = None
    scopes: list[str] | None = None


def redact_catalog(cat: Catalog) -> dict[str, Any]:
    """The catalog as JSON-ready data, stored upstream credentials masked."""
    data: dict[str, Any] = msgspec.to_builtins(cat)
    for offering in data.get("offerings", []):
        upstream = offering.get("upstream")
        if isinstance(upstream, dict) and upstream.get("api_key"):
            upstream["api_key"] = "***"
    return data


def _convert(body: dict[str, Any], kind: type[Any]) -> Any:
    try:
        return msgspec.convert(body, kind)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(str(exc), code="invalid_value") from None


def _patch_field(field: str, merged: Catalog, patch_doc: Catalog | None) -> str:
    """Name a field of a merged catalog by its place in the operator's patch, so the error
    points into the file they wrote (``offerings[7]`` of the merge is ``offerings[0]`` there)."""
    match = _OFFERING_INDEX.match(field)
    if patch_doc is None or match is None:
        return field
    index = int(match.group(1))
    if index >= len(merged.offerings):
        return field
    offering_id = merged.offerings[index].id
    for position, offering in enumerate(patch_doc.offerings):
        if offering.id == offering_id:
            return f"offerings[{position}]{match.group(2)}"
    return field


def admin_routes(gw: Gateway) -> list[BaseRouteHandler]:
    async def admin(request: Request[Any, Any, Any]) -> Principal:
        principal = await gw.authenticator.authenticate_headers(request.headers)
        if not principal.has(Scope.ADMIN):
            raise PermissionDenied(f"The admin API needs the scope '{Scope.ADMIN}'.")
        return principal

    async def body_of(request: Request[Any, Any, Any], kind: type[Any]) -> Any:
        _, body = await read_json_object(request, gw.settings.max_body_bytes)
        return _convert(body, kind)

    async def store(
        new: Catalog, expected: int | None, patch_doc: Catalog | None = None
    ) -> Response[bytes]:
        try:
            stored = await gw.catalog_store.apply(new, expected_version=expected)
        except CatalogError as exc:
            field = _patch_field(exc.field, new, patch_doc)
            message = exc.message.replace(exc.field, field) if field != exc.field else exc.message
            raise InvalidRequest(
                f"Invalid catalog: {message}", param=field, code="invalid_catalog"
            ) from None
        await gw.catalog.run_once()
        return json_response(
            _encoder.encode({"version": stored.version, "catalog": redact_catalog(stored)})
        )

    @get("/admin/v1/catalog")
    async def catalog_show(request: Request[Any, Any, Any]) -> Response[bytes]:
        await admin(request)
        return json_response(_encoder.encode(redact_catalog(await gw.catalog_store.get())))

    @post("/admin/v1/catalog", status_code=200)
    async def catalog_apply(request: Request[Any, Any, Any]) -> Response[bytes]:
        await admin(request)
        write: CatalogWrite = await body_of(request, CatalogWrite)
        try:
            patch_doc = catalog_from_dict(write.catalog)
        except CatalogError as exc:
            raise InvalidRequest(
                f"Invalid catalog: {exc.message}", param=exc.field, code="invalid_catalog"
            ) from None
        current = await gw.catalog_store.get()
        new = patch_doc if write.mode == "replace" else merge_catalog(current, patch_doc)
        expected = write.expected_version if write.expected_version is not None else None
        return await store(new, expected, None if write.mode == "replace" else patch_doc)

    @put("/admin/v1/catalog/aliases/{name:str}", status_code=200)
    async def alias_set(request: Request[Any, Any, Any], name: str) -> Response[bytes]:
        await admin(request)
        write: AliasWrite = await body_of(request, AliasWrite)
        current = await gw.catalog_store.get()
        new = msgspec.structs.replace(current, aliases={**current.aliases, name: write.target})
        return await store(new, current.version)

    @delete("/admin/v1/catalog/aliases/{name:str}", status_code=200)
    async def alias_delete(request: Request[Any, Any, Any], name: str) -> Response[bytes]:
        await admin(request)
        current = await gw.catalog_store.get()
        if name not in current.aliases:
            raise NotFound(f"No alias '{name}'.", param="name")
        aliases = {k: v for k, v in current.aliases.items() if k != name}
        return await store(msgspec.structs.replace(current, aliases=aliases), current.version)

    @post("/admin/v1/workspaces", status_code=201)
    async def workspace_create(request: Request[Any, Any, Any]) -> Response[bytes]:
        await admin(request)
        write: WorkspaceWrite = await body_of(request, WorkspaceWrite)
        settings = {
            k: v for k, v in msgspec.structs.asdict(write).items() if k != "name" and v is not None
        }
        ws = await gw.workspaces.create(write.name, **settings)
        return json_response(_encoder.encode(ws), 201)

    @get("/admin/v1/workspaces")
    async def workspace_list(request: Request[Any, Any, Any]) -> Response[bytes]:
        await admin(request)
        return json_response(
            _encoder.encode({"object": "list", "data": await gw.workspaces.list()})
        )

    @patch("/admin/v1/workspaces/{name:str}", status_code=200)
    async def workspace_update(request: Request[Any, Any, Any], name: str) -> Response[bytes]:
        await admin(request)
        write: WorkspacePatch = await body_of(request, WorkspacePatch)
        fields = {k: v for k, v in msgspec.structs.asdict(write).items() if v is not None}
        ws = await gw.workspaces.update(name, **fields)
        await gw.redis.publish(keys.EVENTS_CHANNEL, f"workspace-changed:{name}")
        return json_response(_encoder.encode(ws))

    @post("/admin/v1/keys", status_code=201)
    async def key_create(request: Request[Any, Any, Any]) -> Response[bytes]:
        await admin(request)
        write: KeyWrite = await body_of(request, KeyWrite)
        kwargs: dict[str, Any] = {"name": write.name}
        if write.scopes is not None:
            kwargs["scopes"] = write.scopes
        plaintext, record = await gw.apikeys.create(write.workspace, **kwargs)
        out = msgspec.to_builtins(record)
        out["key"] = plaintext
        return json_response(_encoder.encode(out), 201)

    @get("/admin/v1/keys")
    async def key_list(request: Request[Any, Any, Any]) -> Response[bytes]:
        await admin(request)
        workspace = request.query_params.get("workspace")
        records = await gw.apikeys.list(workspace)
        return json_response(_encoder.encode({"object": "list", "data": records}))

    @delete("/admin/v1/keys/{key_id:str}", status_code=200)
    async def key_revoke(request: Request[Any, Any, Any], key_id: str) -> Response[bytes]:
        await admin(request)
        if not await gw.apikeys.revoke(key_id):
            raise NotFound(f"No API key '{key_id}'.", param="key_id", code="key_not_found")
        return json_response(_encoder.encode({"id": key_id, "revoked": True}))

    return [
        catalog_show,
        catalog_apply,
        alias_set,
        alias_delete,
        workspace_create,
        workspace_list,
        workspace_update,
        key_create,
        key_list,
        key_revoke,
    ]
