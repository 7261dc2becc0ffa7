"""Semantic checks of a whole catalog: every reference resolves, every price is sane.

:func:`validate_catalog` raises the first problem as a :class:`CatalogError` naming its field;
:func:`catalog_problems` yields them all (for ``lattice catalog check``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from catalog.errors import CatalogError, ResolveError, field_path
from catalog.model import Catalog, ModelEntry, Offering, Pricing, TaskClass, Upstream
from catalog.resolve import DEFAULT_MODEL_NAME, RESERVED_PREFIX, canonical_model, split_pin
from catalog.schema import schema_problem

__all__ = ["BUILTIN_CODECS", "catalog_problems", "validate_catalog"]

#: Built-in task classes and the codec each must use (the gateway's native surfaces).
BUILTIN_CODECS = {
    "chat-completion": "openai.chat",
    "text-completion": "openai.completion",
    "embedding": "openai.embedding",
    "audio-transcription": "openai.audio_transcription",
}
_TASK_NAME = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
_UNIT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_ALIAS_PATH = re.compile(r"^/v1(/[a-z0-9][a-z0-9_.-]*)+$")
_NAME = re.compile(r"^[^\s@]{1,200}$")  # model ids, alias names, offering ids
_PROVIDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
#: Provider ids under this prefix name personal runtimes (catalog.charges.runtime_offering).
_RUNTIME_PROVIDER = "runtime:"
#: The provider of the operator's own capacity; never a marketplace seller.
_HOSTED_PROVIDER = "hosted"
#: Basis points in a whole (100 %).
_BPS = 10_000
#: Paths the gateway serves itself; a task class may not claim them.
_RESERVED_PATHS = ("/v1/tasks", "/v1/models", "/v1/personal-runtimes", "/v1/admin")


def validate_catalog(cat: Catalog) -> None:
    """Raise the first problem of ``cat`` as a :class:`CatalogError`; return if it is sound."""
    for problem in catalog_problems(cat):
        raise problem


def catalog_problems(cat: Catalog) -> Iterator[CatalogError]:
    """Every problem of ``cat``: task classes, models, offerings, aliases, defaults, pricing.

    Rules: task names match ``^[a-z][a-z0-9-]{0,63}$``; built-in classes use their own codec
    and only they have one; ``input_schema`` is a valid JSON Schema; ``alias_path`` is a
    unique ``/v1/...`` path outside the gateway's own; meters have unique units (exactly
    ``requests`` when counted per request). Model ids have no ``@`` or whitespace, are not
    under ``lattice:``, and serve existing task classes. Offering ids are unique; an offering
    names an existing model and a subset of its task classes; prices are non-negative integers
    for units of those classes' meters, either none (free) or all of them; ``price_per`` > 0;
    ``kind`` is ``hosted`` or ``marketplace`` (``runtime`` offerings are synthetic), provider
    ids under ``runtime:`` are reserved for runtimes and a marketplace offering's provider is
    not ``hosted``. The pricing policy's fee prices non-negative integers for meter units of
    the catalog's task classes, ``runtime_platform_fee_per`` > 0, ``marketplace_margin_bps``
    >= 0 and 0 <= ``provider_share_bps`` <= 10000.
    Aliases do not shadow models, resolve (chains allowed, cycles not), and defaults name
    models (or aliases of models) serving their task class.
    """
    for name, task in cat.task_classes.items():
        yield from _task_problems(name, task)
    seen_paths: dict[str, str] = {}
    for name, task in cat.task_classes.items():
        if task.alias_path is None:
            continue
        if task.alias_path in seen_paths:
            yield CatalogError(
                field_path("task_classes", name, "alias_path"),
                f"already used by task class {seen_paths[task.alias_path]!r}",
            )
        seen_paths[task.alias_path] = name
    for model_id, model in cat.models.items():
        yield from _model_problems(cat, model_id, model)
    offering_ids: set[str] = set()
    for index, offering in enumerate(cat.offerings):
        if offering.id in offering_ids:
            where = field_path("offerings", index, "id")
            yield CatalogError(where, f"duplicate id {offering.id!r}")
        offering_ids.add(offering.id)
        yield from _offering_problems(cat, index, offering)
    yield from _alias_problems(cat)
    yield from _default_problems(cat)
    if cat.pricing is not None:
        yield from _pricing_problems(cat, cat.pricing)


def _task_problems(name: str, task: TaskClass) -> Iterator[CatalogError]:
    def at(*parts: str) -> str:
        return field_path("task_classes", name, *parts)

    if not _TASK_NAME.match(name):
        yield CatalogError(at(), "task class names match ^[a-z][a-z0-9-]{0,63}$")
    if task.name != name:
        yield CatalogError(at("name"), f"must equal its table key {name!r}")
    builtin = BUILTIN_CODECS.get(name)
    if builtin is not None and task.codec != builtin:
        yield CatalogError(at("codec"), f"the built-in class {name!r} uses codec {builtin!r}")
    if builtin is None and task.codec is not None:
        yield CatalogError(at("codec"), "codecs belong to built-in classes; use input_schema")
    if task.input_schema is not None:
        problem = schema_problem(task.input_schema)
        if problem is not None:
            where = at("input_schema") + ("." + problem.path if problem.path else "")
            yield CatalogError(where, f"not a valid JSON Schema: {problem.message}")
    if task.alias_path is not None:
        path = task.alias_path
        if not _ALIAS_PATH.match(path):
            yield CatalogError(at("alias_path"), "must be a path like /v1/images/generations")
        elif any(path == p or path.startswith(p + "/") for p in _RESERVED_PATHS):
            yield CatalogError(at("alias_path"), f"{path} is served by the gateway itself")
    units = task.meter.units
    if not units:
        yield CatalogError(at("meter", "units"), "must name at least one unit")
    if len(set(units)) != len(units):
        yield CatalogError(at("meter", "units"), "units must be unique")
    for i, unit in enumerate(units):
        if not _UNIT_NAME.match(unit):
            yield CatalogError(
                field_path("task_classes", name, "meter", "units", i),
                "unit names match ^[a-z][a-z0-9_]{0,63}$",
            )
    if task.meter.source == "request" and units != ("requests",):
        yield CatalogError(at("meter", "units"), 'source "request" counts only ["requests"]')


def _model_problems(cat: Catalog, key: str, model: ModelEntry) -> Iterator[CatalogError]:
    def at(*parts: str) -> str:
        return field_path("models", key, *parts)

    if model.id != key:
        yield CatalogError(at("id"), f"must equal its table key {key!r}")
    if not _NAME.match(key) or key == DEFAULT_MODEL_NAME:
        yield CatalogError(at(), "model ids are non-empty, without '@' or whitespace")
    if key.startswith(RESERVED_PREFIX):
        yield CatalogError(at(), f"ids under {RESERVED_PREFIX!r} are reserved for Lattice")
    if not model.task_classes:
        yield CatalogError(at("task_classes"), "must name at least one task class")
    for i, task in enumerate(model.task_classes):
        if task not in cat.task_classes:
            yield CatalogError(
                field_path("models", key, "task_classes", i), f"unknown task class {task!r}"
            )
    for attr in ("context_length", "max_output_tokens", "embedding_dimensions"):
        value = getattr(model, attr)
        if value is not None and value <= 0:
            yield CatalogError(at(attr), "must be positive")
    yield from _param_problems(at("supported_params"), model.supported_params)


def _param_problems(where: str, params: tuple[str, ...] | None) -> Iterator[CatalogError]:
    if params is None:
        return
    if len(set(params)) != len(params):
        yield CatalogError(where, "parameters must be unique")
    for i, param in enumerate(params):
        if not _PARAM_NAME.match(param):
            yield CatalogError(f"{where}[{i}]", f"not a parameter name: {param!r}")


def _offering_problems(cat: Catalog, index: int, o: Offering) -> Iterator[CatalogError]:
    def at(*parts: str) -> str:
        return field_path("offerings", index, *parts)

    if not _NAME.match(o.id):
        yield CatalogError(at("id"), "offering ids are non-empty, without '@' or whitespace")
    if not _PROVIDER.match(o.provider):
        yield CatalogError(at("provider"), "provider names match ^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
    elif o.provider.startswith(_RUNTIME_PROVIDER):
        yield CatalogError(at("provider"), f"ids under {_RUNTIME_PROVIDER!r} name runtimes")
    elif o.kind == "marketplace" and o.provider == _HOSTED_PROVIDER:
        yield CatalogError(at("provider"), "a marketplace offering names its provider")
    if o.kind == "runtime":
        yield CatalogError(
            at("kind"), 'runtime offerings are synthetic; use "hosted" or "marketplace"'
        )
    if o.price_per <= 0:
        yield CatalogError(at("price_per"), "must be positive")
    yield from _param_problems(at("supported_params"), o.supported_params)
    model = cat.models.get(o.model)
    if model is None:
        yield CatalogError(at("model"), f"unknown model {o.model!r}")
        return
    tasks = o.task_classes if o.task_classes is not None else model.task_classes
    for i, task in enumerate(o.task_classes or ()):
        if task not in model.task_classes:
            yield CatalogError(
                field_path("offerings", index, "task_classes", i),
                f"model {o.model!r} does not serve {task!r}",
            )
    if o.task_classes is not None and not o.task_classes:
        yield CatalogError(at("task_classes"), "must name at least one task class")
    units = [u for t in tasks if t in cat.task_classes for u in cat.task_classes[t].meter.units]
    for unit, price in o.prices.items():
        if unit not in units:
            yield CatalogError(at("prices", unit), f"not a meter unit of {', '.join(tasks)}")
        elif price < 0:
            yield CatalogError(at("prices", unit), "must be >= 0")
    missing = [u for u in dict.fromkeys(units) if u not in o.prices]
    if o.prices and missing:
        yield CatalogError(at("prices", missing[0]), "missing (price every unit, or none)")
    if o.upstream is not None:
        yield from _upstream_problems(cat, at("upstream"), o.upstream, tasks)


def _upstream_problems(
    cat: Catalog, where: str, up: Upstream, tasks: tuple[str, ...]
) -> Iterator[CatalogError]:
    if not up.base_url.startswith(("http://", "https://")):
        yield CatalogError(f"{where}.base_url", "must be an http:// or https:// URL")
    if up.kind == "http" and not (up.path or "").startswith("/"):
        yield CatalogError(f"{where}.path", 'an upstream of kind "http" needs a path like /run')
    if up.kind == "openai":
        for task in tasks:
            known = cat.task_classes.get(task)
            if known is not None and known.codec is None:
                yield CatalogError(
                    f"{where}.kind", f'{task!r} has no OpenAI codec; use kind = "http"'
                )
    if up.api_key is not None and up.api_key_env is not None:
        yield CatalogError(f"{where}.api_key", "set api_key or api_key_env, not both")
    for attr in ("timeout_s", "connect_timeout_s"):
        if getattr(up, attr) <= 0:
            yield CatalogError(f"{where}.{attr}", "must be positive")


def _alias_problems(cat: Catalog) -> Iterator[CatalogError]:
    for alias, target in cat.aliases.items():
        where = field_path("aliases", alias)
        if not _NAME.match(alias) or alias == DEFAULT_MODEL_NAME:
            yield CatalogError(where, "alias names are non-empty, without '@' or whitespace")
        elif alias.startswith(RESERVED_PREFIX):
            yield CatalogError(where, f"names under {RESERVED_PREFIX!r} are reserved")
        elif alias in cat.models:
            yield CatalogError(where, "an alias may not shadow a model id")
        else:
            base, pin = split_pin(target)
            if pin == "" or not base:
                yield CatalogError(where, f"bad target {target!r}")
                continue
            try:
                canonical_model(cat, alias)
            except ResolveError:
                yield CatalogError(where, f"target {target!r} is not a model (or loops)")


def _default_problems(cat: Catalog) -> Iterator[CatalogError]:
    for task, name in cat.default_models.items():
        where = field_path("default_models", task)
        if task not in cat.task_classes:
            yield CatalogError(where, f"unknown task class {task!r}")
            continue
        try:
            model_id, _ = canonical_model(cat, name)
        except ResolveError:
            yield CatalogError(where, f"unknown model {name!r}")
            continue
        if task not in cat.models[model_id].task_classes:
            yield CatalogError(where, f"model {name!r} does not serve {task!r}")


def _pricing_problems(cat: Catalog, pricing: Pricing) -> Iterator[CatalogError]:
    def at(*parts: str) -> str:
        return field_path("pricing", *parts)

    units = {u for task in cat.task_classes.values() for u in task.meter.units}
    for unit, price in pricing.runtime_platform_fee.items():
        if unit not in units:
            yield CatalogError(
                at("runtime_platform_fee", unit), "not a meter unit of any task class"
            )
        elif price < 0:
            yield CatalogError(at("runtime_platform_fee", unit), "must be >= 0")
    if pricing.runtime_platform_fee_per <= 0:
        yield CatalogError(at("runtime_platform_fee_per"), "must be positive")
    if pricing.marketplace_margin_bps < 0:
        yield CatalogError(at("marketplace_margin_bps"), "must be >= 0 (basis points)")
    if not 0 <= pricing.provider_share_bps <= _BPS:
        yield CatalogError(
            at("provider_share_bps"), f"must be within 0..{_BPS} (basis points of the price)"
        )
