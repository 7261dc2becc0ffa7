"""What every backend is: the :class:`Backend` protocol, what it advertises, what it answers.

A dispatch names a ``task`` (task class: ``chat-completion``, ``text-completion``,
``embedding`` or a catalog-defined one such as ``image-generation``), a ``model`` (a
canonical catalog id, or the runtime's advertised local-only default, see
:mod:`daemon.backends.mapping`) and a ``body``: the JSON of the OpenAI-shaped request, already
validated by the gateway. Backends rewrite ``body["model"]`` to the local model name and
``stream`` to match the call; everything else is passed as the gateway sent it (e.g. its
``stream_options.include_usage``).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

import msgspec

from daemon.backends.errors import BackendError

__all__ = ["Advertisement", "Backend", "BackendError", "BackendReply"]


class Advertisement(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a backend serves: sent in the tunnel hello. ``default_model`` is what
    ``lattice:personal:lat_<id>`` runs; it may be a local-only name absent from ``models``."""

    task_classes: tuple[str, ...]
    models: tuple[str, ...]
    default_model: str | None
    concurrency: int

    @property
    def servable_models(self) -> tuple[str, ...]:
        """Every model name a dispatch may carry: ``models`` plus the default (what the
        daemon passes to the dispatch-token verifier as ``advertised_models``)."""
        default = self.default_model
        return self.models if default is None or default in self.models else (*self.models, default)


class BackendReply(msgspec.Struct, frozen=True):
    """A non-streamed result: the backend's status (2xx) and JSON body."""

    status: int
    body: bytes


class Backend(Protocol):
    """A source of results. Failures raise :class:`BackendError` (or a subclass)."""

    async def describe(self) -> Advertisement:
        """What this backend serves now (may ask the local server for its models)."""
        ...

    async def call(self, task: str, model: str, body: bytes) -> BackendReply:
        """One non-streamed result."""
        ...

    def stream(self, task: str, model: str, body: bytes) -> AsyncGenerator[bytes, None]:
        """The ``data:`` payloads of the streamed result (JSON bytes, without ``[DONE]``).

        Nothing is produced ahead of the consumer: pulling lazily is the backpressure (a
        slow client slows the backend, never grows a buffer). Errors before the first
        payload raise on the first pull; ``aclose()`` stops the work (the local server sees
        its connection close).
        """
        ...

    async def aclose(self) -> None:
        """Release connections; the backend is not used afterwards."""
        ...
