"""What a personal runtime record is, and how it is laid out in its Redis hash (pure).

A runtime is one hash at ``keys.runtime(id)`` (written by
:class:`~gateway.runtimes.store.RuntimeStore`) whose fields are those of :class:`RuntimeRecord`:
integers in decimal, ``models`` and ``task_classes`` as JSON arrays (:func:`encode_list`),
absent fields for ``None``; ``credential_sha256`` is stored as ``cred_sha256``.
:func:`decode_record` reads an HGETALL reply back (after :func:`hash_fields`), and answers
``None`` for an empty or incomplete hash.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import msgspec

from gateway.errors import InvalidRequest

__all__ = [
    "RuntimeRecord",
    "RuntimeStatus",
    "as_text",
    "decode_record",
    "encode_list",
    "hash_fields",
    "runtime_status",
    "validate_runtime_name",
]

RuntimeStatus = Literal["unpaired", "reachable", "offline", "revoked"]

_MAX_NAME = 128
_LIST = msgspec.json.Decoder(tuple[str, ...])
_JSON = msgspec.json.Encoder()


class RuntimeRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One personal runtime. Times are Unix milliseconds.

    ``credential_sha256`` is the stored digest of the runtime credential (``None`` until
    paired and after revocation); it is never rendered to a caller.
    """

    id: str
    workspace: str
    name: str
    created_ms: int
    paired_ms: int | None = None
    revoked_ms: int | None = None
    last_seen_ms: int | None = None
    models: tuple[str, ...] = ()
    task_classes: tuple[str, ...] = ()
    default_model: str | None = None
    daemon_version: str | None = None
    concurrency: int | None = None
    credential_sha256: str | None = None


def runtime_status(record: RuntimeRecord, *, reachable: bool) -> RuntimeStatus:
    """``revoked`` if revoked; ``unpaired`` if never paired; ``reachable`` while a gateway
    process holds its tunnel (``keys.runtime_holder`` exists); else ``offline``."""
    if record.revoked_ms is not None:
        return "revoked"
    if record.paired_ms is None:
        return "unpaired"
    return "reachable" if reachable else "offline"


def validate_runtime_name(name: object) -> str:
    """``name`` stripped, if it is 1-128 printable characters; else :class:`InvalidRequest`."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest("A runtime name must be a non-empty string.", param="name")
    name = name.strip()
    if len(name) > _MAX_NAME or not name.isprintable():
        raise InvalidRequest(
            f"A runtime name is at most {_MAX_NAME} printable characters.", param="name"
        )
    return name


def as_text(value: bytes | str) -> str:
    """A Redis reply value as text (the client may or may not decode responses)."""
    return value.decode() if isinstance(value, bytes) else value


def hash_fields(raw: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    """An HGETALL reply as text."""
    return {as_text(k): as_text(v) for k, v in raw.items()}


def encode_list(values: Sequence[str]) -> bytes:
    """``models`` or ``task_classes`` as stored: a JSON array."""
    return _JSON.encode(tuple(values))


def _int(h: Mapping[str, str], name: str) -> int | None:
    return int(h[name]) if name in h else None


def decode_record(h: Mapping[str, str]) -> RuntimeRecord | None:
    """The record of an HGETALL reply (as text); ``None`` if empty or incomplete."""
    try:
        return RuntimeRecord(
            id=h["id"],
            workspace=h["workspace"],
            name=h["name"],
            created_ms=int(h["created_ms"]),
            paired_ms=_int(h, "paired_ms"),
            revoked_ms=_int(h, "revoked_ms"),
            last_seen_ms=_int(h, "last_seen_ms"),
            models=_LIST.decode(h["models"]) if "models" in h else (),
            task_classes=_LIST.decode(h["task_classes"]) if "task_classes" in h else (),
            default_model=h.get("default_model"),
            daemon_version=h.get("daemon_version"),
            concurrency=_int(h, "concurrency"),
            credential_sha256=h.get("cred_sha256"),
        )
    except (KeyError, ValueError, msgspec.DecodeError):
        return None
