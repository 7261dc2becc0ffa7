"""The usage spool's frame format, bytes in and frames out: round trip, a torn tail left
pending, damage in the middle skipped, damage at the end of a finished file quarantined, and
where an offset falls relative to frame boundaries."""

from __future__ import annotations

import pytest

from billing.spool import backoff_delay
from billing.spool_format import (
    FRAME_OVERHEAD,
    MAX_PAYLOAD,
    encode_frame,
    frame_end,
    scan_frames,
    span_at,
)


def frames(*payloads: bytes) -> bytes:
    return b"".join(encode_frame(p) for p in payloads)


def test_round_trip() -> None:
    payloads = [b"", b"a", b"\xa7L" * 40, bytes(range(256)) * 10]
    buf = frames(*payloads)
    scan = scan_frames(buf)
    assert [p for _, p in scan.frames] == payloads
    assert scan.corrupt == [] and scan.consumed == len(buf)
    assert len(encode_frame(b"xyz")) == 3 + FRAME_OVERHEAD


def test_empty_input() -> None:
    assert scan_frames(b"") == ([], [], 0)
    assert scan_frames(b"", final=True) == ([], [], 0)


@pytest.mark.parametrize("cut", [1, 2, 5, 6, 9, 12])
def test_torn_tail_is_left_pending(cut: int) -> None:
    whole = frames(b"one", b"two")
    torn = encode_frame(b"three-and-more")[:cut]
    scan = scan_frames(whole + torn)
    assert [p for _, p in scan.frames] == [b"one", b"two"]
    assert scan.corrupt == [] and scan.consumed == len(whole)
    # once the file will not grow, the torn tail is damage
    final = scan_frames(whole + torn, final=True)
    assert final.corrupt == [(len(whole), len(whole) + cut)]
    assert final.consumed == len(whole) + cut


def test_bad_crc_at_the_very_end_is_left_pending() -> None:
    last = bytearray(encode_frame(b"last"))
    last[-1] ^= 0xFF
    scan = scan_frames(frames(b"first") + bytes(last))
    assert [p for _, p in scan.frames] == [b"first"]
    assert scan.consumed == len(encode_frame(b"first"))


@pytest.mark.parametrize("flip", [0, 3, 8, -1])  # magic, length, payload, crc
def test_corrupt_middle_frame_is_skipped(flip: int) -> None:
    first, rest = encode_frame(b"first"), frames(b"3", b"4")
    bad = bytearray(encode_frame(b"second"))
    bad[flip] ^= 0x55
    buf = first + bytes(bad) + rest
    scan = scan_frames(buf)
    assert [p for _, p in scan.frames] == [b"first", b"3", b"4"]
    assert scan.corrupt == [(len(first), len(first) + len(bad))]
    assert scan.consumed == len(buf)


def test_garbage_between_frames() -> None:
    buf = encode_frame(b"a") + b"\x00garbage\xa7Lmore" + encode_frame(b"b")
    scan = scan_frames(buf)
    assert [p for _, p in scan.frames] == [b"a", b"b"]
    assert len(scan.corrupt) == 1 and scan.consumed == len(buf)


def test_max_frames_bounds_a_batch() -> None:
    buf = frames(*(str(i).encode() for i in range(10)))
    scan = scan_frames(buf, max_frames=4)
    assert [p for _, p in scan.frames] == [b"0", b"1", b"2", b"3"]
    rest = scan_frames(buf[scan.consumed :], max_frames=100)
    assert len(rest.frames) == 6 and scan.consumed + rest.consumed == len(buf)


def test_oversized_record_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_frame(b"x" * (MAX_PAYLOAD + 1))


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    assert 0.025 <= backoff_delay(1) <= 0.05
    assert 0.1 <= backoff_delay(3) <= 0.2
    assert all(1.0 <= backoff_delay(n) <= 2.0 for n in range(10, 40))


def test_span_at_tells_frame_boundaries() -> None:
    a, b = encode_frame(b"first"), encode_frame(b"second")
    bad = bytearray(encode_frame(b"third"))
    bad[8] ^= 0x55
    buf = a + b + bytes(bad) + encode_frame(b"4")
    scan = scan_frames(buf)
    assert len(scan.frames) == 3 and len(scan.corrupt) == 1
    assert frame_end(0, b"first") == len(a)
    for boundary in (0, len(a), len(a) + len(b), len(a) + len(b) + len(bad), len(buf)):
        assert span_at(scan, boundary) is None
    assert span_at(scan, 1) == (0, len(a))
    assert span_at(scan, len(a) + 3) == (len(a), len(a) + len(b))
    damaged = len(a) + len(b)
    assert span_at(scan, damaged + 2) == (damaged, damaged + len(bad))
