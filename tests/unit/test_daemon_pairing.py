"""The daemon's pairing logic without a gateway: the poll decision (RFC 8628 §3.5), gateway
URLs, the config directory and the credentials file (atomic, mode 0600)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import (
    ConfigError,
    RuntimeCredentials,
    config_dir,
    load_credentials,
    save_credentials,
)
from daemon.pairing import PairingError, normalise_gateway_url, pair, poll_outcome
from gateway.redis_server import free_port

CREDS = RuntimeCredentials(
    gateway_urls=("https://gw.example",), runtime_id="lat_" + "a" * 16, credential="lrt_x"
)


def test_poll_outcomes() -> None:
    assert poll_outcome(400, {"error": "authorization_pending"}, 5).action == "wait"
    assert poll_outcome(400, {"error": "authorization_pending"}, 5).interval == 5
    slow = poll_outcome(400, {"error": "slow_down"}, 5)
    assert (slow.action, slow.interval) == ("wait", 10)
    assert poll_outcome(400, {"error": "slow_down"}, 10).interval == 15
    done = poll_outcome(200, {"access_token": "lrt_a", "runtime_id": "lat_b"}, 5)
    assert (done.action, done.credential, done.runtime_id) == ("done", "lrt_a", "lat_b")
    for error, words in [
        ("access_denied", "denied"),
        ("expired_token", "expired"),
        ("invalid_grant", "does not know"),
    ]:
        outcome = poll_outcome(400, {"error": error}, 5)
        assert outcome.action == "fail" and outcome.message and words in outcome.message
        assert "lattice daemon pair" in outcome.message
    assert poll_outcome(200, {"token_type": "Bearer"}, 5).action == "fail"
    assert poll_outcome(0, None, 5).action == "wait"  # unreachable: keep trying
    assert poll_outcome(503, "oops", 5).action == "wait"
    weird = poll_outcome(400, {"error": "invalid_client", "error_description": "nope"}, 5)
    assert weird.action == "fail" and weird.message == "Pairing failed: invalid_client nope"


def test_gateway_urls() -> None:
    assert normalise_gateway_url("https://gw.example/v1/") == "https://gw.example"
    assert normalise_gateway_url(" http://127.0.0.1:8080 ") == "http://127.0.0.1:8080"
    assert normalise_gateway_url("https://x.example/lattice") == "https://x.example/lattice"
    for bad in ["gw.example", "ftp://gw.example", "https://"]:
        with pytest.raises(PairingError):
            normalise_gateway_url(bad)


def test_pair_needs_a_gateway(tmp_path: Path) -> None:
    with pytest.raises(PairingError, match="gateway"):
        pair([], directory=tmp_path)


def test_unreachable_gateway(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PairingError, match="Cannot reach"):
        pair([url], directory=tmp_path, sleep=lambda s: None)
    with pytest.raises(PairingError, match="Cannot reach"):
        pair([url], token="lbt_x", directory=tmp_path)


def test_config_dir_order(tmp_path: Path) -> None:
    assert config_dir({"LATTICE_CONFIG_DIR": "/a", "XDG_CONFIG_HOME": "/b"}) == Path("/a")
    assert config_dir({"XDG_CONFIG_HOME": "/b"}) == Path("/b/lattice")
    assert config_dir({"XDG_CONFIG_HOME": "relative"}) == Path.home() / ".config" / "lattice"
    assert config_dir({}) == Path.home() / ".config" / "lattice"


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_credentials_file_is_0600_and_atomic(tmp_path: Path, open_umask: None) -> None:
    directory = tmp_path / "new" / "lattice"
    path = save_credentials(CREDS, directory)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert load_credentials(directory) == CREDS
    # Replacing a too-open file leaves a 0600 one, and no temporary file behind.
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_credentials(directory)
    newer = RuntimeCredentials(("https://b.example",), "lat_" + "b" * 16, "lrt_y")
    save_credentials(newer, directory)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_credentials(directory) == newer
    assert sorted(p.name for p in directory.iterdir()) == ["runtime.json"]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_credentials(tmp_path)
    fd = os.open(tmp_path / "runtime.json", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b'{"runtime_id": 3}')
    os.close(fd)
    with pytest.raises(ConfigError, match="not a valid"):
        load_credentials(tmp_path)
