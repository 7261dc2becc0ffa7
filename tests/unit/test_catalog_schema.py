"""Input schemas of catalog-defined task classes (catalog/schema.py)."""

from __future__ import annotations

from typing import Any

import pytest

from catalog.schema import InputError, compile_input_schema, schema_problem

IMAGE = {
    "type": "object",
    "properties": {
        "prompt": {"type": "string", "minLength": 1},
        "size": {"enum": ["256x256", "512x512", "1024x1024"]},
        "n": {"type": "integer", "minimum": 1, "maximum": 4},
        "images": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"url": {"type": "string"}},
                "required": ["url"],
            },
        },
    },
    "required": ["prompt"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "cat", "size": "9x9"}, "size"),
        ({"prompt": "cat", "n": 9}, "n"),
        ({"prompt": "cat", "images": [{"url": "a"}, {"url": 1}]}, "images[1].url"),
        ({"prompt": "cat", "images": [{}]}, "images[0].url"),
        ({"prompt": "cat", "style": "noir"}, "style"),
        ([], ""),
    ],
)
def test_first_error_names_the_field(body: Any, path: str) -> None:
    error = compile_input_schema(IMAGE).first_error(body)
    assert isinstance(error, InputError)
    assert error.path == path
    assert error.message


def test_valid_body() -> None:
    validator = compile_input_schema(IMAGE)
    assert validator.first_error({"prompt": "a cat", "size": "512x512"}) is None
    assert validator.is_valid({"prompt": "a cat"})


def test_compiled_validators_are_cached_by_content() -> None:
    same = dict(reversed(list(IMAGE.items())))
    assert compile_input_schema(IMAGE) is compile_input_schema(same)
    assert compile_input_schema(IMAGE) is not compile_input_schema({"type": "object"})


def test_invalid_schemas() -> None:
    assert schema_problem(IMAGE) is None
    bad_type = schema_problem({"type": "object", "properties": {"n": {"type": "int"}}})
    assert bad_type is not None
    assert bad_type.path == "properties.n.type"
    assert schema_problem({"type": "string", "pattern": "("}) is not None
    assert schema_problem(["not", "a", "schema"]) == InputError("", "must be a JSON Schema object")
    with pytest.raises(ValueError, match="invalid JSON Schema"):
        compile_input_schema({"type": "nope"})
