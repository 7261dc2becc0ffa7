"""A local, crash-safe usage spool, shipped to the Redis usage stream in the background.

The rule stays "no response leaves without its usage record being durable"; what makes it
durable on the request path is a local append, not a network round trip:

- :meth:`SpoolOutbox.append` writes one frame (:mod:`billing.spool_format`) to this process's
  spool file with a single ``os.write`` on an ``O_APPEND`` descriptor, about 10 µs. Once
  ``write`` returns the bytes are in the OS page cache: they survive the gateway process being
  killed (SIGKILL, OOM kill, a crash). There is no fsync: a *host* crash can lose what the
  shipper had not shipped yet, normally a few milliseconds of records, the same order as
  Redis's own ``appendfsync everysec``. A failed write (disk full) raises
  :class:`SpoolWriteError` and the gateway answers 503; a record is never dropped silently.
- A shipper task reads complete frames from the shipped offset and sends them in batches to
  Redis with ``usage_ship.lua``. Exactly-once rests on one key per spool file,
  ``lat:usage:spool:<file name>`` (:func:`billing.keys.spool_offset`): the byte offset up to
  which that file's frames are in ``USAGE_STREAM``. The script is a compare-and-set: it adds a
  batch and moves the offset to the batch's end in one atomic step, only if the offset still
  is where the batch starts; otherwise it writes nothing and answers the current offset, and
  the shipper skips what is already in the stream (counted in ``duplicates``). So a batch
  shipped twice (a crash after the script, two processes on one file) lands once, whenever
  it is shipped again, for ~100 bytes of Redis per *file* instead of per record. Batches end
  on frame boundaries, so offsets always do. While Redis is down the shipper backs off and
  the records wait in the spool; appends go on.
- The shipper reads a file's Redis offset when it starts on the file and resumes from the
  larger of it and ``<file>.offset``, a local hint saved at most once a second. Redis is
  authoritative when ahead; the hint only matters if Redis lost the key (evicted, an old
  snapshot, a file from before this scheme), where it keeps records from being added twice.
- Every batch refreshes the key's TTL (``USAGE_SPOOL_OFFSET_TTL_S``, 30 days). A fully
  shipped file is deleted, then its key: a crash in between leaves a key that expires.

Files: each process owns ``usage-<pid>-<uuid>.spool`` in the spool directory and holds an
exclusive ``flock`` on it for its lifetime; that lock is how other processes tell it is alive.
A file whose lock can be taken belongs to a process that died: any live process sharing the
directory adopts it (takes the lock), ships it, and deletes it. Past ``rotate_bytes`` the
owner starts a new file and deletes the old one once it is shipped. Damaged frames are moved
to ``corrupt/`` and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import importlib.resources
import logging
import os
import random
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from billing.keys import USAGE_SPOOL_OFFSET_TTL_S, USAGE_STREAM, spool_offset
from billing.spool_checkpoints import checkpoint_payload, is_checkpoint, unfinished
from billing.spool_format import MAX_FRAME, Scan, encode_frame, frame_end, scan_frames, span_at
from billing.usage import UsageRecord, encode_record

__all__ = ["SpoolOutbox", "SpoolWriteError", "backoff_delay"]

log = logging.getLogger(__name__)

_SHIP_LUA = importlib.resources.files("billing").joinpath("usage_ship.lua").read_text()
_PATTERN = "usage-*.spool"
_READ_BYTES = 256 * 1024


class SpoolWriteError(OSError):
    """A usage record could not be written to the local spool (disk full, I/O error): the
    request fails with a retryable 503 rather than leave unmetered."""


class _DispatchId(msgspec.Struct):
    dispatch_id: str


_id_decoder = msgspec.msgpack.Decoder(_DispatchId)


def backoff_delay(failures: int, *, base: float = 0.05, cap: float = 2.0) -> float:
    """Exponential backoff with jitter (half to full) after ``failures`` failures in a row."""
    return min(cap, base * 2.0 ** max(0, failures - 1)) * random.uniform(0.5, 1.0)


@dataclass
class _SpoolFile:
    path: Path
    fd: int
    size: int
    #: Read position: the frames before it are in the stream (or were quarantined).
    shipped: int
    #: No longer appended to (rotated out, or an orphan): read to its end, then deleted.
    final: bool = False
    #: What the file's Redis offset key holds, as last seen (GET, or the script's answer);
    #: ``None`` until read. Ahead of ``shipped``: frames up to it are skipped, not shipped.
    #: Behind it (Redis lost the key): the next batch starts the key again from here.
    remote: int | None = None
    #: The offset last saved in the sidecar, and when (loop time).
    saved: int = 0
    saved_at: float = 0.0

    @property
    def offset_path(self) -> Path:
        return self.path.with_name(self.path.name + ".offset")

    @property
    def key(self) -> str:
        return spool_offset(self.path.name)

    def vanished(self) -> bool:
        """Whether the file is no longer at its path (another shipper finished it)."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return True
        st = os.fstat(self.fd)
        return (st.st_ino, st.st_dev) != (now.st_ino, now.st_dev)


def _read_offset(path: Path) -> int:
    try:
        return max(0, int(path.read_bytes() or b"0"))
    except (FileNotFoundError, ValueError):
        return 0  # only a hint: the offset in Redis says what is in the stream


def _write_offset(path: Path, value: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _delete(f: _SpoolFile) -> None:
    """Remove a fully shipped file and its sidecars; call while holding its lock."""
    streams = f.path.with_name(f.path.name + ".streams")
    for path in (
        f.path,
        f.offset_path,
        f.offset_path.with_name(f.offset_path.name + ".tmp"),
        streams,
    ):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class SpoolOutbox:
    """A :class:`billing.usage.UsageOutbox` that appends to a local spool (see module doc).

    Counters for metrics: ``appended``, ``shipped``, ``duplicates`` (records skipped because
    the file's Redis offset was already past them), ``corrupt`` (frames quarantined),
    ``ship_errors``, ``pending_bytes``.
    """

    def __init__(
        self,
        spool_dir: Path,
        redis: aioredis.Redis,
        *,
        batch: int = 500,
        rotate_bytes: int = 16 * 1024 * 1024,
        idle_s: float = 0.5,
        linger_s: float = 0.01,
        offset_save_s: float = 1.0,
        orphan_scan_s: float = 5.0,
    ) -> None:
        self._dir = Path(spool_dir)
        self._redis = redis
        self._ship = redis.register_script(_SHIP_LUA)
        self._batch = batch
        self._rotate_bytes = rotate_bytes
        self._idle_s = idle_s
        self._linger_s = linger_s
        self._offset_save_s = offset_save_s
        self._orphan_scan_s = orphan_scan_s
        self._files: list[_SpoolFile] = []  # own files, oldest first; the last one is appended to
        #: The latest checkpoint frame of each stream in flight (billing/spool_checkpoints.py).
        self._open: dict[str, bytes] = {}
        self._wake = asyncio.Event()
        self._ship_lock = asyncio.Lock()
        self._orphan_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.appended = 0
        self.shipped = 0
        self.duplicates = 0
        self.corrupt = 0
        self.ship_errors = 0

    @property
    def pending_bytes(self) -> int:
        return sum(max(0, f.size - f.shipped) for f in self._files)

    # -- the request path ------------------------------------------------------------------

    async def append(self, record: UsageRecord) -> str:
        """Make ``record`` durable in the spool (synchronously) and wake the shipper."""
        try:
            frame = encode_frame(encode_record(record))
        except ValueError as exc:
            raise SpoolWriteError(errno.EFBIG, str(exc)) from exc
        self._write(frame)
        self._open.pop(record.dispatch_id, None)
        self.appended += 1
        self._wake.set()
        return record.dispatch_id

    def checkpoint(self, record: UsageRecord) -> None:
        """Make ``record`` what the dispatch is billed if this process dies before its final
        record is appended (a stream in flight; billing/spool_checkpoints.py)."""
        try:
            frame = encode_frame(checkpoint_payload(encode_record(record)))
        except ValueError as exc:
            raise SpoolWriteError(errno.EFBIG, str(exc)) from exc
        self._write(frame)
        self._open[record.dispatch_id] = frame

    def _write(self, frame: bytes) -> None:
        f = self._files[-1] if self._files else self._open_own()
        try:
            written = os.write(f.fd, frame)
        except OSError as exc:
            f.size = os.fstat(f.fd).st_size
            raise SpoolWriteError(exc.errno, f"usage spool write failed: {exc.strerror}") from exc
        if written != len(frame):  # a short write: disk full. Undo it, the caller gets a 503.
            with contextlib.suppress(OSError):
                os.ftruncate(f.fd, f.size)
            f.size = os.fstat(f.fd).st_size
            raise SpoolWriteError(errno.ENOSPC, "usage spool write was cut short (disk full?)")
        f.size += written

    def _open_own(self) -> _SpoolFile:
        try:
            f = self._create_file()
        except OSError as exc:
            raise SpoolWriteError(exc.errno, f"cannot open the usage spool: {exc}") from exc
        self._files.append(f)
        return f

    def _create_file(self) -> _SpoolFile:
        # Created under a name the orphan scan ignores, locked, then renamed: no other process
        # can take the lock of a new file before its owner does.
        self._dir.mkdir(parents=True, exist_ok=True)
        name = f"usage-{os.getpid()}-{uuid.uuid4().hex}.spool"
        tmp = self._dir / f".{name}.tmp"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(tmp, self._dir / name)
        except OSError:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return _SpoolFile(self._dir / name, fd, 0, 0)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open this process's spool file and start the shipper (which adopts orphans first)."""
        if not self._files:
            self._files.append(self._create_file())
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="lattice-usage-shipper")

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Ship what is pending (for up to ``drain_timeout`` seconds), then close. Files not
        fully shipped stay, unlocked, for the next process to adopt."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        failures = 0
        while (pending := self.pending_bytes) and (remaining := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(remaining):
                    await self.ship_once()
            except TimeoutError:
                break
            except (RedisError, OSError):
                failures += 1
                await asyncio.sleep(min(backoff_delay(failures), max(0.0, remaining)))
                continue
            if self.pending_bytes == pending:
                break  # only a torn tail is left: it stays for the next process
        for f in self._files:
            if f.shipped >= f.size:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, deadline - loop.time()) + 1.0):
                        await self._retire(f)
            else:
                with contextlib.suppress(OSError):
                    self._save_offset(f, force=True)
                os.close(f.fd)
        if self.pending_bytes:
            log.warning(
                "usage spool not fully shipped at shutdown; left for the next process",
                extra={"pending_bytes": self.pending_bytes},
            )
        self._files = []

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        next_scan = loop.time()
        failures = 0
        while True:
            if task is not None and task.cancelling():
                # stop() cancelled us, but an await swallowed the CancelledError (seen, rarely,
                # under load on Python 3.11 with redis-py): honour it, or stop() waits forever.
                raise asyncio.CancelledError
            try:
                if loop.time() >= next_scan:
                    next_scan = loop.time() + self._orphan_scan_s
                    await self.adopt_orphans()
                await self.ship_once()
            except (RedisError, OSError) as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "usage shipping failed; records wait in the spool",
                        extra={"error": repr(exc)},
                    )
                await asyncio.sleep(backoff_delay(failures))
                continue
            if failures:
                log.info("usage shipping resumed", extra={"failures": failures})
                failures = 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._idle_s)
            if self._wake.is_set():
                # Let the records of the next few milliseconds join this batch: one shipment
                # (Redis round trip, script, offset) costs the loop ~0.3 ms of CPU however
                # few records it carries, and at low concurrency that CPU is request latency.
                await asyncio.sleep(self._linger_s)
            self._wake.clear()

    # -- shipping --------------------------------------------------------------------------

    async def ship_once(self) -> int:
        """Ship this process's pending records (as of the call); return how many were shipped.
        Raises the Redis (or OS) error that stopped it; what was not shipped stays pending."""
        async with self._ship_lock:
            self._maybe_rotate()
            total = 0
            try:
                for f in list(self._files):
                    total += await self._ship_file(f, f.size)
                    if f.final and f.shipped >= f.size:
                        self._files.remove(f)
                        await self._retire(f)
            except (RedisError, OSError):
                self.ship_errors += 1
                raise
            return total

    def _maybe_rotate(self) -> None:
        if not self._files or self._files[-1].size < self._rotate_bytes:
            return
        try:
            new = self._create_file()
        except OSError as exc:
            log.warning("usage spool rotation failed", extra={"error": repr(exc)})
            return
        self._files[-1].final = True
        self._files.append(new)
        # The old file is deleted once shipped: carry the open streams' checkpoints over.
        for frame in list(self._open.values()):
            try:
                self._write(frame)
            except SpoolWriteError as exc:
                log.warning("could not carry a stream checkpoint over", extra={"error": repr(exc)})

    async def adopt_orphans(self) -> int:
        """Ship and delete the spool files of dead processes; return how many records."""
        async with self._orphan_lock:
            total = 0
            own = {f.path for f in self._files}
            for path in sorted(self._dir.glob(_PATTERN)):
                if path in own:
                    continue
                orphan = self._lock_orphan(path)
                if orphan is None:
                    continue  # its owner is alive, or another process is shipping it
                try:
                    self._finish_streams(orphan)
                    total += await self._ship_file(orphan, orphan.size)
                except (RedisError, OSError):
                    self.ship_errors += 1
                    raise
                finally:
                    if orphan.shipped >= orphan.size:
                        await self._retire(orphan)
                        log.info("adopted orphaned usage spool", extra={"file": path.name})
                    else:
                        with contextlib.suppress(OSError):
                            self._save_offset(orphan, force=True)
                        os.close(orphan.fd)  # releases the lock
            for offset in self._dir.glob(_PATTERN + ".offset"):
                if not offset.with_suffix("").exists():  # its file was deleted, then we crashed
                    with contextlib.suppress(FileNotFoundError):
                        offset.unlink()
            return total

    def _finish_streams(self, orphan: _SpoolFile) -> None:
        """Bill the streams a dead process left in flight: the last checkpoint of each
        becomes its final record, appended to this process's own spool (once per file: a
        marker beside it records that it was done)."""
        marker = orphan.path.with_name(orphan.path.name + ".streams")
        if marker.exists():
            return
        for payload in unfinished(os.pread(orphan.fd, orphan.size, 0)):
            frame = encode_frame(payload)
            self._write(frame)
            self.appended += 1
            log.info(
                "billed a stream cut short by a dead process", extra={"file": orphan.path.name}
            )
        marker.touch()
        self._wake.set()

    @staticmethod
    def _lock_orphan(path: Path) -> _SpoolFile | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st = os.fstat(fd)
            # Whoever held the lock before us may have shipped and deleted it meanwhile.
            if (st.st_ino, st.st_dev) != ((now := os.stat(path)).st_ino, now.st_dev):
                raise FileNotFoundError(path)
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        shipped = min(_read_offset(Path(f"{path}.offset")), st.st_size)
        return _SpoolFile(path, fd, st.st_size, shipped, final=True, saved=shipped)

    async def _retire(self, f: _SpoolFile) -> None:
        """Delete a fully shipped file (and its sidecar), release it, then delete its Redis
        offset: in that order, a crash in between leaves only a key that expires."""
        _delete(f)
        os.close(f.fd)
        if not f.remote:
            return  # never written to Redis (an empty file, or finished by another shipper)
        try:
            await self._redis.delete(f.key)
        except RedisError as exc:
            log.warning(
                "could not delete a usage spool offset; it expires",
                extra={"key": f.key, "error": repr(exc)},
            )

    async def _sync(self, f: _SpoolFile) -> None:
        """Read the file's offset in Redis when starting on a file: resume from the larger of
        it and the local hint (``f.shipped``)."""
        raw = await self._redis.get(f.key)
        if raw is None and f.vanished():
            # Deleted (file first, then key) by another shipper that finished it.
            f.shipped, f.remote = max(f.shipped, f.size), 0
            return
        f.remote = int(raw) if raw is not None else 0
        if f.remote < f.shipped:
            log.warning(
                "usage spool offset in Redis is behind the local offset; shipping on from the "
                "local one",
                extra={"file": f.path.name, "redis": f.remote, "local": f.shipped},
            )

    async def _ship_file(self, f: _SpoolFile, end: int) -> int:
        if f.remote is None:
            await self._sync(f)
        shipped = 0
        while f.shipped < end:
            buf = os.pread(f.fd, min(end - f.shipped, _READ_BYTES), f.shipped)
            at_end = f.shipped + len(buf) >= end
            scan = scan_frames(buf, max_frames=self._batch, final=f.final and at_end)
            if scan.consumed == 0 and not at_end and len(buf) < MAX_FRAME:
                # one frame larger than a read: read enough for the largest frame
                buf = os.pread(f.fd, min(end - f.shipped, MAX_FRAME), f.shipped)
                at_end = f.shipped + len(buf) >= end
                scan = scan_frames(buf, max_frames=self._batch, final=f.final and at_end)
            if scan.consumed == 0:
                break  # a torn tail, or a write still landing: later
            remote = f.remote or 0
            if remote > f.shipped:
                self._skip(f, buf, scan, remote - f.shipped)
                continue
            payloads: list[bytes] = []
            bad: list[tuple[int, bytes]] = []
            for at, payload in scan.frames:
                if is_checkpoint(payload):
                    continue  # superseded by the final record, or billed by an adopter
                try:
                    _id_decoder.decode(payload)
                except msgspec.DecodeError:
                    bad.append((at, payload))
                    continue
                payloads.append(payload)
            stop = f.shipped + scan.consumed
            ok, current = (
                int(x)
                for x in await self._ship(
                    keys=[USAGE_STREAM, f.key],
                    args=[remote, stop, USAGE_SPOOL_OFFSET_TTL_S, *payloads],
                )
            )
            if not ok:
                if self._rejected(f, current, end):
                    break
                continue
            # Quarantined only once the batch is through: a batch lost to another shipper
            # is that shipper's to quarantine.
            for first, last in scan.corrupt:
                self._quarantine(f, buf[first:last], f.shipped + first)
            for at, payload in bad:
                self._quarantine(f, payload, f.shipped + at)
            f.shipped = f.remote = stop
            self._save_offset(f)
            shipped += len(payloads)
            self.shipped += len(payloads)
        if f.final and f.shipped >= f.size and (f.remote or 0) > f.size:
            log.error(
                "usage spool offset in Redis lies beyond the end of its file",
                extra={"file": f.path.name, "redis": f.remote, "size": f.size},
            )
        return shipped

    def _skip(self, f: _SpoolFile, buf: bytes, scan: Scan, skip: int) -> None:
        """Move past the frames of ``scan`` that the Redis offset (``skip`` bytes on) says
        are in the stream already. An offset inside a frame is damage: the frame is
        quarantined."""
        if skip >= scan.consumed:
            self.duplicates += len(scan.frames)
            f.shipped += scan.consumed
        else:
            self.duplicates += sum(1 for at, p in scan.frames if frame_end(at, p) <= skip)
            span = span_at(scan, skip)
            if span is None:
                f.shipped += skip
            else:
                first, last = span
                log.error(
                    "usage spool offset in Redis is not on a frame boundary",
                    extra={"file": f.path.name, "redis": f.remote},
                )
                self._quarantine(f, buf[first:last], f.shipped + first)
                f.shipped += last  # the next batch re-aligns the Redis offset
        self._save_offset(f)

    def _rejected(self, f: _SpoolFile, current: int, end: int) -> bool:
        """The script refused a batch: the file's Redis offset is ``current``, not
        ``f.remote``. Return whether the file is done (another shipper finished it)."""
        if current > (f.remote or 0):
            f.remote = current  # another shipper got there first: skip what it shipped
            return False
        if f.vanished():
            # The offset went back because the key was deleted, after the file was: another
            # shipper finished the file.
            f.shipped, f.remote = max(f.shipped, f.size, end), 0
            return True
        log.warning(
            "usage spool offset in Redis went back; shipping on from the local offset",
            extra={"file": f.path.name, "redis": current, "local": f.shipped},
        )
        f.remote = current
        return False

    def _save_offset(self, f: _SpoolFile, *, force: bool = False) -> None:
        """Save the local hint of the shipped offset, at most every ``offset_save_s`` unless
        forced. A stale hint costs nothing: the offset in Redis says where shipping resumes
        (on ext4 each ``os.replace`` over the old sidecar costs ~0.4 ms: a flush of the data).
        """
        now = asyncio.get_running_loop().time()
        if f.shipped != f.saved and (force or now - f.saved_at >= self._offset_save_s):
            _write_offset(f.offset_path, f.shipped)
            f.saved, f.saved_at = f.shipped, now

    def _quarantine(self, f: _SpoolFile, data: bytes, offset: int) -> None:
        corrupt_dir = self._dir / "corrupt"
        corrupt_dir.mkdir(exist_ok=True)
        target = corrupt_dir / f"{f.path.name}.{offset}.bad"
        target.write_bytes(data)
        self.corrupt += 1
        log.error(
            "corrupt usage spool frame quarantined",
            extra={"file": f.path.name, "offset": offset, "bytes": len(data), "to": str(target)},
        )
