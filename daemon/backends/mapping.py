"""Which catalog models a runtime serves, and under which local names.

A mapping pair is ``CANONICAL=LOCAL``, e.g. ``lovelace:llama-3.2-3b-instruct=llama3.2:3b``
(the catalog's canonical id, then the name the local server knows; a canonical name given
without its ``lovelace:`` namespace gets it). Several canonical names may map to one local
model; one canonical name maps to one local model.

What a backend advertises (the rule every backend follows):

- **models**: only canonical names, those whose local model the backend actually has. A
  local model with no mapping is not advertised as a catalog model — the daemon cannot know
  that ``mistral`` on this machine is the catalog's ``lovelace:mistral-7b-instruct``.
- **default_model** (what ``lattice:personal:lat_<id>`` runs): the configured default if the
  backend has it, else the first mapped model, else the first local model (skipping names
  that look like embedding models). It is advertised by its canonical name when it has one,
  else by its **local name** (a local-only model is still usable through the personal
  runtime, never as a catalog model).

A dispatch's ``model`` is then either a mapped canonical name or the advertised local-only
default; :meth:`ModelMap.to_local` turns it into the name sent to the local server.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

__all__ = ["CANONICAL_PREFIX", "ModelMap", "pick_default"]

CANONICAL_PREFIX = "lovelace:"


class ModelMap:
    """Canonical catalog name → local model name (immutable)."""

    __slots__ = ("_local", "_to_canonical")

    def __init__(self, pairs: Mapping[str, str] | None = None) -> None:
        self._local: dict[str, str] = {}
        self._to_canonical: dict[str, list[str]] = {}
        for canonical, local in (pairs or {}).items():
            self._add(_canonical(canonical), local)

    @classmethod
    def from_pairs(cls, pairs: Iterable[str]) -> ModelMap:
        """Parse ``CANONICAL=LOCAL`` strings (config file entries, ``--model-map`` flags)."""
        result = cls()
        for pair in pairs:
            canonical, eq, local = pair.partition("=")
            canonical, local = canonical.strip(), local.strip()
            if not eq or not canonical or not local:
                raise ValueError(f"model mapping {pair!r} is not CANONICAL=LOCAL")
            result._add(_canonical(canonical), local)
        return result

    def _add(self, canonical: str, local: str) -> None:
        if not local:
            raise ValueError(f"model mapping for {canonical!r} has an empty local name")
        known = self._local.get(canonical)
        if known is not None and known != local:
            raise ValueError(f"{canonical!r} is mapped to both {known!r} and {local!r}")
        if known is None:
            self._local[canonical] = local
            self._to_canonical.setdefault(local, []).append(canonical)

    def merged(self, other: ModelMap) -> ModelMap:
        """A map with ``other``'s pairs taking precedence over this one's."""
        pairs = dict(self._local)
        pairs.update(other._local)
        return ModelMap(pairs)

    @property
    def pairs(self) -> tuple[str, ...]:
        """The mapping as ``CANONICAL=LOCAL`` strings (round-trips through :meth:`from_pairs`)."""
        return tuple(f"{c}={local}" for c, local in self._local.items())

    def __len__(self) -> int:
        return len(self._local)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelMap) and self._local == other._local

    def __hash__(self) -> int:
        return hash(tuple(self._local.items()))

    def __repr__(self) -> str:
        return f"ModelMap({self._local!r})"

    def to_local(self, canonical: str) -> str | None:
        """The local name of a mapped canonical name, else ``None``."""
        return self._local.get(canonical)

    def canonical_names(self, local: str) -> tuple[str, ...]:
        """The canonical names mapped onto one local model."""
        return tuple(self._to_canonical.get(local, ()))

    def advertised(self, local_models: Iterable[str] | None = None) -> tuple[str, ...]:
        """The canonical names to advertise: every mapped one whose local model is among
        ``local_models`` (all mapped names when that is ``None``: the backend cannot tell)."""
        if local_models is None:
            return tuple(self._local)
        have = set(local_models)
        return tuple(c for c, local in self._local.items() if local in have)

    def display(self, name: str) -> str:
        """How a model is advertised: its canonical name if mapped, else as given."""
        if name in self._local:
            return name
        canonical = self._to_canonical.get(name)
        return canonical[0] if canonical else name


def pick_default(
    model_map: ModelMap, configured: str | None, local_models: Sequence[str]
) -> str | None:
    """The advertised default model (see the module docstring), or ``None`` if the backend
    has no model at all or lacks the configured one. Without a configured default or a
    mapping, the first local model that does not look like an embedding model is taken."""
    if configured is not None:
        local = model_map.to_local(configured)
        if local is not None:  # a canonical name
            return configured if local in local_models else None
        return model_map.display(configured) if configured in local_models else None
    for local in local_models:
        if model_map.canonical_names(local):
            return model_map.display(local)
    chat_like = [m for m in local_models if "embed" not in m.lower()] or list(local_models)
    return chat_like[0] if chat_like else None


def _canonical(name: str) -> str:
    if "@" in name or name.startswith("lattice:"):
        raise ValueError(f"{name!r} cannot be mapped: use a canonical model (lovelace:<model>)")
    if ":" in name and not name.startswith(CANONICAL_PREFIX):
        raise ValueError(f"{name!r} is not a canonical model name (lovelace:<model>)")
    return name if name.startswith(CANONICAL_PREFIX) else CANONICAL_PREFIX + name
