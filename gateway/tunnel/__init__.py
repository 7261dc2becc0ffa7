"""The gateway's side of the tunnel; among its modules, :mod:`gateway.tunnel.tokens` mints
dispatch tokens and :mod:`gateway.tunnel.routes` serves the JWKS that verifies them."""
