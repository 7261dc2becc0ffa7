"""Checkpoints of streams in flight, so that a gateway killed mid-stream still bills what it
delivered (issue 4: "A gateway process killed mid-stream: the tokens delivered before the kill
are billed").

While a stream is relayed, the gateway writes a *checkpoint* into its spool before each event
it hands to the client: the usage record the dispatch would get if the process died right
there (status ``failed``, units so far, estimated when the backend has not reported them). A
checkpoint is a normal spool frame whose payload is :data:`CHECKPOINT` followed by the
msgpack record, so the frame format, CRCs and scanning are unchanged; the shipper never sends
checkpoints to the usage stream. The final record of the dispatch supersedes them.

When a process dies, whoever adopts its spool file first asks :func:`unfinished` for the last
checkpoint of every dispatch that has no final record in the file and appends those as final
records. Checkpoints of streams still open when a file is rotated are written again at the
start of the new file, so deleting a shipped file never loses one; a :data:`CARRIED_OVER`
frame then ends the old file, so that an adopter of both files (the process died before the
old one was shipped: Redis was down, say) bills those streams once, from the newer
checkpoint, not also from a stale one in the old file. If the adopter itself dies
half-way, a record may be appended twice: consumers of the usage stream count a dispatch id
once (the billing fold, the usage ledger and the earnings ledger are all idempotent per
dispatch id).
"""

from __future__ import annotations

import msgspec

from billing.spool_format import scan_frames

__all__ = ["CARRIED_OVER", "CHECKPOINT", "checkpoint_payload", "is_checkpoint", "unfinished"]

#: First byte of a checkpoint payload. A record is a msgpack map (0x80-0x8f, 0xde, 0xdf), so a
#: 0x00 byte (msgpack's integer 0) can never start one.
CHECKPOINT = b"\x00"
#: A checkpoint payload without a record: the checkpoints before it in this file were carried
#: over to a newer file (rotation). A checkpoint all the same, so shippers skip it.
CARRIED_OVER = CHECKPOINT


class _DispatchId(msgspec.Struct):
    dispatch_id: str


_id_decoder = msgspec.msgpack.Decoder(_DispatchId)


def dispatch_id_of(record_payload: bytes) -> str:
    """The dispatch id of a msgpack usage record; ``msgspec.DecodeError`` if it is none."""
    return _id_decoder.decode(record_payload).dispatch_id


def checkpoint_payload(record_payload: bytes) -> bytes:
    return CHECKPOINT + record_payload


def is_checkpoint(payload: bytes) -> bool:
    return payload[:1] == CHECKPOINT


def unfinished(buf: bytes) -> list[bytes]:
    """The record payloads (without the checkpoint byte) of the last checkpoint of every
    dispatch in ``buf`` (a whole spool file) that has no final record after it, in order of
    first appearance; none from before a :data:`CARRIED_OVER` frame. Damaged frames are
    skipped."""
    pending: dict[str, bytes] = {}
    pos = 0
    while pos < len(buf):
        scan = scan_frames(buf[pos:], max_frames=10_000, final=True)
        if scan.consumed == 0:
            break
        for _, payload in scan.frames:
            if payload == CARRIED_OVER:
                pending.clear()
                continue
            body = payload[1:] if is_checkpoint(payload) else payload
            try:
                dispatch_id = dispatch_id_of(body)
            except msgspec.DecodeError:
                continue
            if is_checkpoint(payload):
                pending[dispatch_id] = body
            else:
                pending.pop(dispatch_id, None)
        pos += scan.consumed
    return list(pending.values())
