"""Claiming the dispatches that dead holders left pending in runtime queues.

A holder acknowledges a queue entry only when its dispatch is over, so the entries of a
holder process that died stay in the group's pending list. :func:`claim_abandoned` finds
them (XINFO CONSUMERS of every queue in one script call, ``reclaim_scan.lua``, then the
``gateway_alive`` key of every other consumer), claims the
pending entries of the dead consumers that have been idle at least ``idle_ms`` (XPENDING +
XCLAIM) for the calling process, and sorts them: those to start, and those to drop because
their requester cancelled them (``dispatch_cancelled`` marker), the dead holder had already
relayed part of their answer (their reply stream exists: a second run would append another
answer to it; the requester fails them with ``tunnel_closed`` instead), they are malformed,
or they were deleted (trimmed) while pending. Dead consumers with nothing pending are removed
from the group (XGROUP DELCONSUMER), so the group does not grow with every gateway restart.

Only consumers whose process is gone are claimed from: by idle time alone (plain XAUTOCLAIM)
a long stream still being relayed by a live holder would be claimed and run twice. Each
step is one round trip over all the given streams; the common case (no other consumer, or
only live ones) stops after one or two — at thousands of held runtimes, swept every few
seconds, the client's cost per queue is what the sweep costs, hence the script.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from gateway import keys
from gateway.tunnel.bus_protocol import QueuedDispatch, decode_entry

__all__ = ["Claimed", "claim_abandoned"]

#: Pending entries looked at per dead consumer and pass (a later pass takes the rest).
RECLAIM_BATCH = 100
_SCAN_LUA = importlib.resources.files("gateway.tunnel").joinpath("reclaim_scan.lua").read_text()

T = TypeVar("T")


class Claimed(NamedTuple):
    #: Entries now pending for the caller, to start (the caller still checks deadlines).
    found: list[tuple[str, bytes, QueuedDispatch]]
    #: Entries now pending for the caller, to acknowledge and delete unprocessed.
    drop: list[tuple[str, bytes]]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _each(
    redis: aioredis.Redis, items: Sequence[T], call: Callable[[Pipeline, T], object]
) -> list[Any]:
    """One pipelined command per item; errors come back as values."""
    if not items:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for item in items:
            call(pipe, item)
        return await pipe.execute(raise_on_error=False)


async def claim_abandoned(
    redis: aioredis.Redis, process_id: str, streams: Sequence[str], *, idle_ms: int
) -> Claimed:
    """Claim, for ``process_id``, what dead consumers left pending in ``streams``."""
    group = keys.HOLDERS_GROUP
    if not streams:
        return Claimed(found=[], drop=[])
    # Step 1 in one script call: only the consumers other than the caller come back.
    flat = await redis.eval(_SCAN_LUA, len(streams), *streams, group, process_id)
    owned = [
        (streams[int(flat[i])], _text(flat[i + 1]), int(flat[i + 2]))
        for i in range(0, len(flat), 3)
    ]
    names = sorted({name for _, name, _ in owned})
    alive = await _each(redis, names, lambda p, n: p.exists(keys.gateway_alive(n)))
    dead = {name for name, live in zip(names, alive, strict=True) if live == 0}
    targets = [(stream, name, pending) for stream, name, pending in owned if name in dead]

    def pending_or_forget(pipe: Pipeline, target: tuple[str, str, int]) -> object:
        stream, name, pending = target
        if pending:
            return pipe.xpending_range(stream, group, "-", "+", RECLAIM_BATCH, consumername=name)
        return pipe.xgroup_delconsumer(stream, group, name)

    pendings = await _each(redis, targets, pending_or_forget)
    claims: list[tuple[str, list[Any]]] = []
    for (stream, _, pending), reply in zip(targets, pendings, strict=True):
        if pending and not isinstance(reply, Exception):
            ids = [e["message_id"] for e in reply if e["time_since_delivered"] >= idle_ms]
            if ids:
                claims.append((stream, ids))
    # XCLAIM's min-idle makes a concurrent second claimer (idle just reset) get nothing.
    claimed = await _each(
        redis, claims, lambda p, c: p.xclaim(c[0], group, process_id, idle_ms, list(c[1]))
    )
    result = Claimed(found=[], drop=[])
    for (stream, ids), reply in zip(claims, claimed, strict=True):
        if isinstance(reply, Exception):
            continue
        got = {entry_id: fields for entry_id, fields in reply if entry_id is not None}
        missing = [i for i in ids if i not in got]
        if len(missing) == len(reply) - len(got):
            # Redis 6.2 claims a deleted entry as nil: exactly the missing ids are those.
            result.drop.extend((stream, i) for i in missing)
        for entry_id, fields in got.items():
            queued = decode_entry(fields)
            if queued is None:
                result.drop.append((stream, entry_id))
            else:
                result.found.append((stream, entry_id, queued))
    # One EXISTS per entry over both keys: its cancellation marker, and its reply stream (the
    # dead holder relayed part of the answer: running it again would append a second answer
    # to the first; its requester ends it with "tunnel_closed" once it has read that part).
    started = await _each(
        redis,
        result.found,
        lambda p, f: p.exists(keys.dispatch_cancelled(f[2].request.dispatch_id), f[2].reply_to),
    )
    keep = [f for f, n in zip(result.found, started, strict=True) if n == 0]
    result.drop.extend(
        (stream, entry_id)
        for (stream, entry_id, _), n in zip(result.found, started, strict=True)
        if n != 0
    )
    result.found[:] = keep
    return result
