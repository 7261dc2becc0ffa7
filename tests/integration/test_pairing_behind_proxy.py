"""Pairing behind a reverse proxy, over real loopback HTTP (uvicorn as `lattice serve` runs
it: ``proxy_headers`` with ``forwarded_allow_ips``): the ``verification_uri`` handed to the
user is the configured public URL, and the per-address limit on user-code guessing counts the
client a trusted proxy names in ``X-Forwarded-For`` — each user behind one load balancer has
their own budget — while an untrusted peer cannot escape its budget by inventing addresses."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis

from gateway.auth.apikeys import ApiKeyStore
from gateway.auth.principal import Scope
from gateway.auth.workspaces import WorkspaceStore
from gateway.redis_server import free_port
from gateway.runtimes.protocol import DeviceAuthorizationResponse
from gateway.settings import settings_from_env
from tests.integration.runtimes_server import RuntimesServer

APPROVE = "/v1/personal-runtimes/device/approve"
WRONG = [f"BBBB-BBB{c}" for c in "BCDFGHJKLMNP"]


async def _manager_key(aredis: aioredis.Redis) -> str:
    await WorkspaceStore(aredis).create("acme")
    key, _ = await ApiKeyStore(aredis).create(
        "acme", scopes=[Scope.INFERENCE, Scope.RUNTIME_MANAGE]
    )
    return key


def _guess(http: httpx.Client, key: str, code: str, forwarded_for: str) -> int:
    resp = http.post(
        APPROVE,
        json={"user_code": code},
        headers={"Authorization": f"Bearer {key}", "X-Forwarded-For": forwarded_for},
    )
    return resp.status_code


@pytest.fixture
def trusted(redis_url: str) -> Iterator[httpx.Client]:
    """The test client stands for a proxy at 127.0.0.1, which is trusted."""
    with (
        RuntimesServer(
            redis_url,
            free_port(),
            public_url="https://gw.example.com/",
            forwarded_allow_ips="127.0.0.1",
        ) as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        yield client


@pytest.fixture
def untrusted(redis_url: str) -> Iterator[httpx.Client]:
    """Only a proxy at 192.0.2.1 would be believed; the test client is not it."""
    with (
        RuntimesServer(redis_url, free_port(), forwarded_allow_ips="192.0.2.1") as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        yield client


def test_verification_uri_is_the_public_url(trusted: httpx.Client) -> None:
    resp = trusted.post("/v1/oauth/device_authorization", data={"client_id": "lattice-daemon"})
    assert resp.status_code == 200, resp.text
    code = msgspec.json.decode(resp.content, type=DeviceAuthorizationResponse)
    assert code.verification_uri == "https://gw.example.com/device"
    assert code.verification_uri_complete.startswith("https://gw.example.com/device?user_code=")


async def test_each_client_behind_a_trusted_proxy_has_its_own_budget(
    trusted: httpx.Client, aredis: aioredis.Redis
) -> None:
    key = await _manager_key(aredis)
    for code in WRONG[:10]:
        assert _guess(trusted, key, code, "203.0.113.7") == 404
    assert _guess(trusted, key, WRONG[10], "203.0.113.7") == 429
    # Another user behind the same proxy is not throttled by the first one's guesses.
    assert _guess(trusted, key, WRONG[11], "198.51.100.9") == 404


async def test_an_untrusted_peer_cannot_rotate_forwarded_addresses(
    untrusted: httpx.Client, aredis: aioredis.Redis
) -> None:
    key = await _manager_key(aredis)
    for i, code in enumerate(WRONG[:10]):
        assert _guess(untrusted, key, code, f"203.0.113.{i + 1}") == 404
    assert _guess(untrusted, key, WRONG[10], "198.51.100.200") == 429


def test_settings_from_the_environment() -> None:
    settings = settings_from_env(
        {
            "LATTICE_PUBLIC_URL": "https://gw.example.com",
            "LATTICE_FORWARDED_ALLOW_IPS": "10.0.0.0/8",
        }
    )
    assert settings.public_url == "https://gw.example.com"
    assert settings.forwarded_allow_ips == "10.0.0.0/8"
    assert settings_from_env({}).forwarded_allow_ips == "127.0.0.1"
