"""The daemon's configuration directory and its runtime credentials file.

Directory: ``$LATTICE_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/lattice`` (XDG Base Directory
spec: only an absolute ``XDG_CONFIG_HOME`` counts), else ``~/.config/lattice``.

``runtime.json`` holds what pairing produced: ``{"gateway_urls": [...], "runtime_id":
"lat_…", "credential": "lrt_…"}``. The credential is a bearer secret, so the file is created
with mode 0600 (never wider, whatever the umask) in a directory made 0700, and written
atomically (a temporary file in the same directory, fsync, rename, fsync of the directory):
a crash leaves the old file or the new one, never a torn or world-readable one.
:func:`load_credentials` refuses a file that group or others can read, as ssh does.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import msgspec

__all__ = [
    "CREDENTIALS_FILE",
    "ConfigError",
    "RuntimeCredentials",
    "config_dir",
    "credentials_path",
    "gateway_urls",
    "load_credentials",
    "save_credentials",
]

CREDENTIALS_FILE = "runtime.json"


class ConfigError(Exception):
    """The credentials file is missing, unreadable, malformed or too widely readable."""


class RuntimeCredentials(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    gateway_urls: tuple[str, ...]
    runtime_id: str
    credential: str


def config_dir(env: Mapping[str, str] | None = None) -> Path:
    """The daemon's configuration directory (see the module docstring for the order)."""
    env = os.environ if env is None else env
    explicit = env.get("LATTICE_CONFIG_DIR")
    if explicit:
        return Path(explicit)
    xdg = env.get("XDG_CONFIG_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "lattice"
    return Path.home() / ".config" / "lattice"


def credentials_path(directory: Path | None = None) -> Path:
    return (directory or config_dir()) / CREDENTIALS_FILE


def save_credentials(creds: RuntimeCredentials, directory: Path | None = None) -> Path:
    """Write ``runtime.json`` atomically with mode 0600; returns its path."""
    directory = directory or config_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / CREDENTIALS_FILE
    tmp = directory / f".{CREDENTIALS_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask removed
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(creds), indent=2) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    return path


def load_credentials(directory: Path | None = None) -> RuntimeCredentials:
    """Read ``runtime.json``; :class:`ConfigError` if it is missing, malformed, or readable
    by group or others."""
    path = credentials_path(directory)
    try:
        mode = path.stat().st_mode
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path} not found: pair this machine first (lattice daemon pair)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if os.name == "posix" and mode & 0o077:
        raise ConfigError(f"{path} is readable by other users; run: chmod 600 {path}")
    try:
        return msgspec.json.decode(raw, type=RuntimeCredentials)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"{path} is not a valid credentials file: {exc}") from None


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def gateway_urls(
    flags: list[str] | None, paired: tuple[str, ...] = (), env: Mapping[str, str] | None = None
) -> list[str]:
    """The gateways to use: ``--gateway`` flags, else ``$LATTICE_GATEWAY_URL``
    (comma-separated), else those stored at pairing."""
    if flags:
        return list(flags)
    raw = (os.environ if env is None else env).get("LATTICE_GATEWAY_URL", "")
    return [u for u in (part.strip() for part in raw.split(",")) if u] or list(paired)
