"""The one exception handler renders anything, even a bug, as the OpenAI envelope."""

from __future__ import annotations

import json
from typing import Any

from litestar import Litestar, get
from litestar.testing import TestClient
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.errors import RateLimited
from gateway.http import exception_to_response, request_context_middleware
from gateway.metrics import Metrics


@get("/boom")
async def boom() -> None:
    raise ZeroDivisionError("secret internals")


@get("/redis")
async def redis_down() -> None:
    raise RedisConnectionError("Connection refused")


@get("/limited")
async def limited() -> None:
    raise RateLimited("slow down", retry_after=2.4)


def client() -> TestClient[Any]:
    app = Litestar(
        route_handlers=[boom, redis_down, limited],
        exception_handlers={Exception: exception_to_response},
        logging_config=None,
    )
    return TestClient(request_context_middleware(Metrics())(app))  # type: ignore[arg-type]


def test_a_bug_is_a_500_envelope_without_internals() -> None:
    with client() as c:
        resp = c.get("/boom")
    assert resp.status_code == 500
    body = json.loads(resp.content)
    assert body["error"]["code"] == "internal_error"
    assert "secret" not in resp.text
    assert resp.headers["x-request-id"].startswith("req_")


def test_redis_down_is_a_retryable_503() -> None:
    with client() as c:
        resp = c.get("/redis")
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert json.loads(resp.content)["error"]["code"] == "state_unavailable"


def test_retry_after_is_whole_seconds() -> None:
    with client() as c:
        resp = c.get("/limited")
    assert resp.status_code == 429 and resp.headers["retry-after"] == "2"


def test_unknown_route_and_method() -> None:
    with client() as c:
        assert c.get("/nope").json()["error"]["code"] == "unknown_url"
        resp = c.post("/boom")
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"
