"""``Idempotency-Key`` for non-streaming requests, with Stripe's semantics
(https://docs.stripe.com/api/idempotent_requests): the same key and the same body replays
the stored response; the same key with another body is a 409; a request still in flight
under that key is a 409 too. Only successful responses are stored, so a failed request can
be retried under its key. Keys are scoped to the workspace and kept 24 hours.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import msgspec
import redis.asyncio as aioredis

from gateway import keys
from gateway.errors import Conflict, InvalidRequest

__all__ = ["IdempotencyStore", "StoredResponse", "body_digest"]

MAX_KEY_LENGTH = 255


class StoredResponse(msgspec.Struct, frozen=True):
    digest: str
    state: Literal["pending", "done"]
    status: int = 0
    body: bytes = b""


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(StoredResponse)


def body_digest(task: str, body: bytes) -> str:
    return hashlib.sha256(task.encode() + b"\0" + body).hexdigest()


class IdempotencyStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    @staticmethod
    def check_key(key: str) -> None:
        if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
            raise InvalidRequest(
                f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters.",
                param="Idempotency-Key",
                code="invalid_idempotency_key",
            )

    async def begin(self, workspace: str, key: str, digest: str) -> StoredResponse | None:
        """Claim ``key`` for this request, or return the stored response to replay."""
        self.check_key(key)
        name = keys.idempotency(workspace, key)
        pending = _enc.encode(StoredResponse(digest, "pending"))
        if await self._redis.set(name, pending, nx=True, ex=keys.IDEMPOTENCY_TTL_S):
            return None
        raw = await self._redis.get(name)
        if raw is None:  # expired between the two calls: claim again
            return await self.begin(workspace, key, digest)
        stored = _dec.decode(raw if isinstance(raw, bytes) else raw.encode())
        if stored.digest != digest:
            raise Conflict(
                "Keys for idempotent requests can only be used with the same parameters they "
                "were first used with. Try using a key other than "
                f"'{key}' if you meant to execute a different request.",
                param="Idempotency-Key",
            )
        if stored.state == "pending":
            raise Conflict(
                "A request with this Idempotency-Key is still being processed; retry later.",
                param="Idempotency-Key",
                code="idempotency_key_in_use",
            )
        return stored

    async def complete(
        self, workspace: str, key: str, digest: str, status: int, body: bytes
    ) -> None:
        await self._redis.set(
            keys.idempotency(workspace, key),
            _enc.encode(StoredResponse(digest, "done", status, body)),
            ex=keys.IDEMPOTENCY_TTL_S,
        )

    async def abandon(self, workspace: str, key: str) -> None:
        await self._redis.delete(keys.idempotency(workspace, key))
