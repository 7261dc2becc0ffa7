"""Identifiers for requests and dispatches: unique across processes and restarts, not
guessable, and cheap — no system call per id.

``uuid.uuid4()`` asks the kernel for 16 random bytes on every call (a ``getrandom`` system
call, a few microseconds on a busy VM, twice per request). Here each process draws one
256-bit key at start (and again in a forked child) and an id is the keyed BLAKE2b of a
counter: distinct inputs under a secret key give outputs that are unpredictable and, at 128
bits, never collide in practice — the same guarantees as a version-4 UUID, at a fraction of
the cost. An id reveals nothing: not the process, not how many ids came before it.
"""

from __future__ import annotations

import itertools
import os
from hashlib import blake2b

__all__ = ["new_hex_id"]

_key = os.urandom(32)
_counter = itertools.count()


def new_hex_id() -> str:
    """32 lowercase hex characters (the shape of ``uuid.uuid4().hex``)."""
    return blake2b(next(_counter).to_bytes(8, "little"), key=_key, digest_size=16).hexdigest()


def _reseed() -> None:
    global _key, _counter
    _key = os.urandom(32)
    _counter = itertools.count()


os.register_at_fork(after_in_child=_reseed)
