"""Shipping one usage spool file's frames to the Redis usage stream, exactly once.

- A shipper reads complete frames from the shipped offset and sends them in batches to
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

Checkpoint frames (:mod:`billing.spool_checkpoints`) are never shipped. Damaged frames are
moved to ``corrupt/`` and logged.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import os
from pathlib import Path
from typing import Protocol

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from billing.keys import USAGE_SPOOL_OFFSET_TTL_S, USAGE_STREAM
from billing.spool_checkpoints import dispatch_id_of, is_checkpoint
from billing.spool_files import SpoolFile, delete_file, write_offset
from billing.spool_format import MAX_FRAME, Scan, frame_end, scan_frames, span_at

__all__ = ["SpoolCounters", "SpoolShipper"]

#: The spool's one logger, whichever of its modules logs (log filters name ``billing.spool``).
log = logging.getLogger("billing.spool")

_SHIP_LUA = importlib.resources.files("billing").joinpath("usage_ship.lua").read_text()
_READ_BYTES = 256 * 1024


class SpoolCounters(Protocol):
    """Where the shipper and the orphan adopter count, for metrics (the
    :class:`~billing.spool.SpoolOutbox`; see its docstring)."""

    appended: int
    shipped: int
    duplicates: int
    corrupt: int
    ship_errors: int


class SpoolShipper:
    """Ships spool files (see module doc) into ``USAGE_STREAM`` for one outbox, which ships
    each file from one task at a time. Counts ``shipped``, ``duplicates`` and ``corrupt`` in
    ``counters``."""

    def __init__(
        self,
        spool_dir: Path,
        redis: aioredis.Redis,
        counters: SpoolCounters,
        *,
        batch: int,
        offset_save_s: float,
    ) -> None:
        self._dir = spool_dir
        self._redis = redis
        self._ship = redis.register_script(_SHIP_LUA)
        self._counters = counters
        self._batch = batch
        self._offset_save_s = offset_save_s

    async def retire(self, f: SpoolFile) -> None:
        """Delete a fully shipped file (and its sidecar), release it, then delete its Redis
        offset: in that order, a crash in between leaves only a key that expires."""
        delete_file(f)
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

    async def _sync(self, f: SpoolFile) -> None:
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

    async def ship_file(self, f: SpoolFile, end: int) -> int:
        """Ship ``f``'s frames up to byte ``end``; return how many records were shipped.
        Raises the Redis (or OS) error that stopped it; the batches before it stay shipped."""
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
                    dispatch_id_of(payload)
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
            self.save_offset(f)
            shipped += len(payloads)
            self._counters.shipped += len(payloads)
        if f.final and f.shipped >= f.size and (f.remote or 0) > f.size:
            log.error(
                "usage spool offset in Redis lies beyond the end of its file",
                extra={"file": f.path.name, "redis": f.remote, "size": f.size},
            )
        return shipped

    def _skip(self, f: SpoolFile, buf: bytes, scan: Scan, skip: int) -> None:
        """Move past the frames of ``scan`` that the Redis offset (``skip`` bytes on) says
        are in the stream already. An offset inside a frame is damage: the frame is
        quarantined."""
        if skip >= scan.consumed:
            self._counters.duplicates += len(scan.frames)
            f.shipped += scan.consumed
        else:
            self._counters.duplicates += sum(1 for at, p in scan.frames if frame_end(at, p) <= skip)
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
        self.save_offset(f)

    def _rejected(self, f: SpoolFile, current: int, end: int) -> bool:
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

    def save_offset(self, f: SpoolFile, *, force: bool = False) -> None:
        """Save the local hint of the shipped offset, at most every ``offset_save_s`` unless
        forced. A stale hint costs nothing: the offset in Redis says where shipping resumes
        (on ext4 each ``os.replace`` over the old sidecar costs ~0.4 ms: a flush of the data).
        """
        now = asyncio.get_running_loop().time()
        if f.shipped != f.saved and (force or now - f.saved_at >= self._offset_save_s):
            write_offset(f.offset_path, f.shipped)
            f.saved, f.saved_at = f.shipped, now

    def _quarantine(self, f: SpoolFile, data: bytes, offset: int) -> None:
        corrupt_dir = self._dir / "corrupt"
        corrupt_dir.mkdir(exist_ok=True)
        target = corrupt_dir / f"{f.path.name}.{offset}.bad"
        target.write_bytes(data)
        self._counters.corrupt += 1
        log.error(
            "corrupt usage spool frame quarantined",
            extra={"file": f.path.name, "offset": offset, "bytes": len(data), "to": str(target)},
        )
