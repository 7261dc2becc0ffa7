"""A fake Stripe HTTP server for tests and benchmarks: the endpoints Lattice uses, with
Stripe's semantics (meter-event identifier de-duplication, idempotency keys, error bodies)
and failures on demand (500, 429 with Retry-After, timeouts, reset connections).

Modules: ``state`` (the in-memory model, no sockets), ``api`` (HTTP semantics, bytes in and
out), ``failures`` (failure plans), ``server`` (aiohttp, background thread), and helpers
(``forms``, ``params``, ``events``, ``search``, ``idempotency``, ``connect``, ``objects``).
It is a test double: it never talks to Stripe.
"""

from __future__ import annotations

from billing.fake_stripe.failures import FailureInjector, FailurePlan
from billing.fake_stripe.server import FakeStripeServer
from billing.fake_stripe.state import FakeStripeState

__all__ = ["FailureInjector", "FailurePlan", "FakeStripeServer", "FakeStripeState"]
