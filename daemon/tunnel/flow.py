"""Per-dispatch flow control, in bytes of ``Data`` payload.

The scheme is HTTP/2's (RFC 9113 §5.2, §6.9): the receiver of the data (the gateway)
grants credit, the sender (the daemon) never sends more than it holds, and a sender that
does is a protocol error (RFC 9113 §6.9.1 FLOW_CONTROL_ERROR). Each dispatch starts with
``window`` bytes of credit (the Welcome's). The gateway returns credit as its consumer takes
bytes, in batches of at least ``window // 2`` (as HTTP/2 implementations batch
WINDOW_UPDATE), so upstream traffic stays one Credit frame per half window.

Invariant on the gateway, per live dispatch (checked by the property tests)::

    peer_credit + buffered + unacked (+ dropped, once cancelled) == window

Hence what the gateway buffers per dispatch never exceeds ``window``. And because
``unacked < window // 2`` after every ``consume``, a consumer that has taken everything
(``buffered == 0``) leaves the daemon more than ``window // 2`` bytes of credit, which is why
the largest ``Data`` payload is ``window // 2`` (:func:`max_payload`): a payload the daemon
holds can always be sent once the consumer catches up; no deadlock.
"""

from __future__ import annotations

__all__ = ["InboundFlow", "OutboundFlow", "max_payload"]


def max_payload(window: int, peer_max_frame: int, overhead: int) -> int:
    """The largest ``Data`` payload a daemon may send under these terms."""
    return min(window // 2, peer_max_frame - overhead)


class InboundFlow:
    """The gateway's accounting for one dispatch's incoming ``Data``."""

    __slots__ = ("buffered", "cancelled", "dropped", "peer_credit", "unacked", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        #: Bytes the daemon may still send (as far as what arrived tells).
        self.peer_credit = window
        #: Bytes received and handed to the consumer, not consumed yet.
        self.buffered = 0
        #: Bytes consumed but not yet returned to the daemon as credit.
        self.unacked = 0
        #: Bytes received after the gateway cancelled (dropped, never credited back).
        self.dropped = 0
        self.cancelled = False

    def receive(self, nbytes: int) -> bool:
        """Account for ``nbytes`` that arrived; False if they exceed the daemon's credit."""
        if nbytes > self.peer_credit:
            return False
        self.peer_credit -= nbytes
        if self.cancelled:
            self.dropped += nbytes
        else:
            self.buffered += nbytes
        return True

    def consume(self, nbytes: int) -> int:
        """Account for ``nbytes`` the consumer took; the credit to grant now (0: none yet).
        Raises ValueError when more is consumed than was buffered."""
        if nbytes > self.buffered or nbytes < 0:
            raise ValueError(f"consumed {nbytes} bytes with {self.buffered} buffered")
        self.buffered -= nbytes
        self.unacked += nbytes
        if self.unacked < max(1, self.window // 2):
            return 0
        grant, self.unacked = self.unacked, 0
        self.peer_credit += grant
        return grant

    def cancel(self) -> None:
        """From now on arriving bytes are dropped; buffered ones were discarded."""
        self.cancelled = True
        self.dropped += self.buffered
        self.buffered = 0


class OutboundFlow:
    """The daemon's accounting for one dispatch's outgoing ``Data``."""

    __slots__ = ("cancelled", "credit", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.credit = window
        self.cancelled = False

    def grant(self, nbytes: int) -> bool:
        """Add credit; False if the total would exceed the window (the gateway can never
        legitimately grant that: it only returns bytes the daemon spent)."""
        if self.credit + nbytes > self.window:
            return False
        self.credit += nbytes
        return True

    def spend(self, nbytes: int) -> bool:
        """Spend credit for a payload; False (and nothing spent) if there is not enough."""
        if nbytes > self.credit:
            return False
        self.credit -= nbytes
        return True
