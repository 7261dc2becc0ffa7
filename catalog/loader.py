"""Reading catalog documents: files, plain dicts, the packaged seed; merging patches.

A catalog file is TOML (YAML or JSON also work; YAML only when PyYAML is installed)::

    [task_classes.chat-completion]          # the key is the task class's name
    codec = "openai.chat"
    alias_path = "/v1/chat/completions"
    streams = true
    meter = { units = ["prompt_tokens", "completion_tokens"], source = "usage" }

    [models."lovelace:llama-3.2-3b-instruct"]   # the key is the model's id
    task_classes = ["chat-completion", "text-completion"]

    [[offerings]]
    id = "hosted-llama"
    model = "lovelace:llama-3.2-3b-instruct"
    upstream = { base_url = "http://10.0.0.5:8000/v1" }
    prices = { prompt_tokens = 50000, completion_tokens = 100000 }   # micro-USD per 1M

    [aliases]
    "llama-3.2-3b-instruct" = "lovelace:llama-3.2-3b-instruct"

    [default_models]
    chat-completion = "lovelace:llama-3.2-3b-instruct"

    [pricing]                               # catalog.model.Pricing; omitted = defaults
    marketplace_margin_bps = 1000           # marketplace callers pay the price + 10 %
    provider_share_bps = 10000              # providers earn all of their price
    runtime_platform_fee = { completion_tokens = 10000 }   # own runtimes: $0.01 per 1M

Decoding (:func:`catalog_from_dict`) checks shapes and types only; :func:`validate_catalog`
checks meaning (references, prices, schemas). A file may be a *patch* that refers to entries of
another catalog, so it is validated only after :func:`merge_catalog`.
"""

from __future__ import annotations

import importlib
import importlib.resources
import tomllib
from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from catalog.errors import CatalogError, field_path
from catalog.model import Catalog, ModelEntry, Offering, Pricing, TaskClass, Upstream
from catalog.validate import validate_catalog

__all__ = [
    "catalog_from_dict",
    "load_catalog_files",
    "load_seed",
    "merge_catalog",
    "read_catalog_file",
    "seed_offerings",
    "validate_catalog",
]

_T = TypeVar("_T")
_TOP_LEVEL = frozenset(
    {"task_classes", "models", "offerings", "aliases", "default_models", "pricing", "version"}
)
#: Seed files whose name starts with this are templates, not part of :func:`load_seed`.
_TEMPLATE_PREFIX = "_"
_OFFERING_TEMPLATES = "_offerings.toml"


def catalog_from_dict(data: Any) -> Catalog:
    """Decode a catalog document (the parsed contents of a file) into a :class:`Catalog`.

    Table keys fill in ``TaskClass.name`` and ``ModelEntry.id``. Wrong shapes or types raise
    :class:`CatalogError` naming the field; no semantic checks are made here.
    """
    if not isinstance(data, Mapping):
        raise CatalogError("", "a catalog document must be a table")
    for key in data:
        if key not in _TOP_LEVEL:
            raise CatalogError(field_path(str(key)), "unknown table")
    task_classes = {
        name: _convert(
            _keyed(raw, "name", name, "task_classes"), TaskClass, field_path("task_classes", name)
        )
        for name, raw in _table(data, "task_classes").items()
    }
    models = {
        model_id: _convert(
            _keyed(raw, "id", model_id, "models"), ModelEntry, field_path("models", model_id)
        )
        for model_id, raw in _table(data, "models").items()
    }
    offerings = tuple(
        _convert(_offering_raw(raw, i), Offering, field_path("offerings", i))
        for i, raw in enumerate(_array(data, "offerings"))
    )
    version = data.get("version", 0)
    if type(version) is not int or version < 0:
        raise CatalogError("version", "must be a non-negative integer")
    raw_pricing = data.get("pricing")  # absent or null (a shown catalog without one): defaults
    pricing = (
        None if raw_pricing is None else _convert(_pricing_raw(raw_pricing), Pricing, "pricing")
    )
    return Catalog(
        task_classes=task_classes,
        models=models,
        offerings=offerings,
        aliases=_str_table(data, "aliases"),
        default_models=_str_table(data, "default_models"),
        pricing=pricing,
        version=version,
    )


def read_catalog_file(path: str | PathLike[str]) -> Catalog:
    """Decode one file (``.toml``, ``.json``, ``.yaml``/``.yml``) without semantic checks."""
    p = Path(path)
    try:
        data = _parse(p.name, p.read_bytes())
        return catalog_from_dict(data)
    except CatalogError as exc:
        raise exc.with_source(str(p)) from None


def load_catalog_files(paths: Iterable[str | PathLike[str]], *, validate: bool = True) -> Catalog:
    """Read files in order, each merged over the ones before (:func:`merge_catalog`), and
    validate the result (unless ``validate=False``, for a patch to be merged elsewhere)."""
    result = Catalog()
    for path in paths:
        result = merge_catalog(result, read_catalog_file(path))
    if validate:
        validate_catalog(result)
    return result


def load_seed() -> Catalog:
    """The packaged seed catalog (``catalog/seed/*.toml`` in name order), validated.

    Files whose name starts with ``_`` are templates (see :func:`seed_offerings`).
    """
    result = Catalog()
    for name, text in _seed_files():
        if name.startswith(_TEMPLATE_PREFIX):
            continue
        try:
            patch = catalog_from_dict(_parse(name, text))
        except CatalogError as exc:
            raise exc.with_source(f"catalog/seed/{name}") from None
        result = merge_catalog(result, patch)
    validate_catalog(result)
    return result


def seed_offerings(
    base_url: str,
    *,
    provider: str = "hosted",
    api_key: str | None = None,
    id_prefix: str = "",
) -> tuple[Offering, ...]:
    """Offerings for the seed models, priced from ``catalog/seed/_offerings.toml``, all served
    by one OpenAI-compatible upstream at ``base_url`` (``lattice up`` points it at the
    simulator). Templates marked ``enabled = false`` stay disabled.

    Add them with ``merge_catalog(load_seed(), Catalog(offerings=seed_offerings(url)))``.
    """
    files = dict(_seed_files())
    templates = catalog_from_dict(_parse(_OFFERING_TEMPLATES, files[_OFFERING_TEMPLATES]))
    upstream = Upstream(base_url=base_url, kind="openai", api_key=api_key)
    return tuple(
        msgspec.structs.replace(o, id=id_prefix + o.id, provider=provider, upstream=upstream)
        for o in templates.offerings
    )


def merge_catalog(base: Catalog, patch: Catalog) -> Catalog:
    """Apply ``patch`` over ``base`` (what ``lattice catalog apply FILE`` does).

    Upsert only: every entry in ``patch`` replaces the entry of ``base`` with the same key —
    task classes and models by name, offerings by ``id`` (a replaced offering keeps its place,
    new ones are appended), aliases by alias name, default models by task class. The
    ``[pricing]`` table is one entry: a patch that has one replaces the whole policy (restate
    the fields to keep). Entries the patch does not mention are kept unchanged, so a patch
    cannot delete anything: disable an offering with ``enabled = false``, or write a whole
    catalog to replace everything. The result keeps ``base.version`` (the store assigns
    versions). Nothing is validated here.
    """
    patched = {o.id: o for o in patch.offerings}
    offerings = [patched.pop(o.id, o) for o in base.offerings]
    offerings.extend(o for o in patch.offerings if o.id in patched)
    return Catalog(
        task_classes={**base.task_classes, **patch.task_classes},
        models={**base.models, **patch.models},
        offerings=tuple(offerings),
        aliases={**base.aliases, **patch.aliases},
        default_models={**base.default_models, **patch.default_models},
        pricing=patch.pricing if patch.pricing is not None else base.pricing,
        version=base.version,
    )


# -- decoding helpers --------------------------------------------------------------------


def _parse(name: str, content: bytes | str) -> Any:
    text = content.decode() if isinstance(content, bytes) else content
    suffix = name.rsplit(".", 1)[-1].lower()
    try:
        if suffix == "toml":
            return tomllib.loads(text)
        if suffix == "json":
            return msgspec.json.decode(text)
        if suffix in ("yaml", "yml"):
            try:
                yaml = importlib.import_module("yaml")
            except ImportError:
                raise CatalogError("", "YAML catalogs need PyYAML installed") from None
            return yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, msgspec.DecodeError, RecursionError) as exc:
        raise CatalogError("", f"cannot parse: {exc}") from None
    raise CatalogError("", "unsupported file type (use .toml, .json, .yaml)")


def _seed_files() -> list[tuple[str, str]]:
    root = importlib.resources.files("catalog") / "seed"
    files = [(f.name, f.read_text()) for f in root.iterdir() if f.name.endswith(".toml")]
    return sorted(files)


def _convert(raw: Any, kind: type[_T], where: str) -> _T:
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        raise _from_msgspec(exc, where) from None


def _from_msgspec(exc: msgspec.ValidationError, where: str) -> CatalogError:
    """``Expected `int`, got `str` - at `$.upstream.base_url` `` → field ``<where>.upstream…``."""
    text = str(exc)
    reason, sep, at = text.rpartition(" - at `")
    if not sep:
        return CatalogError(where, text)
    sub = at.rstrip("`").removeprefix("$")
    return CatalogError(where + sub, reason)


def _table(data: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, Mapping):
        raise CatalogError(name, "must be a table")
    for key in value:
        if not isinstance(key, str):
            raise CatalogError(name, f"keys must be strings, got {key!r}")
    return dict(value)


def _array(data: Mapping[str, Any], name: str) -> list[Any]:
    value = data.get(name, [])
    if not isinstance(value, list | tuple):
        raise CatalogError(name, "must be an array of tables")
    return list(value)


def _str_table(data: Mapping[str, Any], name: str) -> dict[str, str]:
    table = _table(data, name)
    for key, value in table.items():
        if not isinstance(value, str):
            raise CatalogError(field_path(name, key), "must be a string")
    return table


def _keyed(raw: Any, attr: str, key: str, table: str) -> Any:
    """Fill ``attr`` from the table key; a differing explicit value is an error."""
    if not isinstance(raw, Mapping):
        raise CatalogError(field_path(table, key), "must be a table")
    if attr in raw and raw[attr] != key:
        raise CatalogError(field_path(table, key, attr), f"must equal its table key {key!r}")
    return {**raw, attr: key}


def _offering_raw(raw: Any, index: int) -> Any:
    if isinstance(raw, Mapping):
        _check_prices(raw.get("prices"), ("offerings", index, "prices"))
    return raw


def _pricing_raw(raw: Any) -> Any:
    if isinstance(raw, Mapping):
        _check_prices(raw.get("runtime_platform_fee"), ("pricing", "runtime_platform_fee"))
    return raw


def _check_prices(prices: Any, where: tuple[str | int, ...]) -> None:
    # msgspec reports a bad dict value as `prices[...]`; name the key ourselves.
    if not isinstance(prices, Mapping):
        return
    for unit, price in prices.items():
        if type(price) is not int:
            raise CatalogError(
                field_path(*where, str(unit)),
                f"must be an integer (micro-USD), got {type(price).__name__}",
            )
