"""The live, versioned catalog in Redis, and its in-memory copy for the hot path.

Storage (keys from :mod:`gateway.keys`): ``CATALOG_VERSION`` counts writes, ``CATALOG_CURRENT``
holds the current :class:`Catalog` as msgpack (its ``version`` field equals the counter) and
``catalog_history(v)`` a copy of each of the last ``CATALOG_HISTORY_KEEP`` versions. One Lua
script (``catalog_apply.lua``) compares the version and writes all of it atomically, then
publishes ``catalog:<version>`` on ``EVENTS_CHANNEL``.

Every write is validated first (:func:`catalog.validate_catalog`): an invalid catalog never
replaces a valid one. Every process reads through a :class:`LiveCatalog`, which polls the
version counter and swaps its in-memory copy when it moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from catalog.model import Catalog
from catalog.validate import validate_catalog
from gateway import keys
from gateway.errors import Conflict

__all__ = ["CatalogStore", "CatalogVersionConflict", "LiveCatalog"]

log = logging.getLogger(__name__)

_APPLY_LUA = importlib.resources.files("gateway").joinpath("catalog_apply.lua").read_text()
_DECODER = msgspec.msgpack.Decoder(Catalog)
_ENCODER = msgspec.msgpack.Encoder()
#: How often an unconditional :meth:`CatalogStore.apply` retries when writers race.
_MAX_ATTEMPTS = 16


class CatalogVersionConflict(Conflict):
    """``expected_version`` was not the current version: someone else wrote first."""

    code = "catalog_version_conflict"

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(
            f"The catalog is at version {current}, not {expected}; reload it and retry."
        )
        self.expected = expected
        self.current = current


class CatalogStore:
    """Reads and writes the catalog in Redis. Stateless; share one per process."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._apply = redis.register_script(_APPLY_LUA)

    async def get(self) -> Catalog:
        """The current catalog; an empty ``Catalog()`` at version 0 if none was stored yet."""
        raw = await self._redis.get(keys.CATALOG_CURRENT)
        return Catalog() if raw is None else _decode(raw)

    async def version(self) -> int:
        """The current version (0 before the first write): one cheap ``GET``."""
        raw = await self._redis.get(keys.CATALOG_VERSION)
        return 0 if raw is None else int(raw)

    async def history(self, version: int) -> Catalog | None:
        """The catalog as it was at ``version``, if that copy is still kept."""
        raw = await self._redis.get(keys.catalog_history(version))
        return None if raw is None else _decode(raw)

    async def apply(self, new: Catalog, *, expected_version: int | None = None) -> Catalog:
        """Validate ``new`` and store it as the next version; return it with that version.

        With ``expected_version``, store only if the current version is exactly that (else
        :class:`CatalogVersionConflict`; ``0`` means "only if no catalog exists"). Without it,
        replace whatever is current. Raises :class:`catalog.errors.CatalogError` (before any
        write) when ``new`` is invalid.
        """
        validate_catalog(new)
        for _ in range(_MAX_ATTEMPTS):
            base = expected_version if expected_version is not None else await self.version()
            stored, current = await self._compare_and_set(new, base)
            if stored:
                return msgspec.structs.replace(new, version=current)
            if expected_version is not None:
                raise CatalogVersionConflict(expected_version, current)
        raise CatalogVersionConflict(base, current)

    async def seed_if_empty(self, seed: Catalog) -> Catalog:
        """Store ``seed`` as version 1 unless a catalog exists; return the current catalog.

        Safe when many processes start at once: exactly one write wins, the rest read it.
        """
        try:
            return await self.apply(seed, expected_version=0)
        except CatalogVersionConflict:
            return await self.get()

    async def _compare_and_set(self, new: Catalog, base: int) -> tuple[bool, int]:
        version = base + 1
        document = _ENCODER.encode(msgspec.structs.replace(new, version=version))
        script_keys = [keys.CATALOG_VERSION, keys.CATALOG_CURRENT, keys.catalog_history(version)]
        if version > keys.CATALOG_HISTORY_KEEP:
            script_keys.append(keys.catalog_history(version - keys.CATALOG_HISTORY_KEEP))
        result: Any = await self._apply(
            keys=script_keys,
            args=[base, document, keys.EVENTS_CHANNEL, f"catalog:{version}"],
        )
        return bool(result[0]), int(result[1])


def _decode(raw: bytes | str) -> Catalog:
    if not isinstance(raw, bytes):
        raise TypeError("CatalogStore needs a Redis client with decode_responses=False")
    return _DECODER.decode(raw)


class LiveCatalog:
    """This process's copy of the current catalog, kept fresh in the background.

    :attr:`current` is a plain attribute read (no I/O) for the request path. A background
    task polls the version every ``poll_interval`` seconds (one ``GET``) and reloads the
    document when it changed, so a write is visible everywhere well within a second. While
    Redis fails (or a poll takes longer than ``poll_timeout``), the last good catalog keeps
    serving and the loop logs and retries.
    """

    def __init__(
        self, store: CatalogStore, poll_interval: float = 0.25, poll_timeout: float = 5.0
    ) -> None:
        self._store = store
        self._poll_interval = poll_interval
        self._poll_timeout = poll_timeout
        self._catalog = Catalog()
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._stopping = asyncio.Event()

    @property
    def current(self) -> Catalog:
        return self._catalog

    @property
    def version(self) -> int:
        return self._catalog.version

    async def start(self) -> None:
        """Load the catalog (Redis must answer now) and start polling."""
        await self._reload()
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name="live-catalog")

    def set_poll_interval(self, seconds: float) -> None:
        """Poll every ``seconds`` from the next round on: the gateway relaxes polling while
        its pub/sub subscription delivers catalog events, and tightens it when that fails."""
        self._poll_interval = seconds

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            # The flag ends the loop even if the cancel is swallowed: on Python 3.11,
            # asyncio.wait_for (used inside redis-py) can eat a cancel (gh-86296).
            self._stopping.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run_once(self) -> bool:
        """Check the version once and reload if it moved; return whether it did."""
        if await self._store.version() == self._catalog.version:
            return False
        return await self._reload()

    async def wait_for_version(self, version: int) -> Catalog:
        """Wait until :attr:`current` is at ``version`` or later (bound it with
        ``asyncio.timeout``). To serve one's own write at once, call :meth:`run_once`."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._catalog.version >= version)
        return self._catalog

    async def _reload(self) -> bool:
        fresh = await self._store.get()
        if fresh.version == self._catalog.version:
            return False
        if fresh.version == 0:
            # Redis lost the catalog (flushed, failed over empty): a reseed follows at
            # start-up; until then an empty catalog would only turn every request away.
            log.warning("no catalog in Redis; keeping version %d", self._catalog.version)
            return False
        self._catalog = fresh
        log.info("catalog version %d loaded", fresh.version)
        async with self._changed:
            self._changed.notify_all()
        return True

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                # TimeoutError (an OSError): a stuck call must not stall the loop.
                async with asyncio.timeout(self._poll_timeout):
                    await self.run_once()
            except (RedisError, OSError, msgspec.DecodeError) as exc:
                log.warning("catalog poll failed, serving version %d: %r", self.version, exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._stopping.wait()
