"""Which model and which offerings a request means: pure functions over a :class:`Catalog`.

A request's ``model`` field is one of (ARCHITECTURE.md, Resolve):

- empty, absent or ``"default"``: the workspace's default for the task class, else the
  catalog's ``default_models[task]``;
- ``lovelace:<model>``: a canonical catalog model;
- ``lovelace:<model>@<provider>``: the same, pinned to one provider's offerings;
- an operator alias (``llama-3.2-3b-instruct``), possibly chained, possibly itself pinned
  (``name@provider`` works for aliases too; the caller's own pin wins over an alias's);
- ``lattice:personal:…``: a personal runtime — not resolved here (always :class:`UnknownModel`).
"""

from __future__ import annotations

from fractions import Fraction

import msgspec

from catalog.errors import (
    ModelTaskMismatch,
    NoDefaultModel,
    UnknownModel,
    UnknownTask,
)
from catalog.model import Catalog, ModelEntry, Offering, TaskClass

__all__ = [
    "DEFAULT_MODEL_NAME",
    "RESERVED_PREFIX",
    "Resolved",
    "canonical_model",
    "effective_params",
    "eligible_offerings",
    "resolve_model",
    "split_pin",
    "unit_price",
]

#: The ``model`` value that asks for the default model, like an empty one.
DEFAULT_MODEL_NAME = "default"
#: Model names under this prefix belong to Lattice itself (personal runtimes), never the catalog.
RESERVED_PREFIX = "lattice:"


class Resolved(msgspec.Struct, frozen=True):
    """The outcome of resolving a request's ``model`` for one task class.

    ``requested`` is the name to echo back in responses' ``model`` fields (the caller's own
    spelling; for a defaulted request, the default's name). ``offerings`` are the enabled
    offerings of ``model`` that serve the task (and match ``provider`` when pinned), best
    first: priority descending, then price ascending, then id. It may be empty — capacity
    outside the catalog (runtimes, marketplace daemons) is the router's business.
    """

    model: ModelEntry
    requested: str
    task: TaskClass
    provider: str | None = None
    offerings: tuple[Offering, ...] = ()


def resolve_model(
    cat: Catalog, requested: str | None, task: str, workspace_default: str | None = None
) -> Resolved:
    """Resolve ``requested`` for ``task``.

    ``workspace_default`` is the workspace's default model; it applies when the request names
    none and it serves ``task`` (a chat default does not break embedding requests: those
    fall back to the catalog's ``default_models[task]``).

    Raises :class:`UnknownTask`, :class:`UnknownModel` (:class:`NoDefaultModel` when nothing
    names a model) or :class:`ModelTaskMismatch`.
    """
    task_class = cat.task_classes.get(task)
    if task_class is None:
        raise UnknownTask(task)
    name = requested
    if not name or name == DEFAULT_MODEL_NAME:
        name = _default_for(cat, task, workspace_default)
    model_id, provider = canonical_model(cat, name)
    model = cat.models[model_id]
    if task not in model.task_classes:
        raise ModelTaskMismatch(name, task)
    return Resolved(
        model=model,
        requested=name,
        task=task_class,
        provider=provider,
        offerings=eligible_offerings(cat, model, task_class, provider),
    )


def _default_for(cat: Catalog, task: str, workspace_default: str | None) -> str:
    if workspace_default:
        try:
            model_id, _ = canonical_model(cat, workspace_default)
        except UnknownModel:
            pass
        else:
            if task in cat.models[model_id].task_classes:
                return workspace_default
    name = cat.default_models.get(task)
    if not name:
        raise NoDefaultModel(task)
    return name


def split_pin(name: str) -> tuple[str, str | None]:
    """``"lovelace:x@acme"`` → ``("lovelace:x", "acme")``; no ``@`` → ``(name, None)``."""
    base, sep, provider = name.rpartition("@")
    return (base, provider) if sep else (name, None)


def canonical_model(cat: Catalog, name: str) -> tuple[str, str | None]:
    """Follow aliases from ``name`` to a model id in ``cat``; return it with the provider pin.

    Raises :class:`UnknownModel` (carrying ``name``) for unknown names, reserved
    ``lattice:`` names, empty pins and alias cycles.
    """
    if name.startswith(RESERVED_PREFIX):
        raise UnknownModel(name)
    base, pin = split_pin(name)
    seen: set[str] = set()
    while base not in cat.models:
        target = cat.aliases.get(base)
        if target is None or base in seen:
            raise UnknownModel(name)
        seen.add(base)
        base, alias_pin = split_pin(target)
        pin = pin if pin is not None else alias_pin
    if pin == "":
        raise UnknownModel(name)
    return base, pin


def eligible_offerings(
    cat: Catalog, model: ModelEntry, task: TaskClass, provider: str | None = None
) -> tuple[Offering, ...]:
    """Enabled offerings of ``model`` serving ``task`` (from ``provider`` only, if given),
    ordered by priority descending, then :func:`unit_price` ascending, then id."""
    found = [
        o
        for o in cat.offerings
        if o.enabled
        and o.model == model.id
        and task.name in (o.task_classes if o.task_classes is not None else model.task_classes)
        and (provider is None or o.provider == provider)
    ]
    found.sort(key=lambda o: (-o.priority, unit_price(o, task), o.id))
    return tuple(found)


def unit_price(offering: Offering, task: TaskClass) -> Fraction:
    """A comparable price: the sum of the offering's prices for the task's meter units, per
    single unit, in micro-USD (exact). Only for ordering; bills use :mod:`catalog.pricing`."""
    total = sum(offering.prices.get(unit, 0) for unit in task.meter.units)
    return Fraction(total, offering.price_per)


def effective_params(model: ModelEntry, offering: Offering | None) -> frozenset[str] | None:
    """Optional request parameters the target understands: the offering's own list when it
    has one, else the model's; ``None`` means every parameter of the codec."""
    params = offering.supported_params if offering is not None else None
    if params is None:
        params = model.supported_params
    return None if params is None else frozenset(params)
