"""Pure parts of authentication: token shapes and issuer configuration."""

from __future__ import annotations

import msgspec
import pytest

from gateway.auth.apikeys import KNOWN_SCOPES, parse_api_key
from gateway.auth.authenticator import _bearer
from gateway.auth.jwt import JwtIssuer
from gateway.auth.principal import Scope
from gateway.auth.workspaces import validate_workspace_name
from gateway.errors import InvalidRequest

SECRET = "Ab_-" + "x" * 39  # 43 chars, like secrets.token_urlsafe(32), with '_' and '-'


def test_parse_api_key_splits_on_first_two_underscores() -> None:
    assert parse_api_key(f"sk_ltabcdefgh2345_{SECRET}") == ("ltabcdefgh2345", SECRET)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "sk_",
        "sk_ltabcdefgh2345",
        "sk_ltabcdefgh2345_",
        "sk_ltabcdefgh2345_short",
        f"pk_ltabcdefgh2345_{SECRET}",
        f"sk_LTABCDEFGH2345_{SECRET}",  # key ids are lower case
        f"sk_ltabcdefgh234_{SECRET}",  # too short
        f"sk_ltabcdefgh2341_{SECRET}",  # '1' is not base32
        f"sk_xxabcdefgh2345_{SECRET}",  # wrong id prefix
        f"sk_ltabcdefgh2345_{SECRET}!",
        f"sk_ltabcdefgh2345_{'a' * 500}",
    ],
)
def test_parse_api_key_rejects_malformed(token: str) -> None:
    assert parse_api_key(token) is None


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer sk_x", "sk_x"),
        ("bearer  sk_x ", "sk_x"),
        ("BEARER eyJ.a.b", "eyJ.a.b"),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer", None),
        ("Bearer   ", None),
        ("sk_x", None),
    ],
)
def test_bearer(header: str, token: str | None) -> None:
    assert _bearer(header) == token


def test_admin_scope_is_known() -> None:
    assert Scope.ADMIN == "lattice:admin"
    assert {Scope.ADMIN, Scope.INFERENCE} <= KNOWN_SCOPES


@pytest.mark.parametrize("name", ["acme", "a", "acme-prod.eu_1", "0" * 64])
def test_valid_workspace_names(name: str) -> None:
    assert validate_workspace_name(name) == name


@pytest.mark.parametrize("name", ["", "_admin", "Acme", "-x", "a" * 65, "a:b", "a b", "é"])
def test_invalid_workspace_names(name: str) -> None:
    with pytest.raises(InvalidRequest):
        validate_workspace_name(name)


def _issuer(**kw: object) -> JwtIssuer:
    base = {"issuer": "https://id.example", "jwks_url": "https://id.example/jwks", "audience": "a"}
    return msgspec.convert({**base, **kw}, JwtIssuer)


@pytest.mark.parametrize("algs", [["HS256"], ["none"], ["ES256", "HS512"], []])
def test_issuer_rejects_symmetric_and_none_algorithms(algs: list[str]) -> None:
    with pytest.raises(msgspec.ValidationError):
        _issuer(algorithms=algs)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://id.example/jwks", True),
        ("http://127.0.0.1:8080/jwks", True),
        ("http://localhost/jwks", True),
        ("http://id.example/jwks", False),
        ("file:///etc/jwks.json", False),
    ],
)
def test_issuer_jwks_url_must_be_https_off_loopback(url: str, ok: bool) -> None:
    if ok:
        assert _issuer(jwks_url=url).jwks_url == url
    else:
        with pytest.raises(msgspec.ValidationError):
            _issuer(jwks_url=url)


def test_issuer_defaults() -> None:
    issuer = _issuer()
    assert issuer.algorithms == ("ES256", "RS256", "EdDSA", "Ed25519")
    assert issuer.workspace_claim == "lattice_workspace"
    assert issuer.min_refetch_interval_s == 10.0
