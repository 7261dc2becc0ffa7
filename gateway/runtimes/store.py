"""Personal runtime records in Redis: create, pair, authenticate, list, revoke.

Storage (keys from :mod:`gateway.keys`): one hash per runtime at ``keys.runtime(id)`` whose
fields are those of :class:`~gateway.runtimes.records.RuntimeRecord` (integers in decimal,
``models`` and ``task_classes`` as JSON arrays, absent fields for ``None``; encoded and
decoded by :mod:`gateway.runtimes.records`), plus two secret digests that only this module
writes and compares: ``cred_sha256`` (the runtime credential; decoded into the record's
``credential_sha256``, which is never rendered to a caller) and, until redeemed,
``boot_sha256``/``boot_expires_ms`` (the one-time bootstrap token). Runtime ids of a
workspace are members of ``keys.workspace_runtimes(ws)``. Records are never deleted: a revoked
runtime stays listed with status ``revoked``.

Contracts:

- one read per lookup, whatever the outcome: :meth:`RuntimeStore.authenticate` and
  :meth:`RuntimeStore.redeem_bootstrap` compare against a dummy digest when the runtime is
  unknown, revoked or has no such secret, so those cost what a wrong secret costs; ``get`` of
  another workspace's runtime, an unknown id and a malformed id each cost one round trip and
  return ``None`` (ARCHITECTURE.md: a foreign runtime answers exactly like a missing one);
- a bootstrap token or a device grant yields a credential exactly once: the write is a Lua
  compare-and-set (``bootstrap_redeem.lua``, ``device_pair.lua``);
- :meth:`RuntimeStore.revoke` sets ``revoked_ms`` (first time wins), deletes every secret
  digest, so the credential can never authenticate again, and publishes
  ``runtime-revoked:<id>`` on ``keys.EVENTS_CHANNEL`` for the process holding the tunnel.
"""

from __future__ import annotations

import builtins
import hmac
import importlib.resources
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import msgspec
import redis.asyncio as aioredis
from redis.typing import EncodableT

from gateway import keys
from gateway.runtimes.records import (
    RuntimeRecord,
    RuntimeStatus,
    as_text,
    decode_record,
    encode_list,
    hash_fields,
    runtime_status,
    validate_runtime_name,
)
from gateway.runtimes.tokens import (
    BOOTSTRAP_PREFIX,
    CREDENTIAL_PREFIX,
    DUMMY_DIGEST,
    RUNTIME_ID_RE,
    digest,
    mint_secret_token,
    new_runtime_id,
    parse_secret_token,
)

__all__ = ["RUNTIME_REVOKED_EVENT", "RuntimeStore"]

#: Prefix of the pub/sub message :meth:`RuntimeStore.revoke` publishes on ``EVENTS_CHANNEL``.
RUNTIME_REVOKED_EVENT = "runtime-revoked:"

#: Read in place of a malformed id, so that a bad id costs the same round trip as a good one.
_PLACEHOLDER_ID = "lat_" + "a" * 16
_SECRET_FIELDS = ("cred_sha256", "boot_sha256", "boot_expires_ms")
#: Runtimes per script call in :meth:`RuntimeStore.touch_many` (``touch_many.lua``).
_TOUCH_BATCH = 500


def _lua(name: str) -> str:
    return importlib.resources.files("gateway.runtimes").joinpath(name).read_text()


_REDEEM_LUA = _lua("bootstrap_redeem.lua")
_PAIR_LUA = _lua("device_pair.lua")
_UPDATE_LUA = _lua("update_existing.lua")
_TOUCH_MANY_LUA = _lua("touch_many.lua")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class RuntimeStore:
    """Personal runtime records. Stateless apart from the Redis client; share one per process.

    ``clock`` returns Unix milliseconds (tests move it); ``bootstrap_ttl_s`` bounds how long a
    bootstrap token can be redeemed.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        bootstrap_ttl_s: int = keys.BOOTSTRAP_TOKEN_TTL_S,
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        self._redis = redis
        self.bootstrap_ttl_s = bootstrap_ttl_s
        self._clock = clock
        self._redeem = redis.register_script(_REDEEM_LUA)
        self._pair = redis.register_script(_PAIR_LUA)
        self._update = redis.register_script(_UPDATE_LUA)
        self._touch_many = redis.register_script(_TOUCH_MANY_LUA)

    # -- creation and pairing --------------------------------------------------------------

    async def create(self, workspace: str, name: str) -> tuple[RuntimeRecord, str]:
        """A new unpaired runtime and its one-time bootstrap token (plaintext, shown once).

        The token expires ``bootstrap_ttl_s`` after creation: see :meth:`bootstrap_expires_ms`.
        """
        record = await self._insert(workspace, name)
        token, token_digest = mint_secret_token(BOOTSTRAP_PREFIX, record.id)
        expires = self.bootstrap_expires_ms(record)
        await self._redis.hset(
            keys.runtime(record.id),
            mapping={"boot_sha256": token_digest, "boot_expires_ms": str(expires)},
        )
        return record, token

    def bootstrap_expires_ms(self, record: RuntimeRecord) -> int:
        """When the bootstrap token made with ``record`` stops being redeemable."""
        return record.created_ms + self.bootstrap_ttl_s * 1000

    async def create_for_device(self, workspace: str, name: str) -> RuntimeRecord:
        """A new unpaired runtime without a bootstrap token: the device flow will pair it
        (:meth:`pair_device`)."""
        return await self._insert(workspace, name)

    async def discard_unpaired(self, record: RuntimeRecord) -> None:
        """Delete a runtime that was never paired nor shown with a secret: the roll-back of
        an approval that lost a race for its user code."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.runtime(record.id))
            pipe.srem(keys.workspace_runtimes(record.workspace), record.id)
            await pipe.execute()

    async def redeem_bootstrap(self, token: str) -> tuple[RuntimeRecord, str] | None:
        """Exchange a bootstrap token for the runtime's credential, exactly once.

        ``None`` for a malformed, unknown, expired, already redeemed or revoked token: every
        case after parsing costs one read, one constant-time compare and (only on a match) the
        compare-and-set script.
        """
        parsed = parse_secret_token(BOOTSTRAP_PREFIX, token)
        if parsed is None:
            return None
        runtime_id, secret = parsed
        h = hash_fields(await self._redis.hgetall(keys.runtime(runtime_id)))
        presented = digest(secret)
        stored = h.get("boot_sha256", DUMMY_DIGEST)
        record = decode_record(h)
        if not hmac.compare_digest(presented, stored) or record is None:
            return None
        now = self._clock()
        credential, credential_digest = mint_secret_token(CREDENTIAL_PREFIX, runtime_id)
        won = await self._redeem(
            keys=[keys.runtime(runtime_id)], args=[presented, now, credential_digest]
        )
        if int(won) != 1:
            return None
        paired = msgspec.structs.replace(record, paired_ms=now, credential_sha256=credential_digest)
        return paired, credential

    @staticmethod
    def mint_credential(runtime_id: str) -> str:
        """A new runtime credential ``lrt_…`` for ``runtime_id`` (pure; stored by
        :meth:`pair_device`)."""
        return mint_secret_token(CREDENTIAL_PREFIX, runtime_id)[0]

    async def pair_device(
        self, device_key: str, runtime_id: str, credential: str
    ) -> RuntimeRecord | None:
        """Store ``credential`` (from :meth:`mint_credential`) as the credential of the
        runtime an approved device grant names, consuming the grant atomically.

        ``None`` if the grant was already consumed, names another runtime, or the runtime is
        revoked or already paired.
        """
        parsed = parse_secret_token(CREDENTIAL_PREFIX, credential)
        if parsed is None or parsed[0] != runtime_id:
            raise ValueError("pair_device needs a credential minted for this runtime")
        now = self._clock()
        won = await self._pair(
            keys=[keys.device_grant(device_key), keys.runtime(runtime_id)],
            args=[runtime_id, now, digest(parsed[1])],
        )
        if int(won) != 1:
            return None
        return await self._read(runtime_id)

    # -- the tunnel host's side ------------------------------------------------------------

    async def authenticate(self, credential: str) -> RuntimeRecord | None:
        """The record of a valid credential of a paired, unrevoked runtime, else ``None``.

        One read and one constant-time compare whatever the outcome (a malformed token is
        refused before the read: its shape is public).
        """
        parsed = parse_secret_token(CREDENTIAL_PREFIX, credential)
        if parsed is None:
            return None
        runtime_id, secret = parsed
        h = hash_fields(await self._redis.hgetall(keys.runtime(runtime_id)))
        record = decode_record(h)
        stored = h.get("cred_sha256", DUMMY_DIGEST)
        if not hmac.compare_digest(digest(secret), stored):
            return None
        if record is None or record.revoked_ms is not None:
            return None
        return record

    async def record_hello(
        self,
        runtime_id: str,
        *,
        models: Sequence[str],
        task_classes: Sequence[str],
        default_model: str | None,
        daemon_version: str | None,
        concurrency: int | None,
        now_ms: int,
    ) -> bool:
        """Store what a connecting daemon advertised; ``False`` if there is no such runtime."""
        values: dict[str, EncodableT | None] = {
            "models": encode_list(models),
            "task_classes": encode_list(task_classes),
            "default_model": default_model,
            "daemon_version": daemon_version,
            "concurrency": concurrency,
            "last_seen_ms": now_ms,
        }
        return await self._update_fields(runtime_id, values)

    async def touch(self, runtime_id: str, now_ms: int) -> bool:
        """Record a sign of life (heartbeat); ``False`` if there is no such runtime."""
        return await self._update_fields(runtime_id, {"last_seen_ms": now_ms})

    async def touch_many(self, runtime_ids: Iterable[str], now_ms: int) -> None:
        """:meth:`touch` for many runtimes, one script call per batch (the holder's periodic
        refresh of thousands of idle tunnels)."""
        ids = [r for r in runtime_ids if RUNTIME_ID_RE.fullmatch(r)]
        for start in range(0, len(ids), _TOUCH_BATCH):
            batch = [keys.runtime(r) for r in ids[start : start + _TOUCH_BATCH]]
            await self._touch_many(keys=batch, args=["last_seen_ms", now_ms])

    # -- the owner's side ------------------------------------------------------------------

    async def get(self, workspace: str, runtime_id: str) -> RuntimeRecord | None:
        """The runtime if it belongs to ``workspace``; else ``None``, at the same cost."""
        found = await self.get_with_status(workspace, runtime_id)
        return None if found is None else found[0]

    async def get_with_status(
        self, workspace: str, runtime_id: str
    ) -> tuple[RuntimeRecord, RuntimeStatus] | None:
        """Record and status in one round trip (HGETALL + EXISTS), whatever the outcome."""
        valid = RUNTIME_ID_RE.fullmatch(runtime_id) is not None
        read_id = runtime_id if valid else _PLACEHOLDER_ID
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.runtime(read_id))
            pipe.exists(keys.runtime_holder(read_id))
            raw, holder = await pipe.execute()
        record = decode_record(hash_fields(raw))
        if not valid or record is None or record.workspace != workspace:
            return None
        return record, runtime_status(record, reachable=bool(holder))

    async def list(self, workspace: str) -> builtins.list[RuntimeRecord]:
        """Every runtime of the workspace (revoked ones included), oldest first."""
        return [record for record, _ in await self.list_with_status(workspace)]

    async def list_with_status(
        self, workspace: str
    ) -> builtins.list[tuple[RuntimeRecord, RuntimeStatus]]:
        """Every runtime of the workspace with its status, oldest first."""
        ids = sorted(
            as_text(i) for i in await self._redis.smembers(keys.workspace_runtimes(workspace))
        )
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for runtime_id in ids:
                pipe.hgetall(keys.runtime(runtime_id))
                pipe.exists(keys.runtime_holder(runtime_id))
            replies = await pipe.execute()
        out = []
        for raw, holder in zip(replies[::2], replies[1::2], strict=True):
            record = decode_record(hash_fields(raw))
            if record is not None and record.workspace == workspace:
                out.append((record, runtime_status(record, reachable=bool(holder))))
        return sorted(out, key=lambda pair: (pair[0].created_ms, pair[0].id))

    async def status(self, record: RuntimeRecord) -> RuntimeStatus:
        """The record's status now (one EXISTS of its presence key)."""
        holder = await self._redis.exists(keys.runtime_holder(record.id))
        return runtime_status(record, reachable=bool(holder))

    async def revoke(self, workspace: str, runtime_id: str) -> RuntimeRecord | None:
        """Revoke a runtime of ``workspace``; ``None`` (after the same one read) if there is
        no such runtime in it. Revoking twice keeps the first time and publishes again."""
        record = await self.get(workspace, runtime_id)
        if record is None:
            return None
        key = keys.runtime(runtime_id)
        now = self._clock()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, "revoked_ms", str(now))
            pipe.hdel(key, *_SECRET_FIELDS)
            pipe.hget(key, "revoked_ms")
            pipe.publish(keys.EVENTS_CHANNEL, RUNTIME_REVOKED_EVENT + runtime_id)
            _, _, revoked_ms, _ = await pipe.execute()
        return msgspec.structs.replace(record, revoked_ms=int(revoked_ms), credential_sha256=None)

    # -- internals -------------------------------------------------------------------------

    async def _insert(self, workspace: str, name: str) -> RuntimeRecord:
        name = validate_runtime_name(name)
        created = self._clock()
        while True:
            runtime_id = new_runtime_id()
            # HSETNX claims the id atomically: an (80-bit, so theoretical) collision retries
            # instead of overwriting another workspace's runtime.
            if await self._redis.hsetnx(keys.runtime(runtime_id), "id", runtime_id):
                break
        record = RuntimeRecord(id=runtime_id, workspace=workspace, name=name, created_ms=created)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                keys.runtime(runtime_id),
                mapping={"workspace": workspace, "name": name, "created_ms": str(created)},
            )
            pipe.sadd(keys.workspace_runtimes(workspace), runtime_id)
            await pipe.execute()
        return record

    async def _read(self, runtime_id: str) -> RuntimeRecord | None:
        return decode_record(hash_fields(await self._redis.hgetall(keys.runtime(runtime_id))))

    async def _update_fields(
        self, runtime_id: str, values: Mapping[str, EncodableT | None]
    ) -> bool:
        if not RUNTIME_ID_RE.fullmatch(runtime_id):
            return False
        to_set = [(k, v) for k, v in values.items() if v is not None]
        to_delete = [k for k, v in values.items() if v is None]
        args: list[EncodableT] = [len(to_set)]
        for field, value in to_set:
            args += [field, value]
        args += to_delete
        return int(await self._update(keys=[keys.runtime(runtime_id)], args=args)) == 1
