"""The pure parts of personal runtimes and pairing: ids, secrets, user codes, form parsing,
the slow_down rule, status, the public object. No sockets, no Redis."""

from __future__ import annotations

import re

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.runtimes.pairing import oauth_error, parse_form, polled_too_soon
from gateway.runtimes.protocol import PersonalRuntime
from gateway.runtimes.records import RuntimeRecord, runtime_status, validate_runtime_name
from gateway.runtimes.routes import runtime_object
from gateway.runtimes.tokens import (
    RUNTIME_ID_RE,
    digest,
    mint_secret_token,
    new_runtime_id,
    parse_secret_token,
)
from gateway.runtimes.user_codes import (
    USER_CODE_ALPHABET,
    display_user_code,
    new_user_code,
    normalise_user_code,
)

FORM = "application/x-www-form-urlencoded"


def test_alphabet_is_rfc_8628_section_6_1() -> None:
    assert USER_CODE_ALPHABET == "BCDFGHJKLMNPQRSTVWXZ"
    assert len(set(USER_CODE_ALPHABET)) == 20 and not set(USER_CODE_ALPHABET) & set("AEIOUY")


def test_new_user_codes_are_xxxx_dash_xxxx() -> None:
    codes = {new_user_code() for _ in range(200)}
    assert len(codes) > 190
    for code in codes:
        assert re.fullmatch(r"[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}", code), code
        assert normalise_user_code(code) == code.replace("-", "")


@pytest.mark.parametrize(
    ("typed", "canonical"),
    [
        ("BCDF-GHJK", "BCDFGHJK"),
        ("bcdf-ghjk", "BCDFGHJK"),
        ("bcdfghjk", "BCDFGHJK"),
        (" Bcdf ghjK ", "BCDFGHJK"),
        ("BC-DF-GH-JK", "BCDFGHJK"),
        ("bcdf\u2013ghjk", "BCDFGHJK"),
    ],
)
def test_normalise_accepts_case_and_separators(typed: str, canonical: str) -> None:
    assert normalise_user_code(typed) == canonical
    assert display_user_code(canonical) == "BCDF-GHJK"


@pytest.mark.parametrize(
    "typed",
    ["", "BCDF-GHJ", "BCDF-GHJKL", "ABCD-EFGH", "BCDF_GHJK", "BCDF-GHJ1", "<script>", "B" * 40],
)
def test_normalise_rejects_the_rest(typed: str) -> None:
    assert normalise_user_code(typed) is None


@given(st.text(alphabet=USER_CODE_ALPHABET, min_size=8, max_size=8), st.booleans())
def test_normalise_round_trips(letters: str, lower: bool) -> None:
    shown = display_user_code(letters)
    assert normalise_user_code(shown.lower() if lower else shown) == letters


@given(st.text(max_size=40))
def test_normalise_never_crashes(text: str) -> None:
    out = normalise_user_code(text)
    assert out is None or (len(out) == 8 and set(out) <= set(USER_CODE_ALPHABET))


def test_runtime_ids_and_secret_tokens() -> None:
    ids = {new_runtime_id() for _ in range(100)}
    assert len(ids) == 100 and all(RUNTIME_ID_RE.fullmatch(i) for i in ids)
    runtime_id = next(iter(ids))
    token, token_digest = mint_secret_token("lrt_", runtime_id)
    assert token.startswith("lrt_" + runtime_id[4:] + "_")
    parsed = parse_secret_token("lrt_", token)
    assert parsed is not None and parsed[0] == runtime_id
    assert digest(parsed[1]) == token_digest and len(parsed[1]) >= 43
    assert parse_secret_token("lbt_", token) is None  # prefixes are not interchangeable
    for bad in [
        "",
        "lrt_",
        "lrt_short_" + "x" * 43,
        "lrt_" + "A" * 16 + "_" + "x" * 43,
        token[:-20],
    ]:
        assert parse_secret_token("lrt_", bad) is None
    # A secret may contain "_": only the first two underscores split.
    assert parse_secret_token("lrt_", "lrt_" + "a" * 16 + "_" + "x_y" * 15) == (
        "lat_" + "a" * 16,
        "x_y" * 15,
    )


def test_slow_down_rule() -> None:
    assert not polled_too_soon(None, 5, 1_000, 200)
    assert not polled_too_soon(0, 5, 5_000, 200)
    assert not polled_too_soon(0, 5, 4_800, 200)  # within the grace
    assert polled_too_soon(0, 5, 4_799, 200)
    assert polled_too_soon(0, 10, 6_000, 200)


def test_parse_form() -> None:
    assert parse_form(b"client_id=lattice-daemon&name=my+box%21", FORM) == {
        "client_id": "lattice-daemon",
        "name": "my box!",
    }
    assert parse_form(b"", FORM + "; charset=utf-8") == {}
    for raw, ctype in [
        (b"a=1&a=2", FORM),
        (b'{"a": 1}', "application/json"),
        (b"a=1", None),
        (b"a=%ff", FORM),
        ("a=\u00e9".encode(), FORM),
    ]:
        out = parse_form(raw, ctype)
        assert not isinstance(out, dict), raw
        assert out.status == 400 and out.body["error"] == "invalid_request"
    err = oauth_error("invalid_grant", "Unknown device code.")
    assert err.body == {"error": "invalid_grant", "error_description": "Unknown device code."}
    assert ("Cache-Control", "no-store") in err.headers


def test_runtime_names() -> None:
    assert validate_runtime_name("  my laptop ") == "my laptop"
    for bad in [None, 3, "", " ", "x" * 129, "tab\there"]:
        with pytest.raises(Exception, match="name"):
            validate_runtime_name(bad)


def _record(**kw: object) -> RuntimeRecord:
    base: dict[str, object] = {
        "id": "lat_" + "a" * 16,
        "workspace": "acme",
        "name": "box",
        "created_ms": 1_700_000_000_123,
    }
    return msgspec.convert({**base, **kw}, RuntimeRecord)


def test_status() -> None:
    assert runtime_status(_record(), reachable=True) == "unpaired"
    paired = _record(paired_ms=1)
    assert runtime_status(paired, reachable=False) == "offline"
    assert runtime_status(paired, reachable=True) == "reachable"
    assert runtime_status(_record(paired_ms=1, revoked_ms=2), reachable=True) == "revoked"
    assert runtime_status(_record(revoked_ms=2), reachable=False) == "revoked"


def test_public_object_has_no_secret() -> None:
    record = _record(
        paired_ms=1_700_000_001_999,
        last_seen_ms=1_700_000_002_000,
        models=("m1",),
        task_classes=("chat-completion",),
        default_model="m1",
        daemon_version="0.1.0",
        concurrency=4,
        credential_sha256="f" * 64,
    )
    obj = runtime_object(record, "offline")
    raw = msgspec.json.encode(obj)
    assert b"f" * 64 not in raw and b"sha256" not in raw and b"workspace" not in raw
    assert msgspec.json.decode(raw, type=PersonalRuntime) == obj
    assert (obj.created_at, obj.paired_at, obj.last_seen_at, obj.revoked_at) == (
        1_700_000_000,
        1_700_000_001,
        1_700_000_002,
        None,
    )
    assert msgspec.json.decode(raw)["object"] == "personal_runtime"
