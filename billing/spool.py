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
- A shipper task sends complete frames in batches to ``USAGE_STREAM``, exactly once per
  record through a compare-and-set of one Redis offset per spool file
  (:mod:`billing.spool_shipper`, which states that contract). While Redis is down the shipper
  backs off and the records wait in the spool; appends go on. A fully shipped file is
  deleted, then its key: a crash in between leaves a key that expires.
- A stream in flight is :meth:`SpoolOutbox.checkpoint`-ed, so a process killed mid-stream
  still bills what it delivered (:mod:`billing.spool_checkpoints`).

Files (:mod:`billing.spool_files`): each process owns ``usage-<pid>-<uuid>.spool`` in the
spool directory and holds an exclusive ``flock`` on it for its lifetime; that lock is how
other processes tell it is alive. A file whose lock can be taken belongs to a process that
died: any live process sharing the directory adopts it (takes the lock), ships it, and
deletes it (:mod:`billing.spool_orphans`). Past ``rotate_bytes`` the owner starts a new file
and deletes the old one once it is shipped. Damaged frames are moved to ``corrupt/`` and
logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from billing.spool_checkpoints import CARRIED_OVER, checkpoint_payload
from billing.spool_files import SpoolFile, create_own_file
from billing.spool_format import encode_frame
from billing.spool_orphans import OrphanAdopter
from billing.spool_shipper import SpoolShipper
from billing.usage import UsageRecord, encode_record

__all__ = ["SpoolOutbox", "SpoolWriteError", "backoff_delay"]

log = logging.getLogger(__name__)


class SpoolWriteError(OSError):
    """A usage record could not be written to the local spool (disk full, I/O error): the
    request fails with a retryable 503 rather than leave unmetered."""


def backoff_delay(failures: int, *, base: float = 0.05, cap: float = 2.0) -> float:
    """Exponential backoff with jitter (half to full) after ``failures`` failures in a row."""
    return min(cap, base * 2.0 ** max(0, failures - 1)) * random.uniform(0.5, 1.0)


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
        self._rotate_bytes = rotate_bytes
        self._idle_s = idle_s
        self._linger_s = linger_s
        self._orphan_scan_s = orphan_scan_s
        self._files: list[SpoolFile] = []  # own files, oldest first; the last one is appended to
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
        self._shipper = SpoolShipper(
            self._dir, redis, self, batch=batch, offset_save_s=offset_save_s
        )
        self._adopter = OrphanAdopter(self._dir, self._shipper, self, self._write, self._wake)

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

    def _write(self, frame: bytes, f: SpoolFile | None = None) -> None:
        """Append ``frame`` to ``f`` (default: the file appended to, opened if need be)."""
        if f is None:
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

    def _open_own(self) -> SpoolFile:
        try:
            f = create_own_file(self._dir)
        except OSError as exc:
            raise SpoolWriteError(exc.errno, f"cannot open the usage spool: {exc}") from exc
        self._files.append(f)
        return f

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open this process's spool file and start the shipper (which adopts orphans first)."""
        if not self._files:
            self._files.append(create_own_file(self._dir))
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
                        await self._shipper.retire(f)
            else:
                with contextlib.suppress(OSError):
                    self._shipper.save_offset(f, force=True)
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
                    total += await self._shipper.ship_file(f, f.size)
                    if f.final and f.shipped >= f.size:
                        self._files.remove(f)
                        await self._shipper.retire(f)
            except (RedisError, OSError):
                self.ship_errors += 1
                raise
            return total

    def _maybe_rotate(self) -> None:
        if not self._files or self._files[-1].size < self._rotate_bytes:
            return
        try:
            new = create_own_file(self._dir)
        except OSError as exc:
            log.warning("usage spool rotation failed", extra={"error": repr(exc)})
            return
        old = self._files[-1]
        old.final = True
        self._files.append(new)
        # The old file is deleted once shipped: carry the open streams' checkpoints over.
        carried = True
        for frame in list(self._open.values()):
            try:
                self._write(frame)
            except SpoolWriteError as exc:
                carried = False
                log.warning("could not carry a stream checkpoint over", extra={"error": repr(exc)})
        if carried and self._open:
            # Then say so in the old file (after, so that a crash in between bills a stream
            # twice at worst, never not at all): should this process die before the old file
            # is shipped, its adopter must not bill the stale checkpoints it holds.
            try:
                self._write(encode_frame(CARRIED_OVER), old)
            except SpoolWriteError as exc:
                log.warning(
                    "could not mark stream checkpoints carried over", extra={"error": repr(exc)}
                )

    async def adopt_orphans(self) -> int:
        """Ship and delete the spool files of dead processes (:mod:`billing.spool_orphans`);
        return how many records."""
        async with self._orphan_lock:
            return await self._adopter.adopt({f.path for f in self._files})
