"""A finished SSE stream gives its upstream connection back to the pool: sequential streams
ride one keep-alive connection instead of paying a TCP handshake each."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import msgspec
import pytest

from catalog.model import Upstream
from daemon.sim.app import SimConfig
from daemon.sim.server import SimThread
from gateway.dispatch.upstream import UpstreamClient


@pytest.fixture(scope="module")
def sim() -> Iterator[SimThread]:
    thread = SimThread(SimConfig(token_delay_ms=2)).start()
    yield thread
    thread.stop()


async def test_streams_reuse_one_connection(sim: SimThread) -> None:
    client = UpstreamClient()
    upstream = Upstream(base_url=sim.base_url)
    body = msgspec.json.encode(
        {
            "model": "llama-3.2-3b-instruct",
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "max_tokens": 4,
        }
    )
    url = urlsplit(sim.base_url)
    try:
        for _ in range(5):
            payloads = [p async for p in client.stream(upstream, "/chat/completions", body)]
            assert payloads and payloads[-1] != b"[DONE]"
            http = client._client()
            assert http.idle_count("http", url.hostname or "", url.port or 80) == 1
    finally:
        await client.close()
