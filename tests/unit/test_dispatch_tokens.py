"""Dispatch tokens: minted by :class:`gateway.tunnel.tokens.DispatchSigner` (its key published
in a real Redis), verified by :class:`daemon.tokens.DispatchVerifier` whose fetcher reads the
signer's JWKS. One test per refusal reason; forged tokens come from joserfc or raw ECDSA."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet

from daemon.tokens import (
    REFUSAL_REASONS,
    Claims,
    DispatchRefused,
    DispatchVerifier,
    RefusalReason,
)
from gateway.tunnel.tokens import DISPATCH_TOKEN_TYPE, ISSUER, DispatchSigner

RUNTIME = "lat_0123456789abcdef"
DISPATCH = "dsp_7f3a"
TASK = "chat-completion"
MODEL = "lovelace:llama-3.2-3b-instruct"
TASKS = ("chat-completion", "text-completion")
MODELS = (MODEL, "llama3.2:3b")
NOW = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingFetcher:
    """The signer's JWKS (what ``GET /v1/tunnel/jwks.json`` serves), plus any extra keys a test
    trusts, counting the fetches."""

    def __init__(self, signer: DispatchSigner, extra: list[dict[str, Any]] | None = None) -> None:
        self.signer = signer
        self.extra = extra or []
        self.calls = 0

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        jwks = await self.signer.jwks()
        return {"keys": [*jwks["keys"], *self.extra]}


@pytest.fixture
async def signer(aredis: aioredis.Redis) -> DispatchSigner:
    s = DispatchSigner(aredis, clock=Clock())
    await s.start()
    return s


#: A key the verifier trusts (it is in the JWKS) used to sign claims a real signer never
#: would: this is how the claim checks are tested behind a valid signature.
TRUSTED = ECKey.generate_key("P-256", auto_kid=True)


@pytest.fixture
def fetcher(signer: DispatchSigner) -> CountingFetcher:
    return CountingFetcher(signer, [TRUSTED.as_dict(private=False)])


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(fetcher: CountingFetcher, clock: Clock) -> DispatchVerifier:
    return DispatchVerifier(fetcher, clock=clock, min_refetch_s=5.0)


def mint(signer: DispatchSigner, **overrides: Any) -> str:
    args: dict[str, Any] = {
        "runtime_id": RUNTIME,
        "task": TASK,
        "model": MODEL,
        "dispatch_id": DISPATCH,
        "now": NOW,
    }
    args.update(overrides)
    return signer.mint(**args)


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": RUNTIME,
        "sub": RUNTIME,
        "task": TASK,
        "model": MODEL,
        "dsp": DISPATCH,
        "jti": DISPATCH,
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + 30,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segments(header: dict[str, Any], body: dict[str, Any]) -> str:
    return b64(json.dumps(header).encode()) + "." + b64(json.dumps(body).encode())


def sign(key: ECKey, header: dict[str, Any], payload: bytes) -> str:
    """A JWS compact serialization signed with ES256 by hand (RFC 7515 §7.1, RFC 7518 §3.4),
    so tests can sign headers a JOSE library would refuse to produce."""
    private = key.private_key
    assert private is not None
    signing_input = b64(json.dumps(header).encode()) + "." + b64(payload)
    r, s = decode_dss_signature(private.sign(signing_input.encode(), ec.ECDSA(SHA256())))
    return signing_input + "." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def forge(key: ECKey = TRUSTED, header: dict[str, Any] | None = None, **overrides: Any) -> str:
    head = {"alg": "ES256", "kid": key.kid, "typ": DISPATCH_TOKEN_TYPE, **(header or {})}
    return sign(key, head, json.dumps(claims(**overrides)).encode())


async def verify(v: DispatchVerifier, token: str, **overrides: Any) -> Claims:
    args: dict[str, Any] = {
        "runtime_id": RUNTIME,
        "dispatch_id": DISPATCH,
        "task": TASK,
        "model": MODEL,
        "advertised_tasks": TASKS,
        "advertised_models": MODELS,
    }
    args.update(overrides)
    return await v.verify(token, **args)


async def refused(v: DispatchVerifier, token: str, **overrides: Any) -> RefusalReason:
    with pytest.raises(DispatchRefused) as info:
        await verify(v, token, **overrides)
    return info.value.reason


# -- the happy path ----------------------------------------------------------------------------


async def test_minted_token_verifies(signer: DispatchSigner, verifier: DispatchVerifier) -> None:
    got = await verify(verifier, mint(signer))
    assert got == Claims(
        iss=ISSUER,
        aud=RUNTIME,
        sub=RUNTIME,
        task=TASK,
        model=MODEL,
        dsp=DISPATCH,
        jti=DISPATCH,
        iat=int(NOW),
        nbf=int(NOW),
        exp=int(NOW) + 30,
    )


async def test_minted_token_is_a_standard_es256_jwt(signer: DispatchSigner) -> None:
    """Interop: a generic JOSE library (joserfc) reads what the fast path writes."""
    token = mint(signer)
    keyset = KeySet.import_key_set(await signer.jwks())
    decoded = jwt.decode(token, keyset, algorithms=["ES256"])
    assert decoded.header == {"alg": "ES256", "typ": DISPATCH_TOKEN_TYPE, "kid": signer.kid}
    assert decoded.claims == claims()


async def test_published_jwk_is_public_only(signer: DispatchSigner) -> None:
    (jwk,) = (await signer.jwks())["keys"]
    assert set(jwk) == {"kty", "crv", "x", "y", "kid", "use", "alg"}
    assert (jwk["kty"], jwk["crv"], jwk["use"], jwk["alg"]) == ("EC", "P-256", "sig", "ES256")


async def test_skew_is_tolerated(
    signer: DispatchSigner, verifier: DispatchVerifier, clock: Clock
) -> None:
    token = mint(signer)
    clock.now = NOW + 30 + 4  # 4 s past exp, within the 5 s leeway
    await verify(verifier, token)
    clock.now = NOW - 4  # the gateway's clock is 4 s ahead of ours
    await verify(verifier, token)


def test_signer_refuses_long_lifetimes(aredis: aioredis.Redis) -> None:
    with pytest.raises(ValueError):
        DispatchSigner(aredis, ttl_s=61)
    with pytest.raises(ValueError):
        DispatchSigner(aredis, ttl_s=0)
    assert DispatchSigner(aredis, ttl_s=60).ttl_s == 60


def test_every_reason_has_a_test() -> None:
    tested = {
        name.removeprefix("test_refuses_") for name in globals() if name.startswith("test_refuses_")
    }
    assert tested == set(REFUSAL_REASONS)


# -- one test per refusal reason ---------------------------------------------------------------


async def test_refuses_malformed(verifier: DispatchVerifier, fetcher: CountingFetcher) -> None:
    head = {"alg": "ES256", "kid": TRUSTED.kid}
    for token in [
        "",
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        ".payload.sig",
        "é.b.c",
        "x" * 5000,
        "!!!." + b64(b"{}") + ".sig",  # not base64url
        b64(b"[1,2]") + "." + b64(b"{}") + ".sig",  # header not an object
        # an unknown header field nested past what the decoder follows (RecursionError)
        b64(b'{"alg":"ES256","x":' + b"[" * 1100 + b"]" * 1100 + b"}") + "." + b64(b"{}") + ".s",
        segments({"kid": TRUSTED.kid}, {}) + ".sig",  # no alg
        segments({"alg": "ES256"}, {}) + "." + "A" * 86,  # no kid
    ]:
        assert await refused(verifier, token) == "malformed", token
    # Header parameters we do not implement, or another kind of JWT.
    assert await refused(verifier, forge(header={"crit": ["exp"]})) == "malformed"
    assert await refused(verifier, forge(header={"typ": "JWT"})) == "malformed"
    assert await refused(verifier, forge(header={"typ": "at+jwt"})) == "malformed"
    # Validly signed by a trusted key, but not the claims of a dispatch token.
    assert await refused(verifier, forge(dsp=None)) == "malformed"
    assert await refused(verifier, forge(exp="soon")) == "malformed"
    signed = sign(TRUSTED, head, b"not json")
    assert await refused(verifier, signed) == "malformed"
    assert fetcher.calls == 1  # nothing malformed triggered a refetch


async def test_refuses_bad_algorithm(
    signer: DispatchSigner, verifier: DispatchVerifier, fetcher: CountingFetcher
) -> None:
    body = claims()
    # alg "none": an unsecured JWS (RFC 7515 Appendix A.5) has an empty signature.
    unsecured = segments({"alg": "none", "kid": signer.kid}, body) + "."
    assert await refused(verifier, unsecured) == "bad_algorithm"
    assert await refused(verifier, segments({"alg": "None", "kid": signer.kid}, body) + ".") == (
        "bad_algorithm"
    )
    # The classic confusion: HS256 with the public key (as published) as the HMAC secret.
    public = ECKey.import_key((await signer.jwks())["keys"][0]).public_key
    pem = public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    head = b64(json.dumps({"alg": "HS256", "kid": signer.kid}).encode())
    payload = b64(json.dumps(body).encode())
    mac = hmac.new(pem, f"{head}.{payload}".encode(), hashlib.sha256).digest()
    confused = f"{head}.{payload}.{b64(mac)}"
    assert await refused(verifier, confused) == "bad_algorithm"
    # Other asymmetric algorithms, even with a trusted kid.
    p384 = ECKey.generate_key("P-384", auto_kid=True)
    es384 = jwt.encode({"alg": "ES384", "kid": TRUSTED.kid}, body, p384, algorithms=["ES384"])
    assert await refused(verifier, es384) == "bad_algorithm"
    rs = segments({"alg": "RS256", "kid": signer.kid}, body) + "." + "A" * 342
    assert await refused(verifier, rs) == "bad_algorithm"
    assert fetcher.calls == 0  # refused before any key was looked up


async def test_refuses_unknown_key(
    signer: DispatchSigner, verifier: DispatchVerifier, fetcher: CountingFetcher, clock: Clock
) -> None:
    await verify(verifier, mint(signer))
    assert fetcher.calls == 1
    stranger = ECKey.generate_key("P-256", auto_kid=True)
    token = forge(stranger)
    assert await refused(verifier, token) == "unknown_key"
    assert fetcher.calls == 1  # within min_refetch_s of the first fetch: no refetch
    clock.now += 5
    assert await refused(verifier, token) == "unknown_key"
    assert fetcher.calls == 2  # exactly one refetch once allowed
    assert await refused(verifier, token) == "unknown_key"
    assert fetcher.calls == 2
    # A kid that only looks like a signer's (same thumbprint shape) is still unknown.
    assert await refused(verifier, forge(stranger, header={"kid": "x" * 43})) == "unknown_key"


async def test_refuses_bad_signature(signer: DispatchSigner, verifier: DispatchVerifier) -> None:
    token = mint(signer)
    head, body, sig = token.split(".")
    # Payload changed after signing (another runtime), signature kept.
    other = b64(json.dumps(claims(aud="lat_evil", sub="lat_evil")).encode())
    assert await refused(verifier, f"{head}.{other}.{sig}", runtime_id="lat_evil") == (
        "bad_signature"
    )
    # Signed by another key under the signer's kid.
    assert await refused(verifier, forge(header={"kid": signer.kid})) == "bad_signature"
    # DER instead of JWS's r || s, truncated, not base64url, empty.
    der = ec.generate_private_key(ec.SECP256R1()).sign(
        f"{head}.{body}".encode(), ec.ECDSA(SHA256())
    )
    for bad in [b64(der), sig[:-4], "***", ""]:
        assert await refused(verifier, f"{head}.{body}.{bad}") == "bad_signature", bad
    # A correct r with s replaced: still rejected.
    raw = base64.urlsafe_b64decode(sig + "==")
    flipped = raw[:32] + bytes(32 - 1) + b"\x01"
    assert await refused(verifier, f"{head}.{body}.{b64(flipped)}") == "bad_signature"
    decode_dss_signature(der)  # (the DER above really is a valid DER signature)


async def test_refuses_expired(
    signer: DispatchSigner, verifier: DispatchVerifier, clock: Clock
) -> None:
    token = mint(signer)
    clock.now = NOW + 30 + 5  # exp + leeway: RFC 7519 says "on or after"
    assert await refused(verifier, token) == "expired"
    clock.now = NOW + 3600
    assert await refused(verifier, token) == "expired"


async def test_refuses_not_yet_valid(
    signer: DispatchSigner, verifier: DispatchVerifier, clock: Clock
) -> None:
    assert await refused(verifier, mint(signer, now=NOW + 6)) == "not_yet_valid"
    # nbf in the past but iat in the future (a token that would outlive its 60 s from now).
    future = forge(iat=int(NOW) + 50, nbf=int(NOW), exp=int(NOW) + 100)
    assert await refused(verifier, future) == "not_yet_valid"
    clock.now = NOW + 1
    await verify(verifier, mint(signer, now=NOW + 6))  # within the leeway


async def test_refuses_lifetime_too_long(verifier: DispatchVerifier) -> None:
    assert await refused(verifier, forge(exp=int(NOW) + 61)) == "lifetime_too_long"
    await verify(verifier, forge(exp=int(NOW) + 60))


async def test_refuses_wrong_runtime(signer: DispatchSigner, verifier: DispatchVerifier) -> None:
    token = mint(signer)
    assert await refused(verifier, token, runtime_id="lat_other") == "wrong_runtime"
    assert await refused(verifier, forge(aud="lat_other")) == "wrong_runtime"
    assert await refused(verifier, forge(sub="lat_other")) == "wrong_runtime"
    # RFC 7519 §4.1.3: aud may be an array; ours must be in it.
    await verify(verifier, forge(aud=["lat_x", RUNTIME]))
    assert await refused(verifier, forge(aud=["lat_x"])) == "wrong_runtime"


async def test_refuses_wrong_dispatch(signer: DispatchSigner, verifier: DispatchVerifier) -> None:
    token = mint(signer)
    assert await refused(verifier, token, dispatch_id="dsp_other") == "wrong_dispatch"
    assert await refused(verifier, forge(jti="dsp_other")) == "wrong_dispatch"


async def test_refuses_wrong_task(signer: DispatchSigner, verifier: DispatchVerifier) -> None:
    token = mint(signer)
    assert await refused(verifier, token, task="embedding") == "wrong_task"
    # Even a consistent token and frame for a task this daemon never advertised.
    assert await refused(verifier, token, advertised_tasks=("embedding",)) == "wrong_task"


async def test_refuses_wrong_model(signer: DispatchSigner, verifier: DispatchVerifier) -> None:
    token = mint(signer)
    assert await refused(verifier, token, model="lovelace:other") == "wrong_model"
    assert await refused(verifier, token, advertised_models=("lovelace:other",)) == "wrong_model"
    # A local-only default model (lattice:personal:lat_…) is bound like any other.
    local = mint(signer, model="llama3.2:3b")
    await verify(verifier, local, model="llama3.2:3b")


async def test_refuses_wrong_issuer(verifier: DispatchVerifier) -> None:
    assert await refused(verifier, forge(iss="https://issuer.test")) == "wrong_issuer"


# -- cost (printed, not asserted) --------------------------------------------------------------


async def test_mint_and_verify_cost(
    signer: DispatchSigner, verifier: DispatchVerifier, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 2000
    tokens = []
    started = time.perf_counter()
    for i in range(n):
        tokens.append(mint(signer, dispatch_id=f"dsp_{i}"))
    minted = (time.perf_counter() - started) / n
    await verify(verifier, tokens[0], dispatch_id="dsp_0")
    started = time.perf_counter()
    for i, token in enumerate(tokens):
        await verify(verifier, token, dispatch_id=f"dsp_{i}")
    verified = (time.perf_counter() - started) / n
    with capsys.disabled():
        print(f"\ndispatch token: mint {minted * 1e6:.1f} us, verify {verified * 1e6:.1f} us")
