"""A small synchronous client of the admin API for the command line (stdlib only).

The same client talks to the ``/v1`` API with a workspace key: :func:`api_client`.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

__all__ = ["AdminClient", "AdminError", "api_client"]


class AdminError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


class AdminClient:
    def __init__(
        self,
        gateway: str | None,
        admin_key: str | None,
        timeout: float = 30.0,
        *,
        key_env: str = "LATTICE_ADMIN_KEY",
        key_flag: str = "--admin-key",
    ) -> None:
        gateway = gateway or os.environ.get("LATTICE_GATEWAY_URL")
        admin_key = admin_key or os.environ.get(key_env)
        if not gateway:
            raise AdminError(0, "no gateway: pass --gateway URL or set LATTICE_GATEWAY_URL")
        if not admin_key:
            what = key_flag.removeprefix("--").replace("-", " ")
            raise AdminError(0, f"no {what}: pass {key_flag} KEY or set {key_env}")
        self.base = gateway.rstrip("/").removesuffix("/v1")
        self._key = admin_key
        self._timeout = timeout

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(  # noqa: S310 - the operator's own gateway URL
            self.base + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self._key}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=self._timeout) as resp:  # noqa: S310
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                err = json.loads(raw)["error"]
                raise AdminError(
                    exc.code, err.get("message", ""), err.get("param"), err.get("code")
                ) from None
            except (ValueError, KeyError, TypeError):
                raise AdminError(exc.code, raw.decode("utf-8", "replace")[:500]) from None
        except urllib.error.URLError as exc:
            raise AdminError(0, f"cannot reach the gateway at {self.base}: {exc.reason}") from None


def api_client(gateway: str | None, api_key: str | None, timeout: float = 30.0) -> AdminClient:
    """A client of the ``/v1`` API with a workspace key (``--api-key`` / ``LATTICE_API_KEY``)."""
    return AdminClient(gateway, api_key, timeout, key_env="LATTICE_API_KEY", key_flag="--api-key")
