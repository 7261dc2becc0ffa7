"""The billing worker through the real ``stripe`` library against the fake Stripe server
(billing/fake_stripe), in real time with short windows: outages (500s, resets), 429 with
Retry-After, a deleted customer, and worker *processes* (``python -m billing.worker``) killed
with SIGKILL mid-batch and restarted, or running two at once. Exactness is checked on every
level: each record folded once, the ledger's exact pico-USD sums equal the records', every
segment's value is what Stripe holds under its identifier, nothing left pending, and
``lattice billing reconcile`` finds no difference."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from billing.cli import main as billing_main
from billing.fake_stripe import FakeStripeServer
from billing.keys import USAGE_DEAD_STREAM, USAGE_GROUP, USAGE_STREAM, billing_window_ids
from billing.ledger import Ledger
from billing.reconcile import reconcile
from billing.stripe_api import MeterEvent, MeterEventResult, StripeClientApi, stripe_api_from_env
from billing.usage import UsageRecord
from billing.windows import COST_METER
from billing.worker import BillingWorker, WorkerConfig
from catalog.pricing import picousd_to_microusd
from tests.billing_records import add_records, usage

ROOT = Path(__file__).resolve().parents[2]
FAST = WorkerConfig(
    window_s=1,
    grace_s=0.3,
    batch=5000,
    block_ms=100,
    lock_ms=2000,
    dead_consumer_ms=1000,
    reclaim_every_s=0.5,
    backoff_base_s=0.02,
    backoff_cap_s=0.3,
)
WORKER_FLAGS = [
    "--window-s=1",
    "--grace-s=0.3",
    "--block-ms=100",
    "--lock-ms=2000",
    "--dead-consumer-ms=1000",
    "--reclaim-s=0.5",
    "--backoff-cap-s=0.3",
]


@pytest.fixture
def fake() -> Iterator[FakeStripeServer]:
    server = FakeStripeServer().start()
    yield server
    server.stop()


def stripe_env(fake: FakeStripeServer) -> dict[str, str]:
    return {"LATTICE_STRIPE_API_KEY": "sk_test_lattice", "LATTICE_STRIPE_API_BASE": fake.url}


@pytest.fixture
async def api(fake: FakeStripeServer) -> AsyncIterator[StripeClientApi]:
    client = stripe_api_from_env(stripe_env(fake), timeout_s=2.0)
    yield client
    await client.aclose()


def recent_records(n: int, workspaces: Sequence[str], *, span_s: int = 20) -> list[UsageRecord]:
    """``n`` records over the last ``span_s`` seconds (in time order, like a live stream),
    costs that are not whole micro-USD."""
    now_ms = int(time.time() * 1000)
    return [
        usage(
            i,
            workspace=workspaces[i % len(workspaces)],
            finished_ms=now_ms - span_s * 1000 + i * span_s * 1000 // n,
            cost_picousd=300_000 + (i * 7919) % 2_000_003,
        )
        for i in range(n)
    ]


async def drained(redis: aioredis.Redis) -> bool:
    if not await redis.exists(USAGE_STREAM):
        return False
    groups = await redis.xinfo_groups(USAGE_STREAM)
    if not groups:
        return False
    last = groups[0]["last-delivered-id"].decode()
    unread = await redis.xrange(USAGE_STREAM, f"({last}", "+", count=1)
    return not unread and int(groups[0]["pending"]) == 0 and not await redis.zcard("lat:bill:open")


async def wait_drained(redis: aioredis.Redis, timeout: float = 45.0) -> None:
    deadline = time.monotonic() + timeout
    while not await drained(redis):
        assert time.monotonic() < deadline, "the stream was not drained in time"
        await asyncio.sleep(0.1)


async def run_until_drained(worker: BillingWorker, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await drained(worker.ledger.redis):
        assert time.monotonic() < deadline, "the worker did not drain the stream"
        report = await worker.run_once()
        if not report.read:
            await asyncio.sleep(0.05)


def accepted_events(fake: FakeStripeServer) -> dict[str, tuple[str, int]]:
    """identifier → (customer, value) of the cost meter's events the fake accepted."""
    with fake.locked() as state:
        meter_ids = {m.id for m in state.meters.values() if m.event_name == COST_METER}
        events = [e for e in state.meter_events if e.meter in meter_ids]
    out = {e.identifier: (e.customer, e.value) for e in events}
    assert len(out) == len(events)  # no identifier accepted twice
    return out


async def assert_exactly_once(
    redis: aioredis.Redis,
    fake: FakeStripeServer,
    api: StripeClientApi,
    records: Sequence[UsageRecord],
    *,
    dead_workspaces: frozenset[str] = frozenset(),
) -> None:
    ledger = Ledger(redis)
    states = await ledger.windows(0, 2**40)
    folded: dict[str, str] = {}
    for st in states:
        ids = await redis.hgetall(billing_window_ids(st.ref.start, st.ref.workspace))
        folded.update({k.decode(): v.decode() for k, v in ids.items()})
    assert sorted(folded) == sorted(r.dispatch_id for r in records)  # each folded, once

    exact: dict[str, int] = defaultdict(int)
    for r in records:
        exact[r.workspace] += r.cost_picousd
    in_ledger: dict[str, int] = defaultdict(int)
    events = accepted_events(fake)
    billed: dict[str, int] = defaultdict(int)
    for st in states:
        for seg in st.segments:
            in_ledger[st.ref.workspace] += seg.picousd
            if st.ref.workspace in dead_workspaces:
                continue
            assert seg.status == "sent", (st.ref, seg)
            value = picousd_to_microusd(seg.picousd)
            if value:
                assert seg.accepted == {COST_METER: value}
                assert events[seg.identifiers[COST_METER]][1] == value
                billed[st.ref.workspace] += value
    assert in_ledger == exact  # nothing lost, nothing counted twice, to the pico-USD
    live = {ws for ws in exact if ws not in dead_workspaces}
    customers = await ledger.customers()
    live_customers = {customers[ws] for ws in live if ws in customers}
    assert sum(billed[ws] for ws in live) == sum(
        v for c, v in events.values() if c in live_customers
    )
    assert await redis.xpending(USAGE_STREAM, USAGE_GROUP) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }
    report = await reconcile(ledger, api, int(time.time()) - 600, int(time.time()) + 60)
    assert report.ok, report


async def test_stripe_down_500s_and_resets_then_up_every_unit_once(
    aredis: aioredis.Redis, fake: FakeStripeServer, api: StripeClientApi
) -> None:
    records = recent_records(3000, ["acme", "beta", "gamma"])
    await add_records(aredis, records)
    worker = BillingWorker(aredis, api, FAST)
    await worker.run_once()  # meters and customers exist; the stream is folded
    fake.fail("500", 6, paths="/v1/billing/meter_events")
    fake.fail("reset", 6, paths="/v1/billing/meter_events")
    await asyncio.sleep(FAST.grace_s + 0.1)
    report = await worker.run_once()
    assert report.retry_in is not None and report.acked == 0
    assert accepted_events(fake) == {}
    assert (await aredis.xpending(USAGE_STREAM, USAGE_GROUP))["pending"] == len(records)

    await run_until_drained(worker)
    assert fake.failures.injected == 12
    await assert_exactly_once(aredis, fake, api, records)


class TimedApi:
    """Delegates to a real StripeApi, noting when meter events were sent."""

    def __init__(self, inner: StripeClientApi) -> None:
        self.inner = inner
        self.sends: list[float] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def send_meter_events(self, events: Sequence[MeterEvent]) -> list[MeterEventResult]:
        self.sends.append(time.monotonic())
        return await self.inner.send_meter_events(events)


async def test_429_with_retry_after_is_honoured(
    aredis: aioredis.Redis, fake: FakeStripeServer, api: StripeClientApi
) -> None:
    records = recent_records(200, ["acme"], span_s=3)
    await add_records(aredis, records)
    timed = TimedApi(api)
    worker = BillingWorker(aredis, timed, FAST)  # type: ignore[arg-type]
    fake.fail("429", 1, retry_after=1.5, paths="/v1/billing/meter_events")
    await run_until_drained(worker)
    assert len(timed.sends) >= 2
    assert timed.sends[1] - timed.sends[0] >= 1.5  # FAST's own backoff is capped at 0.3 s
    await assert_exactly_once(aredis, fake, api, records)


async def test_deleted_customer_dead_letters_reported_by_status_and_reconcile(
    aredis: aioredis.Redis,
    fake: FakeStripeServer,
    api: StripeClientApi,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = recent_records(400, ["alive", "gone"], span_s=4)
    await add_records(aredis, first)
    worker = BillingWorker(aredis, api, FAST)
    await run_until_drained(worker)
    gone = await worker.ledger.customer("gone")
    assert gone is not None
    with fake.locked() as state:
        state.delete_customer(gone)

    now_ms = int(time.time() * 1000)
    later = [
        msgspec.structs.replace(r, dispatch_id=f"later_{r.dispatch_id}", finished_ms=now_ms)
        for r in first
    ]
    await add_records(aredis, later)
    await run_until_drained(worker)
    dead = await aredis.xrange(USAGE_DEAD_STREAM)
    assert len(dead) == sum(r.workspace == "gone" for r in later)
    assert {f[b"code"] for _, f in dead} == {b"resource_missing"}
    await assert_exactly_once(aredis, fake, api, first + later, dead_workspaces=frozenset({"gone"}))

    for name, value in {**stripe_env(fake), "LATTICE_REDIS_URL": redis_url}.items():
        monkeypatch.setenv(name, value)
    status_out = await asyncio.to_thread(run_cli, ["status"])
    assert status_out[0] == 0
    assert "resource_missing" in status_out[1] and f"dead letters: {len(dead)}" in status_out[1]
    code, text = await asyncio.to_thread(run_cli, ["reconcile", "--since", "1h"])
    assert code == 0 and "total difference: 0" in text, text
    code, text = await asyncio.to_thread(run_cli, ["reconcile", "--since", "1h", "--json"])
    assert code == 0 and msgspec.json.decode(text)["total_difference"] == 0


def run_cli(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = billing_main(argv)
    return code, out.getvalue()


# -- worker processes ----------------------------------------------------------------------


def start_worker(
    redis_url: str, fake: FakeStripeServer, log: Path, *flags: str
) -> subprocess.Popen[bytes]:
    env = {**os.environ, **stripe_env(fake), "LATTICE_REDIS_URL": redis_url}
    env["PYTHONPATH"] = str(ROOT)
    with log.open("ab") as err:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "billing.worker", *WORKER_FLAGS, *flags],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=15)


async def wait_for(
    redis: aioredis.Redis, what: str, predicate: object, timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("when", ["reading", "sending"])
async def test_worker_killed_with_sigkill_mid_batch_then_restarted(
    aredis: aioredis.Redis,
    fake: FakeStripeServer,
    api: StripeClientApi,
    redis_url: str,
    tmp_path: Path,
    when: str,
) -> None:
    """Killed once its first batch of 5000 is delivered (folding it), or once Stripe took
    its first meter events (before it could settle them); a new process finishes the job."""
    records = recent_records(30_000, ["acme", "beta", "gamma", "delta"], span_s=25)
    await add_records(aredis, records)
    log = tmp_path / "worker.log"
    first = start_worker(redis_url, fake, log, "--batch=5000")

    async def reading() -> bool:
        if not await aredis.exists(USAGE_STREAM):
            return False
        groups = await aredis.xinfo_groups(USAGE_STREAM)
        return bool(groups) and int(groups[0]["pending"]) > 0

    async def sending() -> bool:
        with fake.locked() as state:
            return bool(state.meter_events)

    try:
        await wait_for(aredis, when, reading if when == "reading" else sending)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    pending = (await aredis.xpending(USAGE_STREAM, USAGE_GROUP))["pending"]
    assert 0 < pending < len(records), "killed too late to be mid-batch"

    second = start_worker(redis_url, fake, log, "--batch=5000")
    try:
        await wait_drained(aredis)
    finally:
        assert stop(second) == 0, log.read_text()
    await assert_exactly_once(aredis, fake, api, records)
    assert "reclaiming a dead consumer" in log.read_text()


async def test_two_worker_processes_at_once_no_loss_no_double_count(
    aredis: aioredis.Redis,
    fake: FakeStripeServer,
    api: StripeClientApi,
    redis_url: str,
    tmp_path: Path,
) -> None:
    records = recent_records(30_000, ["acme", "beta", "gamma", "delta"], span_s=25)
    log = tmp_path / "workers.log"
    workers = [start_worker(redis_url, fake, log, "--batch=1000") for _ in range(2)]
    try:
        for i in range(0, len(records), 5000):  # arriving while both run
            await add_records(aredis, records[i : i + 5000])
            await asyncio.sleep(0.05)
        await wait_drained(aredis)
    finally:
        codes = [stop(w) for w in workers]
    assert codes == [0, 0], log.read_text()
    await assert_exactly_once(aredis, fake, api, records)
    # both did work: each folded a share (read only by it), together every record once
    folded = [int(n) for n in re.findall(r"'folded': (\d+)", log.read_text())]
    assert len(folded) == 2 and min(folded) > 0 and sum(folded) == len(records), folded
