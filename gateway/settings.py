"""Gateway settings: one frozen Struct, and the one function that reads the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

from gateway.auth.jwt import JwtIssuer

__all__ = ["Settings", "default_spool_dir", "settings_from_env", "spool_path"]


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    redis_url: str = "redis://127.0.0.1:6379/0"
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    #: Largest request body accepted, in bytes (413 above it).
    max_body_bytes: int = 16 * 1024 * 1024
    #: Seconds a request may take to arrive, from its first byte to the end of its body (408
    #: and the connection closed after it: a client that stalls mid-request holds nothing
    #: for long). Enforced by ``lattice serve``'s protocol (``--http lattice``).
    request_timeout_s: float = 30.0
    #: Seconds between checks of the catalog version (changes visible within 1 s).
    catalog_poll_s: float = 0.25
    #: Default for requests and workspaces that do not say (`drop_params`).
    drop_params: bool = True
    #: OAuth/OIDC issuers whose JWT access tokens are accepted.
    jwt_issuers: tuple[JwtIssuer, ...] = ()
    #: Seed the catalog from the packaged files when Redis holds none.
    seed_catalog: bool = True
    #: Write usage records. Only benchmarks turn this off, to measure what metering costs;
    #: a gateway without metering serves unbilled requests.
    metering: bool = True
    #: Directory of the local usage spool (``billing/spool.py``); empty: the default below.
    spool_dir: str = ""
    #: Tunnel heartbeats: a Ping after this much send-silence; a daemon silent for
    #: ``tunnel_dead_after_s`` is dropped (noticed within that plus two ticks, 14 s by default).
    tunnel_heartbeat_s: float = 5.0
    tunnel_dead_after_s: float = 12.0
    #: A personal runtime's deadline for one dispatch (504 personal_lattice_execution_timeout).
    runtime_timeout_s: float = 120.0
    #: The gateway's URL as its clients reach it (``https://gw.example.com``), for the absolute
    #: URLs it hands out (RFC 8628 ``verification_uri``); empty: taken from each request.
    public_url: str = ""
    #: Addresses of reverse proxies whose ``X-Forwarded-For``/``-Proto`` are believed (comma
    #: separated, CIDRs allowed, ``*`` for any; uvicorn's ``forwarded_allow_ips``). The client
    #: address they give keys the per-address limits (pairing's user-code guessing).
    forwarded_allow_ips: str = "127.0.0.1"
    log_level: str = "info"
    #: Log as JSON lines (one object per line, carrying the request id).
    log_json: bool = True


def default_spool_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/lattice/spool``, else ``~/.local/state/lattice/spool``."""
    env = os.environ if env is None else env
    state = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "lattice" / "spool"


def spool_path(settings: Settings) -> Path:
    return Path(settings.spool_dir) if settings.spool_dir else default_spool_dir()


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def settings_from_env(env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build settings from ``LATTICE_*`` variables; keyword overrides win."""
    env = os.environ if env is None else env
    raw: dict[str, object] = {}
    simple = {
        "LATTICE_REDIS_URL": ("redis_url", str),
        "LATTICE_HOST": ("host", str),
        "LATTICE_PORT": ("port", int),
        "LATTICE_WORKERS": ("workers", int),
        "LATTICE_MAX_BODY_BYTES": ("max_body_bytes", int),
        "LATTICE_REQUEST_TIMEOUT_S": ("request_timeout_s", float),
        "LATTICE_CATALOG_POLL_S": ("catalog_poll_s", float),
        "LATTICE_DROP_PARAMS": ("drop_params", _bool),
        "LATTICE_SEED_CATALOG": ("seed_catalog", _bool),
        "LATTICE_METERING": ("metering", _bool),
        "LATTICE_SPOOL_DIR": ("spool_dir", str),
        "LATTICE_TUNNEL_HEARTBEAT_S": ("tunnel_heartbeat_s", float),
        "LATTICE_TUNNEL_DEAD_AFTER_S": ("tunnel_dead_after_s", float),
        "LATTICE_RUNTIME_TIMEOUT_S": ("runtime_timeout_s", float),
        "LATTICE_PUBLIC_URL": ("public_url", str),
        "LATTICE_FORWARDED_ALLOW_IPS": ("forwarded_allow_ips", str),
        "LATTICE_LOG_LEVEL": ("log_level", str),
        "LATTICE_LOG_JSON": ("log_json", _bool),
    }
    for var, (field, conv) in simple.items():
        if var in env:
            raw[field] = conv(env[var])  # type: ignore[operator]
    if "LATTICE_JWT_ISSUERS" in env:
        raw["jwt_issuers"] = msgspec.json.decode(
            env["LATTICE_JWT_ISSUERS"].encode(), type=tuple[JwtIssuer, ...]
        )
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return msgspec.convert(raw, Settings)
