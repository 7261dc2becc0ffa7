"""The catalog's data model: task classes, models, offerings, aliases.

A catalog is data, not code (ARCHITECTURE.md, Task classes): operators change it with a
catalog write, every gateway process picks the new version up live. These Structs are both
the stored form (msgpack in Redis) and the shape of the seed files in ``catalog/seed/``.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = [
    "Catalog",
    "Meter",
    "ModelEntry",
    "Offering",
    "TaskClass",
    "Upstream",
]

#: Built-in codecs: the request/response shapes the gateway knows natively.
Codec = Literal[
    "openai.chat",
    "openai.completion",
    "openai.embedding",
    "openai.audio_transcription",
]


class Meter(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a task class's usage is counted.

    ``source = "usage"`` reads each unit from the result's ``usage`` object
    (``usage.prompt_tokens``, …); ``source = "request"`` counts one ``requests`` unit per
    completed dispatch.
    """

    units: tuple[str, ...] = ("requests",)
    source: Literal["usage", "request"] = "request"


class TaskClass(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A kind of work. ``codec`` names a built-in shape; otherwise ``input_schema`` (a JSON
    Schema) validates the body of ``POST /v1/tasks/{name}``."""

    name: str
    meter: Meter = Meter()
    description: str = ""
    codec: Codec | None = None
    input_schema: dict[str, Any] | None = None
    alias_path: str | None = None
    streams: bool = False


class ModelEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A canonical model (``lovelace:<name>``) with its metadata.

    ``supported_params`` lists the optional request parameters the model understands;
    ``None`` means every parameter of the task class's codec.
    """

    id: str
    task_classes: tuple[str, ...]
    owned_by: str = "lattice"
    created: int = 0
    description: str = ""
    context_length: int | None = None
    max_output_tokens: int | None = None
    embedding_dimensions: int | None = None
    supported_params: tuple[str, ...] | None = None


class Upstream(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An HTTP upstream that serves an offering.

    ``kind = "openai"``: an OpenAI-compatible server (vLLM, llama.cpp, Ollama, LM Studio,
    another gateway); the gateway calls ``{base_url}/chat/completions`` etc.
    ``kind = "http"``: a generic endpoint for a catalog-defined task class; the gateway
    POSTs the validated body to ``{base_url}{path}`` and relays the JSON result.

    The credential is either stored (``api_key``; the admin API never shows it) or read from
    the gateway's environment (``api_key_env``).
    """

    base_url: str
    kind: Literal["openai", "http"] = "openai"
    model: str | None = None
    path: str | None = None
    api_key: str | None = None
    api_key_env: str | None = None
    timeout_s: float = 120.0
    connect_timeout_s: float = 5.0


class Offering(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Somebody serving a model at a price.

    ``prices`` maps each meter unit to integer micro-USD per ``price_per`` units (for tokens
    the usual ``price_per`` is one million). ``provider`` names who earns from it.
    """

    id: str
    model: str
    upstream: Upstream | None = None
    task_classes: tuple[str, ...] | None = None
    provider: str = "hosted"
    kind: Literal["hosted"] = "hosted"
    prices: dict[str, int] = {}
    price_per: int = 1_000_000
    supported_params: tuple[str, ...] | None = None
    priority: int = 0
    enabled: bool = True


class Catalog(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One whole, versioned catalog."""

    task_classes: dict[str, TaskClass] = {}
    models: dict[str, ModelEntry] = {}
    offerings: tuple[Offering, ...] = ()
    aliases: dict[str, str] = {}
    #: task class -> model used when a request names no model (or ``"default"``).
    default_models: dict[str, str] = {}
    version: int = 0
