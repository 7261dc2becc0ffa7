"""JwtVerifier against a JWKS served by a real aiohttp server on loopback."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, Key, OctKey, OKPKey, RSAKey

from gateway.auth.apikeys import ApiKeyStore
from gateway.auth.authenticator import Authenticator
from gateway.auth.jwt import JwtIssuer, JwtVerifier
from gateway.auth.principal import Principal, Scope
from gateway.errors import AuthenticationFailed, ServiceUnavailable
from gateway.redis_server import free_port

ISS = "https://id.lattice.test"
AUD = "lattice-gateway"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class JwksServer:
    """Serves ``keys`` as a JWKS and counts requests."""

    def __init__(self) -> None:
        self.keys: list[Key] = []
        self.hits = 0
        self.delay = 0.0
        self.status = 200
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.Response(status=self.status)
        return web.json_response({"keys": [k.as_dict(private=False) for k in self.keys]})


@pytest.fixture
async def jwks() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    yield server
    await runner.cleanup()


@pytest.fixture(scope="module")
def ec_key() -> ECKey:
    return ECKey.generate_key("P-256", {"kid": "ec-1"})


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048, {"kid": "rsa-1"})


@pytest.fixture
async def verifier(jwks: JwksServer, ec_key: ECKey, rsa_key: RSAKey) -> AsyncIterator[JwtVerifier]:
    jwks.keys = [ec_key, rsa_key]
    v = JwtVerifier([JwtIssuer(issuer=ISS, jwks_url=jwks.url, audience=AUD)])
    yield v
    await v.close()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "user-42",
        "iat": now,
        "exp": now + 300,
        "lattice_workspace": "acme",
        "scope": f"{Scope.INFERENCE} {Scope.WORKSPACE_ONLY}",
        "client_id": "app-1",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def mint(key: Key, alg: str, **overrides: Any) -> str:
    header = {"alg": alg, "kid": key.kid}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)  # "EdDSA is deprecated via RFC 9864"
        return jwt.encode(header, claims(**overrides), key, algorithms=[alg])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], body: dict[str, Any], sign: Any = None) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
    signature = b64(sign(signing_input.encode())) if sign else ""
    return f"{signing_input}.{signature}"


async def rejected(verifier: JwtVerifier, token: str) -> AuthenticationFailed:
    with pytest.raises(AuthenticationFailed) as info:
        await verifier.verify(token)
    assert info.value.status == 401 and info.value.code == "invalid_token"
    assert token not in info.value.message
    return info.value


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
async def test_valid_token(verifier: JwtVerifier, ec_key: ECKey, rsa_key: RSAKey, alg: str) -> None:
    key = ec_key if alg == "ES256" else rsa_key
    principal = await verifier.verify(mint(key, alg))
    assert principal == Principal(
        workspace="acme",
        subject="user-42",
        scopes=(Scope.INFERENCE, Scope.WORKSPACE_ONLY),
        kind="jwt",
        client_id="app-1",
    )


async def test_eddsa_token(jwks: JwksServer) -> None:
    okp = OKPKey.generate_key("Ed25519", {"kid": "ed-1"})
    jwks.keys = [okp]
    verifier = JwtVerifier([JwtIssuer(issuer=ISS, jwks_url=jwks.url, audience=AUD)])
    try:
        assert (await verifier.verify(mint(okp, "EdDSA"))).subject == "user-42"
        assert (await verifier.verify(mint(okp, "Ed25519"))).subject == "user-42"
    finally:
        await verifier.close()


async def test_claim_variants(verifier: JwtVerifier, ec_key: ECKey) -> None:
    token = mint(
        ec_key,
        "ES256",
        scope=None,
        scp=[Scope.INFERENCE, Scope.ADMIN],
        client_id=None,
        azp="app-2",
        aud=["other", AUD],
    )
    principal = await verifier.verify(token)
    assert principal.scopes == (Scope.INFERENCE,)  # lattice:admin is never taken from a JWT
    assert principal.client_id == "app-2"
    assert (await verifier.verify(mint(ec_key, "ES256", scope=None))).scopes == ()


async def test_leeway(verifier: JwtVerifier, ec_key: ECKey) -> None:
    now = int(time.time())
    assert await verifier.verify(mint(ec_key, "ES256", exp=now - 5))  # within 30 s of skew
    assert await verifier.verify(mint(ec_key, "ES256", nbf=now + 5))


@pytest.mark.parametrize(
    "overrides",
    [
        {"exp": None},
        {"nbf": int(time.time()) + 3600},
        {"iat": int(time.time()) + 3600},
        {"aud": "someone-else"},
        {"aud": None},
        {"sub": None},
        {"sub": 42},
        {"lattice_workspace": None},
        {"lattice_workspace": "Not A Workspace"},
        {"scope": 7},
    ],
)
async def test_bad_claims(verifier: JwtVerifier, ec_key: ECKey, overrides: dict[str, Any]) -> None:
    await rejected(verifier, mint(ec_key, "ES256", **overrides))


async def test_expired(verifier: JwtVerifier, ec_key: ECKey) -> None:
    err = await rejected(verifier, mint(ec_key, "ES256", exp=int(time.time()) - 120))
    assert err.message == "The access token expired."


async def test_unknown_or_wrong_issuer(verifier: JwtVerifier, jwks: JwksServer) -> None:
    other = ECKey.generate_key("P-256", {"kid": "ec-1"})  # same kid, different key
    await rejected(verifier, mint(other, "ES256", iss="https://evil.test"))
    await rejected(verifier, mint(other, "ES256", iss=None))
    await rejected(verifier, mint(other, "ES256"))  # right iss, wrong key: bad signature
    assert jwks.hits == 1  # the unknown issuer never caused a fetch


async def test_alg_none(verifier: JwtVerifier) -> None:
    await rejected(verifier, raw_token({"alg": "none", "kid": "ec-1"}, claims()))
    await rejected(verifier, raw_token({"alg": "none"}, claims()))


async def test_hs256_with_the_rsa_public_key_as_secret(
    verifier: JwtVerifier, rsa_key: RSAKey
) -> None:
    pem = rsa_key.as_pem(private=False)
    for secret in (pem, pem.strip(), json.dumps(rsa_key.as_dict(private=False)).encode()):
        forged = raw_token(
            {"alg": "HS256", "kid": "rsa-1", "typ": "JWT"},
            claims(),
            lambda data, s=secret: hmac.new(s, data, hashlib.sha256).digest(),
        )
        await rejected(verifier, forged)


async def test_symmetric_keys_in_the_jwks_are_ignored(jwks: JwksServer) -> None:
    oct_key = OctKey.generate_key(256, {"kid": "oct-1"})
    jwks.keys = [oct_key]
    issuer = JwtIssuer(issuer=ISS, jwks_url=jwks.url, audience=AUD, algorithms=("RS256",))
    verifier = JwtVerifier([issuer])
    try:
        forged = raw_token(
            {"alg": "HS256", "kid": "oct-1"},
            claims(),
            lambda data: hmac.new(oct_key.raw_value, data, hashlib.sha256).digest(),
        )
        await rejected(verifier, forged)
    finally:
        await verifier.close()


async def test_algorithm_not_allowed_for_issuer(jwks: JwksServer, ec_key: ECKey) -> None:
    jwks.keys = [ec_key]
    issuer = JwtIssuer(issuer=ISS, jwks_url=jwks.url, audience=AUD, algorithms=("RS256",))
    verifier = JwtVerifier([issuer])
    try:
        await rejected(verifier, mint(ec_key, "ES256"))
    finally:
        await verifier.close()


async def test_algorithm_must_fit_the_key(verifier: JwtVerifier, ec_key: ECKey) -> None:
    # An ES256 token whose header names the RSA key's kid.
    token = jwt.encode({"alg": "ES256", "kid": "rsa-1"}, claims(), ec_key, algorithms=["ES256"])
    await rejected(verifier, token)


@pytest.mark.parametrize(
    "token", ["eyJ", "eyJhbGciOiJFUzI1NiJ9.e30", "eyJ.e30.x", "eyJ" + "A" * 20000]
)
async def test_malformed(verifier: JwtVerifier, token: str) -> None:
    await rejected(verifier, token)


async def test_key_rotation_refetches_once(jwks: JwksServer, ec_key: ECKey) -> None:
    clock = FakeClock()
    jwks.keys = [ec_key]
    verifier = JwtVerifier([JwtIssuer(issuer=ISS, jwks_url=jwks.url, audience=AUD)], clock=clock)
    try:
        await verifier.verify(mint(ec_key, "ES256"))
        assert jwks.hits == 1
        rotated = ECKey.generate_key("P-256", {"kid": "ec-2"})
        jwks.keys = [ec_key, rotated]
        clock.now += 11  # past min_refetch_interval_s
        assert (await verifier.verify(mint(rotated, "ES256"))).subject == "user-42"
        assert jwks.hits == 2
        await verifier.verify(mint(rotated, "ES256"))
        await verifier.verify(mint(ec_key, "ES256"))
        assert jwks.hits == 2  # cached
        clock.now += 301  # past jwks_cache_ttl_s
        await verifier.verify(mint(rotated, "ES256"))
        assert jwks.hits == 3
    finally:
        await verifier.close()


async def test_rotation_within_the_interval_waits(jwks: JwksServer, ec_key: ECKey) -> None:
    clock = FakeClock()
    jwks.keys = [ec_key]
    verifier = JwtVerifier([JwtIssuer(issuer=ISS, jwks_url=jwks.url, audience=AUD)], clock=clock)
    try:
        await verifier.verify(mint(ec_key, "ES256"))
        rotated = ECKey.generate_key("P-256", {"kid": "ec-2"})
        jwks.keys = [ec_key, rotated]
        await rejected(verifier, mint(rotated, "ES256"))  # fetched 0 s ago: no refetch yet
        assert jwks.hits == 1
        clock.now += 10
        assert await verifier.verify(mint(rotated, "ES256"))
        assert jwks.hits == 2
    finally:
        await verifier.close()


async def test_unknown_kid_flood_refetches_at_most_once(jwks: JwksServer, ec_key: ECKey) -> None:
    clock = FakeClock()
    jwks.keys = [ec_key]
    jwks.delay = 0.05  # keep the fetch in flight while the flood arrives
    verifier = JwtVerifier([JwtIssuer(issuer=ISS, jwks_url=jwks.url, audience=AUD)], clock=clock)
    try:
        # A cold cache: 20 concurrent valid tokens share one fetch.
        results = await asyncio.gather(*(verifier.verify(mint(ec_key, "ES256")) for _ in range(20)))
        assert len(results) == 20 and jwks.hits == 1
        clock.now += 11
        forged = [ECKey.generate_key("P-256", {"kid": f"made-up-{i}"}) for i in range(20)]
        outcomes = await asyncio.gather(
            *(verifier.verify(mint(k, "ES256")) for k in forged), return_exceptions=True
        )
        assert all(isinstance(o, AuthenticationFailed) for o in outcomes)
        assert jwks.hits == 2  # one refetch for the whole flood
        for k in forged:
            await rejected(verifier, mint(k, "ES256"))
        assert jwks.hits == 2  # and none more within the interval
    finally:
        await verifier.close()


async def test_jwks_unreachable(ec_key: ECKey) -> None:
    url = f"http://127.0.0.1:{free_port()}/jwks.json"
    verifier = JwtVerifier([JwtIssuer(issuer=ISS, jwks_url=url, audience=AUD)])
    try:
        with pytest.raises(ServiceUnavailable):
            await verifier.verify(mint(ec_key, "ES256"))
    finally:
        await verifier.close()


async def test_jwks_failure_keeps_the_old_keys(jwks: JwksServer, ec_key: ECKey) -> None:
    clock = FakeClock()
    jwks.keys = [ec_key]
    verifier = JwtVerifier([JwtIssuer(issuer=ISS, jwks_url=jwks.url, audience=AUD)], clock=clock)
    try:
        await verifier.verify(mint(ec_key, "ES256"))
        jwks.status = 500  # the issuer is down when the cache expires: keep the old keys
        clock.now += 301
        assert await verifier.verify(mint(ec_key, "ES256"))
        assert jwks.hits == 2
        await verifier.verify(mint(ec_key, "ES256"))
        assert jwks.hits == 2  # and do not hammer the issuer while it is down
        jwks.status = 200
        jwks.keys = []  # the issuer withdrew every key: tokens stop verifying
        clock.now += 10
        await rejected(verifier, mint(ec_key, "ES256"))
        assert jwks.hits == 3
    finally:
        await verifier.close()


async def test_authenticator_routes_jwts(verifier: JwtVerifier, ec_key: ECKey, aredis: Any) -> None:
    auth = Authenticator(ApiKeyStore(aredis), verifier)
    principal = await auth.authenticate(f"Bearer {mint(ec_key, 'ES256')}")
    assert principal.kind == "jwt" and principal.workspace == "acme"
    with pytest.raises(AuthenticationFailed) as info:
        await auth.authenticate_headers({"authorization": "Bearer eyJhbGciOiJub25lIn0.e30."})
    assert info.value.code == "invalid_token"
