"""What a request is on the wire: the URL's origin and the serialized request (pure).

:func:`serialize_request` builds one pre-joined buffer (written with a single
``transport.write``) carrying the request line, ``Host``, ``Content-Length``,
``Connection: keep-alive`` and the caller's headers only; the caller's ``Content-Length``,
``Connection`` and ``Transfer-Encoding`` are dropped (the body is always sent whole with its
length), a caller's ``Host`` replaces the URL's, and CR/LF in a header is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

__all__ = ["HeaderInput", "Origin", "serialize_request"]

HeaderInput = Mapping[str, str] | Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]]

_SKIPPED_HEADERS: Final = frozenset((b"content-length", b"connection", b"transfer-encoding"))


class Origin:
    """What a URL means to the pool: origin key, address, Host header and request target."""

    __slots__ = ("host", "host_header", "key", "port", "target", "tls")

    def __init__(self, url: str) -> None:
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL: {url!r}")
        end = len(rest)
        for stop in "/?#":
            at = rest.find(stop)
            if 0 <= at < end:
                end = at
        authority, target = rest[:end], rest[end:].partition("#")[0]
        if not target or target.startswith("?"):
            target = "/" + target
        if "@" in authority:
            raise ValueError("credentials in the URL are not supported")
        self.tls = scheme == "https"
        default_port = 443 if self.tls else 80
        if authority.startswith("["):  # IPv6 literal
            close = authority.find("]")
            if close < 0:
                raise ValueError(f"invalid URL: {url!r}")
            host, port_text = authority[1:close], authority[close + 1 :].removeprefix(":")
        else:
            host, _, port_text = authority.partition(":")
        if not host:
            raise ValueError(f"invalid URL: {url!r}")
        port = int(port_text) if port_text else default_port
        self.host = host
        self.port = port
        self.key = (scheme, host.lower(), port)
        shown = f"[{host}]" if ":" in host else host
        if port != default_port:
            shown = f"{shown}:{port}"
        self.host_header = shown.encode("idna")
        self.target = target.encode("ascii")


def _check(value: bytes) -> bytes:
    if b"\r" in value or b"\n" in value:
        raise ValueError("CR/LF in an HTTP header")
    return value


def serialize_request(
    method: str, origin: Origin, body: bytes, headers: HeaderInput | None
) -> bytes:
    """The whole request (head and body) as one buffer."""
    host = origin.host_header
    parts: list[bytes] = []
    if headers:
        items = headers.items() if isinstance(headers, Mapping) else headers
        for name, value in items:
            bname = name.encode("latin-1") if isinstance(name, str) else name
            bvalue = value.encode("latin-1") if isinstance(value, str) else value
            lname = bname.lower()
            if lname == b"host":
                host = _check(bvalue)
                continue
            if lname in _SKIPPED_HEADERS:
                continue
            parts += (_check(bname), b": ", _check(bvalue), b"\r\n")
    return b"".join(
        (
            method.encode("ascii"),
            b" ",
            origin.target,
            b" HTTP/1.1\r\nHost: ",
            host,
            b"\r\nContent-Length: ",
            str(len(body)).encode("ascii"),
            b"\r\nConnection: keep-alive\r\n",
            *parts,
            b"\r\n",
            body,
        )
    )
