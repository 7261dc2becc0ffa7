"""The server-side state of device authorizations (RFC 8628) in Redis.

One hash per device code at ``keys.device_grant(device_key)``, where ``device_key`` is
``sha256(device_code)``: the device code is a bearer secret for the token endpoint, so only
its digest is stored. The user code maps to the device key at ``keys.device_user_code(code)``
for as long as the code can be approved; the grant itself is kept ``keep_s`` longer, so that
a poll after expiry reads ``expired_token`` (§3.5) instead of an unknown code.

A grant moves ``pending`` -> ``approved`` (naming a runtime) | ``denied`` exactly once
(``device_decide.lua`` claims the user code in the same step); an approved grant is consumed
when its credential is issued (``device_pair.lua``, called by the runtime store).
"""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Mapping
from typing import Literal

import msgspec
import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from gateway import keys

__all__ = ["DeviceGrant", "DeviceGrantStore", "GrantStatus", "device_key"]

GrantStatus = Literal["pending", "approved", "denied"]


def _lua(name: str) -> str:
    return importlib.resources.files("gateway.runtimes").joinpath(name).read_text()


_DECIDE_LUA = _lua("device_decide.lua")
_UPDATE_LUA = _lua("update_existing.lua")


def device_key(device_code: str) -> str:
    """What a device code is stored and looked up by: its hex sha256."""
    return hashlib.sha256(device_code.encode()).hexdigest()


class DeviceGrant(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One device authorization. Times are Unix milliseconds; ``user_code`` is canonical
    (8 letters, no dash); ``interval_s`` grows by 5 on every ``slow_down`` (§3.5)."""

    device_key: str
    client_id: str
    user_code: str
    created_ms: int
    expires_ms: int
    interval_s: int
    name: str | None = None
    last_poll_ms: int | None = None
    status: GrantStatus = "pending"
    runtime_id: str | None = None
    workspace: str | None = None

    def expired(self, now_ms: int) -> bool:
        return now_ms >= self.expires_ms


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode(key: str, raw: Mapping[bytes | str, bytes | str]) -> DeviceGrant | None:
    h = {_text(k): _text(v) for k, v in raw.items()}
    try:
        status = h["status"]
        if status not in ("pending", "approved", "denied"):
            return None
        return DeviceGrant(
            device_key=key,
            client_id=h["client_id"],
            user_code=h["user_code"],
            created_ms=int(h["created_ms"]),
            expires_ms=int(h["expires_ms"]),
            interval_s=int(h["interval_s"]),
            name=h.get("name"),
            last_poll_ms=int(h["last_poll_ms"]) if "last_poll_ms" in h else None,
            status=status,  # type: ignore[arg-type]  # checked just above
            runtime_id=h.get("runtime_id"),
            workspace=h.get("workspace"),
        )
    except (KeyError, ValueError):
        return None


class DeviceGrantStore:
    """Device grants and their user codes. ``keep_s``: how long a grant outlives its code."""

    def __init__(self, redis: aioredis.Redis, *, keep_s: int = keys.DEVICE_GRANT_KEEP_S) -> None:
        self._redis = redis
        self._keep_ms = keep_s * 1000
        self._decide = redis.register_script(_DECIDE_LUA)
        self._update = redis.register_script(_UPDATE_LUA)

    async def create(self, grant: DeviceGrant, now_ms: int) -> bool:
        """Store a new pending grant; ``False`` (nothing stored) if its user code is taken."""
        ttl_ms = max(1, grant.expires_ms - now_ms)
        # SET NX claims the user code first: two live grants never share one.
        if not await self._redis.set(
            keys.device_user_code(grant.user_code), grant.device_key, nx=True, px=ttl_ms
        ):
            return False
        fields: dict[FieldT, EncodableT] = {
            "client_id": grant.client_id,
            "user_code": grant.user_code,
            "created_ms": grant.created_ms,
            "expires_ms": grant.expires_ms,
            "interval_s": grant.interval_s,
            "status": grant.status,
        }
        if grant.name is not None:
            fields["name"] = grant.name
        key = keys.device_grant(grant.device_key)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=fields)
            pipe.pexpire(key, ttl_ms + self._keep_ms)
            await pipe.execute()
        return True

    async def get(self, key: str) -> DeviceGrant | None:
        """The grant stored under a device key (``device_key(device_code)``), if any."""
        return _decode(key, await self._redis.hgetall(keys.device_grant(key)))

    async def find(self, user_code: str) -> DeviceGrant | None:
        """The grant a canonical user code currently maps to, if any."""
        key = await self._redis.get(keys.device_user_code(user_code))
        return None if key is None else await self.get(_text(key))

    async def record_poll(self, key: str, now_ms: int, interval_s: int) -> None:
        """Remember a poll of the token endpoint (and the interval it leaves in force); never
        recreates a grant consumed meanwhile."""
        await self._update(
            keys=[keys.device_grant(key)],
            args=[2, "last_poll_ms", now_ms, "interval_s", interval_s],
        )

    async def decide(
        self,
        grant: DeviceGrant,
        now_ms: int,
        *,
        approve: bool,
        runtime_id: str | None = None,
        workspace: str | None = None,
    ) -> bool:
        """Approve (naming the new runtime) or deny a pending grant, claiming its user code.

        ``False`` if someone else decided first, or the code expired meanwhile.
        """
        won = await self._decide(
            keys=[keys.device_user_code(grant.user_code), keys.device_grant(grant.device_key)],
            args=[
                grant.device_key,
                now_ms,
                "approved" if approve else "denied",
                runtime_id or "",
                workspace or "",
            ],
        )
        return int(won) == 1
