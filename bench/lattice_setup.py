"""Stand up Lattice for ``bench/gateway_bench.py``: a Redis, a catalog, an API key, gateways.

The bench drives it like this (every process it starts is stopped by :meth:`stop`, which the
bench calls from its ``finally`` even when a step below raised)::

    setup = LatticeSetup(work_dir, spawn=procs.spawn)
    try:
        setup.prepare(routes)                         # Redis + catalog offerings + API key
        url_1w = setup.start_gateway(port1, workers=1)  # -> "http://127.0.0.1:<port1>/v1"
        url_2w = setup.start_gateway(port2, workers=2)
        ... requests carry "Authorization: Bearer <setup.api_key>" ...
    finally:
        setup.stop()

``routes`` are the model names the bench sends, each served by one hosted offering whose
OpenAI-compatible upstream is the mock (``daemon.sim.server``): the non-streaming route points
at the fast mock (no token delay), the streaming route at the mock with a per-token delay.
Both gateways share the one Redis, catalog and key.

The offering is a hosted one with auth and usage metering on, as in production.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis

from catalog.loader import load_seed, merge_catalog
from catalog.model import Catalog, ModelEntry, Offering, Upstream
from gateway.auth.apikeys import ApiKeyStore
from gateway.auth.workspaces import WorkspaceStore
from gateway.catalog_store import CatalogStore
from gateway.redis_server import RedisServer

__all__ = ["LatticeSetup", "Route"]

#: spawn(name, argv, env=...) -> Popen; the bench's process registry (own process group each,
#: output to a log file, stopped at the end).
Spawn = Callable[..., "subprocess.Popen[bytes]"]


@dataclass(frozen=True)
class Route:
    """A model name clients send, and the upstream that serves it."""

    model: str  #: the model name in the client's request
    upstream_base_url: str  #: e.g. "http://127.0.0.1:18001/v1" (the mock)
    upstream_model: str  #: the model name to send upstream (the mock's ``--model``)


class LatticeSetup:
    def __init__(self, work_dir: Path, *, spawn: Spawn) -> None:
        self.work_dir = Path(work_dir)
        self.spawn = spawn
        self.redis: RedisServer | None = None
        self.api_key: str | None = None
        self._gateways: list[subprocess.Popen[bytes]] = []

    # -- the whole preparation ---------------------------------------------------------------
    def prepare(self, routes: Sequence[Route]) -> None:
        self.start_redis()
        self.seed_catalog(routes)
        self.api_key = self.create_api_key()

    def start_redis(self) -> RedisServer:
        # AOF on (fsync every second), as `lattice up` and production run it: the usage
        # records the gateway writes per request are part of what is measured.
        self.redis = RedisServer(self.work_dir / "redis", appendonly=True)
        self.redis.start()
        return self.redis

    @property
    def env(self) -> Mapping[str, str]:
        if self.redis is None:
            raise RuntimeError("start_redis() first")
        return {**os.environ, "LATTICE_REDIS_URL": self.redis.url}

    def seed_catalog(self, routes: Sequence[Route]) -> None:
        """Write a catalog with one hosted ``openai``-kind offering per route (metered from
        ``usage``, priced) into the Redis at ``self.redis.url``."""
        asyncio.run(self._seed_catalog(routes))

    async def _seed_catalog(self, routes: Sequence[Route]) -> None:
        assert self.redis is not None
        client = aioredis.Redis.from_url(self.redis.url)
        try:
            base = load_seed()
            models: dict[str, ModelEntry] = {}
            aliases: dict[str, str] = {}
            offerings = []
            for i, route in enumerate(routes):
                # the name clients send is an operator alias of a canonical bench model
                canonical = f"lovelace:bench-{i}"
                aliases[route.model] = canonical
                models[canonical] = ModelEntry(
                    id=canonical, task_classes=("chat-completion", "text-completion")
                )
                offerings.append(
                    Offering(
                        id=f"bench-{i}",
                        model=canonical,
                        upstream=Upstream(
                            base_url=route.upstream_base_url, model=route.upstream_model
                        ),
                        prices={"prompt_tokens": 50_000, "completion_tokens": 100_000},
                    )
                )
            patch = Catalog(models=models, offerings=tuple(offerings), aliases=aliases)
            await CatalogStore(client).apply(merge_catalog(base, patch))
        finally:
            await client.aclose()

    def create_api_key(self) -> str:
        """Create a workspace and an API key for it; return the key."""
        return asyncio.run(self._create_api_key())

    async def _create_api_key(self) -> str:
        assert self.redis is not None
        client = aioredis.Redis.from_url(self.redis.url)
        try:
            await WorkspaceStore(client).create("bench")
            key, _ = await ApiKeyStore(client).create("bench", name="bench")
            return key
        finally:
            await client.aclose()

    # -- gateways ----------------------------------------------------------------------------
    def lattice_argv(self) -> list[str]:
        exe = Path(sys.executable).with_name("lattice")
        if exe.exists():
            return [str(exe)]
        found = shutil.which("lattice")
        if found:
            return [found]
        return [sys.executable, "-c", "from gateway.cli.main import main; main()"]

    def start_gateway(
        self,
        port: int,
        *,
        workers: int = 1,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """Start ``lattice serve --port P --workers N`` (registered as ``name``, default
        ``lattice-<N>w``, with ``env`` added to its environment); return its OpenAI base URL.
        The bench waits for it to answer a chat completion before measuring."""
        argv = [
            *self.lattice_argv(),
            "serve",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
        proc = self.spawn(name or f"lattice-{workers}w", argv, env={**self.env, **(env or {})})
        self._gateways.append(proc)
        return f"http://127.0.0.1:{port}/v1"

    def stop(self) -> None:
        """Stop the gateways (the bench's registry stops them too; this is for use without
        it), then the Redis. Safe to call twice and after a failed :meth:`prepare`."""
        gateways, self._gateways = self._gateways, []
        for proc in gateways:
            if proc.poll() is None:
                proc.terminate()
        for proc in gateways:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
