"""JSON Schema checks for catalog-defined task classes (``TaskClass.input_schema``).

Compiled with ``jsonschema_rs`` (a Rust validator; the draft is picked from ``$schema``,
2020-12 by default). Compiled validators are cached by the schema's content, so every request
of a task class reuses one validator across catalog versions that keep the schema unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple

import jsonschema_rs
import msgspec

__all__ = [
    "InputError",
    "InputValidator",
    "compile_input_schema",
    "schema_problem",
]

_CACHE_SIZE = 256
_cache: OrderedDict[bytes, InputValidator] = OrderedDict()


class InputError(NamedTuple):
    """The first problem with a request body.

    ``path`` names the offending field the way OpenAI's ``error.param`` does (``prompt``,
    ``images[0].url``); ``""`` means the body as a whole.
    """

    path: str
    message: str


class InputValidator:
    """A compiled ``input_schema``. Build with :func:`compile_input_schema`."""

    __slots__ = ("_validator", "schema")

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self._validator: Any = jsonschema_rs.validator_for(schema)

    def is_valid(self, instance: Any) -> bool:
        return bool(self._validator.is_valid(instance))

    def first_error(self, instance: Any) -> InputError | None:
        """The first violation in ``instance``, or ``None`` when it is valid."""
        for error in self._validator.iter_errors(instance):
            return InputError(_error_path(error), str(error.message))
        return None


def compile_input_schema(schema: dict[str, Any]) -> InputValidator:
    """A validator for ``schema``, cached by content (LRU, 256 schemas).

    Raises ``ValueError`` if ``schema`` is not a valid JSON Schema (catalog validation,
    :func:`schema_problem`, keeps such schemas out of a stored catalog).
    """
    key = msgspec.json.encode(schema, order="sorted")
    found = _cache.get(key)
    if found is not None:
        _cache.move_to_end(key)
        return found
    try:
        validator = InputValidator(schema)
    except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError) as exc:
        raise ValueError(f"invalid JSON Schema: {_first_line(exc)}") from None
    _cache[key] = validator
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return validator


def schema_problem(schema: Any) -> InputError | None:
    """Why ``schema`` is not a usable JSON Schema (path inside the schema, message), or
    ``None`` when it is one: checked against its draft's meta-schema, then compiled (which
    also catches bad regular expressions and unresolvable ``$ref`` s)."""
    if not isinstance(schema, dict):
        return InputError("", "must be a JSON Schema object")
    try:
        jsonschema_rs.meta.validate(schema)
    except jsonschema_rs.ValidationError as exc:
        return InputError(_join(exc.instance_path), str(exc.message))
    except jsonschema_rs.ReferencingError as exc:
        return InputError("$schema", _first_line(exc))
    try:
        compile_input_schema(schema)
    except ValueError as exc:
        return InputError("", str(exc))
    return None


def _error_path(error: Any) -> str:
    parts: list[str | int] = list(error.instance_path)
    kind = error.kind
    # A missing or unexpected property is reported at its parent object; name the property.
    prop = getattr(kind, "property", None)
    unexpected = getattr(kind, "unexpected", None)
    if isinstance(prop, str):
        parts.append(prop)
    elif unexpected:
        parts.append(str(unexpected[0]))
    return _join(parts)


def _join(parts: Any) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
