"""Approving or denying a device's user code, as the owner of a workspace (RFC 8628 §3.3).

Whoever approves a code owns the runtime it pairs: the runtime is created in the approver's
workspace. A user code is short (20^8 values, §6.1), so guessing is limited twice (§5.1,
"brute forcing the user code"):

- per client address: at most ``address_failures`` failed lookups (malformed, unknown or
  expired codes) per ``window_s``; past that every attempt is 429 until the window ends;
- per code: at most ``code_attempts`` approve/deny attempts over the code's lifetime; the
  next one *burns* the code (it is denied, so the waiting daemon stops with
  ``access_denied``) and is answered 429.

Both answers are the OpenAI envelope (``rate_limit_exceeded``) with ``retry-after``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from gateway import keys
from gateway.errors import RateLimited, UserCodeNotFound
from gateway.runtimes.device_grants import DeviceGrant, DeviceGrantStore
from gateway.runtimes.ratelimit import FixedWindow
from gateway.runtimes.records import RuntimeRecord, validate_runtime_name
from gateway.runtimes.store import RuntimeStore
from gateway.runtimes.user_codes import display_user_code, normalise_user_code

__all__ = ["DEFAULT_RUNTIME_NAME", "ApprovalLimits", "DeviceApprovals"]

#: Name of a runtime when neither the daemon nor the approver gave one.
DEFAULT_RUNTIME_NAME = "personal runtime"


class ApprovalLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    address_failures: int = 10
    window_s: int = keys.DEVICE_LOOKUP_WINDOW_S
    code_attempts: int = 5
    #: How long a code's attempt counter lives: at least the code's own lifetime.
    code_window_s: int = keys.DEVICE_CODE_LIFETIME_S


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _not_found() -> UserCodeNotFound:
    # One message for malformed, unknown, expired and already decided codes.
    return UserCodeNotFound(
        "No pending device authorization has this user code; it may have expired or been "
        "used. Run `lattice daemon pair` again for a new code.",
        param="user_code",
    )


class DeviceApprovals:
    """Approve/deny by user code; ``address`` is the caller's client address."""

    def __init__(
        self,
        runtimes: RuntimeStore,
        grants: DeviceGrantStore,
        counter: FixedWindow,
        limits: ApprovalLimits | None = None,
        *,
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        self.limits = limits or ApprovalLimits()
        self._runtimes = runtimes
        self._grants = grants
        self._counter = counter
        self._clock = clock

    async def approve(
        self, workspace: str, user_code: str, address: str, name: str | None = None
    ) -> RuntimeRecord:
        """Pair the daemon showing ``user_code`` into ``workspace``; returns the new runtime
        (``unpaired`` until the daemon's next poll picks up its credential)."""
        if name is not None:
            name = validate_runtime_name(name)
        grant = await self._pending(user_code, address)
        record = await self._runtimes.create_for_device(
            workspace, name or grant.name or DEFAULT_RUNTIME_NAME
        )
        if not await self._grants.decide(
            grant, self._clock(), approve=True, runtime_id=record.id, workspace=workspace
        ):
            # Lost the race (another decision, or expiry): the record was never shown to
            # anyone nor given a secret, so it goes.
            await self._runtimes.discard_unpaired(record)
            raise _not_found()
        return record

    async def deny(self, user_code: str, address: str) -> str:
        """Deny the pending authorization; returns the code in display form."""
        grant = await self._pending(user_code, address)
        if not await self._grants.decide(grant, self._clock(), approve=False):
            raise _not_found()
        return display_user_code(grant.user_code)

    async def _pending(self, user_code: str, address: str) -> DeviceGrant:
        limits = self.limits
        failures_key = keys.device_lookup_failures(address)
        failures = await self._counter.peek(failures_key)
        if failures.count >= limits.address_failures:
            raise RateLimited(
                "Too many unknown user codes from your address; try again later.",
                retry_after=failures.reset_s,
            )
        code = normalise_user_code(user_code)
        if code is None:
            await self._counter.hit(failures_key, limits.window_s)
            raise _not_found()
        attempts = await self._counter.hit(keys.device_code_attempts(code), limits.code_window_s)
        grant = await self._grants.find(code)
        if attempts.count > limits.code_attempts:
            if grant is not None and grant.status == "pending":
                await self._grants.decide(grant, self._clock(), approve=False)  # burned
            raise RateLimited(
                "Too many attempts on this user code; it can no longer be used.",
                retry_after=attempts.reset_s,
            )
        if grant is None or grant.status != "pending" or grant.expired(self._clock()):
            await self._counter.hit(failures_key, limits.window_s)
            raise _not_found()
        return grant
