"""The gateway's side of the tunnel: minted dispatch tokens and the JWKS that verifies them
(:mod:`gateway.tunnel.tokens`, :mod:`gateway.tunnel.routes`)."""
