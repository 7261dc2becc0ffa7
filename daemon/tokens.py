"""Verifying dispatch tokens: the daemon works only on dispatches the gateway minted for it.

A dispatch token is an ES256 JWT (RFC 7519) signed by one gateway process's key, published
with every live key at ``GET /v1/tunnel/jwks.json`` (see ``gateway/tunnel/tokens.py``)::

    header  {"alg": "ES256", "typ": "lattice-dispatch+jwt", "kid": ...}
    claims  iss "lattice-gateway", aud = sub = runtime id, task, model, dsp = jti = dispatch
            id, iat, nbf, exp (exp - iat <= 60 s)

:meth:`DispatchVerifier.verify` refuses with :class:`DispatchRefused`, whose ``reason`` is
one of :data:`REFUSAL_REASONS`. Checks run in this order, so a token is refused for the
first reason that applies:

1. ``malformed``: not three base64url segments of JSON, an unexpected ``typ`` or a ``crit``
   header (we implement no extension, RFC 7515 §4.1.11), missing or mistyped claims;
2. ``bad_algorithm``: ``alg`` is anything but ES256 — ``none``, and HS256 "keyed" with the
   public key, are refused before any key is looked at (RFC 8725 §2.1, §3.1);
3. ``bad_signature`` when the signature is not 64 bytes of base64url (before any lookup);
4. ``unknown_key``: the ``kid`` is not in the JWKS, even after one refetch (at most one
   refetch per ``min_refetch_s``; concurrent misses share it);
5. ``bad_signature``: the signature does not verify;
6. ``wrong_issuer``, ``lifetime_too_long`` (exp - iat > 60 s), ``expired``,
   ``not_yet_valid`` (nbf or iat in the future), each with :data:`CLOCK_SKEW_S` leeway;
7. ``wrong_runtime`` (aud and sub), ``wrong_dispatch`` (dsp and jti), ``wrong_task`` and
   ``wrong_model`` (the frame's, and among what this daemon advertised).

The signature is checked with ``cryptography`` directly, over the segments as received
(RFC 7515 §5.2): the payload is parsed only once it is known to be the gateway's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Literal, get_args
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.hashes import SHA256
from joserfc.errors import JoseError
from joserfc.jwk import ECKey

__all__ = [
    "CLOCK_SKEW_S",
    "DISPATCH_TOKEN_TYPE",
    "ISSUER",
    "MAX_TOKEN_TTL_S",
    "REFUSAL_REASONS",
    "Claims",
    "DispatchRefused",
    "DispatchVerifier",
    "JwksFetchError",
    "RefusalReason",
    "http_jwks_fetcher",
    "jwks_url_for",
]

log = logging.getLogger(__name__)

ISSUER = "lattice-gateway"
DISPATCH_TOKEN_TYPE = "lattice-dispatch+jwt"  # noqa: S105 (a JWT "typ", not a secret)
MAX_TOKEN_TTL_S = 60
#: Leeway for clocks that disagree between gateway and daemon (RFC 7519 §4.1.4 allows "some
#: small leeway").
CLOCK_SKEW_S = 5.0
#: Anything longer is not a dispatch token.
MAX_TOKEN_BYTES = 4096

RefusalReason = Literal[
    "malformed",
    "bad_algorithm",
    "unknown_key",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "lifetime_too_long",
    "wrong_runtime",
    "wrong_dispatch",
    "wrong_task",
    "wrong_model",
    "wrong_issuer",
]
REFUSAL_REASONS: tuple[RefusalReason, ...] = get_args(RefusalReason)

_ECDSA_SHA256 = ec.ECDSA(SHA256())


class DispatchRefused(Exception):
    """The daemon will not work on this dispatch; ``reason`` says why (never the token)."""

    def __init__(self, reason: RefusalReason) -> None:
        super().__init__(reason)
        self.reason: RefusalReason = reason


class JwksFetchError(Exception):
    """The JWKS could not be fetched or was not a JWK Set."""


class Claims(msgspec.Struct, frozen=True):
    """The verified claims of a dispatch token."""

    iss: str
    aud: str | list[str]
    sub: str
    task: str
    model: str
    dsp: str
    jti: str
    iat: int | float
    nbf: int | float
    exp: int | float


class _Header(msgspec.Struct, frozen=True):
    alg: str
    kid: str | None = None
    typ: str | None = None
    crit: list[str] | None = None


_decode_header = msgspec.json.Decoder(_Header).decode
_decode_claims = msgspec.json.Decoder(Claims).decode


def _b64url_decode(segment: str) -> bytes:
    # RFC 7515 §2: unpadded base64url; reject anything outside its alphabet.
    return base64.b64decode(segment + "=" * (-len(segment) % 4), altchars=b"-_", validate=True)


class DispatchVerifier:
    """Verifies dispatch tokens against the gateway's JWKS, fetched through ``fetch_jwks``
    (first on demand, then again only for an unknown ``kid``, at most once per
    ``min_refetch_s`` on the ``clock``)."""

    def __init__(
        self,
        fetch_jwks: Callable[[], Awaitable[dict[str, Any]]],
        *,
        clock: Callable[[], float] = time.time,
        min_refetch_s: float = 5.0,
        clock_skew_s: float = CLOCK_SKEW_S,
    ) -> None:
        self._fetch = fetch_jwks
        self._clock = clock
        self._min_refetch_s = min_refetch_s
        self._skew = clock_skew_s
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()

    @property
    def kids(self) -> frozenset[str]:
        """The key ids currently trusted."""
        return frozenset(self._keys)

    async def refresh(self) -> None:
        """Fetch the JWKS now (e.g. right after connecting), whatever the rate limit says."""
        async with self._lock:
            await self._refetch()

    async def verify(
        self,
        token: str,
        *,
        runtime_id: str,
        dispatch_id: str,
        task: str,
        model: str,
        advertised_tasks: Collection[str],
        advertised_models: Collection[str],
    ) -> Claims:
        """The claims of ``token`` if it authorises this dispatch, else :class:`DispatchRefused`
        (see the module docstring for the order of the checks)."""
        header_b64, payload_b64, signature_b64 = self._split(token)
        header = self._header(header_b64)
        assert header.kid is not None  # _header refuses tokens without one
        signature = self._signature(signature_b64)
        key = await self._key(header.kid)
        signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
        try:
            key.verify(signature, signing_input, _ECDSA_SHA256)
        except InvalidSignature:
            raise DispatchRefused("bad_signature") from None
        try:
            claims = _decode_claims(_b64url_decode(payload_b64))
        except (binascii.Error, msgspec.DecodeError, RecursionError):
            raise DispatchRefused("malformed") from None
        self._check_issuer_and_lifetime(claims)
        audience = [claims.aud] if isinstance(claims.aud, str) else claims.aud
        if claims.sub != runtime_id or runtime_id not in audience:
            raise DispatchRefused("wrong_runtime")
        if claims.dsp != dispatch_id or claims.jti != dispatch_id:
            raise DispatchRefused("wrong_dispatch")
        if claims.task != task or task not in advertised_tasks:
            raise DispatchRefused("wrong_task")
        if claims.model != model or model not in advertised_models:
            raise DispatchRefused("wrong_model")
        return claims

    # -- steps --------------------------------------------------------------------------------

    @staticmethod
    def _split(token: str) -> tuple[str, str, str]:
        """The three segments of a JWS compact serialization (RFC 7515 §7.1), as received."""
        if len(token) > MAX_TOKEN_BYTES or not token.isascii():
            raise DispatchRefused("malformed")
        parts = token.split(".")
        # An empty signature is left for the algorithm check: that is how "none" looks.
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise DispatchRefused("malformed")
        return parts[0], parts[1], parts[2]

    @staticmethod
    def _signature(segment: str) -> bytes:
        """The DER form of a JWS ES256 signature, which is ``r || s`` (RFC 7518 §3.4)."""
        try:
            raw = _b64url_decode(segment)
        except binascii.Error:
            raise DispatchRefused("bad_signature") from None
        if len(raw) != 64:  # two 32-byte integers for P-256
            raise DispatchRefused("bad_signature")
        return encode_dss_signature(
            int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
        )

    @staticmethod
    def _header(segment: str) -> _Header:
        try:
            header = _decode_header(_b64url_decode(segment))
        except (binascii.Error, msgspec.DecodeError, RecursionError):
            raise DispatchRefused("malformed") from None
        if header.alg != "ES256":
            raise DispatchRefused("bad_algorithm")
        if header.kid is None or header.crit is not None:
            raise DispatchRefused("malformed")
        if header.typ is not None and header.typ != DISPATCH_TOKEN_TYPE:
            raise DispatchRefused("malformed")
        return header

    def _check_issuer_and_lifetime(self, claims: Claims) -> None:
        if claims.iss != ISSUER:
            raise DispatchRefused("wrong_issuer")
        if claims.exp - claims.iat > MAX_TOKEN_TTL_S:
            raise DispatchRefused("lifetime_too_long")
        now = self._clock()
        if now >= claims.exp + self._skew:  # RFC 7519 §4.1.4: not on or after exp
            raise DispatchRefused("expired")
        if now + self._skew < max(claims.nbf, claims.iat):  # RFC 7519 §4.1.5
            raise DispatchRefused("not_yet_valid")

    async def _key(self, kid: str) -> ec.EllipticCurvePublicKey:
        key = self._keys.get(kid)
        if key is not None:
            return key
        async with self._lock:
            key = self._keys.get(kid)  # another verify may have fetched it meanwhile
            if key is None and self._may_refetch():
                await self._refetch()
                key = self._keys.get(kid)
        if key is None:
            raise DispatchRefused("unknown_key")
        return key

    def _may_refetch(self) -> bool:
        fetched = self._fetched_at
        return fetched is None or self._clock() - fetched >= self._min_refetch_s

    async def _refetch(self) -> None:
        """Replace the trusted keys with the JWKS's (a failed fetch keeps the old ones)."""
        self._fetched_at = self._clock()
        try:
            jwks = await self._fetch()
        except JwksFetchError as exc:
            log.warning("dispatch JWKS fetch failed", extra={"error": str(exc)})
            return
        self._keys = _es256_keys(jwks)


def _es256_keys(jwks: dict[str, Any]) -> dict[str, ec.EllipticCurvePublicKey]:
    """The P-256 signing keys of a JWK Set (RFC 7517 §5), by ``kid``; others are skipped."""
    found: dict[str, ec.EllipticCurvePublicKey] = {}
    entries = jwks.get("keys")
    for jwk in entries if isinstance(entries, list) else []:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str):
            continue
        if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", "ES256") != "ES256":
            continue
        public = {k: jwk[k] for k in ("kty", "crv", "x", "y", "kid") if k in jwk}
        try:
            key = ECKey.import_key(public)
        except (JoseError, ValueError):  # incl. binascii.Error, points off the curve
            log.warning("skipping an unusable key in the dispatch JWKS")
            continue
        found[jwk["kid"]] = key.public_key
    return found


#: Where every gateway process serves the dispatch JWKS.
JWKS_PATH = "/v1/tunnel/jwks.json"


def jwks_url_for(gateway_url: str) -> str:
    """The JWKS URL of the gateway behind a tunnel or HTTP URL: ``wss://gw/v1/tunnel`` →
    ``https://gw/v1/tunnel/jwks.json`` (``ws`` → ``http``)."""
    parts = urlsplit(gateway_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not a gateway URL: {gateway_url!r}")
    return urlunsplit((scheme, parts.netloc, JWKS_PATH, "", ""))


def http_jwks_fetcher(
    jwks_url: str, *, timeout_s: float = 5.0
) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A ``fetch_jwks`` for :class:`DispatchVerifier` that GETs ``jwks_url`` (e.g.
    ``https://gateway.example/v1/tunnel/jwks.json``); failures raise :class:`JwksFetchError`.
    Fetches are rare (start, unknown ``kid``), so each uses a short-lived session."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def fetch() -> dict[str, Any]:
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(jwks_url, headers={"accept": "application/json"}) as resp,
            ):
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise JwksFetchError(f"GET {jwks_url}: {type(exc).__name__}") from exc
        if status != 200:
            raise JwksFetchError(f"GET {jwks_url}: HTTP {status}")
        try:
            jwks = msgspec.json.decode(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise JwksFetchError(f"GET {jwks_url}: not JSON") from exc
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
            raise JwksFetchError(f"GET {jwks_url}: not a JWK Set")
        return jwks

    return fetch
