"""``lattice daemon run``: dial the gateway's tunnel and serve dispatches from a backend.

Configuration, lowest precedence first: ``daemon.toml`` in the config directory (a
``[backend]`` table with the fields of :class:`daemon.backends.BackendSpec`), then flags.
The credential and gateway URLs come from the pairing (``runtime.json``, ``daemon/config.py``);
``--gateway`` or ``$LATTICE_GATEWAY_URL`` replace the URLs. Example ``daemon.toml``::

    [backend]
    kind = "openai"                       # auto | openai | sim
    base_url = "http://127.0.0.1:11434"   # Ollama
    model_map = ["lovelace:llama-3.2-3b-instruct=llama3.2:3b"]
    default_model = "llama3.2:3b"
    task_urls = { "image-generation" = "http://127.0.0.1:7860/generate" }
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from daemon.backends import BackendSpec, build_backends
from daemon.backends.errors import BackendError
from daemon.config import ConfigError, config_dir, gateway_urls, load_credentials
from daemon.runner import DaemonRunner, RunnerStopped
from daemon.tokens import DispatchVerifier, http_jwks_fetcher, jwks_url_for

__all__ = ["add_run_command", "backend_spec", "loop_factory", "run_daemon"]

CONFIG_FILE = "daemon.toml"


def backend_spec(args: argparse.Namespace, directory: Path) -> BackendSpec:
    """The backend configuration: ``daemon.toml``'s ``[backend]``, then the flags."""
    raw: dict[str, Any] = {}
    path = directory / CONFIG_FILE
    if path.exists():
        try:
            raw = dict(tomllib.loads(path.read_text()).get("backend", {}))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    flags = {
        "kind": args.backend,
        "base_url": args.backend_url,
        "api_key": args.backend_key,
        "default_model": args.default_model,
        "concurrency": args.concurrency,
        "sim_token_delay_ms": args.sim_token_delay_ms,
    }
    raw.update({k: v for k, v in flags.items() if v is not None})
    if args.model_map:
        raw["model_map"] = [*raw.get("model_map", ()), *args.model_map]
    if args.task_url:
        urls = dict(raw.get("task_urls", {}))
        for pair in args.task_url:
            task, sep, url = pair.partition("=")
            if not sep or not task or not url:
                raise ConfigError(f"--task-url wants TASK=URL, got {pair!r}")
            urls[task] = url
        raw["task_urls"] = urls
    try:
        return msgspec.convert(raw, BackendSpec)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"backend configuration: {exc}") from exc


def _without_gateway_ports(spec: BackendSpec, gateways: list[str]) -> BackendSpec:
    """Never take one's own gateway for a local backend: drop the ports of loopback gateway
    URLs from the ports ``auto`` probes (a gateway on 8080 would shadow llama.cpp's)."""
    own = set()
    for url in gateways:
        parts = urlsplit(url)
        if parts.hostname in ("127.0.0.1", "localhost", "::1") and parts.port:
            own.add(parts.port)
    ports = tuple(p for p in spec.detect_ports if p not in own)
    return msgspec.structs.replace(spec, detect_ports=ports) if own else spec


async def _serve(args: argparse.Namespace) -> int:
    directory = Path(args.config_dir) if args.config_dir else config_dir()
    creds = load_credentials(directory)
    gateways = gateway_urls(args.gateway, creds.gateway_urls)
    spec = _without_gateway_ports(backend_spec(args, directory), gateways)
    backend = await build_backends(spec)
    try:
        advert = await backend.describe()
        print(
            f"lattice daemon: runtime {creds.runtime_id} serving {', '.join(advert.models) or '-'}"
            f" (default {advert.default_model or '-'}; tasks {', '.join(advert.task_classes)})",
            flush=True,
        )
        runner = DaemonRunner(
            gateways,
            creds.credential,
            backend,
            lambda base: DispatchVerifier(http_jwks_fetcher(jwks_url_for(base))),
            runtime_id=creds.runtime_id,
        )
        runner.drain_on_signals()
        await runner.run()
        return 0
    except RunnerStopped as exc:
        print(f"lattice daemon: {exc}", file=sys.stderr)
        return 2
    finally:
        await backend.aclose()


def loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``lattice daemon run`` uses: uvloop where it is installed (``auto``; it
    is a dependency except on Windows) — every dispatch crosses the loop several times (tunnel
    frames, the backend's HTTP), and uvloop's is cheaper — else asyncio's own (``None``)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError("--loop uvloop: uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_daemon(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO))
    try:
        with asyncio.Runner(loop_factory=loop_factory(getattr(args, "loop", "auto"))) as runner:
            return runner.run(_serve(args))
    except (ConfigError, BackendError, ValueError) as exc:
        print(f"lattice daemon: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):  # a second signal: stop at once
        return 130


def add_run_command(daemon_sub: Any) -> None:
    p = daemon_sub.add_parser("run", help="connect to the gateway and serve dispatches")
    p.add_argument("--gateway", action="append", help="gateway URL (repeatable)")
    p.add_argument("--config-dir", help="where runtime.json and daemon.toml live")
    p.add_argument("--backend", choices=("auto", "openai", "sim"), help="default: auto")
    p.add_argument("--backend-url", help="a local OpenAI-compatible server (…:11434, …/v1)")
    p.add_argument("--backend-key", help="its API key, if it wants one")
    p.add_argument(
        "--model-map",
        action="append",
        metavar="CANONICAL=LOCAL",
        help="serve a catalog model with a local one (repeatable)",
    )
    p.add_argument(
        "--task-url",
        action="append",
        metavar="TASK=URL",
        help="serve a task class by POSTing to a local HTTP endpoint (repeatable)",
    )
    p.add_argument("--default-model", help="what lattice:personal:lat_<id> runs")
    p.add_argument("--concurrency", type=int, help="dispatches run at once (default 256)")
    p.add_argument("--sim-token-delay-ms", type=float, help="pace the simulator's streams")
    p.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop (default: uvloop where installed)",
    )
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=run_daemon)
