"""Redis goes away under a running gateway: callers get a structured, retryable 503 at once
(never a 500, never a hang), /readyz says not ready, and service resumes when Redis is back
with its data (AOF)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx

from gateway.cli.processes import Child, python_module, wait_http_ok
from gateway.cli.up import bootstrap
from gateway.redis_server import RedisServer, free_port
from tests.e2e.test_errors import assert_envelope


def test_gateway_survives_a_redis_outage(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    sim_port = free_port()
    sim = Child(
        "sim", python_module("gateway.cli.main", "sim", "--port", str(sim_port)), quiet=True
    )
    gateway = None
    try:
        sim_url = f"http://127.0.0.1:{sim_port}/v1"
        wait_http_ok(sim_url + "/models", 30, sim.proc)
        creds = asyncio.run(bootstrap(redis.url, tmp_path, sim_url=sim_url, upstream=None))
        port = free_port()
        gateway = Child(
            "gateway",
            python_module("gateway.cli.main", "serve", "--port", str(port)),
            env={
                "LATTICE_REDIS_URL": redis.url,
                "LATTICE_LOG_LEVEL": "error",
                "LATTICE_SPOOL_DIR": str(tmp_path / "spool"),
            },
        )
        base = f"http://127.0.0.1:{port}"
        wait_http_ok(base + "/readyz", 60, gateway.proc)
        headers = {"Authorization": f"Bearer {creds['api_key']}"}
        body = {"messages": [{"role": "user", "content": "x"}]}
        assert (
            httpx.post(base + "/v1/chat/completions", json=body, headers=headers).status_code == 200
        )

        redis.stop()  # Redis goes away
        time.sleep(0.6)  # past the credential cache
        started = time.monotonic()
        resp = httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=15)
        assert time.monotonic() - started < 6
        assert_envelope(resp, 503, "state_unavailable")
        assert resp.headers["retry-after"]
        assert httpx.get(base + "/readyz", timeout=15).status_code == 503

        again = RedisServer(tmp_path / "redis", port=redis.port)
        again.start()
        try:
            deadline = time.monotonic() + 10
            while True:
                resp = httpx.post(
                    base + "/v1/chat/completions", json=body, headers=headers, timeout=15
                )
                if resp.status_code == 200:
                    break
                assert time.monotonic() < deadline, resp.text
                time.sleep(0.2)
            assert httpx.get(base + "/readyz").status_code == 200
        finally:
            again.stop()
    finally:
        if gateway is not None:
            gateway.stop()
        sim.stop()
        redis.stop()


def test_gateway_stops_cleanly_when_redis_is_already_gone(tmp_path: Path) -> None:
    """SIGTERM after Redis went away: every part still stops, the process exits at once
    and logs warnings, not a failed shutdown."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    port = free_port()
    log_file = tmp_path / "gateway.log"
    gateway = Child(
        "gateway",
        python_module("gateway.cli.main", "serve", "--port", str(port)),
        env={
            "LATTICE_REDIS_URL": redis.url,
            "LATTICE_LOG_LEVEL": "warning",
            "LATTICE_SPOOL_DIR": str(tmp_path / "spool"),
        },
        log_file=log_file,
    )
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/readyz", 60, gateway.proc)
        redis.stop()
        started = time.monotonic()
        gateway.proc.send_signal(signal.SIGTERM)
        # uvicorn ends by re-raising the signal it handled: killed by SIGTERM, after cleanup
        assert gateway.proc.wait(15) in (0, -signal.SIGTERM)
        assert time.monotonic() - started < 10
    finally:
        gateway.stop()
        redis.stop()
    text = log_file.read_text()
    assert "Application shutdown failed" not in text
    assert "part stopped without Redis" in text
