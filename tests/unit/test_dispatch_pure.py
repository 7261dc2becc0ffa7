"""Pure dispatch logic without sockets: drop_params, codecs, stream relay, metering."""

from __future__ import annotations

import json

import pytest

from catalog.model import Meter, Offering
from gateway.dispatch.admission import admit_params, resolve_drop_params
from gateway.dispatch.codecs import CODECS, check_body
from gateway.dispatch.metering import build_record, estimate_tokens, meter_units
from gateway.dispatch.relay import StreamRelay, UpstreamStreamError, error_event
from gateway.errors import InvalidRequest, NoCapacity, UnsupportedParameter
from gateway.settings import settings_from_env

CHAT = CODECS["openai.chat"]


def test_drop_params_precedence() -> None:
    assert resolve_drop_params({"drop_params": False}, True, True) is False
    assert resolve_drop_params({}, False, True) is False
    assert resolve_drop_params({}, None, True) is True
    assert resolve_drop_params({"drop_params": "yes"}, None, False) is False


def test_admit_params_drops_or_rejects() -> None:
    body = {"model": "m", "messages": [], "seed": 1, "top_p": 0.5, "drop_params": True}
    out, dropped = admit_params(
        body, core=CHAT.core_fields, supported=frozenset({"seed"}), drop=True
    )
    assert out == {"model": "m", "messages": [], "seed": 1}
    assert dropped == ["top_p"]
    with pytest.raises(UnsupportedParameter) as info:
        admit_params(body, core=CHAT.core_fields, supported=frozenset({"seed"}), drop=False)
    assert info.value.param == "top_p"
    everything, none = admit_params(body, core=CHAT.core_fields, supported=None, drop=False)
    assert "drop_params" not in everything and none == []


def test_check_body_names_nested_fields() -> None:
    with pytest.raises(InvalidRequest) as info:
        check_body(CHAT, {"messages": [{"content": "x"}]})
    assert info.value.param == "messages[0].role"
    with pytest.raises(InvalidRequest) as info:
        check_body(CHAT, {"messages": [{"role": "user"}], "stream_options": {"include_usage": 3}})
    assert info.value.param == "stream_options.include_usage"


def chunk(**fields: object) -> bytes:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up"}
    return json.dumps({**base, **fields}).encode()


def test_relay_hides_usage_unless_asked() -> None:
    relay = StreamRelay("shown", include_usage=False)
    event = relay.relay(chunk(choices=[{"index": 0, "delta": {"content": "hey"}}], usage=None))
    assert event is not None
    data = json.loads(event[6:])
    assert data["model"] == "shown" and "usage" not in data
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert relay.relay(chunk(choices=[], usage=usage)) is None
    assert relay.usage == usage and relay.delivered_chars == 3


def test_relay_keeps_usage_when_asked_and_skips_garbage() -> None:
    relay = StreamRelay("m", include_usage=True)
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    event = relay.relay(chunk(choices=[], usage=usage))
    assert event is not None and json.loads(event[6:])["usage"] == usage
    assert relay.relay(b"{oops") is None
    assert relay.relay(b"[1]") is None
    with pytest.raises(UpstreamStreamError):
        relay.relay(b'{"error": {"message": "boom"}}')


def test_error_event_is_an_openai_envelope() -> None:
    event = error_event(NoCapacity("none"))
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:]) == {
        "error": {"message": "none", "type": "api_error", "param": None, "code": "no_capacity"}
    }


def test_meter_units() -> None:
    tokens = Meter(units=("prompt_tokens", "completion_tokens"), source="usage")
    assert meter_units(tokens, {"prompt_tokens": 3, "completion_tokens": 4}) == (
        {"prompt_tokens": 3, "completion_tokens": 4},
        False,
    )
    assert meter_units(tokens, {"prompt_tokens": 3}) == (
        {"prompt_tokens": 3, "completion_tokens": 0},
        True,
    )
    assert meter_units(tokens, None)[1] is True
    assert meter_units(Meter(), None) == ({"requests": 1}, False)
    assert estimate_tokens("") == 0 and estimate_tokens("abcdefgh") == 2


def test_build_record_money_is_integers() -> None:
    offering = Offering(
        id="o", model="m", prices={"prompt_tokens": 50_000, "completion_tokens": 100_000}
    )
    record = build_record(
        dispatch_id="d",
        request_id="r",
        principal_fields={"workspace": "w", "key_id": "k", "client_id": None, "subject": "s"},
        task="chat-completion",
        model="m",
        offering=offering,
        units={"prompt_tokens": 7, "completion_tokens": 3},
        estimated=False,
        started_ms=1,
        finished_ms=2,
        status="completed",
        tags={},
    )
    # 7 * 0.05 + 3 * 0.10 micro-USD = 0.65 micro-USD = 650,000 pico-USD, exactly
    assert record.cost_picousd == 650_000 and isinstance(record.cost_picousd, int)
    assert record.cost_microusd == 1


def test_settings_from_env() -> None:
    settings = settings_from_env(
        {
            "LATTICE_REDIS_URL": "redis://x:1/2",
            "LATTICE_PORT": "9",
            "LATTICE_DROP_PARAMS": "false",
            "LATTICE_JWT_ISSUERS": (
                '[{"issuer": "i", "jwks_url": "https://i/jwks", "audience": "a"}]'
            ),
        }
    )
    assert settings.redis_url == "redis://x:1/2" and settings.port == 9
    assert settings.drop_params is False and settings.jwt_issuers[0].issuer == "i"
