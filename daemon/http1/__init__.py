"""A lean asyncio HTTP/1.1 client for hot paths: the gateway talking to its upstreams, the
daemon talking to its local backend (it lives under ``daemon/`` because the daemon never
imports ``gateway``, while the gateway may import ``daemon``).

Built on :class:`asyncio.Protocol` and ``httptools.HttpResponseParser`` (llhttp), with:

* a keep-alive pool per (scheme, host, port): LIFO, bounded idle connections per origin;
  a connection goes back to the pool only after its response was received completely and
  did not ask for ``Connection: close``; idle connections the peer closed are dropped;
* ``https`` through an :mod:`ssl` context (``ssl.create_default_context()`` by default);
* streaming bodies with flow control (the transport is paused above ``buffer_limit``
  buffered bytes and resumed below a quarter of it), Content-Length, chunked and
  read-until-close bodies (llhttp decodes the framing);
* one transparent retry when a *reused* idle connection turns out to be dead before any
  byte of the response arrived (the peer closed it while it sat in the pool);
* typed errors: :class:`HttpClientError` and its subclasses.

The request is written with one ``transport.write`` of a pre-joined buffer carrying the
request line, ``Host``, ``Content-Length``, ``Connection: keep-alive`` and the caller's
headers only. ``HEAD`` responses are supported (their connection is not reused);
``Expect: 100-continue`` and upgrades are not.

Modules: :mod:`~daemon.http1.client` (:class:`Http1Client`: the pool and ``request``),
:mod:`~daemon.http1.connection` (one connection: protocol and parser callbacks, body buffer,
flow control), :mod:`~daemon.http1.response` (:class:`Response`: body read whole, as chunks
or as lines), :mod:`~daemon.http1.request` (URL origin and request serialization, pure) and
:mod:`~daemon.http1.errors`.
"""

from daemon.http1.client import Http1Client
from daemon.http1.errors import (
    ConnectError,
    ConnectTimeout,
    HttpClientError,
    ReadTimeout,
    RemoteProtocolError,
)
from daemon.http1.response import Response

__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "Http1Client",
    "HttpClientError",
    "ReadTimeout",
    "RemoteProtocolError",
    "Response",
]
