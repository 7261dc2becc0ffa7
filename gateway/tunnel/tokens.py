"""Minted dispatch tokens: short-lived ES256 JWTs that bind one dispatch to one runtime.

Every gateway process generates its own P-256 key when it starts; the private key never
leaves the process. The public key is published as a JWK in Redis (``keys.DISPATCH_JWKS``,
a sorted set scored by expiry on the Redis server's clock) and served by every process at
``GET /v1/tunnel/jwks.json``, so a daemon verifies a token whichever process minted it.

A token (RFC 7519) carries::

    header  {"alg": "ES256", "typ": "lattice-dispatch+jwt", "kid": <RFC 7638 thumbprint>}
    claims  iss "lattice-gateway", aud = sub = runtime id, task, model (canonical id),
            dsp = jti = dispatch id, iat = nbf, exp = iat + ttl (ttl <= 60 s)

The explicit ``typ`` follows RFC 8725 §3.11 (a dispatch token is never mistaken for another
kind of JWT). :meth:`DispatchSigner.mint` is on the request path, so it does not go through a
generic JOSE library: the header segment is encoded once, the claims are one msgspec encode,
and the signature is one ECDSA call turned into JWS's fixed-width ``r || s`` (RFC 7518 §3.4).
:mod:`daemon.tokens` verifies; the tests check the tokens also decode with joserfc.

Key lifetime: a refresh keeps the key live for ``DISPATCH_JWK_GRACE_S + ttl_s`` seconds, and
the owner refreshes every ~10 s, so a key stays published at least ``ttl_s`` past the last
token it could have signed even if refreshes stall for close to a minute.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.resources
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.hashes import SHA256
from joserfc.jwk import ECKey
from redis.exceptions import RedisError

from gateway import keys

__all__ = [
    "DISPATCH_TOKEN_TYPE",
    "ISSUER",
    "MAX_TOKEN_TTL_S",
    "DispatchSigner",
]

log = logging.getLogger(__name__)

ISSUER = "lattice-gateway"
#: The ``typ`` header of a dispatch token (RFC 8725 §3.11 explicit typing).
DISPATCH_TOKEN_TYPE = "lattice-dispatch+jwt"  # noqa: S105 (a JWT "typ", not a secret)
#: No dispatch token lives longer than this (the daemon refuses longer ones).
MAX_TOKEN_TTL_S = 60

_PUBLISH_LUA = importlib.resources.files("gateway.tunnel").joinpath("jwk_publish.lua").read_text()
_LIVE_LUA = importlib.resources.files("gateway.tunnel").joinpath("jwks_live.lua").read_text()
_ECDSA_SHA256 = ec.ECDSA(SHA256())
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(dict[str, Any]).decode


class _Claims(msgspec.Struct, frozen=True):
    """The claims of a dispatch token, in the order they are written (see module docstring);
    :class:`daemon.tokens.Claims` reads the same shape."""

    iss: str
    aud: str
    sub: str
    task: str
    model: str
    dsp: str
    jti: str
    iat: int
    nbf: int
    exp: int


def _b64url(data: bytes) -> bytes:
    # RFC 7515 §2: base64url without padding.
    return base64.urlsafe_b64encode(data).rstrip(b"=")


class DispatchSigner:
    """Mints dispatch tokens with this process's own key and publishes its public half.

    Call :meth:`start` once (publishes), then :meth:`refresh` every ~10 s (or run
    :meth:`run`); :meth:`mint` is synchronous and needs no I/O.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        ttl_s: int = 30,
        key_ttl_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < ttl_s <= MAX_TOKEN_TTL_S:
            raise ValueError(f"dispatch tokens live 1..{MAX_TOKEN_TTL_S} s, not {ttl_s}")
        self._redis = redis
        self.ttl_s = ttl_s
        #: How long one refresh keeps the public key published (a shorter value is for tests).
        self.key_ttl_s = (
            float(keys.DISPATCH_JWK_GRACE_S + ttl_s) if key_ttl_s is None else key_ttl_s
        )
        self._clock = clock
        key = ECKey.generate_key("P-256", auto_kid=True)
        private = key.private_key
        assert private is not None and key.kid is not None  # generated keys have both
        self._private: ec.EllipticCurvePrivateKey = private
        self.kid: str = key.kid
        #: This process's public key as a JWK (RFC 7517), marked for ES256 signatures only.
        self.public_jwk: dict[str, Any] = {
            **key.as_dict(private=False),
            "use": "sig",
            "alg": "ES256",
        }
        self._member = _encode(self.public_jwk)
        header = {"alg": "ES256", "typ": DISPATCH_TOKEN_TYPE, "kid": self.kid}
        self._header_segment = _b64url(_encode(header)) + b"."
        self._publish = redis.register_script(_PUBLISH_LUA)
        self._live = redis.register_script(_LIVE_LUA)

    # -- minting (request path, no I/O) -------------------------------------------------------

    def mint(
        self,
        *,
        runtime_id: str,
        task: str,
        model: str,
        dispatch_id: str,
        now: float | None = None,
    ) -> str:
        """A token for one dispatch to ``runtime_id``, valid for ``ttl_s`` from ``now``."""
        iat = int(self._clock() if now is None else now)
        claims = _Claims(
            iss=ISSUER,
            aud=runtime_id,
            sub=runtime_id,
            task=task,
            model=model,
            dsp=dispatch_id,
            jti=dispatch_id,
            iat=iat,
            nbf=iat,
            exp=iat + self.ttl_s,
        )
        signing_input = self._header_segment + _b64url(_encode(claims))
        r, s = decode_dss_signature(self._private.sign(signing_input, _ECDSA_SHA256))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return (signing_input + b"." + _b64url(signature)).decode("ascii")

    # -- publishing ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Publish this process's public key (before the first token is minted)."""
        await self.refresh()

    async def refresh(self) -> None:
        """Keep the public key published for another ``key_ttl_s`` (call every ~10 s); also
        prunes expired keys of processes that are gone."""
        await self._publish(
            keys=[keys.DISPATCH_JWKS], args=[self._member, int(self.key_ttl_s * 1000)]
        )

    run_once = refresh

    async def run(self, interval_s: float = 10.0) -> None:
        """Refresh forever (until cancelled); a failed refresh is logged and retried."""
        while True:
            try:
                await self.refresh()
            except (RedisError, OSError) as exc:
                log.warning("dispatch key refresh failed", extra={"error": str(exc)})
            await asyncio.sleep(interval_s)

    async def jwks(self) -> dict[str, list[dict[str, Any]]]:
        """``{"keys": [...]}``: every live public key in Redis, this process's own always
        included (so a daemon whose tunnel this process holds verifies even if Redis is
        briefly unreachable)."""
        try:
            members: list[bytes] = await self._live(keys=[keys.DISPATCH_JWKS])
        except (RedisError, OSError) as exc:
            log.warning("dispatch JWKS read failed; serving own key", extra={"error": str(exc)})
            members = []
        found: dict[str, dict[str, Any]] = {}
        for member in members:
            try:
                jwk = _decode(member)
            except (msgspec.DecodeError, RecursionError):
                continue  # not written by a signer: never served
            kid = jwk.get("kid")
            if isinstance(kid, str):
                found[kid] = jwk
        found.setdefault(self.kid, self.public_jwk)
        return {"keys": list(found.values())}
