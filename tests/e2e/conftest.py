"""The end-to-end stack: a real redis-server, the simulator, a scripted misbehaving upstream
and two gateway processes (``lattice serve``) sharing the Redis, all on loopback. Tests
drive it with the official ``openai`` SDK.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey

from gateway.cli.processes import Child, python_module, wait_http_ok
from gateway.cli.up import bootstrap
from gateway.redis_server import RedisServer, free_port
from tests.e2e.scripted_upstream import ScriptedUpstream

ISSUER = "https://issuer.test"
AUDIENCE = "lattice-gateway"


@dataclass
class Stack:
    redis_url: str
    sim_url: str
    gateways: list[str]
    api_key: str
    admin_key: str
    upstream: ScriptedUpstream
    signing_key: ECKey
    children: list[Child] = field(default_factory=list)
    log_files: list[Path] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return self.gateways[0] + "/v1"

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("base_url", self.base_url)
        kwargs.setdefault("api_key", self.api_key)
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(**kwargs)

    def async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("base_url", self.base_url)
        kwargs.setdefault("api_key", self.api_key)
        kwargs.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(**kwargs)

    def admin(self, method: str, path: str, body: Any = None, gateway: int = 0) -> httpx.Response:
        return httpx.request(
            method,
            self.gateways[gateway] + path,
            json=body,
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=10,
        )

    def apply_catalog(self, document: dict[str, Any]) -> int:
        resp = self.admin("POST", "/admin/v1/catalog", {"catalog": document})
        assert resp.status_code == 200, resp.text
        return int(resp.json()["version"])

    def new_key(self, workspace: str = "dev", scopes: list[str] | None = None) -> str:
        self.admin("POST", "/admin/v1/workspaces", {"name": workspace})
        body: dict[str, Any] = {"workspace": workspace}
        if scopes is not None:
            body["scopes"] = scopes
        resp = self.admin("POST", "/admin/v1/keys", body)
        assert resp.status_code == 201, resp.text
        return str(resp.json()["key"])

    def mint(self, **claims: Any) -> str:
        now = int(time.time())
        base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "iat": now, "exp": now + 300}
        base.update(claims)
        header = {"alg": "ES256", "kid": self.signing_key.kid}
        return jwt.encode(
            header, {k: v for k, v in base.items() if v is not None}, self.signing_key
        )


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data = Path(tmp_path_factory.mktemp("stack"))
    redis = RedisServer(data / "redis")
    redis.start()
    upstream = ScriptedUpstream()
    upstream.start()
    key = ECKey.generate_key("P-256", auto_kid=True)
    upstream.jwks = {"keys": [key.as_dict(private=False)]}
    children: list[Child] = []
    try:
        sim_port = free_port()
        sim = Child("sim", python_module("gateway.cli.main", "sim", "--port", str(sim_port)))
        children.append(sim)
        sim_url = f"http://127.0.0.1:{sim_port}/v1"
        wait_http_ok(sim_url + "/models", 30, sim.proc)
        creds = asyncio.run(bootstrap(redis.url, data, sim_url=sim_url, upstream=None))
        issuers = [
            {
                "issuer": ISSUER,
                "jwks_url": f"http://127.0.0.1:{upstream.port}/jwks.json",
                "audience": AUDIENCE,
                "min_refetch_interval_s": 1.0,
            }
        ]
        env = {
            "LATTICE_REDIS_URL": redis.url,
            "LATTICE_JWT_ISSUERS": json.dumps(issuers),
            "LATTICE_MAX_BODY_BYTES": str(256 * 1024),
            "LATTICE_LOG_LEVEL": "info",
            "LATTICE_SPOOL_DIR": str(data / "spool"),  # shared: each gateway owns its own file
        }
        gateways = []
        log_files = []
        for i in range(2):
            port = free_port()
            log_files.append(data / f"gateway-{i}.log")
            child = Child(
                "gateway",
                python_module("gateway.cli.main", "serve", "--port", str(port)),
                env=env,
                log_file=log_files[-1],
            )
            children.append(child)
            gateways.append(f"http://127.0.0.1:{port}")
        for url, child in zip(gateways, children[1:], strict=True):
            wait_http_ok(url + "/readyz", 60, child.proc)
        yield Stack(
            redis_url=redis.url,
            sim_url=sim_url,
            gateways=gateways,
            api_key=creds["api_key"],
            admin_key=creds["admin_key"],
            upstream=upstream,
            signing_key=key,
            children=children,
            log_files=log_files,
        )
    finally:
        for child in reversed(children):
            child.stop()
        upstream.stop()
        redis.stop()
