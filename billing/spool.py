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
  Redis with ``usage_ship.lua``, which adds each record to ``USAGE_STREAM`` only if its
  ``usage_seen`` marker was not set yet: a batch shipped twice (a crash between the script and
  the offset write) lands once. Then it saves the offset in ``<file>.offset``. While Redis is
  down it backs off and the records wait in the spool; appends go on.

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

from billing.keys import USAGE_SEEN_TTL_S, USAGE_STREAM, usage_seen
from billing.spool_format import MAX_FRAME, encode_frame, scan_frames
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
    shipped: int
    #: No longer appended to (rotated out, or an orphan): read to its end, then deleted.
    final: bool = False
    #: The offset last saved in the sidecar, and when (loop time).
    saved: int = 0
    saved_at: float = 0.0

    @property
    def offset_path(self) -> Path:
        return self.path.with_name(self.path.name + ".offset")


def _read_offset(path: Path) -> int:
    try:
        return max(0, int(path.read_bytes() or b"0"))
    except (FileNotFoundError, ValueError):
        return 0  # shipping again from 0 is safe: the script skips what is in the stream


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
    for path in (f.path, f.offset_path, f.offset_path.with_name(f.offset_path.name + ".tmp")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class SpoolOutbox:
    """A :class:`billing.usage.UsageOutbox` that appends to a local spool (see module doc).

    Counters for metrics: ``appended``, ``shipped``, ``duplicates`` (re-shipped records the
    stream already held), ``corrupt`` (frames quarantined), ``ship_errors``, ``pending_bytes``.
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
        self._ship = redis.register_script(_SHIP_LUA)
        self._batch = batch
        self._rotate_bytes = rotate_bytes
        self._idle_s = idle_s
        self._linger_s = linger_s
        self._offset_save_s = offset_save_s
        self._orphan_scan_s = orphan_scan_s
        self._files: list[_SpoolFile] = []  # own files, oldest first; the last one is appended to
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
        return sum(f.size - f.shipped for f in self._files)

    # -- the request path ------------------------------------------------------------------

    async def append(self, record: UsageRecord) -> str:
        """Make ``record`` durable in the spool (synchronously) and wake the shipper."""
        try:
            frame = encode_frame(encode_record(record))
        except ValueError as exc:
            raise SpoolWriteError(errno.EFBIG, str(exc)) from exc
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
        self.appended += 1
        self._wake.set()
        return record.dispatch_id

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
                _delete(f)
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
        next_scan = loop.time()
        failures = 0
        while True:
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
                        _delete(f)
                        os.close(f.fd)
                        self._files.remove(f)
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
                    total += await self._ship_file(orphan, orphan.size)
                except (RedisError, OSError):
                    self.ship_errors += 1
                    raise
                finally:
                    if orphan.shipped >= orphan.size:
                        _delete(orphan)
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

    async def _ship_file(self, f: _SpoolFile, end: int) -> int:
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
            for start, stop in scan.corrupt:
                self._quarantine(f, buf[start:stop], f.shipped + start)
            ids: list[str] = []
            payloads: list[bytes] = []
            for at, payload in scan.frames:
                try:
                    ids.append(_id_decoder.decode(payload).dispatch_id)
                except msgspec.DecodeError:
                    self._quarantine(f, payload, f.shipped + at)
                    continue
                payloads.append(payload)
            if payloads:
                keys = [USAGE_STREAM, *(usage_seen(i) for i in ids)]
                added = int(await self._ship(keys=keys, args=[USAGE_SEEN_TTL_S, *payloads]))
                self.duplicates += len(payloads) - added
            f.shipped += scan.consumed
            self._save_offset(f)
            shipped += len(payloads)
            self.shipped += len(payloads)
        return shipped

    def _save_offset(self, f: _SpoolFile, *, force: bool = False) -> None:
        """Save the shipped offset, at most every ``offset_save_s`` unless forced. A stale
        offset only means records are shipped again after a crash, and the script drops those
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
