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
    "Pricing",
    "ServingKind",
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


#: Who serves an offering, which decides how it is charged (catalog/charges.py):
#: ``hosted`` the operator's own capacity; ``runtime`` a workspace's personal runtime (synthetic,
#: never in a catalog); ``marketplace`` a third-party provider's daemon.
ServingKind = Literal["hosted", "runtime", "marketplace"]


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

    ``kind`` says who serves it (:data:`ServingKind`), and so how it is charged: ``hosted``
    at its prices, ``marketplace`` at its prices plus the operator's margin
    (:class:`Pricing`). ``runtime`` offerings are synthetic, built per personal runtime by
    ``catalog.charges.runtime_offering``; a catalog never holds one. Stored catalogs from
    before ``kind`` existed decode as ``hosted``.
    """

    id: str
    model: str
    upstream: Upstream | None = None
    task_classes: tuple[str, ...] | None = None
    provider: str = "hosted"
    kind: ServingKind = "hosted"
    prices: dict[str, int] = {}
    price_per: int = 1_000_000
    supported_params: tuple[str, ...] | None = None
    priority: int = 0
    enabled: bool = True


class Pricing(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The operator's pricing policy (the ``[pricing]`` table; issue 4, "Pricing rules").

    - **Own runtime**: a workspace's own runtimes (and its own provider daemons) serving its
      own requests cost no compute. The operator may charge a platform fee per meter unit:
      ``runtime_platform_fee`` maps a unit to integer micro-USD per
      ``runtime_platform_fee_per`` units, the convention of :attr:`Offering.prices`
      (``{completion_tokens = 10000}`` is $0.01 per million tokens). Units it does not name
      are free; the default is no fee at all.
    - **Marketplace**: the caller pays the provider's price plus ``marketplace_margin_bps``
      basis points of it (1000 = 10 %); the provider earns ``provider_share_bps`` of its
      price (10000 = all of it); the operator keeps the margin and the rest of the price.
    - **Hosted**: the offering's price; what it earns accrues to the offering's provider.

    All amounts are integers; the arithmetic is in :mod:`catalog.charges`.
    """

    runtime_platform_fee: dict[str, int] = {}
    runtime_platform_fee_per: int = 1_000_000
    marketplace_margin_bps: int = 0
    provider_share_bps: int = 10_000


class Catalog(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One whole, versioned catalog.

    ``pricing`` is ``None`` when the catalog sets no policy: the defaults of
    :class:`Pricing` apply (``catalog.charges.effective_pricing``). ``None`` rather than a
    default ``Pricing()`` so that a patch without a ``[pricing]`` table leaves the policy alone
    (:func:`catalog.loader.merge_catalog`).
    """

    task_classes: dict[str, TaskClass] = {}
    models: dict[str, ModelEntry] = {}
    offerings: tuple[Offering, ...] = ()
    aliases: dict[str, str] = {}
    #: task class -> model used when a request names no model (or ``"default"``).
    default_models: dict[str, str] = {}
    pricing: Pricing | None = None
    version: int = 0
