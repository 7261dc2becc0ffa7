"""Admission logic that needs no I/O: the ``drop_params`` policy and the upstream body."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.errors import UnsupportedParameter

__all__ = ["admit_params", "resolve_drop_params"]


def resolve_drop_params(
    body: dict[str, Any], workspace_default: bool | None, global_default: bool
) -> bool:
    """Per request (``drop_params`` in the body) beats the workspace, which beats the
    deployment default."""
    value = body.get("drop_params")
    if isinstance(value, bool):
        return value
    if workspace_default is not None:
        return workspace_default
    return global_default


def admit_params(
    body: dict[str, Any],
    *,
    core: Iterable[str],
    supported: frozenset[str] | None,
    drop: bool,
) -> tuple[dict[str, Any], list[str]]:
    """The body to forward and the parameters dropped from it.

    Core fields always pass; any other field must be in ``supported`` (``None`` = every
    field passes). With ``drop`` false an unsupported field is a 400 naming it.
    ``drop_params`` itself is a Lattice extension and never forwarded.
    """
    if supported is None:
        out = {k: v for k, v in body.items() if k != "drop_params"}
        return out, []
    core_set = frozenset(core)
    out = {}
    dropped: list[str] = []
    for name, value in body.items():
        if name == "drop_params":
            continue
        if name in core_set or name in supported:
            out[name] = value
        elif drop:
            dropped.append(name)
        else:
            raise UnsupportedParameter(
                f"Unsupported parameter: '{name}' is not supported by this model. "
                "Remove it, or send drop_params: true to drop unsupported parameters.",
                param=name,
            )
    return out, dropped
