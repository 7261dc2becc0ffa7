"""Typed errors of the catalog package.

Two families: a catalog document that is wrong (raised by loading and validation, carrying the
path of the offending field), and a request that names something the catalog cannot serve
(raised by resolution; the gateway renders these as OpenAI errors)::

    CatalogError (ValueError)           invalid catalog data; .field = "offerings[2].prices.x"
    ResolveError (LookupError)          a request the catalog cannot map onto a model
    ├── UnknownTask                     no such task class               (gateway: 404)
    ├── UnknownModel                    no such model or alias           (gateway: 404)
    │   └── NoDefaultModel              no model named, and no default   (gateway: 400)
    └── ModelTaskMismatch               model exists, not for this task  (gateway: 400)

Field paths use TOML's spelling of the same place in a seed file: tables by key, arrays by
index, keys that are not bare TOML keys quoted (``models."lovelace:llama-3.2-3b-instruct"``).
"""

from __future__ import annotations

import re

__all__ = [
    "CatalogError",
    "ModelTaskMismatch",
    "NoDefaultModel",
    "ResolveError",
    "UnknownModel",
    "UnknownTask",
    "field_path",
]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def field_path(*parts: str | int) -> str:
    """Join table keys (str) and array indexes (int) into a field path, TOML-style.

    >>> field_path("models", "lovelace:x", "task_classes", 0)
    'models."lovelace:x".task_classes[0]'
    """
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        key = part if _BARE_KEY.match(part) else '"' + part.replace('"', '\\"') + '"'
        out = f"{out}.{key}" if out else key
    return out


class CatalogError(ValueError):
    """A catalog document is invalid.

    ``field`` is the path of the offending value (``""`` for the document as a whole),
    ``reason`` says what is wrong with it, ``source`` names the file it came from, if any.
    ``str()`` joins them: ``seed.toml: offerings[2].prices.prompt_tokens: must be >= 0``.
    """

    def __init__(self, field: str, reason: str, *, source: str | None = None) -> None:
        self.field = field
        self.reason = reason
        self.source = source
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = f"{self.field}: {self.reason}" if self.field else self.reason
        return f"{self.source}: {text}" if self.source else text

    def with_source(self, source: str) -> CatalogError:
        """The same error, attributed to a file."""
        return CatalogError(self.field, self.reason, source=source)


class ResolveError(LookupError):
    """A request names a task class or model the catalog cannot serve."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownTask(ResolveError):
    def __init__(self, task: str) -> None:
        super().__init__(f"The task class '{task}' does not exist.")
        self.task = task


class UnknownModel(ResolveError):
    """``name`` is exactly what the caller sent (echo it back, never the canonical id)."""

    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(
            message or f"The model '{name}' does not exist or you do not have access to it."
        )
        self.name = name


class NoDefaultModel(UnknownModel):
    """The request named no model and neither the workspace nor the catalog has a default."""

    def __init__(self, task: str) -> None:
        super().__init__(
            "", f"No model was given and the task class '{task}' has no default model."
        )
        self.task = task


class ModelTaskMismatch(ResolveError):
    def __init__(self, model: str, task: str) -> None:
        super().__init__(f"The model '{model}' does not serve the task class '{task}'.")
        self.model = model
        self.task = task
