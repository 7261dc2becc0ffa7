"""What the front door does with one dispatch request: the request id, metrics and access
line of :func:`gateway.http.request_context_middleware`, then
:func:`gateway.openai.dispatch_app.call_dispatch`, answered through a
:class:`~gateway.front.cycle.FastCycle` — the same outcomes, status codes, headers and error
envelopes as the ASGI path."""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.dispatch.service import JsonOutcome
from gateway.front.cycle import ClientGone, FastCycle
from gateway.http import as_lattice_error, error_body, request_id_of, route_label
from gateway.logs import AccessLog, request_id_var
from gateway.openai.dispatch_app import call_dispatch, decode_headers, task_for
from gateway.runtime import Gateway

__all__ = ["FrontDoor"]

log = logging.getLogger("lattice.http")


class FrontDoor:
    """The dispatch routes of one gateway, for
    :class:`~gateway.front.protocol.LatticeHttpProtocol`."""

    def __init__(self, gw: Gateway) -> None:
        self._gw = gw
        self._access = AccessLog()

    def task_for(self, path: str) -> str | None:
        return task_for(self._gw, path)

    @property
    def request_timeout_s(self) -> float:
        """How long one request may take to arrive (see :class:`LatticeHttpProtocol`)."""
        return self._gw.settings.request_timeout_s

    async def serve(
        self, task: str, path: str, raw_headers: list[tuple[bytes, bytes]], cycle: FastCycle
    ) -> None:
        gw = self._gw
        metrics = gw.metrics
        rid = request_id_of(raw_headers)
        token = request_id_var.set(rid)
        start = time.perf_counter()
        metrics.in_flight += 1
        status = 500
        try:
            headers = decode_headers(raw_headers)
            try:
                outcome = await call_dispatch(gw, task, headers, cycle.read_body, rid)
            except ClientGone:
                return
            except Exception as exc:
                error = as_lattice_error(exc, "POST", path)
                body, extra = error_body(error)
                status = error.status
                cycle.respond(status, body, _with_id(extra, rid))
                return
            if isinstance(outcome, JsonOutcome):
                status = outcome.status
                cycle.respond(status, outcome.body, _with_id(outcome.headers, rid))
            else:
                status = 200
                await cycle.stream(outcome.events, _with_id(outcome.headers, rid))
        except asyncio.CancelledError:  # the server is stopping: nothing more is sent
            cycle.abort()
        except Exception as exc:  # a bug after the response started: cut it, log it
            log.error("unhandled error", exc_info=exc, extra={"path": path})
            cycle.abort()
        finally:
            elapsed = time.perf_counter() - start
            metrics.in_flight -= 1
            metrics.observe_request(route_label(path), status, elapsed)
            self._access.record("POST", path, status, round(elapsed * 1000, 3), rid)
            request_id_var.reset(token)


def _with_id(headers: dict[str, str] | None, rid: str) -> dict[str, str]:
    return {**headers, "x-request-id": rid} if headers else {"x-request-id": rid}
