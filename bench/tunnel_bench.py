#!/usr/bin/env python3
"""Tunnel benchmark (issue 3, Performance): what the personal-runtime tunnel costs.

Everything runs on loopback, started by this script and stopped at the end (also on Ctrl-C):
one Redis (``gateway.redis_server.RedisServer``), two gateway processes A and B on it
(``lattice serve``), the simulator as the local backend (``python -m daemon.sim.server``: one
with no token delay, one with a small per-token delay for the stream load), and daemons
(``lattice daemon run --backend openai --backend-url <sim>``, a runtime each, paired by writing
``runtime.json`` from credentials made directly in Redis with ``RuntimeStore``).

Measurements (``--only latency,streams,idle``):

* ``latency`` - concurrency 1, one keep-alive ``http.client`` connection per target, the same
  request body everywhere (only ``model`` differs), N requests per target per round, rounds
  interleaved, medians of rounds. Targets: ``direct`` (the simulator itself), ``hosted`` (A's
  hosted offering on the same simulator: the gateway without a tunnel, for reference),
  ``tunnel-local`` (``lattice:personal:<rt>`` whose daemon holds its tunnel on A: the local
  fast path) and ``tunnel-cross`` (the daemon is on B, requests go to A: dispatch through
  Redis). Non-streaming (total time) and streaming (time to the first content token).
* ``streams`` - 256 and 512 concurrent streamed chat completions (N tokens each, simulator
  with a per-token delay) through ONE daemon's tunnel (via A: local; via B: cross-process)
  and the same load straight at the simulator; errors, tokens/s relayed, and CPU time used
  by each process per 1,000 tokens.
* ``idle`` - 5,000 runtimes and credentials made in Redis, 5,000 tunnels opened to a fresh
  gateway process C from separate client processes (a minimal client: WebSocket upgrade with
  the credential, the Hello made by ``daemon.tunnel.Connection`` in the daemon role, Pings
  answered); C's RSS (``/proc/<pid>/status`` VmRSS) before and after, presence keys counted,
  C's CPU while it holds them, a dispatch to one of them (through C and through A) and c=1
  latency with them all open.

    python bench/tunnel_bench.py --quick                     # smoke run, ~2 minutes
    python bench/tunnel_bench.py --markdown                  # full run, ~5 minutes
    python bench/tunnel_bench.py --only latency --requests 500

See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import functools
import http.client
import json
import os
import resource
import shlex
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gateway_bench import (  # noqa: E402 (after the sys.path fix above)
    BenchError,
    Procs,
    fmt,
    free_port,
    log,
    machine_info,
    med,
    pct,
    sim_argv,
    terminate_on_signals,
    wait_ready,
)

WORK = BENCH / ".work"
MODEL = "llama-3.2-3b-instruct"
WORKSPACE = "bench"
IDLE_WORKSPACE = "bench-idle"
PHASES = ("latency", "streams", "idle")
MAX_TOKENS = 16  #: output tokens of the latency requests (as gateway_bench)
TARGET_P50_MS = 2.0
TARGET_P99_MS = 10.0
TARGET_STREAMS = 256
TARGET_IDLE = 5000
#: The canned answer of the idle clients' runtimes (a valid chat completion).
IDLE_REPLY = json.dumps(
    {
        "id": "chatcmpl-idle",
        "object": "chat.completion",
        "created": 0,
        "model": "idle-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "idle tunnel ok"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
    }
).encode()


# --------------------------------------------------------------------------------------------
# Small helpers: request bodies, /proc readings, Redis calls from sync code
# --------------------------------------------------------------------------------------------
def chat_body(model: str, *, stream: bool = False, max_tokens: int = MAX_TOKENS) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello in a few words."}],
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
        # exactly max_tokens tokens from the simulator (a vLLM extension it honours)
        body["ignore_eos"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def personal(runtime_id: str) -> str:
    return f"lattice:personal:{runtime_id}"


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used (``/proc/<pid>/stat`` fields 14, 15)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def run_async(coro_fn: Callable[..., Any], *args: Any) -> Any:
    return asyncio.run(coro_fn(*args))


async def _with_redis(url: str, fn: Callable[[Any], Any]) -> Any:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        return await fn(client)
    finally:
        await client.aclose()


def make_runtimes(redis_url: str, workspace: str, names: Sequence[str]) -> list[tuple[str, str]]:
    """Create paired runtimes directly in Redis: ``[(runtime_id, credential), ...]``."""
    from gateway.runtimes.store import RuntimeStore

    async def go(client: Any) -> list[tuple[str, str]]:
        store = RuntimeStore(client)

        async def one(name: str) -> tuple[str, str]:
            _, token = await store.create(workspace, name)
            redeemed = await store.redeem_bootstrap(token)
            if redeemed is None:
                raise BenchError(f"bootstrap token of {name} not redeemable")
            return redeemed[0].id, redeemed[1]

        out: list[tuple[str, str]] = []
        for start in range(0, len(names), 64):  # within the client's connection pool
            out += await asyncio.gather(*(one(n) for n in names[start : start + 64]))
        return out

    result: list[tuple[str, str]] = run_async(_with_redis, redis_url, go)
    return result


def make_api_key(redis_url: str, workspace: str) -> str:
    from gateway.auth.apikeys import ApiKeyStore
    from gateway.auth.workspaces import WorkspaceStore

    async def go(client: Any) -> str:
        await WorkspaceStore(client).create(workspace)
        key, _ = await ApiKeyStore(client).create(workspace, name=workspace)
        return str(key)

    result: str = run_async(_with_redis, redis_url, go)
    return result


def count_holders(redis_url: str, runtime_ids: Sequence[str]) -> tuple[int, int]:
    """(how many of ``runtime_ids`` have a presence key, how many ``lat:rt:*:holder`` keys
    exist in all)."""
    from gateway import keys

    async def go(client: Any) -> tuple[int, int]:
        present = 0
        for start in range(0, len(runtime_ids), 1000):
            async with client.pipeline(transaction=False) as pipe:
                for rid in runtime_ids[start : start + 1000]:
                    pipe.exists(keys.runtime_holder(rid))
                present += sum(await pipe.execute())
        total = 0
        async for _ in client.scan_iter(match=keys.runtime_holder("*"), count=1000):
            total += 1
        return present, total

    result: tuple[int, int] = run_async(_with_redis, redis_url, go)
    return result


def raise_nofile(needed: int) -> dict[str, Any]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = hard if hard != resource.RLIM_INFINITY else max(soft, needed * 2)
    if new > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    soft_now, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft_before": soft, "hard": hard, "soft": soft_now, "enough": soft_now >= needed}


# --------------------------------------------------------------------------------------------
# The stack: Redis, catalog, key, sims, gateways, daemons
# --------------------------------------------------------------------------------------------
@dataclass
class Daemon:
    name: str
    runtime_id: str
    gateway: str  #: which gateway (A/B) holds its tunnel
    proc: Any = None


@dataclass
class Stack:
    procs: Procs
    run_dir: Path
    setup: Any = None
    api_key: str = ""
    sim: str = ""  #: fast simulator, ".../v1"
    stream_sim: str = ""  #: token-delayed simulator, ".../v1"
    gateways: dict[str, str] = field(default_factory=dict)  #: "A" -> "http://127.0.0.1:P"
    gateway_procs: dict[str, Any] = field(default_factory=dict)
    daemons: dict[str, Daemon] = field(default_factory=dict)

    @property
    def redis_url(self) -> str:
        return str(self.setup.redis.url)

    def pid(self, name: str) -> int:
        return int(self.procs.find(name).pid)


#: ``--sim-keep-alive S``: the simulator as ``lattice sim`` runs it, but with uvicorn's idle
#: keep-alive timeout raised from its default 5 s (the daemon's pool keeps idle connections
#: 15 s: see the README's note on keep-alive races).
_SIM_KEEPALIVE = (
    "import sys, uvicorn; from daemon.sim import server as s; from daemon.sim.app import "
    "create_app; a = s._parser().parse_args(sys.argv[2:]); uvicorn.run(create_app("
    "s.config_from_args(a)), host=a.host, port=a.port, http='httptools', loop='uvloop', "
    "lifespan='off', access_log=False, log_level='warning', timeout_keep_alive=float("
    "sys.argv[1]))"
)


def start_sim(
    procs: Procs, name: str, token_delay_ms: float, keep_alive_s: float | None = None
) -> str:
    port = free_port()
    args = ["--host", "127.0.0.1", "--port", str(port)]
    args += ["--token-delay-ms", f"{token_delay_ms:g}", "--model", MODEL]
    if keep_alive_s is None:
        argv = [*sim_argv(), *args]
    else:
        argv = [sys.executable, "-c", _SIM_KEEPALIVE, f"{keep_alive_s:g}", *args]
    proc = procs.spawn(name, argv, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    base = f"http://127.0.0.1:{port}/v1"
    wait_ready(procs, name, proc, functools.partial(post_json, base, "", MODEL), 30)
    return base


def post_json(base: str, api_key: str, model: str, timeout: float = 10) -> dict[str, Any]:
    req = urllib.request.Request(
        base + "/chat/completions",
        data=chat_body(model),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    if not data.get("choices"):
        raise BenchError(f"not a chat completion from {base}: {str(data)[:300]}")
    return data


def start_stack(args: argparse.Namespace, run_dir: Path, procs: Procs) -> Stack:
    from bench.lattice_setup import LatticeSetup, Route

    st = Stack(procs, run_dir)
    st.sim = start_sim(procs, "sim", 0)
    if "streams" in args.phases:
        st.stream_sim = start_sim(procs, "sim-stream", args.token_delay_ms, args.sim_keep_alive)
    st.setup = LatticeSetup(run_dir / "lattice", spawn=procs.spawn)
    st.setup.prepare([Route(MODEL, st.sim, MODEL)])  # Redis, catalog (hosted route), key
    st.api_key = st.setup.api_key
    for gw in ("A", "B"):
        port = free_port()
        st.setup.start_gateway(
            port, name=f"gateway-{gw}", env={"LATTICE_SPOOL_DIR": str(run_dir / "spool")}
        )
        st.gateways[gw] = f"http://127.0.0.1:{port}"
    for gw, url in st.gateways.items():
        name = f"gateway-{gw}"
        proc = procs.find(name)
        st.gateway_procs[gw] = proc
        wait_ready(
            procs, name, proc, functools.partial(post_json, url + "/v1", st.api_key, MODEL), 60
        )
    return st


def start_daemon(
    st: Stack,
    name: str,
    gateway: str,
    backend_url: str | None,
    *,
    concurrency: int = 256,
    loop: str | None = None,
) -> Daemon:
    """Make a runtime in Redis, write its ``runtime.json`` (0600) and run ``lattice daemon
    run`` against ``gateway`` with the ``openai`` backend at ``backend_url`` (``None``: the
    in-process ``sim`` backend, a ``--variants`` target)."""
    from daemon.config import RuntimeCredentials, save_credentials

    [(runtime_id, credential)] = make_runtimes(st.redis_url, WORKSPACE, [f"bench-{name}"])
    cfg = st.run_dir / "daemons" / name
    url = st.gateways[gateway]
    save_credentials(RuntimeCredentials((url,), runtime_id, credential), cfg)
    cli = ["daemon", "run", "--config-dir", str(cfg)]
    if backend_url is None:
        cli += ["--backend", "sim"]
    else:
        cli += ["--backend", "openai", "--backend-url", backend_url]
    cli += ["--default-model", MODEL, "--concurrency", str(concurrency), "--gateway", url]
    if loop is not None:
        cli += ["--loop", loop]
    argv = [*st.setup.lattice_argv(), *cli]
    env = {**os.environ, "LATTICE_CONFIG_DIR": str(cfg)}
    proc = st.procs.spawn(f"daemon-{name}", argv, env=env)
    d = Daemon(name, runtime_id, gateway, proc)
    st.daemons[name] = d
    # Ready once a request for it succeeds through its own gateway and through the other one.
    for gw_url in st.gateways.values():
        wait_ready(
            st.procs,
            f"daemon-{name}",
            proc,
            functools.partial(post_json, gw_url + "/v1", st.api_key, personal(runtime_id)),
            60,
        )
    return d


# --------------------------------------------------------------------------------------------
# Latency at concurrency 1: one raw keep-alive http.client connection per target
# --------------------------------------------------------------------------------------------
@dataclass
class LatTarget:
    name: str
    base: str  #: OpenAI base URL ".../v1"
    model: str
    api_key: str
    stream: bool
    conn: http.client.HTTPConnection | None = None
    path: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def prepare(self) -> None:
        parts = urlsplit(self.base)
        assert parts.hostname is not None and parts.port is not None
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        self.path = parts.path.rstrip("/") + "/chat/completions"
        self.headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {self.api_key}",
        }
        if self.stream:
            self.headers["Accept"] = "text/event-stream"
        self.body = chat_body(self.model, stream=self.stream)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def once(self) -> float:
        """One request; returns ms to the answer's end (non-streamed) or to the first content
        token (streamed; the rest of the stream is read before returning)."""
        conn = self.conn
        assert conn is not None
        t0 = time.perf_counter()
        conn.request("POST", self.path, self.body, self.headers)
        resp = conn.getresponse()
        if not self.stream:
            data = resp.read()
            t = time.perf_counter()
            if resp.status != 200 or b'"choices"' not in data:
                raise BenchError(f"{self.name}: HTTP {resp.status}: {data[:300]!r}")
            return (t - t0) * 1000
        if resp.status != 200:
            raise BenchError(f"{self.name}: HTTP {resp.status}: {resp.read()[:300]!r}")
        first: float | None = None
        done = False
        while line := resp.readline():
            if first is None and line.startswith(b"data: {") and _has_content(line[6:]):
                first = time.perf_counter()
            elif line.startswith(b"data: [DONE]"):
                done = True
        if first is None or not done:
            raise BenchError(f"{self.name}: stream without content or [DONE]")
        return (first - t0) * 1000


def _has_content(payload: bytes) -> bool:
    with contextlib.suppress(ValueError):
        for ch in json.loads(payload).get("choices") or []:
            if (ch.get("delta") or {}).get("content"):
                return True
    return False


def stack_pids(st: Stack, daemons: Sequence[str]) -> dict[str, int]:
    """The processes on the paths measured (the bench client is this process)."""
    pids = {"client": os.getpid()}
    pids.update({f"gateway {gw}": st.pid(f"gateway-{gw}") for gw in st.gateways})
    pids.update({f"daemon {d}": st.pid(f"daemon-{d}") for d in daemons if d in st.daemons})
    pids["redis"] = int(st.setup.redis._proc.pid)
    return pids


VARIANTS = {
    # target name -> (daemon name, what differs from tunnel-local)
    "tunnel-local-asyncio": ("local-asyncio", "daemon on asyncio's loop (`--loop asyncio`)"),
    "tunnel-local-simbackend": ("local-simbackend", "daemon with `--backend sim` (no HTTP hop)"),
}


def latency_targets(st: Stack) -> list[LatTarget]:
    a = st.gateways["A"] + "/v1"
    out: list[LatTarget] = []
    variants = [(t, d) for t, (d, _) in VARIANTS.items() if d in st.daemons]
    for stream in (False, True):
        sfx = "-stream" if stream else ""
        out += [
            LatTarget(f"direct{sfx}", st.sim, MODEL, "sk-direct", stream),
            LatTarget(f"hosted{sfx}", a, MODEL, st.api_key, stream),
            LatTarget(
                f"tunnel-local{sfx}",
                a,
                personal(st.daemons["local"].runtime_id),
                st.api_key,
                stream,
            ),
            LatTarget(
                f"tunnel-cross{sfx}",
                a,
                personal(st.daemons["cross"].runtime_id),
                st.api_key,
                stream,
            ),
        ]
        out += [
            LatTarget(f"{t}{sfx}", a, personal(st.daemons[d].runtime_id), st.api_key, stream)
            for t, d in variants
        ]
    return out


def lat_stats(xs: list[float]) -> dict[str, Any]:
    return {
        "n": len(xs),
        "p50_ms": pct(xs, 50),
        "p90_ms": pct(xs, 90),
        "p99_ms": pct(xs, 99),
        "max_ms": max(xs) if xs else None,
        "load1_after": load1(),
    }


def measure_latency(
    targets: list[LatTarget], n: int, rounds: int, warmup: int, pids: dict[str, int]
) -> dict[str, list[dict[str, Any]]]:
    """``pids``: processes whose CPU time per request is recorded with each batch (where
    the time goes: a request at c=1 costs its CPU time on the path, plus wake-ups)."""
    raw: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for t in targets:
        t.prepare()
    try:
        for t in targets:
            for _ in range(warmup):
                t.once()
        for rnd in range(rounds):
            log(f"latency round {rnd + 1}/{rounds}: {n} requests per target at c=1")
            for t in targets:
                # A fresh connection per batch (servers close idle keep-alive connections after
                # a few seconds), its first requests untimed.
                assert t.conn is not None
                t.conn.close()
                for _ in range(5):
                    t.once()
                cpu0 = {name: cpu_s(pid) for name, pid in pids.items()}
                xs = [t.once() for _ in range(n)]
                r = lat_stats(xs)
                r["cpu_ms_per_req"] = {
                    name: (cpu_s(pid) - cpu0[name]) * 1000 / n for name, pid in pids.items()
                }
                raw[t.name].append(r)
                log(
                    f"  {t.name:20s} p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
                    f"max {r['max_ms']:6.1f} ms  load {r['load1_after']}"
                )
    finally:
        for t in targets:
            t.close()
    return raw


def summarize_latency(raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, rounds in raw.items():
        base = "direct-stream" if name.endswith("-stream") else "direct"
        s: dict[str, Any] = {
            "p50_ms": med([r["p50_ms"] for r in rounds]),
            "p99_ms": med([r["p99_ms"] for r in rounds]),
            "rounds": len(rounds),
            "requests": sum(r["n"] for r in rounds),
            "cpu_ms_per_req": {
                name: med([r["cpu_ms_per_req"][name] for r in rounds])
                for name in rounds[0].get("cpu_ms_per_req", {})
            },
        }
        if name != base and raw.get(base):
            # per round against direct in the same round, then the median over rounds
            pairs = list(zip(rounds, raw[base], strict=False))
            s["added_p50_ms"] = med([a["p50_ms"] - b["p50_ms"] for a, b in pairs])
            s["added_p99_ms"] = med([a["p99_ms"] - b["p99_ms"] for a, b in pairs])
        out[name] = s
    return out


# --------------------------------------------------------------------------------------------
# Many concurrent streams through one tunnel
# --------------------------------------------------------------------------------------------
class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None


class _StreamEvent(msgspec.Struct):
    """What the stream client reads of each SSE event (the rest is skipped by msgspec)."""

    choices: list[_Choice] = []
    error: Any = None


async def _one_stream(
    session: Any, url: str, headers: dict[str, str], body: bytes, decode: Any, expect: int
) -> dict[str, Any]:
    t0 = time.perf_counter()
    first: float | None = None
    tokens = 0
    done = False
    error = None
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            else:
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[6:].strip()
                    if payload == b"[DONE]":
                        done = True
                        continue
                    event = decode(payload)
                    if event.error is not None:
                        error = f"error event: {str(event.error)[:200]}"
                    for ch in event.choices:
                        if ch.delta is not None and ch.delta.content:
                            tokens += 1
                            if first is None:
                                first = time.perf_counter()
    except Exception as exc:  # counted as an error of this stream, the load goes on
        error = f"{type(exc).__name__}: {exc}"[:200]
    end = time.perf_counter()
    if error is None and not done:
        error = "no [DONE]"
    if error is None and expect and tokens != expect:
        error = f"{tokens} tokens, expected {expect}"
    return {
        "ttft_ms": ((first or end) - t0) * 1000,
        "total_ms": (end - t0) * 1000,
        "tokens": tokens,
        "error": error,
    }


async def stream_load(
    base: str, api_key: str, model: str, concurrency: int, tokens: int
) -> dict[str, Any]:
    import aiohttp

    decode = msgspec.json.Decoder(_StreamEvent).decode
    headers = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
        "Authorization": f"Bearer {api_key}",
    }
    body = chat_body(model, stream=True, max_tokens=tokens)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        url = base + "/chat/completions"
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(_one_stream(session, url, headers, body, decode, tokens) for _ in range(concurrency))
        )
        wall = time.perf_counter() - t0
    errors = [r["error"] for r in results if r["error"]]
    total_tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "wall_s": wall,
        "tokens": total_tokens,
        "tokens_per_s": total_tokens / wall if wall else 0.0,
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "ttft_p50_ms": pct([r["ttft_ms"] for r in results], 50),
        "ttft_p99_ms": pct([r["ttft_ms"] for r in results], 99),
        "total_p50_ms": pct([r["total_ms"] for r in results], 50),
        "total_p99_ms": pct([r["total_ms"] for r in results], 99),
    }


def run_stream_load(
    st: Stack, target: str, concurrency: int, tokens: int, pids: dict[str, int]
) -> dict[str, Any]:
    rt = st.daemons["streams"].runtime_id
    base, key, model = {
        "direct": (st.stream_sim, "sk-direct", MODEL),
        "tunnel-local": (st.gateways["A"] + "/v1", st.api_key, personal(rt)),
        "tunnel-cross": (st.gateways["B"] + "/v1", st.api_key, personal(rt)),
    }[target]
    before = {name: cpu_s(pid) for name, pid in pids.items()}
    r: dict[str, Any] = run_loop(stream_load(base, key, model, concurrency, tokens))
    kilo_tokens = max(r["tokens"], 1) / 1000
    r["cpu_ms_per_1k_tokens"] = {
        name: round((cpu_s(pid) - before[name]) * 1000 / kilo_tokens, 1)
        for name, pid in pids.items()
    }
    r["target"] = target
    r["load1_after"] = load1()
    return r


def run_loop(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def measure_streams(st: Stack, args: argparse.Namespace) -> dict[str, Any]:
    pids = {"sim": st.pid("sim-stream"), **stack_pids(st, ["streams"])}
    raw: dict[str, list[dict[str, Any]]] = {}
    targets = ("direct", "tunnel-local", "tunnel-cross")
    run_loop(stream_load(st.stream_sim, "sk-direct", MODEL, 8, args.stream_tokens))  # warm-up
    for rnd in range(args.stream_rounds):
        for c in args.concurrency:
            log(f"streams round {rnd + 1}/{args.stream_rounds}: {c} concurrent streams")
            for t in targets:
                r = run_stream_load(st, t, c, args.stream_tokens, pids)
                raw.setdefault(f"{t}@{c}", []).append(r)
                log(
                    f"  {t:13s} c={c:4d} {r['tokens_per_s']:8.0f} tok/s  errors {r['errors']}  "
                    f"ttft p50 {r['ttft_p50_ms']:7.1f} ms  total p50 {r['total_p50_ms']:7.0f} ms"
                    f"  load {r['load1_after']}"
                    + (f"  {r['error_samples']}" if r["errors"] else "")
                )
    summary: dict[str, Any] = {}
    for key, rs in raw.items():
        target, c = key.split("@")
        s = {
            "target": target,
            "concurrency": int(c),
            "tokens_per_s": med([r["tokens_per_s"] for r in rs]),
            "errors": sum(r["errors"] for r in rs),
            "streams": int(c) * len(rs),
            "ttft_p50_ms": med([r["ttft_p50_ms"] for r in rs]),
            "ttft_p99_ms": med([r["ttft_p99_ms"] for r in rs]),
            "total_p50_ms": med([r["total_p50_ms"] for r in rs]),
            "total_p99_ms": med([r["total_p99_ms"] for r in rs]),
            "cpu_ms_per_1k_tokens": {
                name: med([r["cpu_ms_per_1k_tokens"][name] for r in rs]) for name in pids
            },
        }
        direct = raw.get(f"direct@{c}")
        if direct and target != "direct":
            s["vs_direct"] = s["tokens_per_s"] / med([r["tokens_per_s"] for r in direct])
        summary[key] = s
    return {"raw": raw, "summary": summary}


# --------------------------------------------------------------------------------------------
# Idle tunnels: the client processes (run as `tunnel_bench.py --idle-client ...`)
# --------------------------------------------------------------------------------------------
async def idle_client(creds: list[list[str]], status_file: Path, url: str, parallel: int) -> None:
    """Hold one tunnel per ``(runtime_id, credential)`` of ``creds`` open until SIGTERM;
    write progress to ``status_file`` (JSON). Each tunnel sends the Hello of
    ``Connection("daemon")``, answers Pings (the protocol queues the Pong) and answers a
    non-streamed dispatch with :data:`IDLE_REPLY`."""
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.exceptions import ConnectionClosed, WebSocketException

    from daemon.runner import tunnel_url as to_tunnel_url
    from daemon.tunnel import Connection
    from daemon.tunnel import events as ev

    tunnel_url = to_tunnel_url(url)  # ws://host:port/v1/tunnel
    status: dict[str, Any] = {"wanted": len(creds), "connected": 0, "failed": 0, "closed": 0}
    status.update(dispatches=0, errors={}, done=False)
    live: dict[str, tuple[Connection, ClientConnection]] = {}
    gate = asyncio.Semaphore(parallel)
    stop = asyncio.Event()
    all_tried = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def write_status() -> None:
        tmp = status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        tmp.replace(status_file)

    async def flush(conn: Connection, ws: ClientConnection) -> None:
        for data in conn.data_to_send():
            await ws.send(data)

    def on_events(conn: Connection) -> None:
        for event in conn.events_received():
            if isinstance(event, ev.DispatchReceived):
                d = event.dispatch
                conn.send_data(d.id, IDLE_REPLY)
                conn.send_end(d.id, 200)
                status["dispatches"] += 1

    def tried() -> None:
        if status["connected"] + status["failed"] >= len(creds):
            all_tried.set()

    async def serve(runtime_id: str, credential: str) -> None:
        try:
            async with gate:
                ws = await connect(
                    tunnel_url,
                    additional_headers={"Authorization": f"Bearer {credential}"},
                    compression=None,
                    ping_interval=None,
                    open_timeout=60,
                    max_size=2**25,
                )
                conn = Connection("daemon")
                conn.send_hello(
                    daemon_version="tunnel-bench-idle",
                    task_classes=("chat-completion",),
                    models=(),
                    default_model="idle-model",
                    concurrency=4,
                )
                await flush(conn, ws)
                message = await asyncio.wait_for(ws.recv(), 60)
                conn.receive_message(message)  # type: ignore[arg-type]
                if conn.welcome is None:
                    raise ConnectionError(f"no welcome: {conn.close_frame}")
                on_events(conn)
        except (OSError, TimeoutError, WebSocketException, ConnectionError) as exc:
            status["failed"] += 1
            kind = type(exc).__name__
            status["errors"][kind] = status["errors"].get(kind, 0) + 1
            status.setdefault("error_sample", repr(exc)[:300])
            tried()
            return
        live[runtime_id] = (conn, ws)
        status["connected"] += 1
        tried()
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    conn.receive_message(message)
                    on_events(conn)
                    await flush(conn, ws)
                if conn.closed:
                    break
        except ConnectionClosed:
            pass
        live.pop(runtime_id, None)
        status["closed"] += 1

    async def ticker() -> None:
        while not stop.is_set():
            now = loop.time()
            for conn, ws in list(live.values()):
                conn.tick(now)
                conn.events_received()
                with contextlib.suppress(ConnectionClosed):
                    await flush(conn, ws)
            write_status()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    tasks = [asyncio.create_task(serve(rid, cred)) for rid, cred in creds]
    tick = asyncio.create_task(ticker())

    tried()  # (no credentials at all)
    waits: list[asyncio.Task[Any]] = [
        asyncio.create_task(all_tried.wait()),
        asyncio.create_task(stop.wait()),
    ]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    status["done"] = True
    write_status()
    await stop.wait()
    for task in waits:
        task.cancel()
    for task in tasks:
        task.cancel()
    tick.cancel()
    await asyncio.gather(*tasks, tick, return_exceptions=True)


def read_status(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    return {}


def start_idle_gateway(st: Stack) -> int:
    """A fresh gateway process C for the idle tunnels alone (no earlier traffic to blur its
    memory reading), warmed up with hosted requests; returns its pid."""
    port = free_port()
    st.setup.start_gateway(port, name="gateway-C", env={"LATTICE_SPOOL_DIR": str(st.run_dir)})
    url = f"http://127.0.0.1:{port}"
    proc = st.procs.find("gateway-C")
    ready = functools.partial(post_json, url + "/v1", st.api_key, MODEL)
    wait_ready(st.procs, "gateway-C", proc, ready, 60)
    st.gateways["C"] = url
    for _ in range(200):
        ready()
    return int(proc.pid)


def spawn_idle_clients(
    st: Stack, args: argparse.Namespace, creds: list[tuple[str, str]], url: str
) -> list[Path]:
    """The client processes (credentials handed over in 0600 files); their status files."""
    status_files = []
    per = -(-len(creds) // args.idle_clients)
    for i in range(args.idle_clients):
        cf = st.run_dir / f"idle-creds-{i}.json"
        fd = os.open(cf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # credentials: 0600
        with os.fdopen(fd, "w") as f:
            json.dump([list(c) for c in creds[i * per : (i + 1) * per]], f)
        sf = st.run_dir / f"idle-status-{i}.json"
        status_files.append(sf)
        argv = [sys.executable, str(Path(__file__).resolve()), "--idle-client", str(cf), str(sf)]
        argv += [url, str(args.idle_parallel)]
        st.procs.spawn(f"idle-client-{i}", argv, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return status_files


def wait_idle_clients(
    st: Stack, args: argparse.Namespace, status_files: list[Path], gw_pid: int
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + args.idle_timeout
    statuses: list[dict[str, Any]] = []
    last_log = time.monotonic()
    while time.monotonic() < deadline:
        statuses = [read_status(sf) for sf in status_files]
        if all(s.get("done") for s in statuses):
            break
        for i in range(args.idle_clients):
            proc = st.procs.find(f"idle-client-{i}")
            if proc.poll() is not None:
                raise BenchError(
                    f"idle client {i} exited with {proc.returncode}:\n"
                    + st.procs.log_tail(f"idle-client-{i}")
                )
        if time.monotonic() - last_log > 5:
            up = sum(s.get("connected", 0) for s in statuses)
            log(f"  {up} tunnels open, gateway C RSS {rss_kb(gw_pid) / 1024:.1f} MiB")
            last_log = time.monotonic()
        time.sleep(0.5)
    return statuses


def idle_phase(st: Stack, args: argparse.Namespace) -> dict[str, Any]:
    """Open ``args.idle`` tunnels to a fresh gateway C and read its memory before/after."""
    n = args.idle
    res: dict[str, Any] = {"tunnels_wanted": n, "clients": args.idle_clients}
    res["nofile"] = nofile = raise_nofile(n // args.idle_clients + 1024)
    if not nofile["enough"]:
        log(f"warning: RLIMIT_NOFILE {nofile} is too low for {n} tunnels")
    log(f"idle: creating {n} runtimes and credentials in Redis")
    t0 = time.monotonic()
    creds = make_runtimes(st.redis_url, IDLE_WORKSPACE, [f"idle-{i:05d}" for i in range(n)])
    idle_key = make_api_key(st.redis_url, IDLE_WORKSPACE)
    ids = [rid for rid, _ in creds]
    res["create_s"] = round(time.monotonic() - t0, 1)
    gw_pid = start_idle_gateway(st)
    time.sleep(2.0)
    res["rss_before_kb"] = rss_kb(gw_pid)
    res["fds_before"] = open_fds(gw_pid)
    log(f"idle: gateway C RSS {res['rss_before_kb'] / 1024:.1f} MiB before; opening {n} tunnels")
    t0 = time.monotonic()
    status_files = spawn_idle_clients(st, args, creds, st.gateways["C"])
    statuses = wait_idle_clients(st, args, status_files, gw_pid)
    res["connect_s"] = round(time.monotonic() - t0, 1)
    res["connected"] = sum(s.get("connected", 0) for s in statuses)
    res["failed"] = sum(s.get("failed", 0) for s in statuses)
    res["client_errors"] = [(s.get("errors", {}), s.get("error_sample")) for s in statuses]
    res["holders_after_connect"], _ = count_holders(st.redis_url, ids)
    res["rss_connected_kb"] = rss_kb(gw_pid)
    # Hold them through a few heartbeat periods (pings both ways, nobody declared dead).
    log(f"idle: {res['connected']} open ({res['failed']} failed); holding {args.idle_hold:g}s")
    c0, t0 = cpu_s(gw_pid), time.monotonic()
    time.sleep(args.idle_hold)
    res["gateway_cpu_pct_idle"] = round(100 * (cpu_s(gw_pid) - c0) / (time.monotonic() - t0), 1)
    res["rss_after_kb"] = rss_kb(gw_pid)
    res["fds_after"] = open_fds(gw_pid)
    res["holders"], res["holder_keys_total"] = count_holders(st.redis_url, ids)
    statuses = [read_status(sf) for sf in status_files]
    res["closed_during_hold"] = sum(s.get("closed", 0) for s in statuses)
    res["kb_per_tunnel"] = (res["rss_after_kb"] - res["rss_before_kb"]) / max(res["connected"], 1)
    # Requests still work: one dispatch to one of the idle tunnels through C (which holds it)
    # and through A (across processes); then c=1 latency with them all open.
    probe = ids[len(ids) // 2]
    res["dispatch_ok"] = {}
    for gw in ("C", "A"):
        try:
            t1 = time.perf_counter()
            data = post_json(st.gateways[gw] + "/v1", idle_key, personal(probe), timeout=30)
            ms = (time.perf_counter() - t1) * 1000
            ok = data["choices"][0]["message"]["content"] == "idle tunnel ok"
            res["dispatch_ok"][gw] = {"ok": ok, "ms": round(ms, 2)}
        except (OSError, urllib.error.HTTPError, BenchError, KeyError) as exc:
            res["dispatch_ok"][gw] = {"ok": False, "error": repr(exc)[:300]}
    c = st.gateways["C"] + "/v1"
    targets = [
        LatTarget("direct", st.sim, MODEL, "sk-direct", False),
        LatTarget("hosted via C", c, MODEL, st.api_key, False),
        LatTarget("idle tunnel via C", c, personal(probe), idle_key, False),
        LatTarget("idle tunnel via A", st.gateways["A"] + "/v1", personal(probe), idle_key, False),
    ]
    pids = {"gateway C": gw_pid, "gateway A": st.pid("gateway-A"), "sim": st.pid("sim")}
    raw = measure_latency(targets, args.idle_latency_requests, 1, 20, pids)
    res["latency_with_idle"] = summarize_latency(raw)
    res["loads"] = [r["load1_after"] for rounds in raw.values() for r in rounds]
    log(
        f"idle: RSS {res['rss_before_kb'] / 1024:.1f} -> {res['rss_after_kb'] / 1024:.1f} MiB, "
        f"{res['kb_per_tunnel']:.1f} KB/tunnel, {res['holders']} presence keys, "
        f"CPU {res['gateway_cpu_pct_idle']}% idle, dispatch {res['dispatch_ok']}"
    )
    # Close them, and time how long C takes to release them all (presence keys deleted).
    t0 = time.monotonic()
    for i in range(args.idle_clients):
        st.procs.stop(st.procs.find(f"idle-client-{i}"))
    left = res["holders"]
    while left and time.monotonic() - t0 < 60:
        time.sleep(0.5)
        left, _ = count_holders(st.redis_url, ids)
    res["release_s"] = round(time.monotonic() - t0, 1)
    res["left_after_release"] = left
    log(f"idle: clients gone; {left} presence keys left after {res['release_s']} s")
    return res


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def verdict(ok: bool | None) -> str:
    return "-" if ok is None else "met" if ok else "**missed**"


def render_latency(res: dict[str, Any]) -> list[str]:
    lat = res["latency"]
    m = res["meta"]
    lines = [
        f"Latency at concurrency 1 (chat completion, {MAX_TOKENS} output tokens, simulator "
        f"without token delay): {m['requests']} requests per target per round, "
        f'{m["rounds"]} interleaved rounds, medians of rounds; "added" is against direct in '
        "the same round. Streamed rows time the first content token.",
        "",
        "| target | path | p50 (ms) | p99 (ms) | added p50 (ms) | added p99 (ms) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    paths = {
        "direct": "client → simulator",
        "hosted": "client → gateway A → simulator (hosted offering, no tunnel)",
        "tunnel-local": "client → A ⇒ tunnel held by A ⇒ daemon → simulator",
        "tunnel-cross": "client → A → Redis → B ⇒ tunnel ⇒ daemon → simulator",
        **{t: f"as tunnel-local, {what}" for t, (_, what) in VARIANTS.items()},
    }
    for name, s in lat.items():
        base = name.removesuffix("-stream")
        kind = " (stream, TTFT)" if name.endswith("-stream") else ""
        lines.append(
            f"| {name} | {paths.get(base, '')}{kind} | {fmt(s['p50_ms'])} | {fmt(s['p99_ms'])} "
            f"| {fmt(s.get('added_p50_ms'))} | {fmt(s.get('added_p99_ms'))} |"
        )
    names = list(next(iter(lat.values())).get("cpu_ms_per_req", {}))
    if names:
        lines += [
            "",
            "Where the time goes: CPU time per request of each process (ms, median of rounds; "
            "at c=1 a request's latency is about the CPU time on its path plus the wake-ups "
            "between processes):",
            "",
            "| target | " + " | ".join(names) + " | sum |",
            "|---|" + "---:|" * (len(names) + 1),
        ]
        for name, s in lat.items():
            cpu = s["cpu_ms_per_req"]
            lines.append(
                f"| {name} | "
                + " | ".join(fmt(cpu[n]) for n in names)
                + f" | {fmt(sum(cpu.values()))} |"
            )
    return lines


def render_streams(res: dict[str, Any]) -> list[str]:
    st = res["streams"]["summary"]
    m = res["meta"]
    names = list(next(iter(st.values()))["cpu_ms_per_1k_tokens"]) if st else []
    lines = [
        f"Concurrent streams through one tunnel: each stream {m['stream_tokens']} tokens, "
        f"simulator token delay {m['token_delay_ms']:g} ms, one daemon (`--backend openai`, "
        f"concurrency 1024); medians of {m['stream_rounds']} rounds. tunnel-local: requests "
        "to A, which holds the tunnel; tunnel-cross: requests to B (dispatch through Redis).",
        "",
        "| target | streams | errors | tokens/s | vs direct | TTFT p50 / p99 (ms) "
        "| stream p50 / p99 (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in st.values():
        lines.append(
            f"| {s['target']} | {s['concurrency']} | {s['errors']} | {fmt(s['tokens_per_s'], 0)} "
            f"| {fmt(s.get('vs_direct'))} | {fmt(s['ttft_p50_ms'], 0)} / "
            f"{fmt(s['ttft_p99_ms'], 0)} | {fmt(s['total_p50_ms'], 0)} / "
            f"{fmt(s['total_p99_ms'], 0)} |"
        )
    lines += [
        "",
        "CPU time per 1,000 tokens relayed (ms, all processes on the same 2 cores):",
        "",
        "| target | streams | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for s in st.values():
        cpu = s["cpu_ms_per_1k_tokens"]
        lines.append(
            f"| {s['target']} | {s['concurrency']} | "
            + " | ".join(fmt(cpu[n], 0) for n in names)
            + " |"
        )
    return lines


def render_idle(res: dict[str, Any]) -> list[str]:
    i = res["idle"]
    nf = i["nofile"]
    lines = [
        f"Idle tunnels: {i['tunnels_wanted']:,} runtimes made in Redis (`RuntimeStore`), "
        f"tunnels opened to a fresh gateway process C (started for this, warmed up with 200 "
        f"requests) from {i['clients']} separate client processes (RLIMIT_NOFILE soft "
        f"{nf['soft']} / hard {nf['hard']}), held {res['meta']['idle_hold']:g} s (heartbeats "
        "both ways) before the second reading; each idle client answers a dispatch at once "
        "with a canned completion.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| tunnels open / failed | {i['connected']:,} / {i['failed']:,} |",
        f"| presence keys of those runtimes after the hold | {i['holders']:,} |",
        f"| closed during the hold | {i['closed_during_hold']:,} |",
        f"| time to open them all | {i['connect_s']:g} s |",
        f"| gateway C RSS before (fresh, warmed up) | {i['rss_before_kb'] / 1024:,.1f} MiB |",
        f"| gateway C RSS with all open (after the hold) | {i['rss_after_kb'] / 1024:,.1f} MiB |",
        f"| **memory per tunnel** | **{i['kb_per_tunnel']:.1f} KB** |",
        f"| gateway C CPU while holding them idle | {i['gateway_cpu_pct_idle']:g}% of one core |",
        f"| gateway C open file descriptors before / after | {i['fds_before']:,} / "
        f"{i['fds_after']:,} |",
    ]
    for gw, d in i["dispatch_ok"].items():
        how = "held there" if gw == "C" else "across processes"
        val = f"ok, {d['ms']:.1f} ms" if d.get("ok") else f"FAILED {d.get('error', '')}"
        lines.append(f"| dispatch to one idle tunnel via {gw} ({how}) | {val} |")
    for name, s in (i.get("latency_with_idle") or {}).items():
        lines.append(
            f"| {name}, c=1, with all open: p50 / p99 | {fmt(s['p50_ms'])} / "
            f"{fmt(s['p99_ms'])} ms |"
        )
    if "release_s" in i:
        lines.append(
            f"| clients gone → presence keys deleted | {i['release_s']:g} s "
            f"({i['left_after_release']:,} left) |"
        )
    return lines


def targets_table(res: dict[str, Any]) -> list[str]:
    rows: list[tuple[str, str, str, bool | None]] = []
    lat = res.get("latency") or {}
    for name in ("tunnel-local", "tunnel-cross"):
        s = lat.get(name)
        if s:
            for q, lim in (("p50", TARGET_P50_MS), ("p99", TARGET_P99_MS)):
                v = s.get(f"added_{q}_ms")
                rows.append(
                    (
                        f"added latency, {name.removeprefix('tunnel-')} path, c=1, {q}",
                        f"≤ {lim:g} ms",
                        f"{fmt(v)} ms",
                        None if v is None else v <= lim,
                    )
                )
    streams = (res.get("streams") or {}).get("summary") or {}
    for key in ("tunnel-local", "tunnel-cross"):
        ok_at = [
            s for s in streams.values() if s["target"] == key and s["concurrency"] >= TARGET_STREAMS
        ]
        if ok_at:
            text = ", ".join(f"{s['concurrency']}: {s['errors']} errors" for s in ok_at)
            ratio = ", ".join(
                f"{s['concurrency']}: {fmt(s.get('vs_direct'))}x direct tok/s" for s in ok_at
            )
            rows.append(
                (
                    f"≥ {TARGET_STREAMS} concurrent streams, one daemon, {key}",
                    "0 errors",
                    f"{text} ({ratio})",
                    all(s["errors"] == 0 for s in ok_at),
                )
            )
    i = res.get("idle")
    if i:
        ok: bool | None = (
            i["connected"] >= TARGET_IDLE
            and i["holders"] >= TARGET_IDLE
            and all(d.get("ok") for d in i["dispatch_ok"].values())
        )
        if i["tunnels_wanted"] < TARGET_IDLE:  # a smaller (--quick) run: no verdict
            ok = None
        rows.append(
            (
                f"≥ {TARGET_IDLE:,} idle tunnels on one gateway process",
                "hold them; report memory",
                f"{i['holders']:,} held, {i['kb_per_tunnel']:.1f} KB per tunnel",
                ok,
            )
        )
    lines = ["| target | required | measured | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {verdict(d)} |" for a, b, c, d in rows]
    return lines


def render(res: dict[str, Any], *, markdown: bool) -> str:
    m = res["meta"]
    mach = m["machine"]
    out: list[str] = []
    if markdown:
        out += [
            f"## Tunnel benchmark, {m['timestamp'][:10]}",
            "",
            f"- Machine: {mach['nproc']} cores ({mach['cpu']}), {mach['os']}, "
            f"Python {mach['python']}",
            "- One Redis, gateway processes A and B (and C for the idle tunnels; `lattice serve`, "
            "1 worker each, metering on), simulator processes as the local backend, daemons "
            "(`lattice daemon run --backend openai`), the clients: all on this machine.",
            f"- Load average (1 min) before the run {m['loadavg_start'][0]:.2f}, median during "
            f"the measurements {fmt(m['load1_during_median'])} (other work on the machine shows "
            "here).",
            f"- Command: `{m['command']}`",
            "",
        ]
    out += targets_table(res)
    if res.get("latency"):
        out += ["", *render_latency(res)]
    if res.get("streams"):
        out += ["", *render_streams(res)]
    if res.get("idle"):
        out += ["", *render_idle(res)]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--only", default=",".join(PHASES), help="latency,streams,idle (default all)")
    p.add_argument("--quick", action="store_true", help="smoke run (~2 minutes)")
    p.add_argument("--markdown", action="store_true", help="print a section for BENCHMARKS.md")
    p.add_argument("--requests", type=int, help="latency: per target per round (2000; quick 300)")
    p.add_argument("--rounds", type=int, help="latency: interleaved rounds (3; quick 2)")
    p.add_argument("--concurrency", help="streams: comma-separated (256,512; quick 256)")
    p.add_argument("--stream-tokens", type=int, default=64, help="streams: tokens per stream")
    p.add_argument("--stream-rounds", type=int, help="streams: rounds (3; quick 1)")
    p.add_argument("--token-delay-ms", type=float, default=5.0, help="streams: simulator delay")
    p.add_argument(
        "--sim-keep-alive",
        type=float,
        help="streams: the simulator's idle keep-alive timeout in s (default: uvicorn's 5)",
    )
    p.add_argument("--idle", type=int, help="idle: tunnels to open (5000; quick 1000)")
    p.add_argument("--idle-clients", type=int, default=2, help="idle: client processes")
    p.add_argument("--idle-parallel", type=int, default=64, help="idle: connects in flight")
    p.add_argument(
        "--idle-hold", type=float, help="idle: seconds held before reading (15; quick 6)"
    )
    p.add_argument("--idle-timeout", type=float, default=180.0, help="idle: time to open them")
    p.add_argument("--idle-latency-requests", type=int, help="idle: c=1 requests (500; quick 100)")
    p.add_argument(
        "--variants",
        action="store_true",
        help="latency: also a daemon on asyncio's loop and one with the in-process sim backend",
    )
    p.add_argument("--idle-client", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.idle_client:
        return a
    a.phases = [x.strip() for x in a.only.split(",") if x.strip()]
    bad = [x for x in a.phases if x not in PHASES]
    if bad or not a.phases:
        p.error(f"unknown phase(s) {bad}; choose from {','.join(PHASES)}")
    q = a.quick
    a.requests = a.requests or (300 if q else 2000)
    a.rounds = a.rounds or (2 if q else 3)
    a.concurrency = [int(x) for x in (a.concurrency or ("256" if q else "256,512")).split(",")]
    a.stream_rounds = a.stream_rounds or (1 if q else 3)
    a.idle = a.idle or (1000 if q else TARGET_IDLE)
    a.idle_hold = a.idle_hold if a.idle_hold is not None else (6.0 if q else 15.0)
    a.idle_latency_requests = a.idle_latency_requests or (100 if q else 500)
    return a


def collect_load(res: dict[str, Any]) -> list[float]:
    loads: list[float] = []
    for rounds in (res.get("latency_raw") or {}).values():
        loads += [r["load1_after"] for r in rounds]
    for rounds in ((res.get("streams") or {}).get("raw") or {}).values():
        loads += [r["load1_after"] for r in rounds]
    return loads + list((res.get("idle") or {}).get("loads") or [])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.idle_client:
        cf, sf, url, parallel = args.idle_client
        raise_nofile(20000)
        creds = json.loads(Path(cf).read_text())
        run_loop(idle_client(creds, Path(sf), url, int(parallel)))
        return 0
    command = shlex.join(
        ["python", "bench/tunnel_bench.py", *(sys.argv[1:] if argv is None else argv)]
    )
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = WORK / f"tunnel-run-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    procs = Procs(run_dir / "logs")
    res: dict[str, Any] = {}
    load_start = os.getloadavg()
    t_start = time.monotonic()
    if load_start[0] > (os.cpu_count() or 1) * 0.5:
        log(f"warning: load average {load_start[0]:.2f} before the run: figures will be noisy")
    st: Stack | None = None
    try:
        with terminate_on_signals():
            log(f"run directory {run_dir}")
            st = start_stack(args, run_dir, procs)
            if "latency" in args.phases:
                start_daemon(st, "local", "A", st.sim)
                start_daemon(st, "cross", "B", st.sim)
            if "latency" in args.phases and args.variants:
                start_daemon(st, "local-asyncio", "A", st.sim, loop="asyncio")
                start_daemon(st, "local-simbackend", "A", None)
            if "latency" in args.phases:
                targets = latency_targets(st)
                pids = {"sim": st.pid("sim"), **stack_pids(st, list(st.daemons))}
                raw = measure_latency(targets, args.requests, args.rounds, 50, pids)
                res["latency_raw"] = raw
                res["latency"] = summarize_latency(raw)
            if "streams" in args.phases:
                start_daemon(st, "streams", "A", st.stream_sim, concurrency=1024)
                res["streams"] = measure_streams(st, args)
            if "idle" in args.phases:
                res["idle"] = idle_phase(st, args)
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        raise
    finally:
        procs.stop_all()
        if st is not None and st.setup is not None:
            try:
                st.setup.stop()
            except Exception as exc:  # keep going: report what we have
                log(f"cleanup failed: {exc!r}")
        log("all processes stopped")
    res["meta"] = {
        "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(),
        "phases": args.phases,
        "requests": args.requests,
        "rounds": args.rounds,
        "stream_tokens": args.stream_tokens,
        "stream_rounds": args.stream_rounds,
        "token_delay_ms": args.token_delay_ms,
        "idle_hold": args.idle_hold,
        "wall_s": round(time.monotonic() - t_start, 1),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "load1_during_median": med(collect_load(res)),
    }
    out = WORK / f"tunnel-results-{stamp}.json"
    out.write_text(json.dumps(res, indent=2))
    print(render(res, markdown=False))
    print(f"\nResults: {out.relative_to(ROOT)} (wall time {res['meta']['wall_s']:.0f}s)")
    if args.markdown:
        print("\n" + "-" * 72 + "\n")
        print(render(res, markdown=True))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"tunnel_bench: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
