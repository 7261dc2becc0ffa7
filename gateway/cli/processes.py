"""Starting and stopping the child processes of ``lattice up`` (and the test harness)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import IO

__all__ = ["Child", "python_module", "wait_http_ok", "write_json_atomic"]


def wait_http_ok(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers 2xx; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:  # noqa: S310 - loopback
                if 200 <= resp.status < 300:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout}s ({last})")


class Child:
    """One child process; :meth:`stop` sends SIGTERM, then SIGKILL after a grace period."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        quiet: bool = False,
        log_file: os.PathLike[str] | None = None,
        new_session: bool = False,
    ) -> None:
        """``new_session``: the child gets its own session, so a Ctrl-C in the terminal
        (SIGINT to the whole foreground process group) reaches only the parent, which then
        stops its children in order."""
        self.name = name
        full_env = {**os.environ, **(env or {})}
        out: int | IO[bytes] | None = subprocess.DEVNULL if quiet else None
        if log_file is not None:
            out = open(log_file, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        self._log = out if log_file is not None else None
        self.proc = subprocess.Popen(
            list(args),
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=new_session,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None and not isinstance(self._log, int):
            self._log.close()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def write_json_atomic(path: str, data: object, mode: int = 0o600) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
