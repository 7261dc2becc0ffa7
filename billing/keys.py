"""Redis keys owned by billing: the durable usage outbox and its consumer group."""

from __future__ import annotations

__all__ = ["USAGE_GROUP", "USAGE_SPOOL_OFFSET_TTL_S", "USAGE_STREAM", "spool_offset"]

#: Redis stream of usage records (one entry per completed dispatch), consumed by the
#: billing worker through the consumer group below.
USAGE_STREAM = "lat:usage"
USAGE_GROUP = "billing"
#: Lifetime of a spool file's shipped offset, refreshed by every batch shipped from the file.
#: The shipper deletes the key once the file is fully shipped and deleted; the TTL only
#: collects the keys of files that vanished otherwise (a crash between the two deletions).
USAGE_SPOOL_OFFSET_TTL_S = 30 * 86_400


def spool_offset(name: str) -> str:
    """Byte offset up to which the frames of spool file ``name`` are in ``USAGE_STREAM``;
    advanced by ``usage_ship.lua`` in the same script as the XADDs (compare-and-set)."""
    return f"lat:usage:spool:{name}"


# -- the billing worker's ledger (billing/ledger.py, billing/windows.py) ----------------------
__all__ += [
    "BILLING_CUSTOMERS",
    "BILLING_DEDUP_TTL_S",
    "BILLING_LEDGER_TTL_S",
    "BILLING_OPEN_WINDOWS",
    "BILLING_WINDOWS",
    "USAGE_DEAD_STREAM",
    "billing_window",
    "billing_window_ids",
    "billing_window_lock",
]

#: Usage records Stripe refused for good (a deleted customer, ...) or that cannot be decoded,
#: with the error code and the window: never dropped silently (``lattice billing status``).
USAGE_DEAD_STREAM = "lat:usage:dead"
#: Hash: workspace → Stripe customer id (``cus_…``), filled on demand by the worker.
BILLING_CUSTOMERS = "lat:bill:customers"
#: Sorted set of windows with unsent usage; member ``<start>:<workspace>``, score the
#: window's ready time in ms (``billing.windows.ready_ms``).
BILLING_OPEN_WINDOWS = "lat:bill:open"
#: Sorted set of every window in the ledger; member as above, score the window start (s);
#: what ``lattice billing reconcile`` reads. Trimmed past ``BILLING_LEDGER_TTL_S``.
BILLING_WINDOWS = "lat:bill:windows"
#: How long a settled window's ledger hash is kept: past Stripe's 35-day limit on a meter
#: event's timestamp, so reconcile covers any range Stripe can still hold.
BILLING_LEDGER_TTL_S = 40 * 86_400
#: How long a settled window remembers its dispatch ids (re-folding one is a no-op).
BILLING_DEDUP_TTL_S = 2 * 86_400


def billing_window(start: int, workspace: str) -> str:
    """Hash: the ledger of one window (fields in ``billing.windows``)."""
    return f"lat:bill:w:{start}:{workspace}"


def billing_window_ids(start: int, workspace: str) -> str:
    """Hash: dispatch id → ``<segment>:<stream entry id>`` of the window's folded records."""
    return f"lat:bill:w:{start}:{workspace}:ids"


def billing_window_lock(start: int, workspace: str) -> str:
    """String (SET NX PX): the worker closing the window holds it while it sends."""
    return f"lat:bill:lock:{start}:{workspace}"


# -- provider earnings and payouts (billing/earnings.py, billing/payouts.py) ------------------
__all__ += [
    "EARNINGS_GROUP",
    "EARNINGS_PARTIES",
    "EARNINGS_SEEN_TTL_S",
    "PAYOUT_ACCOUNTS",
    "earnings_ledger",
    "earnings_seen",
    "payout_log",
    "payout_state",
]

#: The earnings ledger's consumer group on ``USAGE_STREAM`` (beside the billing worker's).
EARNINGS_GROUP = "earnings"
#: Set of every serving party with a ledger (``earnings_ledger``).
EARNINGS_PARTIES = "lat:earn:parties"
#: How long a dispatch id stays remembered as accrued: a second stream entry of the same
#: dispatch within it is not counted again (``earnings_accrue.lua``).
EARNINGS_SEEN_TTL_S = 2 * 86_400
#: Hash: provider → Stripe Connect account id (``acct_…``) earnings are paid out to.
PAYOUT_ACCOUNTS = "lat:payout:accounts"


def earnings_ledger(party: str) -> str:
    """Hash of one serving party's earnings per UTC day: ``pico:<YYYY-MM-DD>`` → pico-USD
    earned, ``n:<YYYY-MM-DD>`` → dispatches served."""
    return f"lat:earn:party:{party}"


def earnings_seen(dispatch_id: str) -> str:
    """String (SET NX EX ``EARNINGS_SEEN_TTL_S``): the dispatch's earnings were accrued."""
    return f"lat:earn:seen:{dispatch_id}"


def payout_state(provider: str) -> str:
    """Hash of a provider's payouts: ``seq`` (attempts begun), ``paid_cents``, ``payouts``
    (completed), and ``pending_*`` while an attempt is in flight (``payout_*.lua``)."""
    return f"lat:payout:state:{provider}"


def payout_log(provider: str) -> str:
    """List of the provider's completed payouts, oldest first (JSON ``PayoutRecord``)."""
    return f"lat:payout:log:{provider}"


# -- spend limits and prepaid credit (billing/spend.py, spend.lua) ---------------------------
# One workspace's keys share the hash tag ``{<workspace>}`` so one script may touch them all
# on a Redis Cluster too.
__all__ += [
    "SPEND_MONTH_TTL_S",
    "SPEND_RESERVATION_TTL_S",
    "SPEND_SETTLED_KEEP_S",
    "spend_account",
    "spend_deadlines",
    "spend_grants",
    "spend_month",
    "spend_reservations",
    "spend_settled",
]

#: How long a month's spent counter outlives its last write (only the current month is read).
SPEND_MONTH_TTL_S = 100 * 86_400
#: A reservation not settled or released within this is dropped (its process died).
SPEND_RESERVATION_TTL_S = 15 * 60
#: How long an early settlement waits for the usage ledger to see its record (normally
#: seconds; the ledger removes the marker then).
SPEND_SETTLED_KEEP_S = 7 * 86_400


def spend_account(workspace: str) -> str:
    """Hash: ``limit`` (monthly, micro-USD; absent = none), ``credit_on``, ``credit``
    (balance, pico-USD), ``reserved`` (sum of open reservations, pico-USD)."""
    return f"lat:spend:{{{workspace}}}"


def spend_reservations(workspace: str) -> str:
    """Hash: reservation id (the dispatch id) → estimate in pico-USD."""
    return f"lat:spend:{{{workspace}}}:res"


def spend_deadlines(workspace: str) -> str:
    """Sorted set: reservation id → the time (ms) it is dropped unless settled first."""
    return f"lat:spend:{{{workspace}}}:resdl"


def spend_settled(workspace: str) -> str:
    """Sorted set: dispatch ids a gateway settled that the usage ledger has not seen yet."""
    return f"lat:spend:{{{workspace}}}:early"


def spend_month(workspace: str, month: str) -> str:
    """String: pico-USD spent in the UTC calendar month ``YYYY-MM``."""
    return f"lat:spend:{{{workspace}}}:m:{month}"


def spend_grants(workspace: str) -> str:
    """Hash: credit grant id → amount in micro-USD (a grant is added once)."""
    return f"lat:spend:{{{workspace}}}:grants"


# -- the usage ledger behind GET /v1/usage (billing/usage_ledger.py, billing/usage_query.py) --
__all__ += ["LEDGER_DAY_TTL_S", "LEDGER_DEDUP_TTL_S", "LEDGER_GROUP", "ledger_day", "ledger_ids"]

#: The usage ledger's consumer group on ``USAGE_STREAM``.
LEDGER_GROUP = "ledger"
#: How long a workspace's daily aggregates are kept after their last write.
LEDGER_DAY_TTL_S = 400 * 86_400
#: How long a day's dispatch ids are remembered: a record delivered again within it is not
#: counted again.
LEDGER_DEDUP_TTL_S = 2 * 86_400


def ledger_day(workspace: str, day: str) -> str:
    """Hash: the workspace's aggregates of one UTC day ``YYYY-MM-DD`` (fields in
    :mod:`billing.usage_ledger`)."""
    return f"lat:ledger:{{{workspace}}}:{day}"


def ledger_ids(workspace: str, day: str) -> str:
    """Set: the dispatch ids already counted in ``ledger_day(workspace, day)``."""
    return f"lat:ledger:{{{workspace}}}:{day}:ids"
