"""One entry point for the request path: credential headers in, :class:`Principal` out.

The bearer token is dispatched by its shape (ARCHITECTURE.md, step 1): ``sk_…`` is an API key
(:class:`ApiKeyStore`), ``eyJ…`` (base64url of ``{"``) a JWT access token (:class:`JwtVerifier`).
Anything else is answered exactly like an incorrect API key.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.auth.apikeys import INVALID_KEY_MESSAGE, ApiKeyStore
from gateway.auth.jwt import JwtVerifier
from gateway.auth.principal import Principal
from gateway.errors import AuthenticationFailed

__all__ = ["MISSING_KEY_MESSAGE", "Authenticator"]

#: OpenAI's wording for a request without credentials.
MISSING_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive lookup, for plain dicts as well as case-insensitive header maps."""
    value = headers.get(name)
    if value is not None:
        return value
    return next((v for k, v in headers.items() if k.lower() == name), None)


def _bearer(authorization: str) -> str | None:
    """The token of ``Bearer <token>`` (scheme case-insensitive, RFC 6750 §2.1), else ``None``."""
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class Authenticator:
    """Turns the credential a request presented into a :class:`Principal`.

    ``jwt_verifier`` may be ``None`` (or have no issuers): then every JWT gets a 401.
    """

    def __init__(self, apikeys: ApiKeyStore, jwt_verifier: JwtVerifier | None = None) -> None:
        self._apikeys = apikeys
        self._jwt = jwt_verifier

    async def authenticate(self, authorization: str | None) -> Principal:
        """Verify an ``Authorization`` header value (``Bearer <token>``)."""
        token = _bearer(authorization) if authorization else None
        if token is None:
            raise AuthenticationFailed(MISSING_KEY_MESSAGE, code="missing_api_key")
        return await self.authenticate_token(token)

    async def authenticate_headers(self, headers: Mapping[str, str]) -> Principal:
        """Use ``Authorization: Bearer …``, else Anthropic-style ``x-api-key: …``."""
        authorization = _header(headers, "authorization")
        token = _bearer(authorization) if authorization else None
        if token is None:
            api_key = _header(headers, "x-api-key")
            token = api_key.strip() if api_key else None
        if not token:
            raise AuthenticationFailed(MISSING_KEY_MESSAGE, code="missing_api_key")
        return await self.authenticate_token(token)

    async def authenticate_token(self, token: str) -> Principal:
        """Verify a bare token by its shape."""
        if token.startswith("sk_"):
            return await self._apikeys.verify(token)
        if token.startswith("eyJ"):
            if self._jwt is None or not self._jwt.enabled:
                raise AuthenticationFailed("Invalid access token.", code="invalid_token")
            return await self._jwt.verify(token)
        raise AuthenticationFailed(INVALID_KEY_MESSAGE, code="invalid_api_key")
