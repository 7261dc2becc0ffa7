"""Adopting the usage spool files of dead processes.

A spool file whose lock can be taken (:mod:`billing.spool_files`: each owner holds an
exclusive ``flock`` on its file for its lifetime) belongs to a process that died: any live
process sharing the directory adopts it (takes the lock), ships it, and deletes it. Before
shipping, the adopter bills the streams the dead process left in flight
(:func:`billing.spool_checkpoints.unfinished`): the last checkpoint of each becomes its final
record, appended to the adopter's own spool, once per file (a ``<file>.streams`` marker
beside it records that it was done). A file that could not be fully shipped (Redis down) is
released, its offset hint saved, for the next scan; offset sidecars whose file is gone (it
was deleted, then the process crashed) are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Collection
from pathlib import Path

from redis.exceptions import RedisError

from billing.spool_checkpoints import unfinished
from billing.spool_files import SPOOL_PATTERN, SpoolFile, read_offset
from billing.spool_format import encode_frame
from billing.spool_shipper import SpoolCounters, SpoolShipper

__all__ = ["OrphanAdopter", "lock_orphan"]

#: The spool's one logger, whichever of its modules logs (log filters name ``billing.spool``).
log = logging.getLogger("billing.spool")


def lock_orphan(path: Path) -> SpoolFile | None:
    """The spool file at ``path``, locked and ready to ship from its offset hint; ``None``
    if its owner is alive, another process is shipping it, or it is gone."""
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
    shipped = min(read_offset(Path(f"{path}.offset")), st.st_size)
    return SpoolFile(path, fd, st.st_size, shipped, final=True, saved=shipped)


class OrphanAdopter:
    """Adopts the orphaned files of one spool directory (see module doc) for an outbox.

    ``append`` writes a frame to the outbox's own spool (raising ``OSError``); ``wake`` is set
    once streams were billed, so the outbox ships them. Callers serialize :meth:`adopt`.
    """

    def __init__(
        self,
        spool_dir: Path,
        shipper: SpoolShipper,
        counters: SpoolCounters,
        append: Callable[[bytes], None],
        wake: asyncio.Event,
    ) -> None:
        self._dir = spool_dir
        self._shipper = shipper
        self._counters = counters
        self._append = append
        self._wake = wake

    async def adopt(self, own: Collection[Path]) -> int:
        """Ship and delete the spool files of dead processes (never those in ``own``);
        return how many records were shipped."""
        total = 0
        for path in sorted(self._dir.glob(SPOOL_PATTERN)):
            if path in own:
                continue
            orphan = lock_orphan(path)
            if orphan is None:
                continue  # its owner is alive, or another process is shipping it
            try:
                self._finish_streams(orphan)
                total += await self._shipper.ship_file(orphan, orphan.size)
            except (RedisError, OSError):
                self._counters.ship_errors += 1
                raise
            finally:
                if orphan.shipped >= orphan.size:
                    await self._shipper.retire(orphan)
                    log.info("adopted orphaned usage spool", extra={"file": path.name})
                else:
                    with contextlib.suppress(OSError):
                        self._shipper.save_offset(orphan, force=True)
                    os.close(orphan.fd)  # releases the lock
        for offset in self._dir.glob(SPOOL_PATTERN + ".offset"):
            if not offset.with_suffix("").exists():  # its file was deleted, then we crashed
                with contextlib.suppress(FileNotFoundError):
                    offset.unlink()
        return total

    def _finish_streams(self, orphan: SpoolFile) -> None:
        """Bill the streams a dead process left in flight: the last checkpoint of each
        becomes its final record, appended to this process's own spool (once per file: a
        marker beside it records that it was done)."""
        marker = orphan.path.with_name(orphan.path.name + ".streams")
        if marker.exists():
            return
        for payload in unfinished(os.pread(orphan.fd, orphan.size, 0)):
            frame = encode_frame(payload)
            self._append(frame)
            self._counters.appended += 1
            log.info(
                "billed a stream cut short by a dead process", extra={"file": orphan.path.name}
            )
        marker.touch()
        self._wake.set()
