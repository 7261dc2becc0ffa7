"""Per-workspace monthly spend limits and prepaid credit, enforced across gateway processes.

A workspace may have a monthly spend limit (micro-USD, per UTC calendar month) and prepaid
credit (a balance, topped up by idempotent grants; credit is on from the first grant). A
request is admitted against an *estimate* of its cost (:mod:`billing.estimate`) and settled
at its actual cost once metered (ARCHITECTURE.md, Admit). All state is in Redis and changes
in one ``spend.lua`` call per operation, so admission is atomic across processes:

- :meth:`SpendGuard.admit` reserves the estimate iff ``spent + reserved + estimate <= limit``
  (with a limit) and ``credit - reserved >= estimate`` with some credit left (with credit),
  else raises :class:`QuotaExceeded` (the gateway answers 429 ``insufficient_quota``, no
  upstream work done). A reservation carries a deadline: a process that dies holding one
  loses it after ``reservation_ttl_s`` (dropped inside the next script of that workspace).
- :meth:`SpendGuard.settle` turns the reservation into the actual cost (month spent, and
  credit) and leaves a marker for the usage ledger; a second settle is a no-op.
- The usage ledger (:mod:`billing.usage_ledger`) settles every record too, in its own
  exactly-once batch script, which starts with this file's functions: a dispatch its gateway
  settled only loses its marker there; any other (the gateway died, the reservation expired,
  the workspace had no limit) is counted there. So the month's spent is right for every
  workspace, limited or not, even when a gateway never settles; markers live only from a
  gateway's settlement to the ledger seeing the record (seconds).
- Reservation ids must be dispatch ids for the ledger to drop a dead process's reservation
  before its deadline.

The hot path: most workspaces have neither limit nor credit. The first admit of such a
workspace learns that from the script (one round trip) and the fact is cached in-process;
later admits cost no round trip at all until the cache entry expires or the workspace's
``workspace-changed:<name>`` event calls :meth:`SpendGuard.invalidate` (the admin routes
publish it after every change). The cache TTL is short (0.5 s) unless the event subscription
is up (:meth:`SpendGuard.set_cache_ttl`), the same rule as the workspace cache.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from billing import keys
from billing.usage import UsageRecord
from catalog.pricing import PICO_PER_MICRO, picousd_to_microusd

__all__ = [
    "QUOTA_MESSAGE",
    "GrantConflict",
    "QuotaExceeded",
    "SpendGuard",
    "SpendState",
    "month_of",
]

log = logging.getLogger("lattice.spend")

SPEND_LUA = importlib.resources.files("billing").joinpath("spend.lua").read_text()

#: OpenAI's wording for ``insufficient_quota`` (what its SDKs and users recognise).
QUOTA_MESSAGE = "You exceeded your current quota, please check your plan and billing details."

_CACHE_MAX = 10_000


class QuotaExceeded(Exception):
    """A request was refused: its workspace's monthly limit or credit does not cover it.
    ``reason`` is ``"monthly_limit"`` or ``"credit"``. The gateway renders it as a 429 with
    code ``insufficient_quota``."""

    def __init__(self, workspace: str, reason: Literal["monthly_limit", "credit"]) -> None:
        super().__init__(QUOTA_MESSAGE)
        self.workspace = workspace
        self.reason = reason


class GrantConflict(Exception):
    """A credit grant id was used before with a different amount (``prior_microusd``)."""

    def __init__(self, grant_id: str, prior_microusd: int) -> None:
        super().__init__(f"credit grant {grant_id!r} was already added with another amount")
        self.grant_id = grant_id
        self.prior_microusd = prior_microusd


class SpendState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A workspace's spend this month. Exact amounts in pico-USD; ``*_microusd`` rounded."""

    workspace: str
    month: str
    monthly_limit_microusd: int | None
    spent_picousd: int
    reserved_picousd: int
    credit_enabled: bool
    credit_picousd: int

    @property
    def spent_microusd(self) -> int:
        return picousd_to_microusd(self.spent_picousd)

    @property
    def reserved_microusd(self) -> int:
        return picousd_to_microusd(self.reserved_picousd)

    @property
    def credit_microusd(self) -> int:
        return picousd_to_microusd(self.credit_picousd)


def month_of(now_ms: int) -> str:
    """The UTC calendar month ``YYYY-MM`` of a Unix time in milliseconds."""
    t = time.gmtime(now_ms // 1000)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


def _spend_keys(workspace: str, now_ms: int) -> list[str]:
    """The script's KEYS, in the order ``spend.lua`` documents."""
    return [
        keys.spend_account(workspace),
        keys.spend_reservations(workspace),
        keys.spend_deadlines(workspace),
        keys.spend_settled(workspace),
        keys.spend_month(workspace, month_of(now_ms)),
        keys.spend_grants(workspace),
    ]


class SpendGuard:
    """Admission against spend limits and credit (see the module doc for the contract)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        reservation_ttl_s: float = keys.SPEND_RESERVATION_TTL_S,
        settled_keep_s: float = keys.SPEND_SETTLED_KEEP_S,
        cache_ttl_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._script = redis.register_script(SPEND_LUA)
        self._reservation_ms = int(reservation_ttl_s * 1000)
        self._settled_keep_ms = int(settled_keep_s * 1000)
        self._short_ttl = cache_ttl_s
        self._ttl = cache_ttl_s
        self._clock = clock
        #: workspace -> when it was seen to have neither limit nor credit (clock time)
        self._unlimited: dict[str, float] = {}
        #: bumped by every invalidation: a script answer older than one is not cached
        self._generation = 0
        self._background: set[asyncio.Task[None]] = set()
        #: calls that reached Redis, for tests and metrics
        self.round_trips = 0

    # -- the request path ------------------------------------------------------------------

    def known_unlimited(self, workspace: str) -> bool:
        """Whether ``workspace`` was seen with neither limit nor credit within the cache TTL:
        :meth:`admit` would return ``False`` without a round trip (callers skip computing
        the estimate)."""
        seen = self._unlimited.get(workspace)
        return seen is not None and self._clock() - seen < self._ttl

    async def admit(
        self,
        workspace: str,
        *,
        reservation_id: str,
        estimate_picousd: int,
        now_ms: int | None = None,
    ) -> bool:
        """Reserve ``estimate_picousd`` for one dispatch, or raise :class:`QuotaExceeded`.

        Returns ``True`` if a reservation was recorded (settle or release it), ``False`` if
        the workspace has neither limit nor credit (nothing to settle or release; usually
        answered from the in-process cache without a round trip). Admitting an id that is
        reserved already is a no-op that answers ``True``.
        """
        if estimate_picousd < 0:
            raise ValueError("estimate_picousd must not be negative")
        seen = self._unlimited.get(workspace)
        if seen is not None and self._clock() - seen < self._ttl:
            return False
        now = _now_ms() if now_ms is None else now_ms
        generation = self._generation
        self.round_trips += 1
        reply = await self._script(
            keys=_spend_keys(workspace, now),
            args=["admit", now, reservation_id, estimate_picousd, now + self._reservation_ms],
        )
        outcome = int(reply[0])
        if outcome == 0:
            if generation == self._generation:
                if len(self._unlimited) >= _CACHE_MAX:
                    self._unlimited.clear()
                self._unlimited[workspace] = self._clock()
            return False
        self._unlimited.pop(workspace, None)
        if outcome < 0:
            reason = _text(reply[1])
            raise QuotaExceeded(workspace, "credit" if reason == "credit" else "monthly_limit")
        return True

    async def settle(
        self,
        workspace: str,
        *,
        reservation_id: str,
        actual_picousd: int,
        dispatch_id: str,
        now_ms: int,
    ) -> bool:
        """Replace the reservation by the actual cost, counted in the month of ``now_ms``
        (pass the record's ``finished_ms``, as the usage ledger does). ``True`` if settled
        now; ``False`` (and nothing changed) if there was no open reservation: settled or
        released already, expired, or never made — the usage ledger counts such a record.
        """
        if actual_picousd < 0:
            raise ValueError("actual_picousd must not be negative")
        self.round_trips += 1
        done = await self._script(
            keys=_spend_keys(workspace, now_ms),
            args=[
                "settle",
                now_ms,
                reservation_id,
                actual_picousd,
                dispatch_id,
                _now_ms() + self._settled_keep_ms,
                keys.SPEND_MONTH_TTL_S,
            ],
        )
        return int(done) == 1

    async def settle_record(self, record: UsageRecord) -> bool:
        """:meth:`settle` the reservation of a metered dispatch (reservation id = dispatch id)."""
        return await self.settle(
            record.workspace,
            reservation_id=record.dispatch_id,
            actual_picousd=record.cost_picousd,
            dispatch_id=record.dispatch_id,
            now_ms=record.finished_ms,
        )

    def settle_in_background(self, record: UsageRecord) -> None:
        """Settle off the response's critical path. Safe to lose: until settled, the
        reservation holds the estimate (admission only gets stricter), and the usage
        ledger settles the record anyway. Errors are logged, never raised."""
        task = asyncio.get_running_loop().create_task(
            self._settle_quietly(record), name="lattice-spend-settle"
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _settle_quietly(self, record: UsageRecord) -> None:
        try:
            await self.settle_record(record)
        except (RedisError, OSError) as exc:
            log.warning(
                "spend settlement failed; the usage ledger settles it",
                extra={"dispatch_id": record.dispatch_id, "error": repr(exc)},
            )

    async def release(self, workspace: str, *, reservation_id: str) -> bool:
        """Drop a reservation whose dispatch never ran (no usage record). ``True`` if open."""
        now = _now_ms()
        self.round_trips += 1
        done = await self._script(
            keys=_spend_keys(workspace, now), args=["release", now, reservation_id]
        )
        return int(done) == 1

    async def drain(self, grace_s: float = 5.0) -> None:
        """Wait (up to ``grace_s``) for background settlements: call at shutdown."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=grace_s)

    # -- operator writes -------------------------------------------------------------------

    async def set_limit(self, workspace: str, microusd: int | None) -> None:
        """Set (or with ``None`` remove) the monthly spend limit, in micro-USD."""
        if microusd is not None and microusd < 0:
            raise ValueError("a spend limit must not be negative")
        account = keys.spend_account(workspace)
        if microusd is None:
            await self._redis.hdel(account, "limit")
        else:
            await self._redis.hset(account, "limit", str(microusd))
        self.invalidate(workspace)

    async def add_credit(self, workspace: str, microusd: int, *, grant_id: str) -> bool:
        """Add a credit grant (negative: a correction) and turn credit on. Idempotent per
        ``grant_id``: ``True`` if added now, ``False`` if this grant was added before;
        :class:`GrantConflict` if the id was used with another amount."""
        if not grant_id:
            raise ValueError("a credit grant needs a grant id")
        now = _now_ms()
        self.round_trips += 1
        reply = await self._script(
            keys=_spend_keys(workspace, now),
            args=["credit", now, grant_id, microusd, microusd * PICO_PER_MICRO],
        )
        self.invalidate(workspace)
        outcome = int(reply[0])
        if outcome < 0:
            raise GrantConflict(grant_id, int(reply[1]))
        return outcome == 1

    async def state(self, workspace: str, *, now_ms: int | None = None) -> SpendState:
        """Limit, spent this month, open reservations and credit (expired ones dropped)."""
        now = _now_ms() if now_ms is None else now_ms
        self.round_trips += 1
        limit, spent, reserved, credit_on, credit = await self._script(
            keys=_spend_keys(workspace, now), args=["state", now]
        )
        return SpendState(
            workspace=workspace,
            month=month_of(now),
            monthly_limit_microusd=None if limit is None else int(limit),
            spent_picousd=_int(spent),
            reserved_picousd=_int(reserved),
            credit_enabled=credit_on is not None,
            credit_picousd=_int(credit),
        )

    # -- the in-process cache --------------------------------------------------------------

    def invalidate(self, workspace: str) -> None:
        """Forget what this process knows of the workspace (on ``workspace-changed:``)."""
        self._generation += 1
        self._unlimited.pop(workspace, None)

    def set_cache_ttl(self, ttl_s: float | None) -> None:
        """Trust a cached "no limit, no credit" ``ttl_s`` seconds (``None``: the short
        default) and forget the cache: called when change events start or stop arriving."""
        self._ttl = self._short_ttl if ttl_s is None else ttl_s
        self._generation += 1
        self._unlimited.clear()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
