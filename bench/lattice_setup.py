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

What is left to the lead (marked ``NotImplementedError("lead wires this")``): writing the
catalog into Redis and minting an API key, i.e. the parts that need the gateway's code. The
offering must be a hosted one with auth and usage metering on, as in production.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

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
        # No AOF: the bench's Redis is throw-away, and fsync noise would only blur the figures.
        self.redis = RedisServer(self.work_dir / "redis", appendonly=False)
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
        raise NotImplementedError("lead wires this")

    def create_api_key(self) -> str:
        """Create a consumer account with credit and an API key for it; return the key."""
        raise NotImplementedError("lead wires this")

    # -- gateways ----------------------------------------------------------------------------
    def lattice_argv(self) -> list[str]:
        exe = Path(sys.executable).with_name("lattice")
        if exe.exists():
            return [str(exe)]
        found = shutil.which("lattice")
        if found:
            return [found]
        return [sys.executable, "-c", "from gateway.cli.main import main; main()"]

    def start_gateway(self, port: int, *, workers: int = 1) -> str:
        """Start ``lattice serve --port P --workers N``; return its OpenAI base URL. The bench
        waits for it to answer a chat completion before measuring."""
        argv = [
            *self.lattice_argv(),
            "serve",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
        proc = self.spawn(f"lattice-{workers}w", argv, env=dict(self.env))
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
