"""RuntimeStore and DeviceGrantStore against a real Redis."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
import redis.asyncio as aioredis

from gateway import keys
from gateway.errors import InvalidRequest
from gateway.runtimes.device_grants import DeviceGrant, DeviceGrantStore, device_key
from gateway.runtimes.records import RuntimeRecord
from gateway.runtimes.store import RuntimeStore
from gateway.runtimes.tokens import parse_secret_token


class Clock:
    """Unix milliseconds that tests move forward."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def __call__(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(aredis: aioredis.Redis, clock: Clock) -> RuntimeStore:
    return RuntimeStore(aredis, clock=clock)


async def _commands(redis: aioredis.Redis) -> int:
    return int((await redis.info("stats"))["total_commands_processed"])


async def test_create_is_unpaired_with_a_one_time_token(
    store: RuntimeStore, aredis: aioredis.Redis
) -> None:
    record, token = await store.create("acme", "  laptop ")
    assert record.id.startswith("lat_") and len(record.id) == 20
    assert record.name == "laptop" and record.workspace == "acme"
    assert record.paired_ms is None and record.credential_sha256 is None
    assert token.startswith("lbt_" + record.id[4:] + "_")
    assert await store.get("acme", record.id) == record
    assert await store.status(record) == "unpaired"
    assert await store.list("acme") == [record]
    # Only the digest is stored.
    raw = await aredis.hgetall(keys.runtime(record.id))
    secret = token.split("_", 2)[2]
    assert secret not in repr(raw) and token not in repr(raw)
    assert b"boot_sha256" in raw and b"boot_expires_ms" in raw


async def test_invalid_names_are_refused(store: RuntimeStore) -> None:
    for bad in ["", "   ", "x" * 129, "bad\nname"]:
        with pytest.raises(InvalidRequest):
            await store.create("acme", bad)


async def test_bootstrap_redeems_exactly_once_under_concurrency(store: RuntimeStore) -> None:
    record, token = await store.create("acme", "box")
    results = await asyncio.gather(*(store.redeem_bootstrap(token) for _ in range(25)))
    won = [r for r in results if r is not None]
    assert len(won) == 1
    paired, credential = won[0]
    assert paired.id == record.id and paired.paired_ms is not None
    assert credential.startswith("lrt_" + record.id[4:] + "_")
    assert await store.redeem_bootstrap(token) is None
    authed = await store.authenticate(credential)
    assert authed is not None and authed.id == record.id
    assert await store.status(authed) == "offline"


async def test_bootstrap_expires(store: RuntimeStore, clock: Clock) -> None:
    _, token = await store.create("acme", "box")
    clock.offset_ms = store.bootstrap_ttl_s * 1000 + 1
    assert await store.redeem_bootstrap(token) is None


async def test_bootstrap_rejects_wrong_and_malformed_tokens(store: RuntimeStore) -> None:
    _, token = await store.create("acme", "box")
    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for bad in [
        wrong,
        "lbt_nope",
        "",
        token.replace("lbt_", "lrt_"),
        "lbt_" + "a" * 16 + "_" + "x" * 43,
    ]:
        assert await store.redeem_bootstrap(bad) is None
    assert await store.redeem_bootstrap(token) is not None


async def test_authenticate(store: RuntimeStore) -> None:
    record, token = await store.create("acme", "box")
    redeemed = await store.redeem_bootstrap(token)
    assert redeemed is not None
    _, credential = redeemed
    found = await store.authenticate(credential)
    assert found is not None and found.id == record.id
    runtime_id, secret = parse_secret_token("lrt_", credential) or ("", "")
    assert runtime_id == record.id
    assert (
        await store.authenticate(credential[:-1] + ("x" if credential[-1] != "x" else "y")) is None
    )
    unknown = "lrt_" + "b" * 16 + "_" + secret
    assert await store.authenticate(unknown) is None
    assert await store.authenticate("lrt_bad") is None
    assert await store.authenticate(token) is None  # the spent bootstrap token is no credential
    # An unpaired runtime has no credential at all.
    other, _ = await store.create("acme", "other")
    assert await store.authenticate("lrt_" + other.id[4:] + "_" + secret) is None


async def test_authenticate_costs_one_read_whatever_the_outcome(
    store: RuntimeStore, aredis: aioredis.Redis
) -> None:
    _, token = await store.create("acme", "box")
    redeemed = await store.redeem_bootstrap(token)
    assert redeemed is not None
    credential = redeemed[1]
    secret = credential.split("_", 2)[2]
    revoked, token2 = await store.create("acme", "gone")
    redeemed2 = await store.redeem_bootstrap(token2)
    assert redeemed2 is not None
    await store.revoke("acme", revoked.id)
    cases = [
        credential,
        credential[:-2] + "zz",
        "lrt_" + "c" * 16 + "_" + secret,
        redeemed2[1],
    ]
    costs = []
    for case in cases:
        before = await _commands(aredis)
        await store.authenticate(case)
        costs.append(await _commands(aredis) - before)
    assert len(set(costs)) == 1, costs


async def test_revoke_publishes_and_kills_the_credential(
    store: RuntimeStore, aredis: aioredis.Redis, clock: Clock
) -> None:
    record, token = await store.create("acme", "box")
    redeemed = await store.redeem_bootstrap(token)
    assert redeemed is not None
    credential = redeemed[1]
    pubsub = aredis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.EVENTS_CHANNEL)
    try:
        revoked = await store.revoke("acme", record.id)
        message = None
        for _ in range(20):
            message = await pubsub.get_message(timeout=0.5)
            if message is not None:
                break
        assert message is not None and message["data"] == f"runtime-revoked:{record.id}".encode()
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert revoked is not None and revoked.revoked_ms is not None
    assert revoked.credential_sha256 is None
    assert await store.authenticate(credential) is None
    assert await store.status(revoked) == "revoked"
    raw = await aredis.hgetall(keys.runtime(record.id))
    assert b"cred_sha256" not in raw
    # Revoking again keeps the first time.
    clock.offset_ms += 5000
    again = await store.revoke("acme", record.id)
    assert again is not None and again.revoked_ms == revoked.revoked_ms
    # A revoked, never-redeemed bootstrap token is dead too.
    fresh, fresh_token = await store.create("acme", "fresh")
    await store.revoke("acme", fresh.id)
    assert await store.redeem_bootstrap(fresh_token) is None
    # Listed with status revoked.
    statuses = {r.id: s for r, s in await store.list_with_status("acme")}
    assert statuses == {record.id: "revoked", fresh.id: "revoked"}


async def test_workspaces_are_isolated_at_the_same_cost(
    store: RuntimeStore, aredis: aioredis.Redis
) -> None:
    mine, _ = await store.create("acme", "mine")
    assert await store.get("beta", mine.id) is None
    assert await store.list("beta") == []
    assert await store.revoke("beta", mine.id) is None
    still = await store.get("acme", mine.id)
    assert still is not None and still.revoked_ms is None

    async def cost(workspace: str, runtime_id: str, op: str) -> int:
        before = await _commands(aredis)
        if op == "get":
            await store.get_with_status(workspace, runtime_id)
        else:
            await store.revoke(workspace, runtime_id)
        return await _commands(aredis) - before

    for op in ("get", "revoke"):
        foreign = await cost("beta", mine.id, op)
        unknown = await cost("beta", "lat_" + "q" * 16, op)
        malformed = await cost("beta", "nope", op)
        assert foreign == unknown == malformed, (op, foreign, unknown, malformed)


async def test_status_follows_the_holder_key(store: RuntimeStore, aredis: aioredis.Redis) -> None:
    record, token = await store.create("acme", "box")
    assert await store.status(record) == "unpaired"
    redeemed = await store.redeem_bootstrap(token)
    assert redeemed is not None
    paired = redeemed[0]
    assert await store.status(paired) == "offline"
    await aredis.set(keys.runtime_holder(record.id), "gw-1", px=5000)
    assert await store.status(paired) == "reachable"
    found = await store.get_with_status("acme", record.id)
    assert found is not None and found[1] == "reachable"
    await store.revoke("acme", record.id)
    found = await store.get_with_status("acme", record.id)
    assert found is not None and found[1] == "revoked"


async def test_record_hello_and_touch(store: RuntimeStore, aredis: aioredis.Redis) -> None:
    record, _ = await store.create("acme", "box")
    assert await store.record_hello(
        record.id,
        models=["llama-3.2-3b-instruct", "qwen 2.5"],
        task_classes=["chat-completion", "embedding"],
        default_model="llama-3.2-3b-instruct",
        daemon_version="0.1.0",
        concurrency=8,
        now_ms=1_700_000_000_000,
    )
    got = await store.get("acme", record.id)
    assert got is not None
    assert got.models == ("llama-3.2-3b-instruct", "qwen 2.5")
    assert got.task_classes == ("chat-completion", "embedding")
    assert (got.default_model, got.daemon_version, got.concurrency) == (
        "llama-3.2-3b-instruct",
        "0.1.0",
        8,
    )
    assert got.last_seen_ms == 1_700_000_000_000
    assert await store.touch(record.id, 1_700_000_005_000)
    assert await store.record_hello(
        record.id,
        models=[],
        task_classes=[],
        default_model=None,
        daemon_version=None,
        concurrency=None,
        now_ms=1_700_000_006_000,
    )
    got = await store.get("acme", record.id)
    assert got is not None and got.default_model is None and got.models == ()
    assert got.last_seen_ms == 1_700_000_006_000
    # Never creates a record for an unknown id.
    ghost = "lat_" + "z" * 16
    assert not await store.touch(ghost, 1)
    assert not await store.touch("bad id", 1)
    assert not await aredis.exists(keys.runtime(ghost))


async def test_touch_many_refreshes_last_seen_in_batches(
    store: RuntimeStore, aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.runtimes.store._TOUCH_BATCH", 2)
    records = [(await store.create("acme", f"box {i}"))[0] for i in range(5)]
    ghost = "lat_" + "y" * 16
    await store.touch_many([*(r.id for r in records), ghost, "bad id"], 1_700_000_009_000)
    for record in records:
        got = await store.get("acme", record.id)
        assert got is not None and got.last_seen_ms == 1_700_000_009_000
    assert not await aredis.exists(keys.runtime(ghost))  # never creates a record


async def test_pair_device_issues_once(
    store: RuntimeStore, aredis: aioredis.Redis, clock: Clock
) -> None:
    grants = DeviceGrantStore(aredis)
    now = clock()
    grant = DeviceGrant(
        device_key=device_key("device-code-1"),
        client_id="lattice-daemon",
        user_code="BCDFGHJK",
        created_ms=now,
        expires_ms=now + 600_000,
        interval_s=5,
        name="laptop",
    )
    assert await grants.create(grant, now)
    assert not await grants.create(msgspec.structs.replace(grant, device_key="other"), now)
    found = await grants.find("BCDFGHJK")
    assert found == grant
    record = await store.create_for_device("acme", "laptop")
    assert await grants.decide(grant, now, approve=True, runtime_id=record.id, workspace="acme")
    assert not await grants.decide(grant, now, approve=False)  # decided once
    assert await grants.find("BCDFGHJK") is None  # the user code is claimed
    credentials = [store.mint_credential(record.id) for _ in range(10)]
    results = await asyncio.gather(
        *(store.pair_device(grant.device_key, record.id, c) for c in credentials)
    )
    winners = [(r, c) for r, c in zip(results, credentials, strict=True) if r is not None]
    assert len(winners) == 1
    paired, credential = winners[0]
    assert isinstance(paired, RuntimeRecord) and paired.paired_ms is not None
    assert (await store.authenticate(credential)) is not None
    assert await grants.get(grant.device_key) is None  # consumed
    # A poll recorded after consumption does not resurrect the grant.
    await grants.record_poll(grant.device_key, now, 5)
    assert not await aredis.exists(keys.device_grant(grant.device_key))


async def test_discard_unpaired(store: RuntimeStore, aredis: aioredis.Redis) -> None:
    record = await store.create_for_device("acme", "x")
    await store.discard_unpaired(record)
    assert await store.get("acme", record.id) is None
    assert await store.list("acme") == []
