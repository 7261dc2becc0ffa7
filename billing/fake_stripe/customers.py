"""Customers in memory (https://docs.stripe.com/api/customers), mixed into the state.

A deleted customer leaves :attr:`CustomerOps.customers` for :attr:`CustomerOps.deleted_customers`:
retrieving it answers ``{"id", "object": "customer", "deleted": true}``, lists and search no
longer show it, and deleting it again is a 404 ``resource_missing``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from billing.fake_stripe.errors import missing
from billing.fake_stripe.objects import Customer
from billing.fake_stripe.params import (
    check_known,
    list_page,
    metadata,
    optional_int,
    optional_str,
    required_str,
)
from billing.fake_stripe.search import Clause, parse_customer_query

__all__ = ["CustomerOps"]


class CustomerOps:
    """The customer endpoints over ``customers`` (live, oldest first) and the ids of deleted
    customers; the class using it sets both and ``clock``."""

    clock: Callable[[], float]
    customers: dict[str, Customer]
    deleted_customers: set[str]

    def create_customer(self, params: dict[str, Any]) -> Customer:
        check_known(params, ("email", "name", "description", "metadata"))
        customer = Customer(
            id=f"cus_{secrets.token_hex(7)}",
            created=int(self.clock()),
            email=optional_str(params, "email"),
            name=optional_str(params, "name"),
            description=optional_str(params, "description"),
            metadata=metadata(params),
        )
        self.customers[customer.id] = customer
        return customer

    def retrieve_customer(self, customer_id: str) -> Customer | dict[str, Any]:
        if customer_id in self.deleted_customers:
            return {"id": customer_id, "object": "customer", "deleted": True}
        customer = self.customers.get(customer_id)
        if customer is None:
            raise missing("customer", customer_id)
        return customer

    def delete_customer(self, customer_id: str) -> dict[str, Any]:
        if self.customers.pop(customer_id, None) is None:
            raise missing("customer", customer_id)
        self.deleted_customers.add(customer_id)
        return {"id": customer_id, "object": "customer", "deleted": True}

    def list_customers(self, params: dict[str, Any]) -> dict[str, Any]:
        check_known(params, ("email", "limit", "starting_after", "ending_before", "created"))
        email = optional_str(params, "email")
        chosen = [c for c in self.customers.values() if email is None or c.email == email]
        chosen.reverse()
        return list_page(chosen, params, "/v1/customers", "customer")

    def search_customers(self, params: dict[str, Any]) -> dict[str, Any]:
        """``query`` in Stripe's search language, the subset ``field:'value'`` clauses joined
        by ``AND`` over ``email``, ``name`` and ``metadata['key']``; one page, newest first."""
        check_known(params, ("query", "limit", "page"))
        clauses = parse_customer_query(required_str(params, "query"))
        limit = optional_int(params, "limit") or 10
        found = [c for c in reversed(self.customers.values()) if _matches(c, clauses)]
        return {
            "object": "search_result",
            "data": found[:limit],
            "has_more": len(found) > limit,
            "next_page": None,
            "url": "/v1/customers/search",
        }


def _matches(customer: Customer, clauses: list[Clause]) -> bool:
    for field, key, value in clauses:
        if field == "metadata":
            actual = customer.metadata.get(key or "")
        else:
            actual = getattr(customer, field)
        if actual != value:
            return False
    return True
