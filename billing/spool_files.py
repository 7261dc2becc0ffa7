"""The usage spool's files on disk: naming, the owner's lock, the offset sidecar, deletion.

Each process owns ``usage-<pid>-<uuid>.spool`` in the spool directory and holds an exclusive
``flock`` on it for its lifetime; that lock is how other processes tell it is alive
(:mod:`billing.spool_orphans` adopts the files whose lock can be taken). Beside a file:

- ``<file>.offset``: the local hint of the shipped offset (:func:`write_offset`, replaced
  atomically); the offset in Redis (:func:`billing.keys.spool_offset`) is authoritative;
- ``<file>.streams``: the marker that the streams a dead owner left in flight were billed;
- ``corrupt/<file>.<offset>.bad``: damaged frames, quarantined by the shipper.

A fully shipped file is deleted with its sidecars (:func:`delete_file`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from billing.keys import spool_offset

__all__ = [
    "SPOOL_PATTERN",
    "SpoolFile",
    "create_own_file",
    "delete_file",
    "read_offset",
    "write_offset",
]

#: The names of spool files (a new file's temporary name does not match it).
SPOOL_PATTERN = "usage-*.spool"


@dataclass
class SpoolFile:
    """One spool file open for shipping (this process's own, or an adopted orphan) and where
    its shipping stands."""

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


def create_own_file(spool_dir: Path) -> SpoolFile:
    """A new, empty spool file for this process, locked (``OSError`` if it cannot be made)."""
    # Created under a name the orphan scan ignores, locked, then renamed: no other process
    # can take the lock of a new file before its owner does.
    spool_dir.mkdir(parents=True, exist_ok=True)
    name = f"usage-{os.getpid()}-{uuid.uuid4().hex}.spool"
    tmp = spool_dir / f".{name}.tmp"
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, spool_dir / name)
    except OSError:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return SpoolFile(spool_dir / name, fd, 0, 0)


def read_offset(path: Path) -> int:
    try:
        return max(0, int(path.read_bytes() or b"0"))
    except (FileNotFoundError, ValueError):
        return 0  # only a hint: the offset in Redis says what is in the stream


def write_offset(path: Path, value: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def delete_file(f: SpoolFile) -> None:
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
