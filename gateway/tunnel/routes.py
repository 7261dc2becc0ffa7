"""The tunnel's HTTP routes: the JWKS that verifies dispatch tokens.

``GET /v1/tunnel/jwks.json`` needs no credential (it holds public keys only, RFC 7517) and
may be cached briefly: a daemon that meets an unknown ``kid`` refetches it, rate-limited.
"""

from __future__ import annotations

from typing import Protocol

import msgspec
from litestar import Response, get
from litestar.handlers import BaseRouteHandler

from gateway.http import json_response
from gateway.tunnel.tokens import DispatchSigner

__all__ = ["JWKS_PATH", "tunnel_routes"]

JWKS_PATH = "/v1/tunnel/jwks.json"
#: Short enough that a new gateway process's key is seen within seconds by any cache.
_CACHE_CONTROL = "public, max-age=5"

_encoder = msgspec.json.Encoder()


class _HasDispatchSigner(Protocol):
    @property
    def dispatch_signer(self) -> DispatchSigner: ...


def tunnel_routes(gw: _HasDispatchSigner) -> list[BaseRouteHandler]:
    @get(JWKS_PATH)
    async def jwks() -> Response[bytes]:
        body = _encoder.encode(await gw.dispatch_signer.jwks())
        return json_response(body, headers={"cache-control": _CACHE_CONTROL})

    return [jwks]
