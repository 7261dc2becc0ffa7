"""Stripe Connect in memory: connected accounts, onboarding links and transfers.

Follows https://docs.stripe.com/api/accounts, /api/account_links and /api/transfers for the
parameters Lattice sends. The platform balance is unlimited (no ``insufficient_funds``), and
an account is usable for transfers as soon as it exists (no onboarding to complete).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from billing.fake_stripe.errors import ApiError, missing
from billing.fake_stripe.objects import Account, AccountLink, Transfer
from billing.fake_stripe.params import (
    check_known,
    list_page,
    metadata,
    optional_str,
    required_int,
    required_str,
)

__all__ = ["ACCOUNT_LINK_TTL_S", "ConnectState"]

#: Account links expire a few minutes after creation (Stripe: "expires_at").
ACCOUNT_LINK_TTL_S = 300
_ACCOUNT_TYPES = frozenset({"express", "standard", "custom"})


class ConnectState:
    """Accounts and transfers, oldest first in insertion order."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.accounts: dict[str, Account] = {}
        self.transfers: dict[str, Transfer] = {}
        self._by_destination: dict[str, list[str]] = {}

    def _now(self) -> int:
        return int(self._clock())

    # -- accounts -------------------------------------------------------------------------------

    def create_account(self, params: dict[str, Any]) -> Account:
        check_known(
            params,
            (
                "type",
                "email",
                "metadata",
                "country",
                "capabilities",
                "business_type",
                "business_profile",
                "controller",
                "tos_acceptance",
            ),
        )
        kind = optional_str(params, "type")
        if kind is None and params.get("controller") is None:
            raise ApiError(
                400, "Missing required param: type.", code="parameter_missing", param="type"
            )
        kind = kind or "express"
        if kind not in _ACCOUNT_TYPES:
            raise ApiError(400, f"Invalid type: {kind}", code="parameter_invalid", param="type")
        capabilities = params.get("capabilities") or {}
        if not isinstance(capabilities, dict):
            raise ApiError(400, "Invalid capabilities: must be a hash", param="capabilities")
        account = Account(
            id=f"acct_{secrets.token_hex(8)}",
            created=self._now(),
            type=kind,
            email=optional_str(params, "email"),
            country=(optional_str(params, "country") or "US").upper(),
            capabilities={name: "inactive" for name in capabilities},
            metadata=metadata(params),
        )
        self.accounts[account.id] = account
        return account

    def retrieve_account(self, account_id: str) -> Account:
        account = self.accounts.get(account_id)
        if account is None:
            raise missing("account", account_id)
        return account

    def list_accounts(self, params: dict[str, Any]) -> dict[str, Any]:
        check_known(params, ("limit", "starting_after", "ending_before", "created"))
        newest = list(reversed(self.accounts.values()))
        return list_page(newest, params, "/v1/accounts", "account")

    def create_account_link(self, params: dict[str, Any], base_url: str) -> AccountLink:
        check_known(params, ("account", "refresh_url", "return_url", "type", "collect"))
        account = required_str(params, "account")
        if account not in self.accounts:
            raise missing("account", account, param="account")
        kind = required_str(params, "type")
        if kind not in ("account_onboarding", "account_update"):
            raise ApiError(400, f"Invalid type: {kind}", code="parameter_invalid", param="type")
        required_str(params, "refresh_url")
        required_str(params, "return_url")
        now = self._now()
        token = secrets.token_urlsafe(12)
        return AccountLink(
            created=now,
            expires_at=now + ACCOUNT_LINK_TTL_S,
            url=f"{base_url}/_fake/connect/{kind}/{account}/{token}",
        )

    # -- transfers ------------------------------------------------------------------------------

    def create_transfer(self, params: dict[str, Any]) -> Transfer:
        check_known(
            params,
            (
                "amount",
                "currency",
                "destination",
                "metadata",
                "description",
                "transfer_group",
                "source_transaction",
            ),
        )
        amount = required_int(params, "amount")
        if amount < 1:
            raise ApiError(
                400, "Amount must be at least 1 cent.", code="amount_too_small", param="amount"
            )
        currency = required_str(params, "currency").lower()
        if len(currency) != 3 or not currency.isalpha():
            raise ApiError(
                400, f"Invalid currency: {currency}.", code="parameter_invalid", param="currency"
            )
        destination = required_str(params, "destination")
        if destination not in self.accounts:
            raise ApiError(
                400,
                f"No such destination: '{destination}'",
                code="resource_missing",
                param="destination",
            )
        transfer = Transfer(
            id=f"tr_{secrets.token_hex(8)}",
            created=self._now(),
            amount=amount,
            currency=currency,
            destination=destination,
            description=optional_str(params, "description"),
            transfer_group=optional_str(params, "transfer_group"),
            metadata=metadata(params),
        )
        self.transfers[transfer.id] = transfer
        self._by_destination.setdefault(destination, []).append(transfer.id)
        return transfer

    def retrieve_transfer(self, transfer_id: str) -> Transfer:
        transfer = self.transfers.get(transfer_id)
        if transfer is None:
            raise missing("transfer", transfer_id)
        return transfer

    def list_transfers(self, params: dict[str, Any]) -> dict[str, Any]:
        check_known(
            params,
            (
                "destination",
                "transfer_group",
                "limit",
                "starting_after",
                "ending_before",
                "created",
            ),
        )
        destination = optional_str(params, "destination")
        group = optional_str(params, "transfer_group")
        if destination is not None:
            ids = self._by_destination.get(destination, [])
            chosen = [self.transfers[i] for i in ids]
        else:
            chosen = list(self.transfers.values())
        if group is not None:
            chosen = [t for t in chosen if t.transfer_group == group]
        chosen.reverse()
        return list_page(chosen, params, "/v1/transfers", "transfer")
