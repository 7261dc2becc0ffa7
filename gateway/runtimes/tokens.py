"""Runtime ids and the two secrets of a runtime: pure functions, no I/O.

Formats (all ASCII, safe in headers, URLs and file names):

- runtime id: ``lat_`` + 16 characters of lower-case base32 (80 random bits), for example
  ``lat_q4xv7mza2kpdh3rt``. Public: it names the runtime in listings and in the model name
  ``lattice:personal:lat_…``;
- runtime credential: ``lrt_<lookup>_<secret>``;
- bootstrap token: ``lbt_<lookup>_<secret>`` (one-time, short-lived; see ``store.py``).

``<lookup>`` is the 16 characters of the runtime id, so verifying either secret costs one read
of the runtime's hash. ``<secret>`` is ``secrets.token_urlsafe(32)`` (256 bits); it may contain
``_`` and ``-``, so a token is split on its first two underscores only. Only
``sha256(secret)`` is stored: the secret is 256 random bits, so a slow KDF would add nothing
but latency (the same reasoning as ``gateway/auth/apikeys.py``).
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

__all__ = [
    "BOOTSTRAP_PREFIX",
    "CREDENTIAL_PREFIX",
    "DUMMY_DIGEST",
    "RUNTIME_ID_RE",
    "digest",
    "mint_secret_token",
    "new_runtime_id",
    "parse_secret_token",
]

CREDENTIAL_PREFIX = "lrt_"
BOOTSTRAP_PREFIX = "lbt_"
RUNTIME_ID_RE = re.compile(r"lat_[a-z2-7]{16}")

_LOOKUP_RE = re.compile(r"[a-z2-7]{16}")
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{43,128}")
_SECRET_BYTES = 32
_MAX_TOKEN_LEN = 200
#: Compared against when the runtime is unknown, so that costs what a wrong secret costs.
DUMMY_DIGEST = hashlib.sha256(b"lattice-dummy-runtime-secret").hexdigest()


def new_runtime_id() -> str:
    """A fresh ``lat_`` id (80 random bits)."""
    return "lat_" + base64.b32encode(secrets.token_bytes(10)).decode().lower()


def digest(secret: str) -> str:
    """Hex sha256 of a secret: what is stored and compared."""
    return hashlib.sha256(secret.encode()).hexdigest()


def mint_secret_token(prefix: str, runtime_id: str) -> tuple[str, str]:
    """A new ``<prefix><lookup>_<secret>`` for ``runtime_id``, and ``digest(secret)``."""
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    return f"{prefix}{runtime_id[4:]}_{secret}", digest(secret)


def parse_secret_token(prefix: str, token: str) -> tuple[str, str] | None:
    """``(runtime_id, secret)`` of a well-formed ``<prefix><lookup>_<secret>``, else ``None``."""
    if len(token) > _MAX_TOKEN_LEN or not token.startswith(prefix):
        return None
    lookup, sep, secret = token[len(prefix) :].partition("_")
    if not sep or not _LOOKUP_RE.fullmatch(lookup) or not _SECRET_RE.fullmatch(secret):
        return None
    return "lat_" + lookup, secret
