"""The ``lattice`` command line: one entry point for every part of the system."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from billing.cli import add_billing_commands
from billing.payouts_cli import add_payout_commands
from daemon.cli import add_daemon_commands
from gateway.cli.admin_client import AdminError
from gateway.cli.admin_commands import add_admin_commands
from gateway.cli.runtimes_commands import add_runtimes_commands
from gateway.cli.up import add_up_command
from gateway.cli.usage_commands import add_usage_commands

__all__ = ["main"]


def run_serve(args: argparse.Namespace) -> int:
    """Run gateway worker processes under uvicorn (uvloop + httptools; with ``--http
    lattice``, the default, the dispatch routes skip ASGI: gateway/front)."""
    import uvicorn

    from gateway.front.protocol import LatticeHttpProtocol
    from gateway.settings import settings_from_env

    os.environ["LATTICE_HOST"] = args.host
    os.environ["LATTICE_PORT"] = str(args.port)
    if args.redis_url:
        os.environ["LATTICE_REDIS_URL"] = args.redis_url
    uvicorn.run(
        "gateway.app:create_app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http=LatticeHttpProtocol if args.http == "lattice" else "httptools",
        access_log=False,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=30,
        # the tunnel has its own heartbeats (daemon/tunnel): no second ping per WebSocket
        ws_ping_interval=None,
        proxy_headers=True,
        forwarded_allow_ips=settings_from_env().forwarded_allow_ips,
    )
    return 0


def run_bootstrap(args: argparse.Namespace) -> int:
    """Print a new admin key, writing straight to Redis (for a fresh deployment)."""
    import redis.asyncio as aioredis

    from gateway.auth.apikeys import ApiKeyStore

    async def make() -> str:
        client = aioredis.Redis.from_url(args.redis_url or os.environ["LATTICE_REDIS_URL"])
        try:
            key, _ = await ApiKeyStore(client).create_admin_key(name=args.name)
            return key
        finally:
            await client.aclose()

    print(asyncio.run(make()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lattice", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--host", default=os.environ.get("LATTICE_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("LATTICE_PORT", "8080")))
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument(
        "--http",
        choices=("lattice", "httptools"),
        default=os.environ.get("LATTICE_HTTP", "lattice"),
        help="HTTP protocol: 'lattice' serves the dispatch routes without ASGI (default); "
        "'httptools' is plain uvicorn (everything through ASGI)",
    )
    p.add_argument("--redis-url", help="default: $LATTICE_REDIS_URL")
    p.set_defaults(func=run_serve)

    sub.add_parser("sim", help="run the simulated OpenAI-compatible backend (lattice sim -h)")

    p = sub.add_parser("bootstrap", help="create an admin key directly in Redis")
    p.add_argument("--redis-url")
    p.add_argument("--name", default="bootstrap")
    p.set_defaults(func=run_bootstrap)

    add_up_command(sub)
    add_admin_commands(sub)
    add_usage_commands(sub)
    add_billing_commands(sub, extra=[add_payout_commands])
    add_runtimes_commands(sub)
    add_daemon_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim"]:  # the simulator parses its own flags
        from daemon.sim.server import main as sim_main

        return int(sim_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except AdminError as exc:
        where = f" ({exc.param})" if exc.param else ""
        print(f"lattice: {exc.message}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
