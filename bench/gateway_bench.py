#!/usr/bin/env python3
"""Gateway performance benchmark: Lattice against direct, LiteLLM proxy and Portkey gateway.

One run, one machine, one mock upstream (``daemon.sim.server``) behind every target, one server
process per target (plus Lattice with 2 worker processes for the scaling figure):

* ``direct``  - wrk straight to the mock;
* ``lattice`` - ``lattice serve`` with a hosted offering on the mock, auth and metering on
  (set up by ``bench/lattice_setup.py``);
* ``litellm`` - LiteLLM proxy (own venv under ``bench/.work/litellm-venv``, 1 worker);
* ``portkey`` - Portkey's open-source gateway (npm, under ``bench/.work/portkey``).

Non-streaming chat is loaded with ``wrk`` (``bench/wrk/chat.lua``): latency p50/p99 at
concurrency 1 and throughput at concurrency 32. Streaming is measured with a small aiohttp
client (time to first ``data:`` event, time to first token, total time, chunk inter-arrival
times against a mock with a per-token delay). Each measurement is repeated in interleaved
rounds (A,B,C,D,A,B,C,D,...) and the medians are reported.

    python bench/gateway_bench.py                      # everything (~8 minutes)
    python bench/gateway_bench.py --quick              # smoke run (~1.5 minutes)
    python bench/gateway_bench.py --only direct,litellm,portkey --markdown

See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import filecmp
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / ".work"
LITELLM_VENV = WORK / "litellm-venv"
PORTKEY_DIR = WORK / "portkey"
WRK_SCRIPT = BENCH / "wrk" / "chat.lua"

#: Pinned so a rerun measures the same thing; change deliberately (and note it in BENCHMARKS.md).
LITELLM_VERSION = "1.106.2"
MODEL = "llama-3.2-3b-instruct"
#: The model name Lattice routes to the token-delayed mock (streaming measurements).
STREAM_ROUTE = "llama-3.2-3b-instruct-stream"
MAX_TOKENS = 16
LITELLM_MASTER_KEY = "sk-bench-litellm"
DIRECT_KEY = "sk-bench-direct"
ALL_TARGETS = ("direct", "lattice", "lattice-nometer", "litellm", "portkey")
STREAM_TARGETS = ("direct", "lattice", "portkey")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# Processes: every server runs in its own session (process group) so that it and its children
# are stopped together, and never gets the terminal's Ctrl-C before we can stop it in order.
# --------------------------------------------------------------------------------------------
class Procs:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the proc
        log(f"start {name}: {shlex.join(argv)}")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        logf.close()
        self.procs.append((name, proc))
        return proc

    def find(self, name: str) -> subprocess.Popen[bytes]:
        for n, proc in reversed(self.procs):
            if n == name:
                return proc
        raise BenchError(f"no process named {name} was started")

    def log_tail(self, name: str, n: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # the group id is the leader's pid (start_new_session)

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 8.0) -> None:
        self._signal(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(proc, signal.SIGKILL)
            proc.wait()
        # Children that outlived their leader (e.g. uvicorn workers) are still in the group.
        self._signal(proc, signal.SIGKILL)

    def stop_all(self) -> None:
        procs, self.procs = self.procs, []
        for _name, proc in reversed(procs):
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + 8.0
        for name, proc in reversed(procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{name} did not stop on SIGTERM; killing")
            self._signal(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------
# Installing the comparison targets (idempotent; --install forces a reinstall).
# --------------------------------------------------------------------------------------------
def run(argv: list[str], **kw: Any) -> None:
    log("run: " + shlex.join(argv))
    subprocess.run(argv, check=True, **kw)


def ensure_wrk(install: bool) -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if install and shutil.which("apt-get") and os.geteuid() == 0:
        run(["apt-get", "update"])
        run(["apt-get", "install", "-y", "wrk"])
        found = shutil.which("wrk")
        if found:
            return found
    raise BenchError(
        "wrk is not installed. Install it with:\n"
        "    apt-get update && apt-get install -y wrk      (Debian/Ubuntu, as root)\n"
        "    brew install wrk                              (macOS)\n"
        "or rerun with --install as root to let the bench do it."
    )


def litellm_installed() -> bool:
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        return False
    out = subprocess.run(
        [
            str(LITELLM_VENV / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.returncode == 0 and out.stdout.strip() == LITELLM_VERSION


def ensure_litellm(force: bool) -> None:
    if not force and litellm_installed():
        return
    log(f"installing LiteLLM proxy {LITELLM_VERSION} into {LITELLM_VENV} (a minute or two)")
    if force and LITELLM_VENV.exists():
        shutil.rmtree(LITELLM_VENV)
    if not (LITELLM_VENV / "bin" / "python").exists():
        # The base interpreter, not the project's venv, so nothing leaks between the two.
        base = getattr(sys, "_base_executable", sys.executable)
        run([base, "-m", "venv", str(LITELLM_VENV)])
    pip = [str(LITELLM_VENV / "bin" / "python"), "-m", "pip"]
    run([*pip, "install", "--quiet", "--upgrade", "pip"])
    run([*pip, "install", "--quiet", f"litellm[proxy]=={LITELLM_VERSION}"])


def portkey_entry() -> Path:
    return PORTKEY_DIR / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"


def ensure_portkey(force: bool) -> None:
    src = BENCH / "portkey" / "package.json"
    dst = PORTKEY_DIR / "package.json"
    up_to_date = dst.exists() and filecmp.cmp(src, dst, shallow=False) and portkey_entry().exists()
    if up_to_date and not force:
        return
    for tool in ("node", "npm"):
        if not shutil.which(tool):
            raise BenchError(
                f"{tool} is not installed (Portkey's gateway is a Node.js program). Install "
                "Node.js 18 or newer, e.g. `apt-get install -y nodejs npm`, or skip Portkey "
                "with --only direct,lattice,litellm."
            )
    log(f"installing Portkey gateway into {PORTKEY_DIR}")
    PORTKEY_DIR.mkdir(parents=True, exist_ok=True)
    if force:
        shutil.rmtree(PORTKEY_DIR / "node_modules", ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (PORTKEY_DIR / "package-lock.json").unlink()
    shutil.copyfile(src, dst)
    run(["npm", "install", "--prefix", str(PORTKEY_DIR), "--no-audit", "--no-fund"])
    if not portkey_entry().exists():
        raise BenchError(f"npm install finished but {portkey_entry()} is missing")


def installed_versions() -> dict[str, str]:
    v: dict[str, str] = {}
    with contextlib.suppress(Exception):
        pj = PORTKEY_DIR / "node_modules" / "@portkey-ai" / "gateway" / "package.json"
        v["portkey-gateway"] = json.loads(pj.read_text())["version"]
        hn = PORTKEY_DIR / "node_modules" / "@hono" / "node-server" / "package.json"
        v["@hono/node-server"] = json.loads(hn.read_text())["version"]
    with contextlib.suppress(Exception):
        v["node"] = subprocess.run(
            ["node", "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
    if litellm_installed():
        v["litellm"] = LITELLM_VERSION
    with contextlib.suppress(Exception):
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
        m = re.search(r"wrk (?:debian/)?(\S+)", out.stdout + out.stderr)
        v["wrk"] = m.group(1) if m else "?"
    return v


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    base_url: str  #: OpenAI base URL, ".../v1"
    api_key: str
    headers: dict[str, str] = field(default_factory=dict)
    model: str = MODEL
    #: How this target reaches the token-delayed mock (streaming); None = not measured.
    stream: tuple[str, dict[str, str], str] | None = None  # (base_url, headers, model)

    @property
    def chat_url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


def chat_body(model: str, *, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello in a few words."}],
        "max_tokens": MAX_TOKENS,
    }
    if stream:
        body["stream"] = True
    return body


def probe_chat(url: str, api_key: str, headers: dict[str, str], model: str) -> dict[str, Any]:
    """One non-streaming chat completion; returns the JSON or raises."""
    req = urllib.request.Request(
        url,
        data=json.dumps(chat_body(model)).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {api_key}",
            **headers,
        },
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    if not data.get("choices"):
        raise BenchError(f"not a chat completion from {url}: {str(data)[:300]}")
    return data


def wait_ready(
    procs: Procs,
    name: str,
    proc: subprocess.Popen[bytes],
    probe: Callable[[], Any],
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(
                f"{name} exited with {proc.returncode} during start-up; its log:\n"
                + procs.log_tail(name)
            )
        try:
            probe()
            return
        except urllib.error.HTTPError as exc:
            last = exc
            body = exc.read()[:300]
            if exc.code in (400, 401, 403, 404, 422):  # up, but the request is wrong: no point
                raise BenchError(f"{name} answered {exc.code}: {body!r}") from exc
        except (OSError, ValueError, BenchError) as exc:
            last = exc
        time.sleep(0.25)
    raise BenchError(
        f"{name} not ready after {timeout:.0f}s (last error: {last}); its log:\n"
        + procs.log_tail(name)
    )


def sim_argv() -> list[str]:
    """How to run daemon.sim.server with arguments (it may or may not have a __main__ guard)."""
    src = ROOT / "daemon" / "sim" / "server.py"
    if not src.exists():
        raise BenchError(
            f"{src} does not exist (yet): the bench's mock upstream is the project's simulator"
        )
    if re.search(r"""^if __name__ == ["']__main__["']""", src.read_text(), re.M):
        return [sys.executable, "-m", "daemon.sim.server"]
    return [
        sys.executable,
        "-c",
        "import sys; from daemon.sim.server import main; sys.exit(main())",
    ]


def start_mock(procs: Procs, name: str, token_delay_ms: float) -> str:
    port = free_port()
    argv = [
        *sim_argv(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--token-delay-ms",
        f"{token_delay_ms:g}",
        "--model",
        MODEL,
    ]
    proc = procs.spawn(name, argv, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    base = f"http://127.0.0.1:{port}/v1"
    wait_ready(
        procs, name, proc, lambda: probe_chat(base + "/chat/completions", DIRECT_KEY, {}, MODEL), 30
    )
    return base


def start_litellm(procs: Procs, mock_base: str, run_dir: Path) -> Target:
    port = free_port()
    tmpl = (BENCH / "litellm" / "config.yaml").read_text()
    cfg = (
        tmpl.replace("{{MODEL}}", MODEL)
        .replace("{{MOCK_BASE_URL}}", mock_base)
        .replace("{{MASTER_KEY}}", LITELLM_MASTER_KEY)
    )
    cfg_path = run_dir / "litellm-config.yaml"
    cfg_path.write_text(cfg)
    env = {
        **os.environ,
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price map from the internet
        "DISABLE_ADMIN_UI": "True",
        "NO_DOCS": "True",
    }
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{LITELLM_VENV / 'bin'}:{env.get('PATH', '')}"
    argv = [
        str(LITELLM_VENV / "bin" / "litellm"),
        "--config",
        str(cfg_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    proc = procs.spawn("litellm", argv, env=env, cwd=run_dir)
    t = Target("litellm", f"http://127.0.0.1:{port}/v1", LITELLM_MASTER_KEY)
    wait_ready(procs, "litellm", proc, lambda: probe_chat(t.chat_url, t.api_key, {}, MODEL), 180)
    return t


def portkey_headers(mock_base: str) -> dict[str, str]:
    return {"x-portkey-provider": "openai", "x-portkey-custom-host": mock_base}


def start_portkey(procs: Procs, mock_base: str, stream_mock_base: str) -> Target:
    port = free_port()
    env = {**os.environ, "NODE_ENV": "production"}
    argv = ["node", str(portkey_entry()), f"--port={port}", "--headless"]
    proc = procs.spawn("portkey", argv, env=env, cwd=PORTKEY_DIR)
    t = Target("portkey", f"http://127.0.0.1:{port}/v1", DIRECT_KEY, portkey_headers(mock_base))
    t.stream = (t.base_url, portkey_headers(stream_mock_base), MODEL)
    wait_ready(
        procs, "portkey", proc, lambda: probe_chat(t.chat_url, t.api_key, t.headers, MODEL), 60
    )
    return t


def prepare_lattice(setup: Any, mock_base: str, stream_mock_base: str) -> None:
    from bench.lattice_setup import Route

    setup.prepare(
        [
            Route(MODEL, mock_base, MODEL),
            Route(STREAM_ROUTE, stream_mock_base, MODEL),
        ]
    )


def start_lattice(
    procs: Procs,
    mock_base: str,
    stream_mock_base: str,
    run_dir: Path,
    workers: list[int],
    cleanups: list[Callable[[], None]],
    nometer: bool = False,
) -> dict[int | str, Target]:
    """Lattice gateways (one per entry of ``workers``) sharing one Redis/catalog/key; the
    Redis, catalog and key come from bench/lattice_setup.py (the lead's plug-in point).
    ``nometer`` adds a one-process gateway with usage metering off (``LATTICE_METERING=0``),
    keyed ``"nometer"``, so that what metering costs is measured in the same run."""
    sys.path.insert(0, str(ROOT))
    from bench.lattice_setup import LatticeSetup

    setup = LatticeSetup(run_dir / "lattice", spawn=procs.spawn)
    cleanups.append(setup.stop)
    try:
        prepare_lattice(setup, mock_base, stream_mock_base)
    except NotImplementedError as exc:
        raise BenchError(
            f"the Lattice target is not wired yet (bench/lattice_setup.py: {exc}); "
            "leave it out with --only direct,litellm,portkey or use --keep-going"
        ) from exc
    assert setup.api_key is not None
    out: dict[int | str, Target] = {}
    pnames: dict[int | str, str] = {}
    for n in workers:
        base = setup.start_gateway(free_port(), workers=n)
        name = "lattice" if n == 1 else f"lattice-{n}w"
        t = Target(name, base, setup.api_key)
        t.stream = (base, {}, STREAM_ROUTE) if n == 1 else None
        out[n] = t
        pnames[n] = f"lattice-{n}w"  # the name LatticeSetup.start_gateway spawns it under
    if nometer:
        base = setup.start_gateway(
            free_port(), name="lattice-nometer", env={"LATTICE_METERING": "0"}
        )
        out["nometer"] = Target("lattice-nometer", base, setup.api_key)
        pnames["nometer"] = "lattice-nometer"
    for n, t in out.items():
        pname = pnames[n]
        proc = procs.find(pname)
        wait_ready(procs, pname, proc, lambda t=t: probe_chat(t.chat_url, t.api_key, {}, MODEL), 60)
        # Streaming route too, so a broken offering fails here and not mid-measurement.
        wait_ready(
            procs, pname, proc, lambda t=t: probe_chat(t.chat_url, t.api_key, {}, STREAM_ROUTE), 30
        )
    return out


# --------------------------------------------------------------------------------------------
# wrk (non-streaming)
# --------------------------------------------------------------------------------------------
def run_wrk(t: Target, *, threads: int, conns: int, seconds: float) -> dict[str, Any]:
    env = {
        **os.environ,
        "BENCH_BODY": json.dumps(chat_body(t.model), separators=(",", ":")),
        "BENCH_API_KEY": t.api_key,
        "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in t.headers.items()),
    }
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(WRK_SCRIPT),
        t.chat_url,
    ]
    out = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    m = re.search(r"^BENCH_JSON (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or not m:
        raise BenchError(f"wrk failed on {t.name} ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    r: dict[str, Any] = json.loads(m.group(1))
    r["load1_after"] = round(os.getloadavg()[0], 2)
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = sum(v for k, v in r.items() if k.startswith("err_"))
    for k in ("p50", "p90", "p99", "max"):
        r[f"{k}_ms"] = r.pop(f"{k}_us") / 1000
    r["mean_ms"] = r.pop("mean_us") / 1000
    return r


# --------------------------------------------------------------------------------------------
# Streaming client (aiohttp): wrk cannot see when the first chunk arrives.
# --------------------------------------------------------------------------------------------
async def _stream_once(
    session: Any, url: str, headers: dict[str, str], model: str
) -> dict[str, Any]:
    body = json.dumps(chat_body(model, stream=True))
    hdrs = {"Content-Type": "application/json", "Accept": "text/event-stream", **headers}
    t0 = time.perf_counter()
    first_event = first_token = None
    token_times: list[float] = []
    events = 0
    done = False
    async with session.post(url, data=body, headers=hdrs) as resp:
        if resp.status != 200:
            raise BenchError(f"stream {url}: HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:  # one SSE line at a time, as soon as it has arrived
            now = time.perf_counter()
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                continue
            events += 1
            if first_event is None:
                first_event = now
            with contextlib.suppress(ValueError):
                chunk = json.loads(payload)
                for ch in chunk.get("choices") or []:
                    if (ch.get("delta") or {}).get("content"):
                        token_times.append(now)
                        if first_token is None:
                            first_token = now
                        break
    end = time.perf_counter()
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(token_times)]
    return {
        "ttfc_ms": ((first_event or end) - t0) * 1000,
        "ttft_ms": ((first_token or end) - t0) * 1000,
        "total_ms": (end - t0) * 1000,
        "events": events,
        "tokens": len(token_times),
        "done": done,
        "gaps_ms": [round(g, 3) for g in gaps],
    }


async def stream_rounds(
    targets: list[Target], n_per_round: int, rounds: int
) -> dict[str, list[dict[str, Any]]]:
    import aiohttp

    out: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    timeout = aiohttp.ClientTimeout(total=60)
    sessions = {}
    try:
        for t in targets:
            # One keep-alive connection per target, like an SDK client making sequential calls.
            sessions[t.name] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1), timeout=timeout
            )
        for t in targets:  # warm-up (connection, JIT, caches)
            assert t.stream is not None
            base, hdrs, model = t.stream
            await _stream_once(
                sessions[t.name],
                base + "/chat/completions",
                {"Authorization": f"Bearer {t.api_key}", **hdrs},
                model,
            )
        for _ in range(rounds):
            for t in targets:
                assert t.stream is not None
                base, hdrs, model = t.stream
                for _ in range(n_per_round):
                    out[t.name].append(
                        await _stream_once(
                            sessions[t.name],
                            base + "/chat/completions",
                            {"Authorization": f"Bearer {t.api_key}", **hdrs},
                            model,
                        )
                    )
    finally:
        for s in sessions.values():
            await s.close()
    return out


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------
def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def summarize(raw: dict[str, Any], token_delay_ms: float) -> dict[str, Any]:
    s: dict[str, Any] = {"targets": {}, "ratios": {}, "stream": {}, "scaling": {}}
    c1, c32 = raw["c1"], raw["c32"]
    for name in list(dict.fromkeys([*c1, *c32])):
        rs1, rs32 = c1.get(name, []), c32.get(name, [])
        s["targets"][name] = {
            "p50_ms": med([r["p50_ms"] for r in rs1]),
            "p99_ms": med([r["p99_ms"] for r in rs1]),
            "rps_c1": med([r["rps"] for r in rs1]),
            "rps_c32": med([r["rps"] for r in rs32]),
            "p50_ms_c32": med([r["p50_ms"] for r in rs32]),
            "p99_ms_c32": med([r["p99_ms"] for r in rs32]),
            "errors": sum(r["errors"] for r in [*rs1, *rs32]),
            "requests": sum(r["requests"] for r in [*rs1, *rs32]),
            "rounds": max(len(rs1), len(rs32)),
        }
    d = s["targets"].get("direct")
    for _name, v in s["targets"].items():
        if d and d["p50_ms"] is not None and v["p50_ms"] is not None:
            v["added_p50_ms"] = v["p50_ms"] - d["p50_ms"]
            v["added_p99_ms"] = v["p99_ms"] - d["p99_ms"]
        if d and d["rps_c32"] and v["rps_c32"]:
            v["rps_vs_direct"] = v["rps_c32"] / d["rps_c32"]
    tg = s["targets"]
    lat = tg.get("lattice", {}).get("rps_c32")
    for other in ("litellm", "portkey"):
        o = tg.get(other, {}).get("rps_c32")
        if lat and o:
            s["ratios"][f"lattice/{other}"] = lat / o
    nm = tg.get("lattice-nometer", {})
    if tg.get("lattice", {}).get("p50_ms") is not None and nm.get("p50_ms") is not None:
        # What usage metering adds to a request: the same gateway with metering on and off.
        s["metering"] = {
            "p50_on_ms": tg["lattice"]["p50_ms"],
            "p50_off_ms": nm["p50_ms"],
            "added_p50_ms": tg["lattice"]["p50_ms"] - nm["p50_ms"],
            "p99_on_ms": tg["lattice"]["p99_ms"],
            "p99_off_ms": nm["p99_ms"],
        }
    l2 = tg.get("lattice-2w", {}).get("rps_c32")
    if lat and l2:
        s["scaling"] = {"rps_1w": lat, "rps_2w": l2, "ratio_2w/1w": l2 / lat}
    for name, reqs in raw.get("stream", {}).items():
        gaps = [g for r in reqs for g in r["gaps_ms"]]
        s["stream"][name] = {
            "requests": len(reqs),
            "ttfc_p50_ms": med([r["ttfc_ms"] for r in reqs]),
            "ttfc_p90_ms": pct([r["ttfc_ms"] for r in reqs], 90),
            "ttft_p50_ms": med([r["ttft_ms"] for r in reqs]),
            "total_p50_ms": med([r["total_ms"] for r in reqs]),
            "tokens_per_req": med([r["tokens"] for r in reqs]),
            "gap_p50_ms": med(gaps),
            "gap_p10_ms": pct(gaps, 10),
            "gap_p90_ms": pct(gaps, 90),
            # Share of token chunks that arrived glued to the previous one (< 1/4 of the
            # mock's per-token delay after it): buffering in the gateway shows up here.
            "coalesced_frac": (sum(g < token_delay_ms / 4 for g in gaps) / len(gaps))
            if gaps
            else None,
            "all_done": all(r["done"] for r in reqs),
        }
    sd = s["stream"].get("direct")
    for name, v in s["stream"].items():
        if sd and name != "direct":
            v["added_ttft_ms"] = v["ttft_p50_ms"] - sd["ttft_p50_ms"]
            v["added_total_ms"] = v["total_p50_ms"] - sd["total_p50_ms"]
            v["added_ttfc_ms"] = v["ttfc_p50_ms"] - sd["ttfc_p50_ms"]
            # No chunk held back: same chunk count, gaps like direct's, nothing glued together,
            # and the first event (even a content-less role chunk) not waiting for the next.
            problems = []
            if v["tokens_per_req"] != sd["tokens_per_req"]:
                problems.append(f"{v['tokens_per_req']:g} tokens, direct {sd['tokens_per_req']:g}")
            if v["added_ttfc_ms"] >= token_delay_ms / 2:
                problems.append(f"first event +{v['added_ttfc_ms']:.0f} ms")
            if v["ttft_p50_ms"] >= sd["ttft_p50_ms"] + token_delay_ms:
                problems.append(f"first token +{v['added_ttft_ms']:.0f} ms")
            if (
                v["gap_p50_ms"] is None
                or sd["gap_p50_ms"] is None
                or abs(v["gap_p50_ms"] - sd["gap_p50_ms"]) >= max(3.0, token_delay_ms * 0.25)
            ):
                problems.append(f"median gap {fmt(v['gap_p50_ms'], 1)} ms")
            if (v["coalesced_frac"] or 0) > (sd["coalesced_frac"] or 0) + 0.05:
                problems.append(f"{(v['coalesced_frac'] or 0) * 100:.0f}% chunks glued")
            v["no_holdback"] = not problems
            v["holdback_problems"] = problems
    return s


def fmt(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def render_tables(res: dict[str, Any]) -> str:
    s = res["summary"]
    m = res["meta"]
    lines = [
        f"Non-streaming chat completion ({MAX_TOKENS} output tokens, mock with no token delay); "
        f"medians of {m['rounds']} interleaved rounds of {m['seconds']:g}s each.",
        "",
        "| target | p50 c=1 (ms) | p99 c=1 (ms) | added p50 (ms) | added p99 (ms) "
        "| req/s c=32 | vs direct | p99 c=32 (ms) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in s["targets"].items():
        lines.append(
            f"| {name} | {fmt(v['p50_ms'])} | {fmt(v['p99_ms'])} | {fmt(v.get('added_p50_ms'))} "
            f"| {fmt(v.get('added_p99_ms'))} | {fmt(v['rps_c32'], 0)} "
            f"| {fmt(v.get('rps_vs_direct'))} | {fmt(v['p99_ms_c32'])} | {v['errors']} |"
        )
    if s["ratios"]:
        lines += [
            "",
            "Throughput ratios at c=32: "
            + ", ".join(f"{k} = {v:.2f}x" for k, v in s["ratios"].items()),
        ]
    if s.get("metering"):
        me = s["metering"]
        lines += [
            "",
            f"Usage metering (c=1, same run): p50 {me['p50_on_ms']:.3f} ms with metering, "
            f"{me['p50_off_ms']:.3f} ms without (`LATTICE_METERING=0`): metering adds "
            f"{me['added_p50_ms']:.3f} ms p50 (target <= 0.2 ms); p99 {me['p99_on_ms']:.2f} / "
            f"{me['p99_off_ms']:.2f} ms.",
        ]
    if s["scaling"]:
        sc = s["scaling"]
        lines += [
            "",
            f"Scaling (Lattice, c=32): 1 process {sc['rps_1w']:,.0f} req/s, "
            f"2 processes {sc['rps_2w']:,.0f} req/s, ratio {sc['ratio_2w/1w']:.2f}x "
            f"(on {m['machine']['nproc']} cores shared with wrk and the mock).",
        ]
    if s["stream"]:
        lines += [
            "",
            f"Streaming chat at c=1 ({MAX_TOKENS} tokens, mock token delay "
            f"{m['stream_token_delay_ms']:g} ms), {m['stream_requests']} sequential requests "
            "per target:",
            "",
            "| target | first event p50 (ms) | first token p50 (ms) | added TTFT (ms) "
            "| total p50 (ms) | chunk gap p10/p50/p90 (ms) | glued chunks | no chunk held back |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, v in s["stream"].items():
            nh = v.get("no_holdback")
            verdict = (
                "-" if nh is None else "yes" if nh else "NO: " + ", ".join(v["holdback_problems"])
            )
            lines.append(
                f"| {name} | {fmt(v['ttfc_p50_ms'])} | {fmt(v['ttft_p50_ms'])} "
                f"| {fmt(v.get('added_ttft_ms'))} | {fmt(v['total_p50_ms'])} "
                f"| {fmt(v['gap_p10_ms'], 1)} / {fmt(v['gap_p50_ms'], 1)} / "
                f"{fmt(v['gap_p90_ms'], 1)} | {fmt((v['coalesced_frac'] or 0) * 100, 0)}% "
                f"| {verdict} |"
            )
    if m.get("skipped"):
        lines += ["", "Not measured: " + "; ".join(f"{k} ({v})" for k, v in m["skipped"].items())]
    return "\n".join(lines)


def render_markdown_section(res: dict[str, Any]) -> str:
    m = res["meta"]
    mach = m["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return "\n".join(
        [
            f"## Gateway benchmark, {m['timestamp'][:10]}",
            "",
            f"- Machine: {mach['nproc']} cores ({mach['cpu']}), {mach['os']}, "
            f"Python {mach['python']}",
            f"- Versions: {versions}",
            "- Mock upstream: `daemon.sim.server` (one process); each target is one server process "
            "(Lattice also with 2), wrk and the mock on the same machine.",
            f"- Load average (1 min) before the run {m['loadavg_start'][0]:.2f}, median during "
            f"the measurements {fmt(m['load1_during_median'])} (other work on the machine "
            "shows here).",
            f"- Command: `{m['command']}`",
            "",
            render_tables(res),
            "",
        ]
    )


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP become KeyboardInterrupt so the ``finally`` that stops the
    servers runs."""

    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    # Ctrl-C too, even when started from a shell that had SIGINT ignored (background jobs).
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--only",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated targets out of {','.join(ALL_TARGETS)} (default: all)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 rounds of 3s per measurement (about 1.5 minutes)",
    )
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 2)")
    p.add_argument("--seconds", type=float, help="duration of one wrk run (default 8; --quick 3)")
    p.add_argument(
        "--stream-requests",
        type=int,
        help="streaming requests per target per round (default 10; --quick 4)",
    )
    p.add_argument(
        "--token-delay-ms",
        type=float,
        default=20.0,
        help="the streaming mock's per-token delay (default 20)",
    )
    p.add_argument("--no-scaling", action="store_true", help="skip Lattice with 2 processes")
    p.add_argument("--no-stream", action="store_true", help="skip the streaming measurements")
    p.add_argument(
        "--install",
        action="store_true",
        help="(re)install LiteLLM, Portkey and (as root, with apt-get) wrk, then run",
    )
    p.add_argument("--install-only", action="store_true", help="install, then exit")
    p.add_argument(
        "--markdown", action="store_true", help="print a section ready to paste into BENCHMARKS.md"
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="if a target fails to start, leave it out instead of stopping",
    )
    a = p.parse_args(argv)
    a.targets = [t.strip() for t in a.only.split(",") if t.strip()]
    bad = [t for t in a.targets if t not in ALL_TARGETS]
    if bad or not a.targets:
        p.error(f"unknown target(s) {bad}; choose from {','.join(ALL_TARGETS)}")
    a.rounds = a.rounds or (2 if a.quick else 3)
    a.seconds = a.seconds or (3.0 if a.quick else 8.0)
    a.stream_requests = a.stream_requests or (4 if a.quick else 10)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(
        ["python", "bench/gateway_bench.py", *(sys.argv[1:] if argv is None else argv)]
    )
    ensure_wrk(args.install or args.install_only)
    if "litellm" in args.targets or args.install_only:
        ensure_litellm(args.install)
    if "portkey" in args.targets or args.install_only:
        ensure_portkey(args.install)
    if args.install_only:
        log("installed: " + json.dumps(installed_versions()))
        return 0

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = WORK / f"run-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    procs = Procs(run_dir / "logs")
    cleanups: list[Callable[[], None]] = []
    skipped: dict[str, str] = {}
    raw: dict[str, Any] = {"c1": {}, "c32": {}, "stream": {}}
    t_start = time.monotonic()
    load_start = os.getloadavg()
    if load_start[0] > (os.cpu_count() or 1) * 0.5:
        log(
            f"warning: load average {load_start[0]:.2f} on {os.cpu_count()} cores before the "
            "run: other work on this machine will blur the figures"
        )
    try:
        with terminate_on_signals():
            log(f"run directory {run_dir}")
            mock = start_mock(procs, "mock", 0)
            stream_mock = None
            if not args.no_stream:
                stream_mock = start_mock(procs, "mock-stream", args.token_delay_ms)

            targets: list[Target] = []
            extra_c32: list[Target] = []
            for name in args.targets:
                try:
                    if name == "direct":
                        t = Target("direct", mock, DIRECT_KEY)
                        if stream_mock:
                            t.stream = (stream_mock, {}, MODEL)
                        targets.append(t)
                    elif name == "litellm":
                        targets.append(start_litellm(procs, mock, run_dir))
                    elif name == "portkey":
                        targets.append(start_portkey(procs, mock, stream_mock or mock))
                    elif name == "lattice":
                        workers = [1] if args.no_scaling else [1, 2]
                        lt = start_lattice(
                            procs,
                            mock,
                            stream_mock or mock,
                            run_dir,
                            workers,
                            cleanups,
                            nometer="lattice-nometer" in args.targets,
                        )
                        targets.append(lt[1])
                        if "nometer" in lt:
                            targets.append(lt["nometer"])
                        if 2 in lt:
                            extra_c32.append(lt[2])
                    elif name == "lattice-nometer" and "lattice" not in args.targets:
                        raise BenchError("lattice-nometer runs alongside the lattice target")
                except (BenchError, NotImplementedError) as exc:
                    if not args.keep_going:
                        raise
                    log(f"skipping {name}: {exc!r}")
                    skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"

            # Warm-up: one short load per target (connection pools, JITs, caches).
            for t in [*targets, *extra_c32]:
                run_wrk(t, threads=2, conns=32, seconds=1 if args.quick else 2)

            for rnd in range(args.rounds):
                log(f"round {rnd + 1}/{args.rounds}: c=1 latency")
                for t in targets:
                    r = run_wrk(t, threads=1, conns=1, seconds=args.seconds)
                    raw["c1"].setdefault(t.name, []).append(r)
                    log(
                        f"  {t.name:11s} c=1  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} "
                        f"ms  errors {r['errors']}"
                    )
                log(f"round {rnd + 1}/{args.rounds}: c=32 throughput")
                for t in [*targets, *extra_c32]:
                    r = run_wrk(t, threads=2, conns=32, seconds=args.seconds)
                    raw["c32"].setdefault(t.name, []).append(r)
                    log(
                        f"  {t.name:11s} c=32 {r['rps']:8.0f} req/s  p99 {r['p99_ms']:7.2f} ms"
                        f"  errors {r['errors']}"
                    )

            stream_targets = [t for t in targets if t.name in STREAM_TARGETS and t.stream]
            if stream_targets:
                log(
                    f"streaming: {args.rounds} rounds x {args.stream_requests} requests per "
                    f"target ({', '.join(t.name for t in stream_targets)})"
                )
                raw["stream"] = asyncio.run(
                    stream_rounds(stream_targets, args.stream_requests, args.rounds)
                )
    except KeyboardInterrupt:
        log("interrupted; stopping servers")
        raise
    finally:
        procs.stop_all()
        for fn in reversed(cleanups):
            try:
                fn()
            except Exception as exc:  # keep stopping the rest
                log(f"cleanup failed: {exc!r}")
        log("all servers stopped")

    res: dict[str, Any] = {
        "meta": {
            "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command,
            "machine": machine_info(),
            "versions": installed_versions(),
            "targets": args.targets,
            "rounds": args.rounds,
            "seconds": args.seconds,
            "max_tokens": MAX_TOKENS,
            "model": MODEL,
            "stream_token_delay_ms": args.token_delay_ms,
            "stream_requests": args.stream_requests * args.rounds,
            "wrk": {
                "c1": "-t1 -c1 --latency",
                "c32": "-t2 -c32 --latency",
                "script": "bench/wrk/chat.lua",
            },
            "skipped": skipped,
            "wall_s": round(time.monotonic() - t_start, 1),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "load1_during_median": med(
                [r["load1_after"] for k in ("c1", "c32") for rs in raw[k].values() for r in rs]
            ),
        },
        "summary": summarize(raw, args.token_delay_ms),
        "raw": raw,
    }
    out = WORK / f"results-{stamp}.json"
    out.write_text(json.dumps(res, indent=2))
    print(render_tables(res))
    print(f"\nResults: {out.relative_to(ROOT)} (wall time {res['meta']['wall_s']:.0f}s)")
    if args.markdown:
        print("\n" + "-" * 72 + "\n")
        print(render_markdown_section(res))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"gateway_bench: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
