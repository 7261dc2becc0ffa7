"""The Stripe API Lattice uses, behind :class:`StripeApi`; the only module that imports ``stripe``.

:class:`StripeClientApi` implements it with stripe-python's ``StripeClient`` (async methods
over an aiohttp session, no library retries: backoff is the caller's job) and turns every
failure into one of two errors::

    StripeError                 .message
    ├── StripeRetryable         .retry_after_s   429, 409, 5xx, timeouts, connection resets
    └── StripePermanent         .code, .http_status   other 4xx (resource_missing, ...)

Meter events (https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api)
go one per call to ``POST /v1/billing/meter_events`` by default, many calls at once but one at
a time per customer and meter (Stripe allows "one concurrent call per customer per meter"),
each with an ``Idempotency-Key`` derived from the event's identifier: a retry of an event
Stripe took is answered from Stripe's idempotency layer. With ``use_v2_stream=True`` they go
in batches of up to 100 through ``POST /v2/billing/meter_event_stream``, authenticated by a
meter event session (cached until a minute before it expires); the stream validates
asynchronously, so every event of a batch Stripe took is reported accepted, and events Stripe
later drops surface only in Stripe's meter error reports (and in ``lattice billing reconcile``).

Environment (:func:`stripe_api_from_env`):

- ``LATTICE_STRIPE_API_KEY`` (required): the secret key, ``sk_live_...`` or ``sk_test_...``.
- ``LATTICE_STRIPE_API_BASE``: the API base URL (default Stripe's), e.g. a fake Stripe.
- ``LATTICE_STRIPE_METER_EVENTS_API_BASE``: the v2 meter-event stream's base URL (default:
  ``LATTICE_STRIPE_API_BASE`` when that is set, else Stripe's).
- ``LATTICE_STRIPE_TIMEOUT_S``: per-request timeout in seconds (default 10).
- ``LATTICE_STRIPE_METER_EVENTS_V2``: ``1`` to send meter events through the v2 stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
import stripe

from billing.stripe_types import (
    MeterEvent,
    MeterEventResult,
    StripeApi,
    StripeError,
    StripePermanent,
    StripeRetryable,
    Transfer,
)

__all__ = [
    "CUSTOMER_WORKSPACE_KEY",
    "PROVIDER_ACCOUNT_KEY",
    "MeterEvent",
    "MeterEventResult",
    "StripeApi",
    "StripeClientApi",
    "StripeError",
    "StripePermanent",
    "StripeRetryable",
    "Transfer",
    "stripe_api_from_env",
]

#: Metadata keys linking Stripe objects to Lattice.
CUSTOMER_WORKSPACE_KEY = "lattice_workspace"
PROVIDER_ACCOUNT_KEY = "lattice_provider"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_CONCURRENCY = 16
#: "Supports up to 100 events per request" (v2 meter event stream).
STREAM_BATCH = 100
#: Renew a meter event session this long before it expires (they last 15 minutes).
SESSION_MARGIN_S = 60.0
#: Statuses that condemn a whole call (credentials, permissions, a wrong base URL), never
#: one event.
_CALL_STATUSES = frozenset({401, 403, 404, 405})
#: Stripe refuses a meter event whose identifier it accepted within 24 h with a 400
#: ``invalid_request_error`` that has no ``code``, only this message (observed; the docs state
#: the uniqueness rule, not the error). With no code to go by, this is the one Stripe error
#: recognized by its text; idempotency keys make it rare (a retry more than 24 h later).
_DUPLICATE_IDENTIFIER = "An event already exists with identifier"

T = TypeVar("T")


class _AiohttpClient(stripe.HTTPClient):
    """stripe-python's HTTP client interface over one aiohttp session, async only.

    stripe-python's own ``HTTPXClient`` passes bodies as ``data=<str>``, which httpx 0.28
    deprecates (a warning, an error under ``-W error``); this client owns its timeouts and
    maps every transport failure to ``APIConnectionError`` (what the library expects).
    """

    name = "aiohttp"

    def __init__(self, timeout_s: float, max_connections: int) -> None:
        super().__init__()
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        data = post_data.encode() if isinstance(post_data, str) else post_data
        try:
            async with self._session.request(method, url, headers=headers, data=data) as resp:
                return await resp.read(), resp.status, resp.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]
                f"Could not reach Stripe ({type(exc).__name__}).", should_retry=True
            ) from exc

    async def close_async(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def sleep_async(self, secs: float) -> Awaitable[None]:
        return asyncio.sleep(secs)


class StripeClientApi:
    """:class:`StripeApi` over stripe-python (see the module docstring for the choices)."""

    def __init__(
        self,
        api_key: str,
        *,
        api_base: str | None = None,
        meter_events_api_base: str | None = None,
        max_network_retries: int = 0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        concurrency: int = DEFAULT_CONCURRENCY,
        use_v2_stream: bool = False,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        events_base = meter_events_api_base or api_base
        self._http = _AiohttpClient(timeout_s, max_connections=concurrency)
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={
                "api": (api_base or stripe.DEFAULT_API_BASE).rstrip("/"),
                "meter_events": (events_base or stripe.DEFAULT_METER_EVENTS_API_BASE).rstrip("/"),
            },
            max_network_retries=max_network_retries,
            http_client=self._http,
        )
        self.concurrency = concurrency
        self.use_v2_stream = use_v2_stream
        self._session: tuple[str, float] | None = None  # (token, expires at, unix seconds)
        self._session_lock = asyncio.Lock()

    # -- customers ------------------------------------------------------------------------------

    async def find_or_create_customer(self, workspace: str) -> str:
        """Search finds no deleted customer, so a workspace whose customer was deleted gets
        the deleted id back only within the key's 24 h (Stripe replays the creation), and a
        new customer after that; the worker keeps its own mapping and never calls this for a
        workspace it already maps (see :meth:`relink_customer`)."""
        value = workspace.replace("\\", "\\\\").replace("'", "\\'")
        query = f"metadata['{CUSTOMER_WORKSPACE_KEY}']:'{value}'"
        found = await self._all(self._client.v1.customers.search_async({"query": query}))
        if found:
            return str(min(found, key=lambda c: (c.created, c.id)).id)
        return await self._create_customer(workspace, _key("customer", workspace))

    async def relink_customer(self, workspace: str, *, replaces: str) -> str:
        """A new customer for ``workspace`` whose customer ``replaces`` was deleted; the
        idempotency key is derived from both, so a retried relink creates one customer."""
        return await self._create_customer(workspace, _key("customer", workspace, replaces))

    async def _create_customer(self, workspace: str, idempotency_key: str) -> str:
        customer = await _translated(
            self._client.v1.customers.create_async(
                {
                    "description": f"Lattice workspace {workspace}",
                    "metadata": {CUSTOMER_WORKSPACE_KEY: workspace},
                },
                {"idempotency_key": idempotency_key},
            )
        )
        return str(customer.id)

    async def customer_deleted(self, customer_id: str) -> bool:
        """True for a deleted customer and for an id Stripe does not know."""
        try:
            customer = await _translated(self._client.v1.customers.retrieve_async(customer_id))
        except StripePermanent as exc:
            if exc.code == "resource_missing":
                return True
            raise
        return "deleted" in customer and bool(customer["deleted"])

    # -- meters ---------------------------------------------------------------------------------

    async def ensure_meter(self, *, event_name: str, display_name: str) -> str:
        """Raises :class:`StripePermanent` (``meter_inactive``, ``meter_misconfigured``) when
        a meter of that event name exists but is deactivated or does not sum ``value`` by
        ``stripe_customer_id``: billing through it would be wrong."""
        meters = await self._all(self._client.v1.billing.meters.list_async({"limit": 100}))
        for meter in meters:
            if meter.event_name != event_name:
                continue
            if meter.status != "active":
                raise StripePermanent(
                    f"The meter {meter.id} of {event_name!r} is deactivated.",
                    code="meter_inactive",
                    http_status=400,
                )
            if (
                meter.default_aggregation.formula != "sum"
                or meter.customer_mapping.event_payload_key != "stripe_customer_id"
                or meter.value_settings.event_payload_key != "value"
            ):
                raise StripePermanent(
                    f"The meter {meter.id} of {event_name!r} does not sum 'value' by "
                    "'stripe_customer_id'.",
                    code="meter_misconfigured",
                    http_status=400,
                )
            return str(meter.id)
        created = await _translated(
            self._client.v1.billing.meters.create_async(
                {
                    "display_name": display_name,
                    "event_name": event_name,
                    "default_aggregation": {"formula": "sum"},
                    "customer_mapping": {
                        "event_payload_key": "stripe_customer_id",
                        "type": "by_id",
                    },
                    "value_settings": {"event_payload_key": "value"},
                },
                {"idempotency_key": _key("meter", event_name)},
            )
        )
        return created.id

    async def meter_total(self, meter_id: str, customer_id: str, start: int, end: int) -> int:
        """Raises ValueError unless ``start`` and ``end`` are whole minutes (Stripe's rule)."""
        if start % 60 or end % 60:
            raise ValueError("meter_total needs minute-aligned start and end (unix seconds)")
        if end <= start:
            return 0
        summaries = await self._all(
            self._client.v1.billing.meters.event_summaries.list_async(
                meter_id,
                {"customer": customer_id, "start_time": start, "end_time": end, "limit": 100},
            )
        )
        # aggregated_value is a JSON number (a float in Stripe's schema); values are whole.
        return sum(round(s.aggregated_value) for s in summaries)

    # -- meter events ---------------------------------------------------------------------------

    async def send_meter_events(self, events: Sequence[MeterEvent]) -> list[MeterEventResult]:
        if not events:
            return []
        if self.use_v2_stream:
            return await self._send_stream(events)
        return await self._send_v1(events)

    async def _send_v1(self, events: Sequence[MeterEvent]) -> list[MeterEventResult]:
        """One (customer, meter) group's events go one after another, groups side by side."""
        groups: dict[tuple[str, str], list[int]] = {}
        for index, event in enumerate(events):
            groups.setdefault((event.customer_id, event.event_name), []).append(index)
        results: list[MeterEventResult | None] = [None] * len(events)

        async def send_group(group: list[int]) -> None:
            for index in group:
                results[index] = await self._send_one(events[index])

        await self._fan_out(list(groups.values()), send_group)
        return [r for r in results if r is not None]

    async def _send_one(self, event: MeterEvent) -> MeterEventResult:
        params: Any = {
            "event_name": event.event_name,
            "identifier": event.identifier,
            "timestamp": event.timestamp,
            "payload": {"stripe_customer_id": event.customer_id, "value": str(event.value)},
        }
        options: Any = {"idempotency_key": _key("meter-event", event.identifier)}
        try:
            await self._client.v1.billing.meter_events.create_async(params, options)
        except stripe.StripeError as exc:
            error = _translate(exc)
            if isinstance(error, StripeRetryable) or error.http_status in _CALL_STATUSES:
                raise error from exc
            if _is_duplicate_identifier(exc):
                return MeterEventResult(identifier=event.identifier, accepted=True)
            code = error.code or _error_type(exc) or f"http_{error.http_status}"
            return MeterEventResult(identifier=event.identifier, accepted=False, error_code=code)
        return MeterEventResult(identifier=event.identifier, accepted=True)

    async def _send_stream(self, events: Sequence[MeterEvent]) -> list[MeterEventResult]:
        batches = [events[i : i + STREAM_BATCH] for i in range(0, len(events), STREAM_BATCH)]
        await self._fan_out(batches, self._stream_batch)
        return [MeterEventResult(identifier=e.identifier, accepted=True) for e in events]

    async def _fan_out(self, jobs: Sequence[T], run: Callable[[T], Awaitable[None]]) -> None:
        """Run ``jobs`` on up to :attr:`concurrency` tasks; after the first failure no job
        starts, and the worst failure is raised once the running ones are done."""
        pending = iter(jobs)
        failures: list[StripeRetryable | StripePermanent] = []

        async def worker() -> None:
            for job in pending:
                if failures:
                    return
                try:
                    await run(job)
                except (StripeRetryable, StripePermanent) as exc:
                    failures.append(exc)
                    return

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(jobs)))))
        if failures:
            raise _worst(failures)

    async def _stream_batch(self, batch: Sequence[MeterEvent]) -> None:
        body: Any = {
            "events": [
                {
                    "event_name": e.event_name,
                    "identifier": e.identifier,
                    "timestamp": _iso(e.timestamp),
                    "payload": {"stripe_customer_id": e.customer_id, "value": str(e.value)},
                }
                for e in batch
            ]
        }
        for attempt in range(2):
            token = await self._session_token()
            try:
                await self._client.v2.billing.meter_event_stream.create_async(
                    body, {"api_key": token}
                )
                return
            except stripe.TemporarySessionExpiredError as exc:
                self._session = None  # expired early (clock skew): one retry with a new one
                if attempt:
                    raise _translate(exc) from exc
            except stripe.StripeError as exc:
                raise _translate(exc) from exc

    async def _session_token(self) -> str:
        async with self._session_lock:
            if self._session is None or self._session[1] - time.time() < SESSION_MARGIN_S:
                session = await _translated(
                    self._client.v2.billing.meter_event_session.create_async()
                )
                expires = datetime.fromisoformat(session.expires_at).timestamp()
                self._session = (session.authentication_token, expires)
            return self._session[0]

    # -- Connect --------------------------------------------------------------------------------

    async def create_connected_account(self, provider: str, *, email: str | None = None) -> str:
        """The Express account whose metadata ``lattice_provider`` is ``provider``: found
        among the platform's accounts, else created (idempotency key from the provider)."""
        accounts = await self._all(self._client.v1.accounts.list_async({"limit": 100}))
        mine = [a for a in accounts if _metadata(a).get(PROVIDER_ACCOUNT_KEY) == provider]
        if mine:
            return str(min(mine, key=lambda a: (a.created, a.id)).id)
        params: Any = {
            "type": "express",
            "capabilities": {"transfers": {"requested": True}},
            "metadata": {PROVIDER_ACCOUNT_KEY: provider},
        }
        if email:
            params["email"] = email
        account = await _translated(
            self._client.v1.accounts.create_async(
                params, {"idempotency_key": _key("account", provider)}
            )
        )
        return account.id

    async def account_link(self, account_id: str, *, refresh_url: str, return_url: str) -> str:
        link = await _translated(
            self._client.v1.account_links.create_async(
                {
                    "account": account_id,
                    "refresh_url": refresh_url,
                    "return_url": return_url,
                    "type": "account_onboarding",
                }
            )
        )
        return link.url

    async def create_transfer(
        self,
        *,
        amount: int,
        currency: str,
        destination: str,
        idempotency_key: str,
        metadata: dict[str, str],
    ) -> Transfer:
        transfer = await _translated(
            self._client.v1.transfers.create_async(
                {
                    "amount": amount,
                    "currency": currency,
                    "destination": destination,
                    "metadata": metadata,
                },
                {"idempotency_key": idempotency_key},
            )
        )
        return _transfer(transfer)

    async def list_transfers(self, destination: str) -> list[Transfer]:
        """Every transfer to ``destination``, newest first."""
        found = await self._all(
            self._client.v1.transfers.list_async({"destination": destination, "limit": 100})
        )
        return [_transfer(t) for t in found]

    async def aclose(self) -> None:
        await self._http.close_async()

    async def _all(self, first_page: Awaitable[Any]) -> list[Any]:
        """Every object of a list or search result, following its pages."""
        try:
            page = await first_page
            items: AsyncIterator[Any] = page.auto_paging_iter()
            return [item async for item in items]
        except stripe.StripeError as exc:
            raise _translate(exc) from exc


async def _translated(call: Awaitable[T]) -> T:
    try:
        return await call
    except stripe.StripeError as exc:
        raise _translate(exc) from exc


def _translate(exc: stripe.StripeError) -> StripeRetryable | StripePermanent:
    """stripe-python's error as ours (https://docs.stripe.com/error-handling)."""
    message = str(exc.user_message or type(exc).__name__)
    status = exc.http_status
    if isinstance(exc, stripe.RateLimitError | stripe.APIConnectionError):
        return StripeRetryable(message, retry_after_s=_retry_after(exc.headers))
    if status is None or status >= 500 or status == 409:  # 409: a concurrent same-key request
        return StripeRetryable(message, retry_after_s=_retry_after(exc.headers))
    code = exc.code or (exc.error.code if exc.error is not None else None)
    if code is None and isinstance(exc, stripe.IdempotencyError):
        code = "idempotency_error"
    return StripePermanent(message, code=code, http_status=status)


def _error_type(exc: stripe.StripeError) -> str | None:
    return exc.error.type if exc.error is not None else None


def _is_duplicate_identifier(exc: stripe.StripeError) -> bool:
    return (
        isinstance(exc, stripe.InvalidRequestError)
        and exc.http_status == 400
        and not exc.code
        and str(exc.user_message or "").startswith(_DUPLICATE_IDENTIFIER)
    )


def _worst(failures: Sequence[StripeRetryable | StripePermanent]) -> StripeError:
    """A permanent failure of the whole call wins; else the longest ``Retry-After``."""
    for failure in failures:
        if isinstance(failure, StripePermanent):
            return failure
    waits = [f.retry_after_s for f in failures if isinstance(f, StripeRetryable)]
    known = [w for w in waits if w is not None]
    first = failures[0]
    return StripeRetryable(first.message, retry_after_s=max(known) if known else None)


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    for name, value in (headers or {}).items():
        if name.lower() == "retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:  # an HTTP-date: let the caller's backoff decide
                return None
    return None


def _key(kind: str, *parts: str) -> str:
    """A deterministic idempotency key; hashed when the readable form would be too long or
    not plain ASCII (Stripe keys are at most 255 characters)."""
    readable = f"lattice-{kind}:" + ":".join(parts)
    if len(readable) <= 200 and readable.isascii() and readable.isprintable():
        return readable
    return f"lattice-{kind}-sha256:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _metadata(obj: Any) -> dict[str, str]:
    meta = getattr(obj, "metadata", None)
    return {} if meta is None else {str(k): str(v) for k, v in meta.to_dict().items()}


def _transfer(obj: Any) -> Transfer:
    destination = obj.destination
    return Transfer(
        id=obj.id,
        amount=obj.amount,
        currency=obj.currency,
        destination=destination if isinstance(destination, str) else destination.id,
        metadata=_metadata(obj),
        created=obj.created,
    )


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def stripe_api_from_env(env: Mapping[str, str] | None = None, **overrides: Any) -> StripeClientApi:
    """A :class:`StripeClientApi` from the ``LATTICE_STRIPE_*`` variables (module docstring);
    keyword overrides win. Raises ValueError without an API key."""
    env = os.environ if env is None else env
    key = overrides.pop("api_key", None) or env.get("LATTICE_STRIPE_API_KEY", "")
    if not key:
        raise ValueError("set LATTICE_STRIPE_API_KEY to the Stripe secret key")
    options: dict[str, Any] = {
        "api_base": env.get("LATTICE_STRIPE_API_BASE") or None,
        "meter_events_api_base": env.get("LATTICE_STRIPE_METER_EVENTS_API_BASE") or None,
    }
    if env.get("LATTICE_STRIPE_TIMEOUT_S"):
        options["timeout_s"] = float(env["LATTICE_STRIPE_TIMEOUT_S"])
    if env.get("LATTICE_STRIPE_METER_EVENTS_V2"):
        options["use_v2_stream"] = _bool(env["LATTICE_STRIPE_METER_EVENTS_V2"])
    options.update(overrides)
    return StripeClientApi(key, **options)
