"""The personal-runtime routes on a real loopback HTTP server (uvicorn on a thread), with a
clock the tests move: pairing's device-code expiry and slow_down, and bootstrap expiry, all
read it, so the daemon's injected ``sleep`` can advance it instead of sleeping."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import uvicorn
from litestar import Litestar

from gateway.http import exception_to_response
from gateway.runtime import Gateway
from gateway.runtimes.approvals import ApprovalLimits, DeviceApprovals
from gateway.runtimes.device_grants import DeviceGrantStore
from gateway.runtimes.pairing import DevicePairing, PairingConfig
from gateway.runtimes.ratelimit import FixedWindow
from gateway.runtimes.routes import runtime_routes
from gateway.runtimes.store import RuntimeStore
from gateway.settings import Settings


class Clock:
    """Unix milliseconds, ``offset_ms`` ahead of the real clock."""

    def __init__(self) -> None:
        self.offset_ms = 0
        self._lock = threading.Lock()

    def __call__(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.offset_ms += int(seconds * 1000)


class RuntimesServer:
    def __init__(
        self,
        redis_url: str,
        port: int,
        *,
        public_url: str = "",
        forwarded_allow_ips: str = "127.0.0.1",
    ) -> None:
        self.clock = Clock()
        self.gateway = Gateway(
            Settings(
                redis_url=redis_url,
                metering=False,
                seed_catalog=False,
                log_json=False,
                public_url=public_url,
            )
        )
        redis = self.gateway.redis
        self.gateway.runtimes = RuntimeStore(redis, clock=self.clock)
        grants = DeviceGrantStore(redis)
        self.pairing = DevicePairing(
            self.gateway.runtimes, grants, PairingConfig(interval_s=5), clock=self.clock
        )
        self.approvals = DeviceApprovals(
            self.gateway.runtimes, grants, FixedWindow(redis), ApprovalLimits(), clock=self.clock
        )
        app = Litestar(
            route_handlers=runtime_routes(
                self.gateway, pairing=self.pairing, approvals=self.approvals
            ),
            exception_handlers={Exception: exception_to_response},
            openapi_config=None,
            logging_config=None,
        )
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            lifespan="off",
            log_level="warning",
            loop="asyncio",
            proxy_headers=True,  # as `lattice serve` runs it
            forwarded_allow_ips=forwarded_allow_ips,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="runtimes-http", daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def _run(self) -> None:
        async def serve() -> None:
            try:
                await self._server.serve()
            finally:
                await self.gateway.redis.aclose()

        asyncio.run(serve())

    def start(self) -> RuntimesServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("runtimes server did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def __enter__(self) -> RuntimesServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
