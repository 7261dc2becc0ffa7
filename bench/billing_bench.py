#!/usr/bin/env python3
"""Billing worker throughput: usage records from the Redis stream into the fake Stripe.

Starts a real ``redis-server`` (AOF on, like production) and the fake Stripe server
(``python -m billing.fake_stripe``, its own process), fills ``lat:usage`` with N usage records
over several workspaces (XADD ``r=<msgpack>``, exactly as the spool shipper writes them), then
runs one :class:`billing.worker.BillingWorker` (real ``stripe`` library, v1 meter events or the
v2 stream with ``--v2``) in this process until every record is acknowledged, and checks that
the result is exact (``reconcile``: zero difference; the ledger's pico-USD sums equal the
records'). Measured from the first read to the last acknowledgement, per configuration:

    python bench/billing_bench.py                         # 100k records, two window sizes
    python bench/billing_bench.py --records 20000 --configs 60:1000
    python bench/billing_bench.py --markdown              # also the machine, for BENCHMARKS.md

A configuration is ``<window_s>:<batch>``; records span the last ``--span-s`` seconds, so the
window size sets how many meter events there are (workspaces x windows). The time to all
acknowledged includes ``--grace-s`` (a window is closed once nothing was folded into it for
that long), reported separately.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgspec
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from billing.keys import USAGE_GROUP, USAGE_STREAM  # noqa: E402
from billing.ledger import Ledger  # noqa: E402
from billing.reconcile import reconcile  # noqa: E402
from billing.stripe_api import stripe_api_from_env  # noqa: E402
from billing.usage import UsageRecord, encode_record  # noqa: E402
from billing.worker import BillingWorker, WorkerConfig  # noqa: E402
from gateway.redis_server import RedisServer, free_port  # noqa: E402


def make_records(n: int, workspaces: int, span_s: int, window_s: int) -> list[UsageRecord]:
    """``n`` records in time order over ``span_s`` seconds ending just before the current
    window (which could not close before its end: that wait is not the worker's speed)."""
    end_ms = int(time.time()) // window_s * window_s * 1000 - 1
    start_ms = end_ms - span_s * 1000
    return [
        UsageRecord(
            dispatch_id=f"dsp_bench_{i}",
            request_id=f"req_bench_{i}",
            workspace=f"ws{i % workspaces:03d}",
            task="chat-completion",
            model="lovelace:llama-3.2-3b-instruct",
            offering="hosted-llama",
            provider="hosted",
            units={"prompt_tokens": 20 + i % 400, "completion_tokens": 16 + i % 100},
            prices={"prompt_tokens": 150_000, "completion_tokens": 600_000},
            price_per=1_000_000,
            cost_picousd=(20 + i % 400) * 150_000 + (16 + i % 100) * 600_000,
            cost_microusd=0,
            started_ms=start_ms + i * span_s * 1000 // n - 40,
            finished_ms=start_ms + i * span_s * 1000 // n,
        )
        for i in range(n)
    ]


async def fill(redis: aioredis.Redis, records: list[UsageRecord]) -> None:
    for start in range(0, len(records), 5000):
        async with redis.pipeline(transaction=False) as pipe:
            for r in records[start : start + 5000]:
                pipe.xadd(USAGE_STREAM, {"r": encode_record(r)})
            await pipe.execute()


async def drained(redis: aioredis.Redis) -> bool:
    group = (await redis.xinfo_groups(USAGE_STREAM))[0]
    last = group["last-delivered-id"].decode()
    unread = await redis.xrange(USAGE_STREAM, f"({last}", "+", count=1)
    return not unread and int(group["pending"]) == 0 and not await redis.zcard("lat:bill:open")


@contextlib.contextmanager
def fake_stripe() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "billing.fake_stripe", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the fake Stripe did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def reset_fake(stripe_url: str) -> None:
    request = urllib.request.Request(f"{stripe_url}/_fake/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass


async def run_config(
    redis_url: str, stripe_url: str, window_s: int, batch: int, args: argparse.Namespace
) -> dict[str, object]:
    # a fresh ledger and a fresh Stripe: identifiers of one configuration would collide with
    # the previous one's (same windows, forgotten ledger) and be refused as reused keys
    await asyncio.to_thread(reset_fake, stripe_url)
    redis = aioredis.Redis.from_url(redis_url)
    await redis.flushall()
    records = make_records(args.records, args.workspaces, args.span_s, window_s)
    await fill(redis, records)
    env = {"LATTICE_STRIPE_API_KEY": "sk_test_bench", "LATTICE_STRIPE_API_BASE": stripe_url}
    api = stripe_api_from_env(env, use_v2_stream=args.v2)
    config = WorkerConfig(window_s=window_s, grace_s=args.grace_s, batch=batch)
    worker = BillingWorker(redis, api, config)
    await worker.stripe.ensure_meter(event_name="lattice_usage_microusd", display_name="bench")
    t0 = time.perf_counter()
    folded_at = None
    while True:
        report = await worker.run_once()
        if folded_at is None and worker.totals.folded == len(records):
            folded_at = time.perf_counter()
        if await drained(redis):
            break
        if not report.read:
            await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - t0
    assert folded_at is not None
    ledger = Ledger(redis)
    check = await reconcile(
        ledger, api, int(time.time()) - args.span_s - 120, int(time.time()) + 60
    )
    states = await ledger.windows(0, 2**40)
    exact = sum(seg.picousd for s in states for seg in s.segments) == sum(
        r.cost_picousd for r in records
    )
    pending = (await redis.xpending(USAGE_STREAM, USAGE_GROUP))["pending"]
    dead = int(await redis.xlen("lat:usage:dead"))
    await api.aclose()
    await redis.aclose()
    t = worker.totals
    return {
        "window_s": window_s,
        "batch": batch,
        "records": len(records),
        "segments": t.segments_sent,
        "events": t.events_accepted,
        "fold_s": folded_at - t0,
        "fold_rps": len(records) / (folded_at - t0),
        "total_s": elapsed,
        "rps": len(records) / elapsed,
        "rps_no_grace": len(records) / max(1e-9, elapsed - args.grace_s),
        "exact": exact and check.ok and pending == 0 and dead == 0,
    }


def table(results: list[dict[str, object]], args: argparse.Namespace) -> str:
    mode = "v2 meter event stream, 100 per request" if args.v2 else "v1, 16 concurrent requests"
    lines = [
        f"Billing worker, {args.records:,} records over {args.workspaces} workspaces spanning "
        f"{args.span_s} s; grace {args.grace_s} s; Stripe calls: {mode}; "
        "events_per_call 100.",
        "",
        "| window (s) | batch (XREADGROUP + 1 fold script) | segments | meter events "
        "| read+fold (records/s) | first read → all acked (s) | records/s "
        "| records/s without grace | exact (reconcile 0, nothing pending) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['window_s']} | {r['batch']:,} | {r['segments']} | {r['events']} "
            f"| {r['fold_rps']:,.0f} | {r['total_s']:.2f} | {r['rps']:,.0f} "
            f"| {r['rps_no_grace']:,.0f} | {'yes' if r['exact'] else 'NO'} |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


async def main_async(args: argparse.Namespace) -> int:
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp, fake_stripe() as stripe_url:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            for window_s, batch in configs:
                results.append(await run_config(server.url, stripe_url, window_s, batch, args))
        finally:
            server.stop()
    if args.json:
        print(msgspec.json.encode(results).decode())
    print(table(results, args))
    if args.markdown:
        cpu = cpu_model()
        print()
        print(
            f"- Machine: {os.cpu_count()} cores ({cpu}), {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}"
        )
        print(f"- Load average (1 min) after the run: {os.getloadavg()[0]:.2f}")
        print(f"- Command: `python bench/billing_bench.py {' '.join(sys.argv[1:])}`")
    return 0 if all(r["exact"] for r in results) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--workspaces", type=int, default=10)
    parser.add_argument("--span-s", type=int, default=300, help="records span the last S seconds")
    parser.add_argument(
        "--configs", default="60:1000,10:1000,60:5000", help="comma-separated <window_s>:<batch>"
    )
    parser.add_argument("--grace-s", type=float, default=0.5)
    parser.add_argument("--v2", action="store_true", help="send through the v2 meter event stream")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
