"""Provider payouts through Stripe Connect: link an account, transfer what was earned.

A serving party (a marketplace provider) links a Stripe Connect Express account
(:meth:`PayoutService.link_provider`: the account is created once per provider, the mapping
kept in ``billing.keys.PAYOUT_ACCOUNTS``, and an onboarding link returned). Payouts
(:meth:`PayoutService.run_payouts`) then pay every *linked* provider what its earnings ledger
(:mod:`billing.earnings`) says it is owed and was not paid yet, ``floor(earned_picousd /
10**10) - paid_cents``: the sub-cent remainder stays for the next payout. Parties never
linked (``hosted``, the operator's own capacity; personal runtimes) accrue but are never paid.

Exactly once, across crashes and concurrent runs (Stripe docs, "Idempotent requests"; per
provider, state in ``billing.keys.payout_state``):

1. *Begin*: ``payout_begin.lua`` records attempt ``seq + 1`` as pending with its amount and
   destination — a compare-and-set on ``seq``, so two runs cannot both begin one.
2. *Transfer*: ``create_transfer`` with the idempotency key ``lattice-payout:<provider>:<seq>``
   and metadata ``lattice_provider``/``lattice_payout_seq``.
3. *Commit*: ``payout_commit.lua`` adds the amount to ``paid_cents``, logs the transfer and
   clears the pending attempt — only if that attempt is still pending.

A crash (or a timeout) between 2 and 3 leaves the attempt pending; the next run *heals* it
before anything else: it looks for the attempt's transfer among the destination's transfers
(by its metadata: this holds past Stripe's 24-hour key retention) and otherwise sends the
same request with the same idempotency key, which Stripe answers with the transfer it already
made, or makes it now. Either way it is recorded once. Stripe refusing the transfer for good
(:class:`StripePermanent`; not an ``idempotency_error``, which says the key already has a
history) drops the attempt; its number stays used, so the next attempt has a fresh key.
"""

from __future__ import annotations

import importlib.resources
import logging
import re
import time
from collections.abc import Callable
from typing import Any, Literal

import msgspec
import redis.asyncio as aioredis

from billing.earnings import DayLine, EarningsLedger, utc_day
from billing.keys import PAYOUT_ACCOUNTS, payout_log, payout_state
from billing.stripe_types import StripeApi, StripeError, StripePermanent, StripeRetryable, Transfer

__all__ = [
    "PICO_PER_CENT",
    "UNPAYABLE",
    "LinkResult",
    "PayoutError",
    "PayoutOutcome",
    "PayoutRecord",
    "PayoutService",
    "PayoutState",
    "PendingPayout",
    "Statement",
    "idempotency_key",
]

log = logging.getLogger(__name__)

#: Pico-USD in one US cent (Stripe amounts are in the currency's smallest unit).
PICO_PER_CENT = 10**10
#: The operator's own capacity earns too (for a uniform ledger) but is never paid out.
UNPAYABLE = frozenset({"hosted"})
_CURRENCY = "usd"
_PROVIDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
#: Refusals that do not prove the attempt's transfer does not exist: the key is in use by a
#: concurrent request (409; StripeClientApi reports it as retryable anyway), or it is bound to
#: a request with other parameters. The attempt then stays pending, never dropped.
_KEY_IN_USE_STATUS = 409
_KEY_MISMATCH_CODE = "idempotency_error"


_BEGIN_LUA, _COMMIT_LUA, _ABORT_LUA = (
    importlib.resources.files("billing").joinpath(f"payout_{name}.lua").read_text()
    for name in ("begin", "commit", "abort")
)


class PayoutError(Exception):
    """A payout operation was refused (an unpayable or malformed provider id)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class LinkResult(msgspec.Struct, frozen=True):
    provider: str
    account_id: str
    #: Stripe-hosted onboarding: the provider opens it to finish the account (it expires;
    #: linking again gives a fresh one for the same account).
    onboarding_url: str


class PendingPayout(msgspec.Struct, frozen=True):
    """A payout attempt begun and not yet recorded as paid."""

    seq: int
    amount_cents: int
    destination: str
    started: int


class PayoutRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One completed payout, as kept in the provider's payout log."""

    seq: int
    amount_cents: int
    transfer_id: str
    destination: str
    created: int


class PayoutState(msgspec.Struct, frozen=True):
    """A provider's payout counters: ``seq`` attempts begun, ``payouts`` completed."""

    seq: int = 0
    paid_cents: int = 0
    payouts: int = 0
    pending: PendingPayout | None = None


PayoutStatus = Literal[
    "paid",  # a new transfer was made and recorded
    "healed",  # a pending attempt's transfer was found or made, and recorded
    "below_minimum",  # nothing, or less than the minimum, is payable
    "dry_run",  # would pay amount_cents
    "pending",  # dry run: an attempt is pending and would be healed
    "busy",  # another run began or recorded this attempt concurrently
    "retry",  # Stripe failed transiently; a pending attempt stays for the next run
    "failed",  # Stripe refused the transfer; nothing was paid
]


class PayoutOutcome(msgspec.Struct, frozen=True):
    provider: str
    status: PayoutStatus
    amount_cents: int = 0
    seq: int | None = None
    transfer_id: str | None = None
    error: str | None = None


class Statement(msgspec.Struct, frozen=True):
    """A provider's account: everything earned and paid; day lines from ``since`` on.

    ``balance_picousd`` is earned and not yet paid (pending attempts included);
    ``payable_cents`` is what a payout would transfer now (whole cents, pending excluded).
    """

    provider: str
    account_id: str | None
    earned_picousd: int
    paid_cents: int
    balance_picousd: int
    payable_cents: int
    pending: PendingPayout | None
    lines: list[DayLine]
    payouts: list[PayoutRecord]


def idempotency_key(provider: str, seq: int) -> str:
    """The Stripe idempotency key of a provider's payout attempt ``seq``: deterministic, so a
    retry after any failure asks Stripe for the same transfer."""
    return f"lattice-payout:{provider}:{seq}"


class PayoutService:
    """Links providers' Connect accounts and pays out their earnings (module docstring).

    ``stripe=None`` serves what needs no Stripe call (statements, dry runs); the rest then
    raises :class:`PayoutError`.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        stripe: StripeApi | None,
        *,
        ledger: EarningsLedger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._stripe_api = stripe
        self._ledger = ledger or EarningsLedger(redis)
        self._clock = clock
        self._begin = redis.register_script(_BEGIN_LUA)
        self._commit = redis.register_script(_COMMIT_LUA)
        self._abort = redis.register_script(_ABORT_LUA)

    @property
    def _stripe(self) -> StripeApi:
        if self._stripe_api is None:
            raise PayoutError("this operation needs the Stripe API")
        return self._stripe_api

    # -- accounts ---------------------------------------------------------------------------

    async def link_provider(
        self,
        provider: str,
        email: str | None = None,
        *,
        refresh_url: str,
        return_url: str,
    ) -> LinkResult:
        """Create (once) the provider's Express account and return an onboarding link.

        Linking again keeps the account and returns a fresh link. Raises
        :class:`PayoutError` for ``hosted`` and malformed ids.
        """
        if provider in UNPAYABLE or not _PROVIDER.match(provider):
            raise PayoutError(f"'{provider}' cannot be linked to a payout account.")
        account = await self.account(provider)
        if account is None:
            created = await self._stripe.create_connected_account(provider, email=email)
            # The first writer wins; Stripe's idempotency key (derived from the provider)
            # gives concurrent linkers the same account anyway.
            await self._redis.hsetnx(PAYOUT_ACCOUNTS, provider, created)
            account = await self.account(provider) or created
        url = await self._stripe.account_link(
            account, refresh_url=refresh_url, return_url=return_url
        )
        return LinkResult(provider=provider, account_id=account, onboarding_url=url)

    async def account(self, provider: str) -> str | None:
        raw: Any = await self._redis.hget(PAYOUT_ACCOUNTS, provider)
        return None if raw is None else _text(raw)

    async def accounts(self) -> dict[str, str]:
        """Every linked provider and its account."""
        raw: Any = await self._redis.hgetall(PAYOUT_ACCOUNTS)
        return {_text(k): _text(v) for k, v in sorted(raw.items())}

    # -- payouts ----------------------------------------------------------------------------

    async def run_payouts(
        self, *, min_amount_cents: int = 100, dry_run: bool = False
    ) -> list[PayoutOutcome]:
        """Pay every linked provider what it is owed (at least ``min_amount_cents``), after
        healing its pending attempt if it has one. ``dry_run`` changes nothing and calls no
        Stripe API. Exceptions other than Stripe's (Redis down, say) propagate: a rerun picks
        up where this one stopped."""
        outcomes: list[PayoutOutcome] = []
        for provider, account in (await self.accounts()).items():
            outcomes += await self.pay_provider(
                provider, account, min_amount_cents=min_amount_cents, dry_run=dry_run
            )
        return outcomes

    async def pay_provider(
        self, provider: str, account: str, *, min_amount_cents: int = 100, dry_run: bool = False
    ) -> list[PayoutOutcome]:
        """One provider's part of :meth:`run_payouts`."""
        outcomes: list[PayoutOutcome] = []
        state = await self.state(provider)
        if state.pending is not None:
            if dry_run:
                return [_outcome(provider, "pending", state.pending)]
            healed = await self._send(provider, state.pending, healing=True)
            outcomes.append(healed)
            if healed.status != "healed":
                return outcomes
            state = await self.state(provider)
        earned = await self._ledger.earned_picousd(provider)
        payable = earned // PICO_PER_CENT - state.paid_cents
        if payable <= 0 or payable < min_amount_cents:
            return [*outcomes, PayoutOutcome(provider, "below_minimum", max(payable, 0))]
        attempt = PendingPayout(
            seq=state.seq + 1, amount_cents=payable, destination=account, started=self._now()
        )
        if dry_run:
            return [*outcomes, _outcome(provider, "dry_run", attempt)]
        began = await self._begin(
            keys=[payout_state(provider)],
            args=[state.seq, payable, account, attempt.started],
        )
        if not int(began):
            return [*outcomes, _outcome(provider, "busy", attempt)]
        return [*outcomes, await self._send(provider, attempt, healing=False)]

    async def _send(self, provider: str, attempt: PendingPayout, *, healing: bool) -> PayoutOutcome:
        if healing:
            try:
                found = await self._find(provider, attempt)
            except StripeError as exc:
                # Not knowing whether the transfer exists, the attempt must stay pending.
                log.warning("payout %s #%d: cannot list transfers: %s", provider, attempt.seq, exc)
                return _outcome(provider, "retry", attempt, error=exc.message)
            if found is not None:
                return await self._record(provider, attempt, found, healing=True)
        try:
            transfer = await self._stripe.create_transfer(
                amount=attempt.amount_cents,
                currency=_CURRENCY,
                destination=attempt.destination,
                idempotency_key=idempotency_key(provider, attempt.seq),
                metadata={"lattice_provider": provider, "lattice_payout_seq": str(attempt.seq)},
            )
        except StripeRetryable as exc:
            log.warning("payout %s #%d: Stripe unavailable: %s", provider, attempt.seq, exc)
            return _outcome(provider, "retry", attempt, error=exc.message)
        except StripePermanent as exc:
            if exc.http_status != _KEY_IN_USE_STATUS and exc.code != _KEY_MISMATCH_CODE:
                await self._abort(keys=[payout_state(provider)], args=[attempt.seq])
            log.error("payout %s #%d refused: %s", provider, attempt.seq, exc)
            return _outcome(provider, "failed", attempt, error=exc.code or exc.message)
        return await self._record(provider, attempt, transfer, healing=healing)

    async def _find(self, provider: str, attempt: PendingPayout) -> Transfer | None:
        for transfer in await self._stripe.list_transfers(attempt.destination):
            meta = transfer.metadata
            if meta.get("lattice_provider") == provider and meta.get("lattice_payout_seq") == str(
                attempt.seq
            ):
                return transfer
        return None

    async def _record(
        self, provider: str, attempt: PendingPayout, transfer: Transfer, *, healing: bool
    ) -> PayoutOutcome:
        if transfer.amount != attempt.amount_cents:  # Stripe's record wins; say so loudly
            log.error("payout %s #%d: %s differs from %r", provider, attempt.seq, transfer, attempt)
        entry = PayoutRecord(
            seq=attempt.seq,
            amount_cents=transfer.amount,
            transfer_id=transfer.id,
            destination=transfer.destination,
            created=transfer.created,
        )
        done = await self._commit(
            keys=[payout_state(provider), payout_log(provider)],
            args=[attempt.seq, transfer.amount, msgspec.json.encode(entry)],
        )
        status: PayoutStatus = ("healed" if healing else "paid") if int(done) else "busy"
        return PayoutOutcome(provider, status, transfer.amount, attempt.seq, transfer.id)

    # -- reading ----------------------------------------------------------------------------

    async def state(self, provider: str) -> PayoutState:
        raw: Any = await self._redis.hgetall(payout_state(provider))
        fields = {_text(k): _text(v) for k, v in raw.items()}
        pending = None
        if "pending_seq" in fields:
            pending = PendingPayout(
                seq=int(fields["pending_seq"]),
                amount_cents=int(fields["pending_cents"]),
                destination=fields["pending_dest"],
                started=int(fields["pending_at"]),
            )
        return PayoutState(
            seq=int(fields.get("seq", 0)),
            paid_cents=int(fields.get("paid_cents", 0)),
            payouts=int(fields.get("payouts", 0)),
            pending=pending,
        )

    async def payouts(self, provider: str) -> list[PayoutRecord]:
        """The provider's completed payouts, oldest first."""
        raw: Any = await self._redis.lrange(payout_log(provider), 0, -1)
        return [msgspec.json.decode(r, type=PayoutRecord) for r in raw]

    async def statement(self, provider: str, *, since: str | None = None) -> Statement:
        """The provider's statement; ``since`` (``YYYY-MM-DD``) limits the day lines and the
        payouts listed, never the totals."""
        state = await self.state(provider)
        lines = await self._ledger.lines(provider)
        earned = sum(line.earned_picousd for line in lines)
        payouts = await self.payouts(provider)
        if since is not None:
            lines = [line for line in lines if line.day >= since]
            payouts = [p for p in payouts if utc_day(p.created * 1000) >= since]
        in_flight = state.pending.amount_cents if state.pending is not None else 0
        return Statement(
            provider=provider,
            account_id=await self.account(provider),
            earned_picousd=earned,
            paid_cents=state.paid_cents,
            balance_picousd=earned - state.paid_cents * PICO_PER_CENT,
            payable_cents=max(0, earned // PICO_PER_CENT - state.paid_cents - in_flight),
            pending=state.pending,
            lines=lines,
            payouts=payouts,
        )

    def _now(self) -> int:
        return int(self._clock())


def _outcome(
    provider: str, status: PayoutStatus, attempt: PendingPayout, *, error: str | None = None
) -> PayoutOutcome:
    return PayoutOutcome(provider, status, attempt.amount_cents, attempt.seq, error=error)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
