"""The errors the HTTP/1.1 client raises: :class:`HttpClientError` and its subclasses.

::

    HttpClientError
    ├── ConnectError            the TCP (or TLS) connection could not be established
    │   └── ConnectTimeout      ... in time (also a TimeoutError)
    ├── ReadTimeout             the head or the next part of the body did not arrive in time
    └── RemoteProtocolError     malformed response, or the peer closed the connection early
        └── ClosedBeforeResponse  (internal) closed before any byte: retried once if reused
"""

from __future__ import annotations

__all__ = [
    "ClosedBeforeResponse",
    "ConnectError",
    "ConnectTimeout",
    "HttpClientError",
    "ReadTimeout",
    "RemoteProtocolError",
]


class HttpClientError(Exception):
    """Base class of every error this client raises."""


class ConnectError(HttpClientError):
    """The TCP (or TLS) connection could not be established."""


class ConnectTimeout(ConnectError, TimeoutError):
    """Establishing the connection took longer than the connect timeout."""


class ReadTimeout(HttpClientError, TimeoutError):
    """The response (or the next part of its body) did not arrive in time."""


class RemoteProtocolError(HttpClientError):
    """The peer sent a malformed response or closed the connection before it was done."""


class ClosedBeforeResponse(RemoteProtocolError):
    """The connection died before any byte of the response arrived (retryable once when
    the connection came from the pool)."""
