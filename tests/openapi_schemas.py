"""Validate JSON against the official OpenAI OpenAPI schemas (``shared/openai-openapi``).

The document is OpenAPI 3.1 but still carries 3.0-style ``nullable: true`` in places; a 3.1
(JSON Schema 2020-12) validator would then reject a correct ``null``, so every such schema is
rewritten as ``{"anyOf": [schema, {"type": "null"}]}`` before use (see that folder's README).
``$ref``s (``#/components/schemas/...``) resolve through a :mod:`referencing` registry that holds
the whole document. Compiled validators are cached, so validating in a loop stays cheap.

    validate("CreateChatCompletionResponse", response_json)  # AssertionError names the path
"""

from __future__ import annotations

import json
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

__all__ = ["OPENAPI_PATH", "schema_names", "validate", "validate_completion_chunk"]

OPENAPI_PATH = (
    Path(__file__).resolve().parents[1].parent / "shared" / "openai-openapi" / "openapi.json"
)
_URI = "urn:lattice:openai-openapi"


def _rewrite_nullable(node: Any) -> Any:
    """OpenAPI 3.0 ``nullable`` → JSON Schema 2020-12 ``anyOf [..., {"type": "null"}]``."""
    if isinstance(node, list):
        return [_rewrite_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _rewrite_nullable(value) for key, value in node.items()}
    nullable = out.get("nullable")
    if isinstance(nullable, bool):
        del out["nullable"]
        if nullable:
            return {"anyOf": [out, {"type": "null"}]}
    return out


@lru_cache(maxsize=1)
def _document() -> dict[str, Any]:
    with OPENAPI_PATH.open("rb") as f:
        document: dict[str, Any] = json.load(f)
    # Rewrite only the component schemas: that is all `$ref`s into the registry point at.
    components = document["components"]
    components["schemas"] = {
        name: _rewrite_nullable(schema) for name, schema in components["schemas"].items()
    }
    return document


@lru_cache(maxsize=1)
def _registry() -> Registry[Any]:
    resource = Resource.from_contents(_document(), default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(_URI, resource)
    return registry


@cache
def _validator(schema_name: str) -> jsonschema.Draft202012Validator:
    if schema_name not in _document()["components"]["schemas"]:
        raise KeyError(f"no schema {schema_name!r} in {OPENAPI_PATH}")
    ref = {"$ref": f"{_URI}#/components/schemas/{schema_name}"}
    return jsonschema.Draft202012Validator(ref, registry=_registry())


def schema_names() -> list[str]:
    """Names of every schema under ``components/schemas``."""
    return sorted(_document()["components"]["schemas"])


def validate(schema_name: str, instance: object) -> None:
    """Raise ``AssertionError`` naming the JSON path of the first violation, if any."""
    error = best_match(_validator(schema_name).iter_errors(instance))
    if error is not None:
        raise AssertionError(
            f"{schema_name}: {error.json_path}: {error.message}"
            f" (schema path: {'/'.join(map(str, error.absolute_schema_path))})"
        )


def validate_completion_chunk(chunk: object) -> None:
    """A streamed ``text_completion`` chunk against ``CreateCompletionResponse``.

    OpenAI streams ``finish_reason: null`` until a choice ends and ``usage: null`` (with
    include_usage) before the last chunk; the schema, written for the full response, allows
    neither, so those two nulls are checked here and set aside for the schema.
    """
    assert isinstance(chunk, dict)
    relaxed = dict(chunk)
    if relaxed.get("usage", {}) is None:
        del relaxed["usage"]
    choices = []
    for choice in relaxed["choices"]:
        assert "finish_reason" in choice
        choices.append({**choice, "finish_reason": choice["finish_reason"] or "stop"})
    validate("CreateCompletionResponse", {**relaxed, "choices": choices})
