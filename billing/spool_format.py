"""The usage spool's on-disk frame format, and scanning it: pure functions over bytes.

One frame per usage record, appended with a single ``write``::

    magic (2 bytes, b"\\xa7L") | length (4 bytes, little-endian) | payload | crc (4 bytes, LE)

``payload`` is the msgpack record (:func:`billing.usage.encode_record`); ``crc`` is the
CRC-32 (zlib) of the length bytes followed by the payload, so a damaged length is caught as
surely as a damaged payload. The magic lets a reader find the next frame after damage.

Scanning (:func:`scan_frames`) reads frames from the shipped offset onwards and tells the
shipper three things: the complete, intact frames; the damaged byte ranges to quarantine; and
how many bytes it may mark as done. An incomplete or bad frame at the very end is a write the
reader may have caught half-way (or a torn write after a crash): it is left pending unless the
caller says the file will never grow again (``final``), in which case it is damage too.
:func:`span_at` tells whether an offset (the shipped offset kept in Redis) falls on a frame
boundary of a scan.
"""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

__all__ = [
    "FRAME_OVERHEAD",
    "MAGIC",
    "MAX_FRAME",
    "MAX_PAYLOAD",
    "Scan",
    "encode_frame",
    "frame_end",
    "scan_frames",
    "span_at",
]

MAGIC = b"\xa7L"
_HEADER = struct.Struct("<2sI")
_CRC = struct.Struct("<I")
FRAME_OVERHEAD = _HEADER.size + _CRC.size
#: Largest payload a frame carries; a larger length field is damage, not a record.
MAX_PAYLOAD = 1 << 20
MAX_FRAME = MAX_PAYLOAD + FRAME_OVERHEAD


class Scan(NamedTuple):
    #: ``(offset, payload)`` of each intact frame, offsets relative to the scanned buffer.
    frames: list[tuple[int, bytes]]
    #: ``(start, end)`` byte ranges that are damaged and should be quarantined.
    corrupt: list[tuple[int, int]]
    #: Bytes from the start of the buffer that are accounted for (frames and corrupt ranges).
    consumed: int


def encode_frame(payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"usage record of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    length = len(payload).to_bytes(4, "little")
    crc = zlib.crc32(payload, zlib.crc32(length))
    return b"".join((MAGIC, length, payload, _CRC.pack(crc)))


def _frame_at(buf: bytes, pos: int) -> bytes | None:
    """The payload of the intact frame starting at ``pos``, or ``None`` (damaged or cut off)."""
    if len(buf) - pos < FRAME_OVERHEAD:
        return None
    magic, length = _HEADER.unpack_from(buf, pos)
    end = pos + _HEADER.size + length
    if magic != MAGIC or length > MAX_PAYLOAD or end + _CRC.size > len(buf):
        return None
    payload = buf[pos + _HEADER.size : end]
    (crc,) = _CRC.unpack_from(buf, end)
    if crc != zlib.crc32(payload, zlib.crc32(buf[pos + 2 : pos + 6])):
        return None
    return payload


def _resync(buf: bytes, pos: int) -> int | None:
    """Offset of the next intact frame after ``pos``, if the buffer holds one."""
    at = buf.find(MAGIC, pos + 1)
    while at != -1:
        if _frame_at(buf, at) is not None:
            return at
        at = buf.find(MAGIC, at + 1)
    return None


def scan_frames(buf: bytes, *, max_frames: int = 500, final: bool = False) -> Scan:
    """Split ``buf`` (spool bytes from the shipped offset) into frames, at most ``max_frames``.

    A damaged frame followed by an intact one is quarantined and skipped. Damage with no
    intact frame after it is left pending (it may be a write still in progress), unless
    ``final`` says no more bytes will follow: then it is quarantined.
    """
    frames: list[tuple[int, bytes]] = []
    corrupt: list[tuple[int, int]] = []
    pos = 0
    while pos < len(buf) and len(frames) < max_frames:
        payload = _frame_at(buf, pos)
        if payload is not None:
            frames.append((pos, payload))
            pos += FRAME_OVERHEAD + len(payload)
            continue
        nxt = _resync(buf, pos)
        if nxt is None:
            if final:
                corrupt.append((pos, len(buf)))
                pos = len(buf)
            break
        corrupt.append((pos, nxt))
        pos = nxt
    return Scan(frames, corrupt, pos)


def frame_end(at: int, payload: bytes) -> int:
    """Offset just past the frame at ``at`` carrying ``payload``."""
    return at + FRAME_OVERHEAD + len(payload)


def span_at(scan: Scan, pos: int) -> tuple[int, int] | None:
    """The frame or damaged range of ``scan`` that ``pos`` falls strictly inside, as
    ``(start, end)``; ``None`` when ``pos`` is a boundary (or outside what was consumed)."""
    for at, payload in scan.frames:
        if at < pos < frame_end(at, payload):
            return at, frame_end(at, payload)
    for start, end in scan.corrupt:
        if start < pos < end:
            return start, end
    return None
