"""Streams in flight are billed even when their gateway process dies: checkpoints in the
spool (billing/spool_checkpoints.py) are never shipped themselves, are superseded by the final
record, survive rotation, and become the final record when another process adopts the file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from billing.keys import USAGE_STREAM
from billing.spool import SpoolOutbox
from billing.spool_checkpoints import checkpoint_payload, unfinished
from billing.spool_format import encode_frame
from billing.usage import UsageRecord, decode_record, encode_record
from tests.integration.test_usage_spool import BROKEN_URL, die
from tests.usage_records import record


def progress(i: int, completion: int, status: str = "failed") -> UsageRecord:
    return msgspec.structs.replace(
        record(i), units={"prompt_tokens": 3, "completion_tokens": completion}, status=status
    )


async def stream_records(aredis: aioredis.Redis) -> list[UsageRecord]:
    return [decode_record(f[b"r"]) for _, f in await aredis.xrange(USAGE_STREAM)]


def test_unfinished_keeps_the_last_checkpoint_of_open_dispatches() -> None:
    frames = [
        encode_frame(checkpoint_payload(encode_record(progress(1, 1)))),
        encode_frame(checkpoint_payload(encode_record(progress(2, 1)))),
        encode_frame(checkpoint_payload(encode_record(progress(1, 2)))),
        encode_frame(encode_record(progress(2, 5, "completed"))),
        encode_frame(checkpoint_payload(encode_record(progress(3, 7)))),
    ]
    buf = b"".join(frames) + b"\xa7L\x10"  # and a torn tail
    left = [decode_record(p) for p in unfinished(buf)]
    assert [(r.dispatch_id, r.units["completion_tokens"]) for r in left] == [
        ("dsp_1", 2),
        ("dsp_3", 7),
    ]


async def test_checkpoints_are_not_shipped_and_the_final_record_is(
    aredis: aioredis.Redis, tmp_path: Path
) -> None:
    outbox = SpoolOutbox(tmp_path, aredis, offset_save_s=0)
    for n in range(1, 4):
        outbox.checkpoint(progress(1, n))
    assert await outbox.ship_once() == 0
    await outbox.append(progress(1, 3, "completed"))
    assert await outbox.ship_once() == 1
    assert [(r.dispatch_id, r.status) for r in await stream_records(aredis)] == [
        ("dsp_1", "completed")
    ]
    await outbox.stop()


async def test_a_dead_process_streams_are_billed_by_the_adopter(
    aredis: aioredis.Redis, tmp_path: Path
) -> None:
    dead = SpoolOutbox(tmp_path, aredis, offset_save_s=0)
    await dead.append(progress(0, 9, "completed"))
    for n in range(1, 6):
        dead.checkpoint(progress(1, n))  # a stream that delivered 5 events, then the kill
    dead.checkpoint(progress(2, 1))
    await dead.append(progress(2, 4, "completed"))  # a stream that finished
    assert await dead.ship_once() == 2
    die(dead)

    adopter = SpoolOutbox(tmp_path, aredis, offset_save_s=0)
    await adopter.start()
    try:
        await adopter.adopt_orphans()
        await adopter.ship_once()
        got = {r.dispatch_id: r for r in await stream_records(aredis)}
        assert set(got) == {"dsp_0", "dsp_1", "dsp_2"}
        assert got["dsp_1"].status == "failed"
        assert got["dsp_1"].units["completion_tokens"] == 5
        # adopting again (another process, a retry) finds nothing more to bill
        await adopter.adopt_orphans()
        await adopter.ship_once()
        assert len(await stream_records(aredis)) == 3
    finally:
        await adopter.stop()


async def test_open_checkpoints_survive_rotation(aredis: aioredis.Redis, tmp_path: Path) -> None:
    outbox = SpoolOutbox(tmp_path, aredis, offset_save_s=0, rotate_bytes=2_000)
    outbox.checkpoint(progress(1, 1))
    for i in range(100, 130):  # fill past the rotation size; the old file gets deleted
        await outbox.append(record(i))
    await outbox.ship_once()
    await outbox.ship_once()
    assert len(list(tmp_path.glob("usage-*.spool"))) == 1
    die(outbox)
    adopter = SpoolOutbox(tmp_path, aredis, offset_save_s=0)
    await adopter.start()
    try:
        await adopter.adopt_orphans()
        await adopter.ship_once()
        await asyncio.sleep(0)
        ids = [r.dispatch_id for r in await stream_records(aredis)]
        assert "dsp_1" in ids
        assert ids.count("dsp_1") == 1
    finally:
        await adopter.stop()


async def test_a_dead_process_rotated_file_bills_no_stale_checkpoint(
    aredis: aioredis.Redis, tmp_path: Path
) -> None:
    """Rotation during a Redis outage leaves the old file with an older checkpoint: the
    carried-over marker keeps the adopter from billing it (only the newest counts)."""
    broken = aioredis.Redis.from_url(BROKEN_URL, socket_connect_timeout=0.2)
    dead = SpoolOutbox(tmp_path, broken, offset_save_s=0, rotate_bytes=2_000)
    dead.checkpoint(progress(1, 1))
    for i in range(100, 130):
        await dead.append(record(i))
    with pytest.raises((RedisError, OSError)):
        await dead.ship_once()  # rotates, then cannot ship: both files stay
    dead.checkpoint(progress(1, 7))
    die(dead)
    await broken.aclose()
    adopter = SpoolOutbox(tmp_path, aredis, offset_save_s=0)
    await adopter.start()
    try:
        await adopter.adopt_orphans()
        await adopter.ship_once()
        got = [
            r.units["completion_tokens"]
            for r in await stream_records(aredis)
            if r.dispatch_id == "dsp_1"
        ]
        assert got == [7]
    finally:
        await adopter.stop()
