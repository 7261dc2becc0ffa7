"""Dispatching to a personal runtime, with the same contract as a hosted upstream.

:class:`RuntimeCaller` turns a runtime target into what the dispatch service already knows
from :class:`~gateway.dispatch.upstream.UpstreamClient`: ``post`` returns the result body,
``stream`` yields SSE data payloads, and failures are typed gateway errors. Underneath, a
dispatch is minted (ARCHITECTURE.md, The shape, step 5: a short-lived ES256 token binding
runtime, task class, model and dispatch id) and opened on the runtime's tunnel, wherever it is
held (:class:`~gateway.tunnel.types.DispatchHandle`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Protocol

import msgspec

from catalog.model import Offering
from gateway.dispatch.upstream import map_upstream_status
from gateway.errors import (
    ExecutionTimeout,
    InvalidRequest,
    LatticeError,
    RateLimited,
    RelayUnavailable,
    Unprocessable,
    UpstreamError,
)
from gateway.tunnel.types import Chunk, DispatchHandle, DispatchRequest, Failed, Finished

__all__ = ["RuntimeCaller", "RuntimeTarget", "failure_error"]


class RuntimeTarget(msgspec.Struct, frozen=True):
    """A personal runtime chosen for one request, priced by ``offering``."""

    offering: Offering
    runtime_id: str
    #: The model the runtime is asked for: a canonical catalog id, or its own default model.
    model: str
    #: Whether the caller named this runtime (``lattice:personal:lat_…``): then its
    #: unavailability is the answer (never fall back to other capacity).
    pinned: bool = False


class TokenMinter(Protocol):
    def mint(self, *, runtime_id: str, task: str, model: str, dispatch_id: str) -> str: ...


#: Opens a dispatch on whichever process holds the runtime's tunnel; raises
#: :class:`RelayUnavailable` when no process does. The handle ends at the request's deadline.
OpenDispatch = Callable[[DispatchRequest], Awaitable[DispatchHandle]]


def failure_error(failed: Failed) -> LatticeError:
    """The caller's error for a dispatch that failed on the runtime side."""
    message = failed.message or "The personal runtime failed."
    if failed.code == ExecutionTimeout.code or failed.status == 504:
        return ExecutionTimeout(message)
    if failed.status == 400:
        return InvalidRequest(message, code=failed.code)
    if failed.status == 422:
        return Unprocessable(message, code=failed.code)
    if failed.status == 429:
        return RateLimited(message, retry_after=1.0)
    if failed.status == 503:
        return RelayUnavailable(message)
    return UpstreamError(message, code=failed.code)


class RuntimeCaller:
    def __init__(self, open_dispatch: OpenDispatch, minter: TokenMinter, timeout_s: float) -> None:
        self._open = open_dispatch
        self._minter = minter
        self._timeout_ms = int(timeout_s * 1000)

    def _request(
        self, target: RuntimeTarget, task: str, dispatch_id: str, body: bytes, stream: bool
    ) -> DispatchRequest:
        token = self._minter.mint(
            runtime_id=target.runtime_id, task=task, model=target.model, dispatch_id=dispatch_id
        )
        return DispatchRequest(
            dispatch_id=dispatch_id,
            runtime_id=target.runtime_id,
            task=task,
            model=target.model,
            body=body,
            stream=stream,
            token=token,
            deadline_ms=time.time_ns() // 1_000_000 + self._timeout_ms,
        )

    async def post(self, target: RuntimeTarget, task: str, dispatch_id: str, body: bytes) -> bytes:
        handle = await self._open(self._request(target, task, dispatch_id, body, False))
        parts: list[bytes] = []
        try:
            async for event in handle:
                if isinstance(event, Chunk):
                    parts.append(event.data)
                elif isinstance(event, Finished):
                    result = b"".join(parts)
                    if event.status >= 400:
                        raise map_upstream_status(event.status, result, None)
                    return result
                else:
                    raise failure_error(event)
        except BaseException:
            await handle.cancel()
            raise
        raise UpstreamError("The personal runtime ended the dispatch without a result.")

    async def stream(
        self, target: RuntimeTarget, task: str, dispatch_id: str, body: bytes
    ) -> AsyncGenerator[bytes, None]:
        """SSE data payloads of the runtime's stream. A failure before the first payload
        raises (so the service can answer with a status, or fall back); one after it raises
        too, and the relay turns it into an SSE error event. Closing the generator early
        cancels the dispatch on the daemon."""
        handle = await self._open(self._request(target, task, dispatch_id, body, True))
        done = False
        try:
            async for event in handle:
                if isinstance(event, Chunk):
                    yield event.data
                elif isinstance(event, Finished):
                    done = True
                    if event.status >= 400:
                        raise UpstreamError(f"The personal runtime answered {event.status}.")
                    return
                else:
                    done = True
                    raise failure_error(event)
            done = True
        finally:
            if not done:
                await handle.cancel()
