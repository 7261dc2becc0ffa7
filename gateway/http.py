"""HTTP plumbing shared by every route: reading bodies, rendering errors, the request-id and
metrics middleware. Handlers stay thin: decode, call a service, encode."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from redis.exceptions import RedisError

from billing.spool import SpoolWriteError
from gateway.errors import (
    InvalidRequest,
    LatticeError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from gateway.ids import new_hex_id
from gateway.logs import AccessLog, request_id_var
from gateway.metrics import Metrics

__all__ = [
    "as_lattice_error",
    "check_json_headers",
    "decode_json_object",
    "error_body",
    "error_response",
    "exception_to_response",
    "json_response",
    "read_json_object",
    "request_context_middleware",
    "request_id_of",
    "route_label",
]

log = logging.getLogger("lattice.http")

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_JSON_TYPES = ("application/json", "application/merge-patch+json")


def json_response(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> Response[bytes]:
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_body(exc: LatticeError) -> tuple[bytes, dict[str, str] | None]:
    """The OpenAI error envelope for ``exc``, and its extra headers (``retry-after``)."""
    headers = None
    if exc.retry_after is not None:
        headers = {"retry-after": str(max(1, round(exc.retry_after)))}
    return _encoder.encode(exc.envelope()), headers


def error_response(exc: LatticeError) -> Response[bytes]:
    body, headers = error_body(exc)
    return json_response(body, exc.status, headers)


def as_lattice_error(exc: Exception, method: str, path: str) -> LatticeError:
    """What the caller is told about any exception: typed errors as they are, a lost state
    store or usage spool as a retryable 503, framework errors by their status, and anything
    else as a logged 500 that reveals nothing."""
    if isinstance(exc, LatticeError):
        return exc
    if isinstance(exc, RedisError):
        # Redis holds keys, catalog and the usage outbox: without it nothing is served (and
        # nothing unmetered leaves), but the caller gets a retryable 503, never a 500.
        log.warning("state store unavailable", extra={"error": type(exc).__name__})
        return ServiceUnavailable(
            "The gateway's state store is unavailable; retry shortly.",
            code="state_unavailable",
            retry_after=1.0,
        )
    if isinstance(exc, SpoolWriteError):
        # The usage record could not be made durable (disk full): nothing unmetered leaves.
        log.error("usage spool unavailable", extra={"error": str(exc)})
        return ServiceUnavailable(
            "The gateway cannot record usage right now; retry shortly.",
            code="usage_spool_unavailable",
            retry_after=1.0,
        )
    if isinstance(exc, HTTPException):
        status = exc.status_code
        if status == 404:
            return NotFound(f"Invalid URL ({method} {path})", code="unknown_url")
        if status == 405:
            return MethodNotAllowed(f"Method {method} is not allowed on {path}.")
        if status == 413:
            return PayloadTooLarge("The request body is too large.")
        if 400 <= status < 500:
            return InvalidRequest(str(exc.detail), code="invalid_request")
    log.error("unhandled error", exc_info=exc, extra={"path": path})
    return LatticeError("The server had an error while processing your request.")


def exception_to_response(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """The one exception handler: every error leaves in the OpenAI envelope."""
    return error_response(as_lattice_error(exc, request.method, request.url.path))


def check_json_headers(content_type: str | None, content_length: str | None, limit: int) -> None:
    """415 for a body that does not say it is JSON; 413 for one announced too large."""
    if content_type is not None:
        base = content_type.split(";", 1)[0].strip().lower()
        if base not in _JSON_TYPES and not base.endswith("+json"):
            raise UnsupportedMediaType(
                f"Unsupported Content-Type '{base}': send 'Content-Type: application/json'."
            )
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")


def decode_json_object(raw: bytes) -> dict[str, Any]:
    """The request's JSON object; 400 ``invalid_json`` for anything else."""
    if not raw.strip():
        raise InvalidRequest("The request body is empty: send a JSON object.", code="invalid_json")
    try:
        body = _decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request ({exc}).", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return body


async def read_json_object(
    request: Request[Any, Any, Any], limit: int
) -> tuple[bytes, dict[str, Any]]:
    """The raw body and its JSON object; 413/415/400 in the caller's format otherwise."""
    check_json_headers(
        request.headers.get("content-type"), request.headers.get("content-length"), limit
    )
    raw = await request.body()
    if len(raw) > limit:
        raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
    return raw, decode_json_object(raw)


def route_label(path: str) -> str:
    """``path`` as a bounded metrics label."""
    if path.startswith("/v1/tasks/"):
        return "/v1/tasks/{task}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    if path.startswith("/admin/"):
        return "/admin"
    if path in _KNOWN:
        return path
    return "other"


_KNOWN = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/tasks",
        "/healthz",
        "/readyz",
        "/metrics",
    }
)


def request_id_of(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The caller's ``x-request-id`` if it is a sane one, else a new ``req_…`` id."""
    for name, value in headers:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _REQUEST_ID_RE.match(candidate):
                return candidate
            break
    return "req_" + new_hex_id()


def request_context_middleware(metrics: Metrics) -> Any:
    """ASGI middleware: request id (incoming ``x-request-id`` if sane, else a new one) on
    every response and in every log record; request counts, latency and in-flight; the
    access log line."""
    access = AccessLog()

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            rid = request_id_of(scope["headers"])
            scope.setdefault("state", {})["request_id"] = rid
            token = request_id_var.set(rid)
            header = (b"x-request-id", rid.encode())
            status = 500
            start = time.perf_counter()
            metrics.in_flight += 1

            async def send_wrapper(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message["headers"] = [*message.get("headers", ()), header]
                await send(message)

            try:
                await app(scope, receive, send_wrapper)
            finally:
                elapsed = time.perf_counter() - start
                metrics.in_flight -= 1
                path = scope["path"]
                metrics.observe_request(route_label(path), status, elapsed)
                access.record(scope["method"], path, status, round(elapsed * 1000, 3), rid)
                request_id_var.reset(token)

        return middleware

    return factory
