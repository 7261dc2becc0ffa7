"""OAuth access tokens: JWTs verified against each trusted issuer's JWKS (RFC 7519, RFC 9068).

:class:`JwtVerifier` picks the :class:`JwtIssuer` by the token's (unverified) ``iss`` claim, finds
the signing key by ``kid`` in that issuer's JWKS (fetched over HTTP with aiohttp and cached), and
lets joserfc check the signature and the registered claims (``iss``, ``aud``, ``exp``, ``nbf``,
``iat``, each within ``leeway_s``). Only asymmetric algorithms are ever accepted: ``none`` and
``HS*`` cannot even be configured, symmetric (``oct``) keys in a JWKS are ignored, and joserfc
checks that the key type fits the algorithm, so a token HMAC-signed with an RSA public key as
the secret (the classic RS/HS confusion) is rejected.

JWKS refresh policy, per issuer:

- the key set is refetched when it is older than ``jwks_cache_ttl_s``;
- a ``kid`` the cached set does not know triggers one refetch (key rotation), but no issuer is
  fetched more than once per ``min_refetch_interval_s``, so a flood of tokens with made-up
  ``kid``\\ s costs the issuer at most one request per interval;
- concurrent requests share one in-flight fetch; a failed refresh keeps the old key set.

Every rejected token raises :class:`AuthenticationFailed` with code ``invalid_token`` and a
message that says nothing about why (except "expired", which clients need in order to refresh;
RFC 6750 §3.1). Only when an issuer's keys could never be fetched at all is the answer
:class:`ServiceUnavailable`: that is the gateway's fault, not the token's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
from joserfc import jwt
from joserfc.errors import ExpiredTokenError, JoseError, SecurityWarning
from joserfc.jwk import JWKRegistry, Key, KeySet
from joserfc.jws import JWSRegistry

from gateway.auth.principal import Principal, Scope
from gateway.auth.workspaces import WORKSPACE_NAME_RE
from gateway.errors import AuthenticationFailed, ServiceUnavailable

__all__ = ["ASYMMETRIC_ALGORITHMS", "JwtIssuer", "JwtVerifier"]

log = logging.getLogger(__name__)

#: Every JWS algorithm an issuer may be configured with: public-key signatures only.
ASYMMETRIC_ALGORITHMS = frozenset(
    {
        *("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),  # RSA
        *("ES256", "ES384", "ES512"),  # EC
        *("EdDSA", "Ed25519", "Ed448"),  # OKP
    }
)
_ASYMMETRIC_KTY = frozenset({"RSA", "EC", "OKP"})
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
_MAX_TOKEN_LEN = 16_384
_MAX_JWKS_BYTES = 512 * 1024


class JwtIssuer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One trusted token issuer (an OAuth authorization server).

    ``workspace_claim`` names the claim holding the Lattice workspace (no fallback to another
    claim: guessing a tenant from a generic claim such as ``org_id`` is an operator decision, so
    set ``workspace_claim="org_id"`` explicitly if that is what the issuer puts there).
    ``scope_claims`` / ``client_id_claims`` are tried in order; a scope claim may be a
    space-separated string (RFC 8693 ``scope``) or a list of strings (``scp``).
    ``lattice:admin`` in a token is dropped unless ``allow_admin_scope``.
    ``jwks_url`` must be https, except on a loopback host.
    """

    issuer: str
    jwks_url: str
    audience: str
    algorithms: tuple[str, ...] = ("ES256", "RS256", "EdDSA", "Ed25519")
    workspace_claim: str = "lattice_workspace"
    scope_claims: tuple[str, ...] = ("scope", "scp")
    client_id_claims: tuple[str, ...] = ("client_id", "azp")
    leeway_s: int = 30
    jwks_cache_ttl_s: float = 300.0
    min_refetch_interval_s: float = 10.0
    allow_admin_scope: bool = False

    def __post_init__(self) -> None:
        bad = [a for a in self.algorithms if a not in ASYMMETRIC_ALGORITHMS]
        if bad or not self.algorithms:
            raise ValueError(f"JWT algorithms must be asymmetric signatures, not {bad}")
        url = urlsplit(self.jwks_url)
        loopback = url.scheme == "http" and url.hostname in _LOOPBACK_HOSTS
        if url.scheme != "https" and not loopback:
            raise ValueError("jwks_url must be an https URL (http only on a loopback host)")


def _invalid(message: str = "Invalid access token.") -> AuthenticationFailed:
    return AuthenticationFailed(message, code="invalid_token")


def _b64json(segment: str) -> dict[str, Any]:
    value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _peek(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a compact JWS, unverified: only to choose issuer and key."""
    parts = token.split(".")
    if len(parts) != 3 or len(token) > _MAX_TOKEN_LEN:
        raise ValueError("not a compact JWS")
    return _b64json(parts[0]), _b64json(parts[1])


def _import_jwks(document: object) -> KeySet:
    """The usable signing keys of a JWKS document; other keys are skipped (RFC 7517 §5)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK Set")
    keys: list[Key] = []
    for data in document["keys"]:
        if not isinstance(data, dict) or data.get("kty") not in _ASYMMETRIC_KTY:
            continue  # never accept a symmetric key from a JWKS
        if data.get("use", "sig") != "sig":
            continue
        try:
            keys.append(JWKRegistry.import_key(data))
        except (JoseError, ValueError, TypeError):
            log.warning("skipping a JWK that does not import (kid=%r)", data.get("kid"))
    return KeySet(keys)


def _find_key(keyset: KeySet | None, kid: str | None, alg: str) -> Key | None:
    if keyset is None:
        return None
    try:
        return keyset.get_by_kid(kid, {"alg": alg, "use": "sig"})
    except JoseError:
        return None


class _IssuerKeys:
    """Mutable JWKS cache state of one issuer."""

    def __init__(self) -> None:
        self.keyset: KeySet | None = None
        self.fetched_at = 0.0
        self.last_attempt: float | None = None
        self.inflight: asyncio.Task[None] | None = None


class JwtVerifier:
    """Verifies bearer JWTs of the configured issuers into :class:`Principal`\\ s.

    Owns an aiohttp session unless one is passed in; call :meth:`close` when done.
    """

    def __init__(
        self,
        issuers: Iterable[JwtIssuer],
        http: aiohttp.ClientSession | None = None,
        *,
        fetch_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._issuers = {i.issuer: i for i in issuers}
        self._keys = {name: _IssuerKeys() for name in self._issuers}
        self._registries = {
            name: JWSRegistry(algorithms=list(i.algorithms), strict_check_header=False)
            for name, i in self._issuers.items()
        }
        self._http = http
        self._owns_http = http is None
        self._timeout = aiohttp.ClientTimeout(total=fetch_timeout_s)
        self._clock = clock

    @property
    def enabled(self) -> bool:
        """Whether any issuer is configured (else every JWT is rejected)."""
        return bool(self._issuers)

    async def close(self) -> None:
        for state in self._keys.values():
            if state.inflight is not None:
                state.inflight.cancel()
        if self._owns_http and self._http is not None:
            await self._http.close()
            self._http = None

    async def verify(self, token: str) -> Principal:
        """The caller behind a bearer JWT, or :class:`AuthenticationFailed`."""
        try:
            header, unverified = _peek(token)
        except (ValueError, RecursionError):
            raise _invalid() from None
        alg, kid, iss = header.get("alg"), header.get("kid"), unverified.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None or not isinstance(alg, str) or alg not in issuer.algorithms:
            raise _invalid()
        if kid is not None and not isinstance(kid, str):
            raise _invalid()
        key = await self._signing_key(issuer, kid, alg)
        claims = self._decode(issuer, token, key, alg)
        return _principal(issuer, claims)

    def _decode(self, issuer: JwtIssuer, token: str, key: Key, alg: str) -> dict[str, Any]:
        claims_registry = jwt.JWTClaimsRegistry(
            leeway=issuer.leeway_s,
            iss={"essential": True, "value": issuer.issuer},
            aud={"essential": True, "value": issuer.audience},
            exp={"essential": True},
            sub={"essential": True},
        )
        try:
            with warnings.catch_warnings():
                if alg == "EdDSA":  # joserfc warns that RFC 9864 deprecates the name
                    warnings.simplefilter("ignore", SecurityWarning)
                decoded = jwt.decode(token, key, registry=self._registries[issuer.issuer])
            claims_registry.validate(decoded.claims)
        except ExpiredTokenError:
            raise _invalid("The access token expired.") from None
        except (JoseError, ValueError, TypeError) as exc:
            log.debug("rejected a JWT of %s: %s", issuer.issuer, type(exc).__name__)
            raise _invalid() from None
        return decoded.claims

    async def _signing_key(self, issuer: JwtIssuer, kid: str | None, alg: str) -> Key:
        state = self._keys[issuer.issuer]
        if state.keyset is None or self._clock() - state.fetched_at >= issuer.jwks_cache_ttl_s:
            await self._refresh(issuer, state)
        if state.keyset is None:
            raise ServiceUnavailable(
                "Access tokens cannot be verified right now.", code="jwks_unavailable"
            )
        key = _find_key(state.keyset, kid, alg)
        if key is None and kid is not None:
            await self._refresh(issuer, state)  # maybe the issuer rotated its keys
            key = _find_key(state.keyset, kid, alg)
        if key is None:
            raise _invalid()
        return key

    async def _refresh(self, issuer: JwtIssuer, state: _IssuerKeys) -> None:
        """Refetch the JWKS unless fetched within the interval; joins a fetch in flight."""
        if state.inflight is None:
            now = self._clock()
            if state.last_attempt is not None and (
                now - state.last_attempt < issuer.min_refetch_interval_s
            ):
                return
            state.last_attempt = now
            state.inflight = asyncio.create_task(self._fetch_into(issuer, state))
        # shield: a caller that goes away must not cancel the fetch others wait on.
        await asyncio.shield(state.inflight)

    async def _fetch_into(self, issuer: JwtIssuer, state: _IssuerKeys) -> None:
        try:
            state.keyset = await self._fetch(issuer.jwks_url)
            state.fetched_at = self._clock()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("JWKS fetch for %s failed: %s", issuer.issuer, type(exc).__name__)
        finally:
            state.inflight = None

    async def _fetch(self, url: str) -> KeySet:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        async with self._http.get(url, timeout=self._timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"JWKS answered HTTP {resp.status}")
            body = await resp.content.read(_MAX_JWKS_BYTES + 1)
        if len(body) > _MAX_JWKS_BYTES:
            raise ValueError("JWKS document too large")
        return _import_jwks(json.loads(body))


def _first(claims: Mapping[str, Any], names: Iterable[str]) -> Any:
    return next((claims[n] for n in names if claims.get(n) is not None), None)


def _principal(issuer: JwtIssuer, claims: Mapping[str, Any]) -> Principal:
    workspace = claims.get(issuer.workspace_claim)
    if not isinstance(workspace, str) or not WORKSPACE_NAME_RE.fullmatch(workspace):
        raise _invalid("The access token is not bound to a workspace.")
    raw_scopes = _first(claims, issuer.scope_claims)
    if raw_scopes is None:
        scopes: tuple[str, ...] = ()
    elif isinstance(raw_scopes, str):
        scopes = tuple(raw_scopes.split())
    elif isinstance(raw_scopes, list) and all(isinstance(s, str) for s in raw_scopes):
        scopes = tuple(raw_scopes)
    else:
        raise _invalid()
    if not issuer.allow_admin_scope:
        scopes = tuple(s for s in scopes if s != Scope.ADMIN)
    client_id = _first(claims, issuer.client_id_claims)
    return Principal(
        workspace=workspace,
        subject=claims["sub"],
        scopes=tuple(dict.fromkeys(scopes)),
        kind="jwt",
        client_id=client_id if isinstance(client_id, str) else None,
    )
