"""Several backends as one: routes each dispatch by (task, model), merges advertisements.

Routing uses the advertisements of the last :meth:`CompositeBackend.describe` (described on
first use otherwise): the first backend that advertises both the task and the model (or has
it as its default) serves it; failing that, the first that advertises the task (it answers
for the model itself). The merged advertisement is the union of tasks and models in backend
order, the first backend's default, and the configured concurrency (how many dispatches the
daemon runs at once, whatever each backend could take).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence

from daemon.backends.base import Advertisement, Backend, BackendReply
from daemon.backends.errors import BackendError, UnsupportedTask

__all__ = ["DEFAULT_CONCURRENCY", "CompositeBackend"]

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 256


class CompositeBackend:
    """Routes dispatches to ``backends`` (see the module docstring); owns and closes them."""

    def __init__(
        self, backends: Sequence[Backend], *, concurrency: int = DEFAULT_CONCURRENCY
    ) -> None:
        if not backends:
            raise ValueError("a composite backend needs at least one backend")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.backends = tuple(backends)
        self.concurrency = concurrency
        self._routes: list[tuple[Backend, Advertisement]] | None = None

    async def describe(self) -> Advertisement:
        """Describe every backend; one that fails is left out (and logged) until the next
        describe, unless all fail."""
        results = await asyncio.gather(
            *(b.describe() for b in self.backends), return_exceptions=True
        )
        routes: list[tuple[Backend, Advertisement]] = []
        failures: list[BackendError] = []
        for backend, result in zip(self.backends, results, strict=True):
            if isinstance(result, BackendError):
                log.warning(
                    "backend unavailable; not advertised",
                    extra={"backend": type(backend).__name__, "error": result.message},
                )
                failures.append(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                routes.append((backend, result))
        if not routes:
            raise failures[0]
        self._routes = routes
        tasks: dict[str, None] = {}
        models: dict[str, None] = {}
        for _, adv in routes:
            tasks.update(dict.fromkeys(adv.task_classes))
            models.update(dict.fromkeys(adv.models))
        default = next((a.default_model for _, a in routes if a.default_model is not None), None)
        return Advertisement(
            task_classes=tuple(tasks),
            models=tuple(models),
            default_model=default,
            concurrency=self.concurrency,
        )

    async def call(self, task: str, model: str, body: bytes) -> BackendReply:
        backend = await self._route(task, model)
        return await backend.call(task, model, body)

    async def stream(self, task: str, model: str, body: bytes) -> AsyncGenerator[bytes, None]:
        backend = await self._route(task, model)
        inner = backend.stream(task, model, body)
        try:
            async for payload in inner:
                yield payload
        finally:
            await inner.aclose()  # at once, not when collected: it holds a connection

    async def aclose(self) -> None:
        for backend in self.backends:
            await backend.aclose()

    async def _route(self, task: str, model: str) -> Backend:
        if self._routes is None:
            await self.describe()
        assert self._routes is not None
        fallback: Backend | None = None
        for backend, adv in self._routes:
            if task not in adv.task_classes:
                continue
            if model in adv.models or model == adv.default_model:
                return backend
            fallback = fallback or backend
        if fallback is None:
            raise UnsupportedTask(f"This runtime does not serve '{task}'.")
        return fallback
