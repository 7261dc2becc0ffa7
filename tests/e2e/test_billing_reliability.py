"""Billing survives failures, end to end (issue 4, "Reliability tests" and "Spend limits").

A fleet of its own on loopback: a redis-server, the simulator pacing streams at 50 ms a token
(``lattice sim --token-delay-ms 50``), a scripted upstream that records what reaches it, and
three ``lattice serve`` processes sharing one spool directory: a *victim*, killed with SIGKILL
in the middle of a stream, and two survivors, one of which adopts the victim's spool file on
its next orphan scan (``billing/spool.py``: every 5 s) and bills the stream's last checkpoint
(``billing/spool_checkpoints.py``).

- A gateway killed mid-stream: the record bills at least what the client received and at most
  one more token chunk (the checkpoint written before an event that never left), status
  ``failed``, counted once by the usage ledger (``GET /v1/usage``), and the dead process's
  spend reservation is settled at that cost.
- A client that disconnects mid-stream is billed what it received, status ``cancelled``
  (tighter than ``test_upstreams.test_cancelled_stream_is_metered``, which only checks ≥ 1;
  read over a plain socket, so that what reached the client is known exactly).
- A spend limit refuses with 429 ``insufficient_quota`` through the ``openai`` SDK before any
  upstream work, and admission is atomic across two gateway processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import h11
import httpx
import openai
import pytest
import redis
import redis.asyncio as aioredis

from billing.keys import USAGE_STREAM
from billing.usage import UsageRecord, decode_record
from catalog.loader import catalog_from_dict, load_seed, merge_catalog
from daemon.sim.generation import VOCABULARY
from gateway.auth.apikeys import ApiKeyStore
from gateway.auth.principal import Scope
from gateway.catalog_store import CatalogStore
from gateway.cli.processes import Child, python_module, wait_http_ok
from gateway.dispatch.estimates import estimate_stream_units
from gateway.redis_server import RedisServer, free_port
from tests.e2e.scripted_upstream import ScriptedUpstream

T = TypeVar("T")

LONG = "lovelace:e2e-long"  # served by the paced simulator; ignore_eos makes it long
PRICED = "lovelace:e2e-priced"  # served by the scripted upstream's recording route
#: The priced offering charges only completion tokens, 5 micro-USD each. With max_tokens = 1
#: the admission estimate (billing/estimate.py) and the actual cost (the scripted upstream
#: reports 1 completion token) are both exactly 5 micro-USD: a limit of N x 5 admits N
#: requests in total, however admissions and settlements interleave.
REQUEST_MICROUSD = 5
#: The longest token the simulator sends: a word and its leading space.
MAX_TOKEN_CHARS = 1 + max(len(word) for word in VOCABULARY)
KILL_AFTER_CHUNKS = 10
#: The victim's spool file is adopted on a survivor's next orphan scan (5 s), then shipped.
ADOPT_DEADLINE_S = 15.0


@dataclass
class Fleet:
    redis_url: str
    admin_key: str
    victim: Child
    victim_url: str
    survivors: list[str]
    spool_dir: Path
    upstream: ScriptedUpstream
    log_files: list[Path] = field(default_factory=list)

    def admin(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return httpx.request(
            method,
            self.survivors[0] + path,
            json=body,
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=10,
        )

    def new_key(self, workspace: str, scopes: list[str]) -> str:
        resp = self.admin("POST", "/admin/v1/workspaces", {"name": workspace})
        assert resp.status_code == 201, resp.text
        resp = self.admin("POST", "/admin/v1/keys", {"workspace": workspace, "scopes": scopes})
        assert resp.status_code == 201, resp.text
        return str(resp.json()["key"])

    def records(self, dispatch_id: str) -> list[UsageRecord]:
        client = redis.Redis.from_url(self.redis_url)
        try:
            entries: Any = client.xrange(USAGE_STREAM)
        finally:
            client.close()
        records = [decode_record(fields[b"r"]) for _, fields in entries]
        return [r for r in records if r.dispatch_id == dispatch_id]


def _test_catalog(sim_url: str, upstream_url: str) -> dict[str, Any]:
    return {
        "models": {
            LONG: {
                "task_classes": ["chat-completion"],
                "supported_params": ["max_tokens", "stream", "stream_options", "ignore_eos"],
            },
            PRICED: {"task_classes": ["chat-completion"], "supported_params": ["max_tokens"]},
        },
        "offerings": [
            {
                "id": "e2e-long-sim",
                "model": LONG,
                "upstream": {"base_url": sim_url, "model": "llama-3.2-3b-instruct"},
                "prices": {"prompt_tokens": 50_000, "completion_tokens": 100_000},
            },
            {
                "id": "e2e-priced-record",
                "model": PRICED,
                "upstream": {"base_url": upstream_url, "model": "record"},
                "prices": {"prompt_tokens": 0, "completion_tokens": REQUEST_MICROUSD * 1_000_000},
            },
        ],
    }


async def _setup(redis_url: str, sim_url: str, upstream_url: str) -> str:
    """The seed catalog plus this module's models, written before any gateway starts so that
    none has to catch up; returns an admin key."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        patch = catalog_from_dict(_test_catalog(sim_url, upstream_url))
        await CatalogStore(client).apply(merge_catalog(load_seed(), patch))
        admin_key, _ = await ApiKeyStore(client).create_admin_key(name="e2e-billing")
        return admin_key
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    data = Path(tmp_path_factory.mktemp("billing-reliability"))
    redis_server = RedisServer(data / "redis")
    redis_server.start()
    upstream = ScriptedUpstream()
    upstream.start()
    children: list[Child] = []
    try:
        sim_port = free_port()
        sim = Child(
            "sim",
            python_module(
                "gateway.cli.main", "sim", "--port", str(sim_port), "--token-delay-ms", "50"
            ),
            quiet=True,
        )
        children.append(sim)
        sim_url = f"http://127.0.0.1:{sim_port}/v1"
        wait_http_ok(sim_url + "/models", 30, sim.proc)
        admin_key = asyncio.run(_setup(redis_server.url, sim_url, upstream.base_url))
        spool_dir = data / "spool"
        env = {
            "LATTICE_REDIS_URL": redis_server.url,
            "LATTICE_LOG_LEVEL": "info",
            "LATTICE_SPOOL_DIR": str(spool_dir),  # shared: whoever is alive adopts the dead's
        }
        urls: list[str] = []
        gateways: list[Child] = []
        log_files: list[Path] = []
        for i in range(3):  # started together, waited for together
            port = free_port()
            log_files.append(data / f"gateway-{i}.log")
            child = Child(
                "gateway",
                python_module("gateway.cli.main", "serve", "--port", str(port)),
                env=env,
                log_file=log_files[-1],
            )
            children.append(child)
            gateways.append(child)
            urls.append(f"http://127.0.0.1:{port}")
        for url, child in zip(urls, gateways, strict=True):
            wait_http_ok(url + "/readyz", 60, child.proc)
        yield Fleet(
            redis_url=redis_server.url,
            admin_key=admin_key,
            victim=gateways[0],
            victim_url=urls[0],
            survivors=urls[1:],
            spool_dir=spool_dir,
            upstream=upstream,
            log_files=log_files,
        )
    finally:
        for child in reversed(children):
            child.stop()
        upstream.stop()
        redis_server.stop()


def eventually(probe: Callable[[], T | None], deadline_s: float, what: str) -> T:
    """Poll ``probe`` until it returns something other than ``None``/``False``."""
    deadline = time.monotonic() + deadline_s
    while True:
        got = probe()
        if got is not None and got is not False:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        time.sleep(0.05)


def tokens_of(chars: int) -> int:
    """Completion tokens the gateway bills for ``chars`` characters of streamed text when the
    backend reported no usage (gateway/dispatch/estimates.py)."""
    return estimate_stream_units({"completion_tokens": 0}, {}, chars)["completion_tokens"]


def content_of(line: str) -> str | None:
    """The text of one SSE line's chunk (``None`` for anything that is not a chunk)."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    chunk = json.loads(line.removeprefix("data: "))
    text = ""
    for choice in chunk.get("choices") or ():
        text += (choice.get("delta") or {}).get("content") or ""
    return text


def long_stream(base_url: str, key: str) -> dict[str, Any]:
    return {
        "method": "POST",
        "url": base_url + "/v1/chat/completions",
        "json": {
            "model": LONG,
            "messages": [{"role": "user", "content": "tell me a long story"}],
            "stream": True,
            "max_tokens": 2000,
            "ignore_eos": True,  # the simulator's natural answer is 8-24 tokens
        },
        "headers": {"Authorization": f"Bearer {key}"},
        "timeout": 30,
    }


class SseSocket:
    """A streamed request over a plain socket, parsed with h11 (sans-I/O). Unlike an HTTP
    client library it can take in everything the kernel has received before it closes the
    connection, so "what the client received" at a disconnect is exact."""

    def __init__(self, base_url: str, request: dict[str, Any]) -> None:
        url = httpx.URL(base_url)
        assert url.port is not None
        self._sock = socket.create_connection((url.host, url.port), timeout=10)
        self._conn = h11.Connection(h11.CLIENT)
        self._sse = b""
        self.texts: list[str] = []
        body = json.dumps(request["json"]).encode()
        headers = [
            ("host", f"{url.host}:{url.port}"),
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            *request["headers"].items(),
        ]
        target = httpx.URL(request["url"]).raw_path
        self._sock.sendall(
            self._conn.send(h11.Request(method="POST", target=target, headers=headers))
            + self._conn.send(h11.Data(data=body))
            + self._conn.send(h11.EndOfMessage())
        )
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                self._conn.receive_data(self._sock.recv(65536))
            elif isinstance(event, h11.Response):
                self.status = event.status_code
                self.headers = {k.decode(): v.decode() for k, v in event.headers}
                return

    def _take(self, data: bytes) -> None:
        """Feed received bytes; collect the text of every complete SSE event."""
        self._conn.receive_data(data)
        while isinstance(event := self._conn.next_event(), h11.Data):
            self._sse += event.data
            *complete, self._sse = self._sse.split(b"\n\n")
            for raw in complete:
                text = content_of(raw.decode())
                if text:
                    self.texts.append(text)

    def read_texts(self, count: int) -> None:
        """Block until ``count`` non-empty text chunks arrived."""
        while len(self.texts) < count:
            data = self._sock.recv(65536)
            assert data, "the stream ended early"
            self._take(data)

    def drain_and_close(self) -> None:
        """Take in what the kernel already holds, then close the connection at once."""
        self._sock.setblocking(False)
        try:
            while data := self._sock.recv(65536):
                self._take(data)
        except BlockingIOError:
            pass
        finally:
            self._sock.close()


def usage_rows(base_url: str, key: str) -> list[dict[str, Any]]:
    resp = httpx.get(base_url + "/v1/usage", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert resp.status_code == 200, resp.text
    rows: list[dict[str, Any]] = resp.json()["data"]
    return rows


def spend_of(base_url: str, key: str) -> dict[str, Any]:
    resp = httpx.get(
        base_url + "/v1/usage/spend", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def assert_billed_as_received(record: UsageRecord, received_chars: int) -> None:
    """Every delivered character is billed, and at most one more token chunk."""
    billed = record.units["completion_tokens"]
    assert record.units_estimated  # the simulator reports usage only at the end
    assert tokens_of(received_chars) <= billed <= tokens_of(received_chars + MAX_TOKEN_CHARS), (
        billed,
        received_chars,
    )


def test_gateway_killed_mid_stream_bills_what_was_delivered(fleet: Fleet) -> None:
    key = fleet.new_key("kill-ws", [Scope.INFERENCE, Scope.USAGE_READ])
    # A (generous) limit, so that the victim holds a spend reservation when it dies.
    limit = {"monthly_limit_microusd": 1_000_000}
    resp = fleet.admin("PUT", "/admin/v1/workspaces/kill-ws/spend-limit", limit)
    assert resp.status_code == 200, resp.text
    received: list[str] = []
    with httpx.Client() as client, client.stream(**long_stream(fleet.victim_url, key)) as resp:
        assert resp.status_code == 200, resp.read()
        dispatch_id = resp.headers["x-lattice-dispatch-id"]
        lines = resp.iter_lines()
        try:
            for line in lines:
                text = content_of(line)
                if text:
                    received.append(text)
                if len(received) == KILL_AFTER_CHUNKS and fleet.victim.alive():
                    assert spend_of(fleet.survivors[0], key)["reserved_picousd"] > 0
                    os.kill(fleet.victim.pid, signal.SIGKILL)
                    fleet.victim.proc.wait(10)
                # and read on: what the victim wrote before it died still arrives
        except (httpx.RemoteProtocolError, httpx.ReadError):
            pass  # the connection ended without the chunked terminator
    assert not fleet.victim.alive()
    assert len(received) >= KILL_AFTER_CHUNKS
    received_chars = sum(len(t) for t in received)

    records = eventually(
        lambda: fleet.records(dispatch_id) or None, ADOPT_DEADLINE_S, "the adopted record"
    )
    assert len(records) == 1
    record = records[0]
    assert record.status == "failed"
    assert record.workspace == "kill-ws" and record.model == LONG
    assert_billed_as_received(record, received_chars)
    assert record.cost_picousd > 0

    # The victim's file is gone once adopted and shipped (no second adoption later).
    pattern = f"usage-{fleet.victim.pid}-*.spool"
    eventually(lambda: not list(fleet.spool_dir.glob(pattern)), 10, "the victim's spool gone")

    # The usage ledger (in the survivors) counts the dispatch once.
    def counted() -> list[dict[str, Any]] | None:
        rows = usage_rows(fleet.survivors[1], key)
        return rows if sum(r["requests"] for r in rows) else None

    rows = eventually(counted, 10, "the usage ledger to count the dispatch")
    assert sum(r["requests"] for r in rows) == 1
    assert (
        sum(r["units"].get("completion_tokens", 0) for r in rows)
        == (record.units["completion_tokens"])
    )
    assert sum(r["cost_picousd"] for r in rows) == record.cost_picousd
    assert len(fleet.records(dispatch_id)) == 1

    # The dead process's reservation is gone and the month holds the billed cost.
    state = spend_of(fleet.survivors[0], key)
    assert state["reserved_picousd"] == 0
    assert state["spent_picousd"] == record.cost_picousd


def test_client_disconnect_mid_stream_bills_what_was_received(fleet: Fleet) -> None:
    key = fleet.new_key("cancel-ws", [Scope.INFERENCE, Scope.USAGE_READ])
    client = SseSocket(fleet.survivors[0], long_stream(fleet.survivors[0], key))
    try:
        assert client.status == 200
        dispatch_id = client.headers["x-lattice-dispatch-id"]
        client.read_texts(5)
    finally:
        client.drain_and_close()
    records = eventually(lambda: fleet.records(dispatch_id) or None, 5, "the record")
    assert len(records) == 1
    assert records[0].status == "cancelled"
    assert_billed_as_received(records[0], sum(len(t) for t in client.texts))


def quota_code(call: Callable[[], object]) -> str | None:
    """Run ``call``; ``None`` if it succeeded, else the 429's error code."""
    try:
        call()
    except openai.RateLimitError as exc:
        assert exc.status_code == 429
        return str(exc.code)
    return None


def test_spend_limit_refuses_before_upstream_work(fleet: Fleet) -> None:
    key = fleet.new_key("broke-ws", [Scope.INFERENCE])
    resp = fleet.admin(
        "PUT", "/admin/v1/workspaces/broke-ws/spend-limit", {"monthly_limit_microusd": 1}
    )
    assert resp.status_code == 200, resp.text
    before = len(fleet.upstream.received)
    messages: Any = [{"role": "user", "content": "hi"}]
    for url in fleet.survivors:
        with openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as client:

            def plain() -> object:
                return client.chat.completions.create(model=PRICED, messages=messages, max_tokens=1)

            def streamed() -> object:
                return client.chat.completions.create(
                    model=PRICED, messages=messages, max_tokens=1, stream=True
                )

            assert quota_code(plain) == "insufficient_quota", url
            assert quota_code(streamed) == "insufficient_quota", url
    assert len(fleet.upstream.received) == before  # no upstream work was done


def test_spend_limit_is_atomic_across_gateway_processes(fleet: Fleet) -> None:
    admitted, attempts = 3, 12
    key = fleet.new_key("limit-ws", [Scope.INFERENCE, Scope.USAGE_READ])
    resp = fleet.admin(
        "PUT",
        "/admin/v1/workspaces/limit-ws/spend-limit",
        {"monthly_limit_microusd": admitted * REQUEST_MICROUSD},
    )
    assert resp.status_code == 200, resp.text
    before = len(fleet.upstream.received)
    clients = [
        openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=20)
        for url in fleet.survivors
    ]
    start = threading.Barrier(attempts)

    def one(i: int) -> str | None:
        client = clients[i % len(clients)]  # half the requests at each process
        start.wait(10)
        return quota_code(
            lambda: client.chat.completions.create(
                model=PRICED, messages=[{"role": "user", "content": f"r{i}"}], max_tokens=1
            )
        )

    try:
        with ThreadPoolExecutor(attempts) as pool:
            outcomes = list(pool.map(one, range(attempts)))
    finally:
        for client in clients:
            client.close()
    assert outcomes.count(None) == admitted, outcomes
    assert outcomes.count("insufficient_quota") == attempts - admitted, outcomes
    assert len(fleet.upstream.received) - before == admitted  # refused ones never went out

    # Settled at the actual cost, which equals the estimate: the month is exactly full.
    state = eventually(
        lambda: (s := spend_of(fleet.survivors[0], key))["reserved_picousd"] == 0 and s,
        10,
        "the reservations to settle",
    )
    assert state["spent_microusd"] == admitted * REQUEST_MICROUSD
