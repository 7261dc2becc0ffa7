"""The end-to-end stack: a real redis-server, the simulator, a scripted misbehaving upstream
and two gateway processes (``lattice serve``) sharing the Redis, all on loopback. Tests
drive it with the official ``openai`` SDK.

Personal runtimes (issue 3):

- ``fast_stack`` (module-scoped): two more gateway processes on the same Redis with short
  tunnel heartbeats and a short runtime deadline (:data:`FAST_TUNNEL_ENV`), for the failure
  tests, so the shared ``stack`` keeps the default settings;
- ``runtimes`` (session-scoped factory): :meth:`RuntimeFactory.pair` creates a runtime with a
  key holding the manage scope and pairs it with the real ``lattice daemon pair --token`` into
  a temporary config directory; :meth:`PairedRuntime.start` runs ``lattice daemon run`` as a
  :class:`~gateway.cli.processes.Child` against chosen gateways; ``stop`` (SIGTERM, drains)
  and ``kill`` (SIGKILL) end it. Every daemon still running is stopped at the session's end.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey
from redis import Redis as SyncRedis

from billing.keys import USAGE_STREAM
from billing.usage import UsageRecord, decode_record
from gateway import keys
from gateway.auth.principal import Scope
from gateway.cli.processes import Child, python_module, wait_http_ok
from gateway.cli.up import bootstrap
from gateway.redis_server import RedisServer, free_port
from tests.e2e.scripted_upstream import ScriptedUpstream

ISSUER = "https://issuer.test"
AUDIENCE = "lattice-gateway"
#: A key that may run tasks and manage personal runtimes.
MANAGE_SCOPES = [Scope.INFERENCE, Scope.RUNTIME_MANAGE]
PERSONAL_PREFIX = "lattice:personal:"
#: The failure tests' gateways: a dead tunnel is noticed within ~2.5 s, a dispatch to a
#: personal runtime gives up after 3 s (504 personal_lattice_execution_timeout).
FAST_TUNNEL_ENV = {
    "LATTICE_TUNNEL_HEARTBEAT_S": "0.5",
    "LATTICE_TUNNEL_DEAD_AFTER_S": "2",
    "LATTICE_RUNTIME_TIMEOUT_S": "3",
}


def wait_for(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); fail after
    ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def start_gateway(port: int, env: dict[str, str], log_file: Path) -> Child:
    return Child(
        "gateway",
        python_module("gateway.cli.main", "serve", "--port", str(port)),
        env=env,
        log_file=log_file,
    )


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
    #: The environment the gateways were started with, and their processes (by index).
    gateway_env: dict[str, str] = field(default_factory=dict)
    gateway_children: list[Child] = field(default_factory=list)

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

    def call(
        self, method: str, path: str, key: str, body: Any = None, gateway: int = 0
    ) -> httpx.Response:
        """``path`` on gateway ``gateway`` with ``key`` as the bearer token."""
        return httpx.request(
            method,
            self.gateways[gateway] + path,
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )

    def sync_redis(self) -> SyncRedis:
        """A synchronous client of the stack's Redis (the caller closes it)."""
        return SyncRedis.from_url(self.redis_url)

    def usage_records(self, dispatch_id: str, deadline_s: float = 5.0) -> list[UsageRecord]:
        """The usage stream's records of one dispatch, polled (the spool ships them within
        milliseconds)."""
        client = self.sync_redis()
        try:

            def found() -> list[UsageRecord]:
                entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(USAGE_STREAM)  # type: ignore[assignment]
                return [
                    record
                    for _, fields in entries
                    if (record := decode_record(fields[b"r"])).dispatch_id == dispatch_id
                ]

            return list(wait_for(found, deadline_s, f"the usage record of {dispatch_id}"))
        finally:
            client.close()

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
        gateway_children = []
        for i in range(2):
            port = free_port()
            log_files.append(data / f"gateway-{i}.log")
            # the first gateway serves the dispatch routes through the front door (the
            # default); the second through plain uvicorn and ASGI, so both paths are tested
            child_env = env if i == 0 else {**env, "LATTICE_HTTP": "httptools"}
            child = start_gateway(port, child_env, log_files[-1])
            children.append(child)
            gateway_children.append(child)
            gateways.append(f"http://127.0.0.1:{port}")
        for url, child in zip(gateways, gateway_children, strict=True):
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
            gateway_env=env,
            gateway_children=gateway_children,
        )
    finally:
        for child in reversed(children):
            child.stop()
        upstream.stop()
        redis.stop()


@pytest.fixture(scope="module")
def fast_stack(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Two more gateway processes on the stack's Redis (same credentials, catalog and
    simulator) with :data:`FAST_TUNNEL_ENV`: for the failure tests of personal runtimes."""
    data = Path(tmp_path_factory.mktemp("fast"))
    env = {**stack.gateway_env, **FAST_TUNNEL_ENV}
    gateways: list[str] = []
    children: list[Child] = []
    log_files: list[Path] = []
    try:
        for i in range(2):
            port = free_port()
            log_files.append(data / f"fast-gateway-{i}.log")
            children.append(start_gateway(port, env, log_files[-1]))
            gateways.append(f"http://127.0.0.1:{port}")
        for url, child in zip(gateways, children, strict=True):
            wait_http_ok(url + "/readyz", 60, child.proc)
        fast = Stack(
            redis_url=stack.redis_url,
            sim_url=stack.sim_url,
            gateways=gateways,
            api_key=stack.api_key,
            admin_key=stack.admin_key,
            upstream=stack.upstream,
            signing_key=stack.signing_key,
            children=children,
            log_files=log_files,
            gateway_env=env,
            gateway_children=list(children),
        )
        yield fast
    finally:
        for child in reversed(children):
            child.stop()


@dataclass
class PairedRuntime:
    """A personal runtime paired into its own config directory, and its daemon process."""

    stack: Stack
    workspace: str
    key: str
    id: str
    config_dir: Path
    log_dir: Path
    daemon: Child | None = None
    runs: int = 0

    @property
    def model(self) -> str:
        """``lattice:personal:lat_…``"""
        return PERSONAL_PREFIX + self.id

    @property
    def log_file(self) -> Path:
        """The current (last started) daemon's output."""
        return self.log_dir / f"daemon-{self.runs}.log"

    def client(self, gateway: int = 0, **kwargs: Any) -> openai.OpenAI:
        """The official SDK on gateway ``gateway`` with this runtime's workspace key."""
        kwargs.setdefault("base_url", self.stack.gateways[gateway] + "/v1")
        kwargs.setdefault("api_key", self.key)
        return self.stack.client(**kwargs)

    def async_client(self, gateway: int = 0, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("base_url", self.stack.gateways[gateway] + "/v1")
        kwargs.setdefault("api_key", self.key)
        return self.stack.async_client(**kwargs)

    def api(self, method: str = "GET", gateway: int = 0) -> httpx.Response:
        """``/v1/personal-runtimes/<id>`` with the workspace key."""
        return self.stack.call(method, f"/v1/personal-runtimes/{self.id}", self.key, None, gateway)

    def status(self, gateway: int = 0) -> str:
        resp = self.api("GET", gateway)
        assert resp.status_code == 200, resp.text
        return str(resp.json()["status"])

    def wait_status(self, status: str, timeout: float = 15.0) -> None:
        wait_for(lambda: self.status() == status, timeout, f"{self.id} to be {status}")

    def holder(self) -> str | None:
        """The gateway process id holding the tunnel now (its presence key), if any."""
        client = self.stack.sync_redis()
        try:
            value = client.get(keys.runtime_holder(self.id))
        finally:
            client.close()
        return value.decode() if isinstance(value, bytes) else None

    def start(
        self, gateways: Sequence[str], *args: str, wait: bool = True, timeout: float = 30.0
    ) -> Child:
        """Run ``lattice daemon run --gateway …`` (``args`` are more flags, e.g. the backend);
        with ``wait``, return once the runtime is reachable through ``gateways``."""
        if self.daemon is not None and self.daemon.alive():
            raise AssertionError("a daemon of this runtime is already running")
        argv = ["daemon", "run", "--log-level", "info"]
        for url in gateways:
            argv += ["--gateway", url]
        argv += args or ["--backend", "sim"]
        self.runs += 1
        env = {"LATTICE_CONFIG_DIR": str(self.config_dir)}
        self.daemon = Child(
            "daemon", python_module("gateway.cli.main", *argv), env=env, log_file=self.log_file
        )
        if wait:
            self.wait_reachable(timeout)
        return self.daemon

    def wait_reachable(self, timeout: float = 30.0) -> None:
        daemon = self.daemon

        def up() -> bool:
            if daemon is not None and not daemon.alive():
                raise AssertionError(f"the daemon exited: {self.log_file.read_text()}")
            return self.status() == "reachable"

        wait_for(up, timeout, f"{self.id} to be reachable", interval=0.05)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (the daemon drains and exits); its exit code (-9: it had to be killed
        after ``timeout`` seconds)."""
        if self.daemon is None:
            return None
        self.daemon.stop(timeout)
        return self.daemon.proc.returncode

    def kill(self) -> None:
        """SIGKILL the daemon (``kill -9``): no Close frame, the OS closes its socket."""
        assert self.daemon is not None
        self.daemon.proc.send_signal(signal.SIGKILL)
        self.daemon.proc.wait(10)
        self.daemon.stop()

    def wait_exit(self, timeout: float) -> int:
        """The daemon's exit code, once it exited on its own within ``timeout`` seconds."""
        assert self.daemon is not None
        code = self.daemon.proc.wait(timeout)
        self.daemon.stop()
        return code

    def output(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""


class RuntimeFactory:
    """Pairs runtimes (see the module docstring) and stops their daemons at the end."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._paired: list[PairedRuntime] = []

    def pair(
        self, stack: Stack, *, workspace: str | None = None, name: str = "e2e", gateway: int = 1
    ) -> PairedRuntime:
        """A new runtime in ``workspace`` (a fresh one by default) with a new key holding
        :data:`MANAGE_SCOPES`, paired by ``lattice daemon pair --token`` through gateway
        ``gateway``."""
        workspace = workspace or "rt-" + secrets.token_hex(4)
        key = stack.new_key(workspace, scopes=MANAGE_SCOPES)
        created = stack.call("POST", "/v1/personal-runtimes", key, {"name": name})
        assert created.status_code == 201, created.text
        runtime_id = str(created.json()["id"])
        directory = self._root / runtime_id
        config = directory / "config"
        argv = python_module(
            "gateway.cli.main",
            "daemon",
            "pair",
            "--gateway",
            stack.gateways[gateway],
            "--token",
            created.json()["bootstrap_token"],
        )
        env = {**os.environ, "LATTICE_CONFIG_DIR": str(config)}
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        runtime = PairedRuntime(stack, workspace, key, runtime_id, config, directory)
        self._paired.append(runtime)
        return runtime

    def close(self) -> None:
        for runtime in self._paired:
            if runtime.daemon is not None:
                runtime.daemon.stop(5.0)


@pytest.fixture(scope="session")
def runtimes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeFactory]:
    factory = RuntimeFactory(Path(tmp_path_factory.mktemp("runtimes")))
    try:
        yield factory
    finally:
        factory.close()
