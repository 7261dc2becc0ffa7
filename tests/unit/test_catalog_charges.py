"""Pricing rules (catalog/charges.py), the ``[pricing]`` catalog table, and the usage record's
earnings split (gateway/dispatch/metering.py build_record)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.usage import UsageRecord, decode_record
from catalog.charges import Charge, charge, effective_pricing, runtime_offering, self_served
from catalog.errors import CatalogError
from catalog.loader import catalog_from_dict, load_seed, merge_catalog
from catalog.model import Catalog, Offering, Pricing, ServingKind
from catalog.pricing import cost_picousd
from catalog.validate import validate_catalog
from gateway.dispatch.metering import build_record

PRICES = {"prompt_tokens": 150_000, "completion_tokens": 600_000}  # $0.15 / $0.60 per 1M
HOSTED = Offering(id="h", model="m", prices=PRICES)
MARKET = Offering(id="acme-m", model="m", provider="acme", kind="marketplace", prices=PRICES)
UNITS = {"prompt_tokens": 1000, "completion_tokens": 500}
PRICE = 1000 * 150_000 * 10**6 // 10**6 + 500 * 600_000  # 450,000,000 pico-USD ($0.00045)
POLICY = Pricing(
    runtime_platform_fee={"completion_tokens": 10_000},  # $0.01 per 1M completion tokens
    marketplace_margin_bps=1_500,  # 15 %
    provider_share_bps=8_000,  # providers keep 80 % of their price
)


def test_hosted_is_the_offerings_price_earned_by_its_provider() -> None:
    assert PRICE == cost_picousd(UNITS, HOSTED) == 450_000_000
    for pricing in (None, POLICY):
        for same in (False, True):
            got = charge(UNITS, HOSTED, pricing, serving_kind="hosted", same_workspace=same)
            assert got == Charge(
                customer_picousd=PRICE, provider_earnings_picousd=PRICE, platform_picousd=0
            )


def test_own_runtime_costs_no_compute_only_the_platform_fee() -> None:
    offering = runtime_offering("lovelace:m", "lat_abc", POLICY)
    assert offering.id == offering.provider == "runtime:lat_abc"
    assert offering.kind == "runtime" and offering.model == "lovelace:m"
    assert offering.prices == {"completion_tokens": 10_000}
    assert offering.price_per == 1_000_000
    # 500 completion tokens at $0.01 per million = $0.000005 = 5,000,000 pico-USD.
    fee = charge(UNITS, offering, POLICY, serving_kind="runtime", same_workspace=True)
    assert fee == Charge(
        customer_picousd=5_000_000, provider_earnings_picousd=0, platform_picousd=5_000_000
    )
    # Without a fee (the default policy) it is free.
    free = runtime_offering("lovelace:m", "lat_abc")
    assert free.prices == {}
    assert charge(UNITS, free, None, same_workspace=True) == Charge(0, 0, 0)
    # A runtime serves only its own workspace: same_workspace does not change its price.
    assert charge(UNITS, offering, POLICY) == fee
    # Its offering carries the fee in force when it was built: that is what is charged.
    assert charge(UNITS, offering, None) == fee


def test_marketplace_margin_and_share_are_exact() -> None:
    got = charge(UNITS, MARKET, POLICY, serving_kind="marketplace")
    # customer: price + 15 % = 517,500,000; provider: 80 % of the price = 360,000,000.
    assert got == Charge(
        customer_picousd=517_500_000,
        provider_earnings_picousd=360_000_000,
        platform_picousd=157_500_000,  # margin 67.5M + unshared 90M
    )
    # Defaults: no margin, providers keep everything.
    assert charge(UNITS, MARKET, None) == Charge(PRICE, PRICE, 0)
    # serving_kind defaults to the offering's kind.
    assert charge(UNITS, MARKET, POLICY) == got


def test_marketplace_rounds_down_in_pico() -> None:
    one = Offering(
        id="o", model="m", provider="p", kind="marketplace", prices={"requests": 1}, price_per=1
    )
    policy = Pricing(marketplace_margin_bps=3_333, provider_share_bps=6_667)
    # price 10**6 pico; margin 333,300; share 666,700
    assert charge({"requests": 1}, one, policy) == Charge(1_333_300, 666_700, 666_600)
    # price 1 pico: the margin (0.3333) and the share (0.6667) round down.
    tiny = msgspec.structs.replace(one, price_per=10**6)
    assert charge({"requests": 1}, tiny, policy) == Charge(1, 0, 1)


def test_own_marketplace_daemon_is_self_served() -> None:
    assert self_served("marketplace", True) and self_served("runtime", False)
    assert not self_served("marketplace", False) and not self_served("hosted", True)
    got = charge(UNITS, MARKET, POLICY, same_workspace=True)
    assert got == Charge(5_000_000, 0, 5_000_000)


def test_negative_usage_is_rejected() -> None:
    with pytest.raises(ValueError, match="prompt_tokens"):
        charge({"prompt_tokens": -1}, MARKET, POLICY)


KINDS: list[ServingKind] = ["hosted", "runtime", "marketplace"]


@given(
    units=st.dictionaries(
        st.sampled_from(["prompt_tokens", "completion_tokens", "seconds"]), st.integers(0, 10**9)
    ),
    prices=st.dictionaries(
        st.sampled_from(["prompt_tokens", "completion_tokens", "seconds"]), st.integers(0, 10**7)
    ),
    price_per=st.integers(1, 10**7),
    fee=st.dictionaries(st.sampled_from(["completion_tokens", "seconds"]), st.integers(0, 10**6)),
    fee_per=st.integers(1, 10**7),
    margin=st.integers(0, 50_000),
    share=st.integers(0, 10_000),
    kind=st.sampled_from(KINDS),
    same=st.booleans(),
)
def test_charges_split_exactly_and_never_go_negative(
    units: dict[str, int],
    prices: dict[str, int],
    price_per: int,
    fee: dict[str, int],
    fee_per: int,
    margin: int,
    share: int,
    kind: ServingKind,
    same: bool,
) -> None:
    policy = Pricing(
        runtime_platform_fee=fee,
        runtime_platform_fee_per=fee_per,
        marketplace_margin_bps=margin,
        provider_share_bps=share,
    )
    offering = Offering(id="o", model="m", provider="p", prices=prices, price_per=price_per)
    got = charge(units, offering, policy, serving_kind=kind, same_workspace=same)
    assert got.customer_picousd == got.provider_earnings_picousd + got.platform_picousd
    assert min(got.customer_picousd, got.provider_earnings_picousd, got.platform_picousd) >= 0
    assert all(type(v) is int for v in msgspec.structs.astuple(got))
    price = cost_picousd(units, offering)
    if self_served(kind, same):
        assert got.provider_earnings_picousd == 0
    elif kind == "marketplace":
        assert got.provider_earnings_picousd <= price <= got.customer_picousd
        assert got.customer_picousd - price <= price * margin // 10_000 + 1
    else:
        assert got == Charge(price, price, 0)


# -- the [pricing] table --------------------------------------------------------------------

TASKS: dict[str, Any] = {
    "chat-completion": {
        "codec": "openai.chat",
        "meter": {"units": ["prompt_tokens", "completion_tokens"], "source": "usage"},
    }
}


def doc(**pricing: Any) -> dict[str, Any]:
    return {
        "task_classes": TASKS,
        "models": {"lovelace:m": {"task_classes": ["chat-completion"]}},
        "pricing": pricing,
    }


def test_pricing_table_decodes_and_defaults() -> None:
    cat = catalog_from_dict(doc(marketplace_margin_bps=1000, runtime_platform_fee={}))
    validate_catalog(cat)
    assert cat.pricing == Pricing(marketplace_margin_bps=1000)
    assert effective_pricing(cat) == cat.pricing
    absent = catalog_from_dict({"task_classes": TASKS})
    assert absent.pricing is None and effective_pricing(absent) == Pricing()
    # A shown catalog (JSON) carries "pricing": null when none is set.
    assert catalog_from_dict({**doc(), "pricing": None}).pricing is None


@pytest.mark.parametrize(
    ("pricing", "field"),
    [
        ({"runtime_platform_fee": {"completion_tokens": "1"}},
         "pricing.runtime_platform_fee.completion_tokens"),
        ({"runtime_platform_fee": {"completion_tokens": 1.5}},
         "pricing.runtime_platform_fee.completion_tokens"),
        ({"marketplace_margin_bps": True}, "pricing.marketplace_margin_bps"),
        ({"provider_share_bps": "all"}, "pricing.provider_share_bps"),
        ({"bogus": 1}, "pricing"),
    ],
)  # fmt: skip
def test_pricing_decoding_errors_name_the_field(pricing: dict[str, Any], field: str) -> None:
    with pytest.raises(CatalogError) as info:
        catalog_from_dict(doc(**pricing))
    assert info.value.field == field


@pytest.mark.parametrize(
    ("pricing", "field"),
    [
        ({"runtime_platform_fee": {"images": 1}}, "pricing.runtime_platform_fee.images"),
        ({"runtime_platform_fee": {"prompt_tokens": -1}},
         "pricing.runtime_platform_fee.prompt_tokens"),
        ({"runtime_platform_fee_per": 0}, "pricing.runtime_platform_fee_per"),
        ({"marketplace_margin_bps": -1}, "pricing.marketplace_margin_bps"),
        ({"provider_share_bps": 10_001}, "pricing.provider_share_bps"),
        ({"provider_share_bps": -1}, "pricing.provider_share_bps"),
    ],
)  # fmt: skip
def test_pricing_semantic_errors_name_the_field(pricing: dict[str, Any], field: str) -> None:
    with pytest.raises(CatalogError) as info:
        validate_catalog(catalog_from_dict(doc(**pricing)))
    assert info.value.field == field, info.value


@pytest.mark.parametrize(
    ("offering", "field"),
    [
        ({"kind": "runtime"}, "offerings[0].kind"),
        ({"kind": "rented"}, "offerings[0].kind"),
        ({"provider": "runtime:lat_x"}, "offerings[0].provider"),
        ({"kind": "marketplace"}, "offerings[0].provider"),  # provider "hosted"
    ],
)
def test_offering_kind_errors_name_the_field(offering: dict[str, Any], field: str) -> None:
    document = {**doc(), "offerings": [{"id": "o", "model": "lovelace:m", **offering}]}
    with pytest.raises(CatalogError) as info:
        validate_catalog(catalog_from_dict(document))
    assert info.value.field == field, info.value


def test_marketplace_offering_is_valid() -> None:
    document = {
        **doc(),
        "offerings": [
            {"id": "o", "model": "lovelace:m", "kind": "marketplace", "provider": "acme"}
        ],
    }
    validate_catalog(catalog_from_dict(document))


def test_merge_keeps_or_replaces_the_whole_policy() -> None:
    base = catalog_from_dict(doc(marketplace_margin_bps=1000, provider_share_bps=9000))
    assert merge_catalog(base, Catalog()).pricing == base.pricing
    patch = catalog_from_dict({"pricing": {"marketplace_margin_bps": 500}})
    assert merge_catalog(base, patch).pricing == Pricing(marketplace_margin_bps=500)


def test_seed_has_a_pricing_policy() -> None:
    seed = load_seed()
    assert seed.pricing is not None
    assert seed.pricing.runtime_platform_fee == {}  # own runtimes: no fee by default
    assert 0 <= seed.pricing.provider_share_bps <= 10_000


def test_catalogs_stored_before_pricing_still_decode() -> None:
    # What an older gateway stored: no `pricing`, offerings without `kind`.
    old = {
        "task_classes": {},
        "models": {},
        "offerings": [{"id": "o", "model": "m", "prices": {"requests": 1}, "price_per": 1}],
        "aliases": {},
        "default_models": {},
        "version": 3,
    }
    cat = msgspec.msgpack.decode(msgspec.msgpack.encode(old), type=Catalog)
    assert cat.pricing is None and cat.offerings[0].kind == "hosted"


# -- usage records ----------------------------------------------------------------------------


def record_for(offering: Offering, **kwargs: Any) -> UsageRecord:
    return build_record(
        dispatch_id="d",
        request_id="r",
        principal_fields={"workspace": "w", "key_id": "k", "client_id": None, "subject": "s"},
        task="chat-completion",
        model="m",
        offering=offering,
        units=UNITS,
        estimated=False,
        started_ms=1,
        finished_ms=2,
        status="completed",
        tags={},
        **kwargs,
    )


def test_build_record_hosted_by_default() -> None:
    rec = record_for(HOSTED)
    assert rec.cost_picousd == PRICE and rec.cost_microusd == 450
    assert rec.serving_kind == "hosted" and rec.serving_id == rec.provider == "hosted"
    assert rec.provider_earnings_picousd == PRICE and rec.platform_picousd == 0
    assert rec.prices == PRICES


def test_build_record_marketplace_and_runtime() -> None:
    rec = record_for(MARKET, pricing=POLICY)
    assert rec.cost_picousd == 517_500_000 and rec.cost_microusd == 518
    assert rec.serving_kind == "marketplace" and rec.serving_id == "acme"
    assert (rec.provider_earnings_picousd, rec.platform_picousd) == (360_000_000, 157_500_000)
    assert rec.prices == PRICES  # the provider's prices; the margin is on top

    own = record_for(runtime_offering("m", "lat_1", POLICY), pricing=POLICY, same_workspace=True)
    assert own.serving_kind == "runtime" and own.serving_id == "runtime:lat_1"
    assert own.offering == "runtime:lat_1"
    assert (own.cost_picousd, own.provider_earnings_picousd, own.platform_picousd) == (
        5_000_000,
        0,
        5_000_000,
    )
    assert own.prices == {"completion_tokens": 10_000}
    assert record_for(runtime_offering("m", "lat_1", POLICY)).cost_picousd == 5_000_000

    mine = record_for(MARKET, pricing=POLICY, same_workspace=True)
    assert mine.cost_picousd == 5_000_000 and mine.provider_earnings_picousd == 0
    assert mine.prices == POLICY.runtime_platform_fee


def test_usage_records_from_before_the_split_decode() -> None:
    old = msgspec.to_builtins(record_for(HOSTED))
    for field in ("serving_kind", "serving_id", "provider_earnings_picousd", "platform_picousd"):
        del old[field]
    rec = decode_record(msgspec.msgpack.encode(old))
    assert rec.serving_kind == "hosted" and rec.serving_id == ""
    assert rec.serving_party == "hosted" and rec.provider_earnings_picousd == 0
