"""The usage spool against a real Redis and real files: every appended record reaches the
stream exactly once, through Redis outages, re-shipments, dead (even SIGKILLed) processes,
two shippers on one file, rotation and shutdown; with one offset key per spool file in Redis
(deleted once the file is shipped), never a key per record."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from billing.keys import USAGE_SPOOL_OFFSET_TTL_S, USAGE_STREAM, spool_offset
from billing.spool import SpoolOutbox, SpoolWriteError
from billing.spool_format import encode_frame, scan_frames
from billing.usage import decode_record, encode_record
from tests.usage_records import record

BROKEN_URL = "redis://127.0.0.1:1/0"


async def stream_ids(aredis: aioredis.Redis) -> list[str]:
    return [decode_record(f[b"r"]).dispatch_id for _, f in await aredis.xrange(USAGE_STREAM)]


async def wait_for_files(spool: Path, n: int, timeout: float = 5.0) -> list[Path]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(files := spool_files(spool)) != n and loop.time() < deadline:
        await asyncio.sleep(0.01)
    return files


async def wait_for_stream(aredis: aioredis.Redis, n: int, timeout: float = 5.0) -> list[str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(ids := await stream_ids(aredis)) < n and loop.time() < deadline:
        await asyncio.sleep(0.01)
    return ids


async def offset_keys(aredis: aioredis.Redis) -> list[str]:
    return sorted([k.decode() async for k in aredis.scan_iter(match="lat:usage:spool:*")])


async def assert_no_record_keys(aredis: aioredis.Redis) -> None:
    assert [k async for k in aredis.scan_iter(match="lat:usage:seen:*")] == []
    # the stream and the offset keys of files not fully shipped: nothing per record
    keys = [k async for k in aredis.scan_iter()]
    assert all(k == USAGE_STREAM.encode() or k.startswith(b"lat:usage:spool:") for k in keys)


def spool_files(spool: Path) -> list[Path]:
    return sorted(spool.glob("usage-*.spool"))


def die(outbox: SpoolOutbox) -> None:
    """What the kernel does when the owner dies: its descriptors close, its locks go."""
    for f in outbox._files:
        os.close(f.fd)
    outbox._files = []


@pytest.fixture
def broken() -> aioredis.Redis:
    return aioredis.Redis.from_url(BROKEN_URL, socket_connect_timeout=0.2)


async def test_appended_records_are_shipped_once(aredis: aioredis.Redis, tmp_path: Path) -> None:
    outbox = SpoolOutbox(tmp_path, aredis, offset_save_s=0)
    records = [record(i) for i in range(1200)]
    ids = [await outbox.append(r) for r in records]
    assert ids == [r.dispatch_id for r in records]
    assert outbox.appended == 1200 and outbox.pending_bytes > 0
    assert await outbox.ship_once() == 1200
    entries = await aredis.xrange(USAGE_STREAM)
    assert [decode_record(f[b"r"]) for _, f in entries] == records
    assert outbox.pending_bytes == 0 and outbox.shipped == 1200 and outbox.duplicates == 0
    (file,) = spool_files(tmp_path)
    size = file.stat().st_size
    assert int(Path(f"{file}.offset").read_text()) == size
    # the shipped offset lives in Redis, one key per file, with a TTL
    assert await offset_keys(aredis) == [spool_offset(file.name)]
    assert int(await aredis.get(spool_offset(file.name))) == size
    assert 0 < await aredis.ttl(spool_offset(file.name)) <= USAGE_SPOOL_OFFSET_TTL_S
    await assert_no_record_keys(aredis)
    assert await outbox.ship_once() == 0
    await outbox.stop()
    assert list(tmp_path.glob("usage-*")) == []  # fully shipped files are removed
    assert await offset_keys(aredis) == []  # and then their offset keys


async def test_redis_down_loses_nothing(
    aredis: aioredis.Redis, broken: aioredis.Redis, tmp_path: Path
) -> None:
    down = SpoolOutbox(tmp_path, broken)
    await down.start()  # the shipper runs against a Redis that is not there
    for i in range(50):
        await down.append(record(i))
        await asyncio.sleep(0.002)
    with pytest.raises(aioredis.ConnectionError):
        await down.ship_once()
    assert down.ship_errors >= 1 and down.appended == 50 and down.shipped == 0
    await down.stop(drain_timeout=0.3)
    await broken.aclose()
    assert len(spool_files(tmp_path)) == 1  # left for the next process

    up = SpoolOutbox(tmp_path, aredis)
    assert await up.adopt_orphans() == 50
    assert await stream_ids(aredis) == [f"dsp_{i}" for i in range(50)]
    assert spool_files(tmp_path) == [] and list(tmp_path.glob("*.offset")) == []
    assert await up.adopt_orphans() == 0
    assert len(await stream_ids(aredis)) == 50


async def test_reshipping_after_a_crash_adds_no_duplicates(
    aredis: aioredis.Redis, tmp_path: Path
) -> None:
    first = SpoolOutbox(tmp_path, aredis)
    for i in range(700):
        await first.append(record(i))
    assert await first.ship_once() == 700
    (file,) = spool_files(tmp_path)
    die(first)  # crashed after the script ran but before the offset was saved:
    Path(f"{file}.offset").write_text("0")
    second = SpoolOutbox(tmp_path, aredis)
    assert await second.adopt_orphans() == 0  # the offset in Redis says all are in the stream
    assert second.duplicates == 700 and second.shipped == 0
    assert await stream_ids(aredis) == [f"dsp_{i}" for i in range(700)]
    assert spool_files(tmp_path) == [] and await offset_keys(aredis) == []
    await assert_no_record_keys(aredis)


async def test_local_offset_reset_after_a_full_ship_adds_nothing(
    aredis: aioredis.Redis, tmp_path: Path
) -> None:
    outbox = SpoolOutbox(tmp_path, aredis, offset_save_s=0, batch=64)
    for i in range(300):
        await outbox.append(record(i))
    assert await outbox.ship_once() == 300
    length = await aredis.xlen(USAGE_STREAM)
    # the local offset (sidecar and memory) goes back to 0, as if the shipper started afresh
    (f,) = outbox._files
    f.offset_path.write_text("0")
    f.shipped = f.saved = 0
    f.remote = None
    assert await outbox.ship_once() == 0
    assert await aredis.xlen(USAGE_STREAM) == length == 300
    assert outbox.duplicates == 300 and outbox.shipped == 300 and outbox.pending_bytes == 0
    await assert_no_record_keys(aredis)
    # new records after the re-sync ship normally
    await outbox.append(record(300))
    assert await outbox.ship_once() == 1
    assert await stream_ids(aredis) == [f"dsp_{i}" for i in range(301)]
    await outbox.stop()
    assert await offset_keys(aredis) == []


async def test_local_offset_wins_when_redis_lost_the_key(
    aredis: aioredis.Redis, tmp_path: Path
) -> None:
    first = SpoolOutbox(tmp_path, aredis, offset_save_s=0)
    for i in range(200):
        await first.append(record(i))
    assert await first.ship_once() == 200
    (file,) = spool_files(tmp_path)
    die(first)
    await aredis.delete(spool_offset(file.name))  # evicted, or a file from before the key
    with file.open("ab") as out:  # records the dead process appended after its last batch
        for i in range(200, 210):
            out.write(encode_frame(encode_record(record(i))))
    second = SpoolOutbox(tmp_path, aredis)
    assert await second.adopt_orphans() == 10
    assert await stream_ids(aredis) == [f"dsp_{i}" for i in range(210)]
    assert second.duplicates == 0 and spool_files(tmp_path) == []
    assert await offset_keys(aredis) == []


async def test_redis_offset_inside_a_frame_is_quarantined(
    aredis: aioredis.Redis, tmp_path: Path
) -> None:
    frames = [encode_frame(encode_record(record(i))) for i in range(4)]
    path = tmp_path / "usage-1-handwritten.spool"
    path.write_bytes(b"".join(frames))
    await aredis.set(spool_offset(path.name), len(frames[0]) + 3)  # inside the second frame
    outbox = SpoolOutbox(tmp_path, aredis)
    assert await outbox.adopt_orphans() == 2
    assert await stream_ids(aredis) == ["dsp_2", "dsp_3"]
    assert outbox.duplicates == 1 and outbox.corrupt == 1
    (bad,) = (tmp_path / "corrupt").iterdir()
    assert bad.read_bytes() == frames[1]
    assert spool_files(tmp_path) == [] and await offset_keys(aredis) == []


async def test_two_shippers_on_one_orphan_add_it_once(
    aredis: aioredis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = SpoolOutbox(tmp_path, aredis)
    for i in range(100):
        await dead.append(record(i))
    die(dead)
    (file,) = spool_files(tmp_path)
    # flock not honoured (a spool directory on a network filesystem, say): both processes
    # take the orphan; the script's compare-and-set lets each batch in once.
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: None)
    a = SpoolOutbox(tmp_path, aredis, batch=7)
    b = SpoolOutbox(tmp_path, aredis, batch=7)
    shipped = await asyncio.gather(a.adopt_orphans(), b.adopt_orphans())
    assert sum(shipped) == a.shipped + b.shipped == 100
    assert a.duplicates + b.duplicates > 0  # the loser of a race skipped, not re-added
    assert await stream_ids(aredis) == [f"dsp_{i}" for i in range(100)]  # once, in order
    assert not file.exists() and await offset_keys(aredis) == []
    await assert_no_record_keys(aredis)


async def test_orphan_of_a_dead_process_is_adopted(aredis: aioredis.Redis, tmp_path: Path) -> None:
    dead = SpoolOutbox(tmp_path, aredis)
    alive = SpoolOutbox(tmp_path, aredis)
    for i in range(30):
        await dead.append(record(i))
    dead_name = dead._files[0].path.name
    await alive.append(record(1000))
    other = SpoolOutbox(tmp_path, aredis)
    assert await other.adopt_orphans() == 0  # both owners are alive: their locks are held
    die(dead)
    await other.start()  # adopts at start
    ids = await wait_for_stream(aredis, 30)
    assert sorted(ids) == sorted(f"dsp_{i}" for i in range(30))
    # the orphan is deleted right after its last batch is in the stream, then its offset
    assert len(await wait_for_files(tmp_path, 2)) == 2  # alive's and other's own files
    assert spool_offset(dead_name) not in await offset_keys(aredis)
    await other.stop()
    await alive.stop()
    assert len(await stream_ids(aredis)) == 31 and spool_files(tmp_path) == []


async def test_sigkilled_process_records_are_shipped(
    aredis: aioredis.Redis, tmp_path: Path
) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, os
        from pathlib import Path
        import redis.asyncio as aioredis
        from billing.spool import SpoolOutbox
        from tests.usage_records import record

        async def main():
            outbox = SpoolOutbox(Path({str(tmp_path)!r}), aioredis.Redis.from_url({BROKEN_URL!r}))
            for i in range(100):
                await outbox.append(record(i))
            os.kill(os.getpid(), 9)

        asyncio.run(main())
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    assert proc.returncode == -9
    assert len(spool_files(tmp_path)) == 1
    outbox = SpoolOutbox(tmp_path, aredis)
    await outbox.start()
    ids = await wait_for_stream(aredis, 100)
    assert ids == [f"dsp_{i}" for i in range(100)]
    assert len(await wait_for_files(tmp_path, 1)) == 1  # only the new process's own file
    await outbox.stop()
    assert spool_files(tmp_path) == []


async def test_concurrent_appends_with_the_shipper_running(
    aredis: aioredis.Redis, tmp_path: Path
) -> None:
    outbox = SpoolOutbox(tmp_path, aredis)
    await outbox.start()

    async def client(c: int) -> None:
        for i in range(40):
            await outbox.append(record(c * 1000 + i))
            await asyncio.sleep(0)

    await asyncio.gather(*(client(c) for c in range(50)))
    ids = await wait_for_stream(aredis, 2000)
    assert sorted(ids) == sorted(f"dsp_{c * 1000 + i}" for c in range(50) for i in range(40))
    assert outbox.shipped == 2000 and outbox.pending_bytes == 0
    await outbox.stop()


async def test_rotation(aredis: aioredis.Redis, tmp_path: Path) -> None:
    frame = len(encode_frame(encode_record(record(0))))
    outbox = SpoolOutbox(tmp_path, aredis, rotate_bytes=frame * 20, batch=7)
    seen: set[Path] = set()
    for round_ in range(5):
        for i in range(25):
            await outbox.append(record(round_ * 100 + i))
        seen.update(spool_files(tmp_path))
        await outbox.ship_once()
        (current,) = spool_files(tmp_path)  # the full file was shipped and deleted
        # and so was its offset key: at most the current file's is left
        assert set(await offset_keys(aredis)) <= {spool_offset(current.name)}
    assert len(seen) == 5
    await outbox.ship_once()
    assert await stream_ids(aredis) == [f"dsp_{r * 100 + i}" for r in range(5) for i in range(25)]
    assert outbox.duplicates == 0
    await outbox.stop()
    assert await offset_keys(aredis) == []


async def test_stop_drains(aredis: aioredis.Redis, tmp_path: Path) -> None:
    outbox = SpoolOutbox(tmp_path, aredis, idle_s=60)
    await outbox.start()
    for i in range(300):
        await outbox.append(record(i))
    await outbox.stop()
    assert len(await stream_ids(aredis)) == 300
    assert spool_files(tmp_path) == []


async def test_corrupt_frame_is_quarantined(aredis: aioredis.Redis, tmp_path: Path) -> None:
    bad = bytearray(encode_frame(encode_record(record(1))))
    bad[20] ^= 0xFF
    data = (
        encode_frame(encode_record(record(0)))
        + bytes(bad)
        + encode_frame(encode_record(record(2)))
        + encode_frame(encode_record(record(3)))[:9]  # torn: the writer died mid-write
    )
    (tmp_path / "usage-1-handwritten.spool").write_bytes(data)
    outbox = SpoolOutbox(tmp_path, aredis)
    assert await outbox.adopt_orphans() == 2
    assert await stream_ids(aredis) == ["dsp_0", "dsp_2"]
    assert len(list((tmp_path / "corrupt").iterdir())) == 2 and outbox.corrupt == 2
    assert spool_files(tmp_path) == []


def test_disk_full_raises_and_leaves_whole_frames(tmp_path: Path) -> None:
    # A file size limit makes write() fail or come up short just like a full disk.
    script = textwrap.dedent(
        f"""
        import asyncio, json, resource, signal
        from pathlib import Path
        import redis.asyncio as aioredis
        from billing.spool import SpoolOutbox, SpoolWriteError
        from tests.usage_records import record

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))

        async def main():
            outbox = SpoolOutbox(Path({str(tmp_path)!r}), aioredis.Redis.from_url({BROKEN_URL!r}))
            errors = 0
            for i in range(20):
                try:
                    await outbox.append(record(i))
                except SpoolWriteError as exc:
                    assert isinstance(exc, OSError)
                    errors += 1
            print(json.dumps({{"appended": outbox.appended, "errors": errors}}))

        asyncio.run(main())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=Path(__file__).parents[2], capture_output=True
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["errors"] > 0 and result["appended"] + result["errors"] == 20
    (file,) = spool_files(tmp_path)
    scan = scan_frames(file.read_bytes(), final=True)
    assert len(scan.frames) == result["appended"] and scan.corrupt == []


def test_write_error_is_an_oserror() -> None:
    assert issubclass(SpoolWriteError, OSError)
