"""``lattice up``: a whole working stack on one machine with embedded defaults.

Starts Redis (embedded ``redis-server`` with AOF in the data directory, unless
``LATTICE_REDIS_URL`` names one), an upstream (the simulator, or ``--upstream URL``), wires
the upstream into the catalog as hosted offerings, makes a ``dev`` workspace with an ``sk_``
key and an admin key, starts the gateway, prints how to call it, and stops everything it
started on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis

from catalog.errors import CatalogError
from catalog.loader import load_seed, merge_catalog, seed_offerings
from catalog.model import Catalog, ModelEntry, Offering, Upstream
from gateway.auth.apikeys import ApiKeyStore
from gateway.auth.workspaces import WorkspaceStore
from gateway.catalog_store import CatalogStore
from gateway.cli.processes import Child, python_module, wait_http_ok, write_json_atomic
from gateway.errors import AuthenticationFailed
from gateway.redis_server import RedisServer, free_port

__all__ = ["add_up_command", "bootstrap"]

DEV_WORKSPACE = "dev"


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "lattice"


def upstream_catalog(base_url: str, api_key: str | None) -> Catalog:
    """Models and offerings for an existing OpenAI-compatible server, under its own names."""
    req = urllib.request.Request(  # noqa: S310 - the user's own upstream
        base_url.rstrip("/") + "/models",
        headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
        listing = json.loads(resp.read())
    models: dict[str, ModelEntry] = {}
    offerings: list[Offering] = []
    for item in listing.get("data", []):
        name = str(item["id"])
        if name.startswith("lattice:"):
            continue
        embed = "embed" in name.lower() or "minilm" in name.lower()
        tasks = ("embedding",) if embed else ("chat-completion", "text-completion")
        models[name] = ModelEntry(
            id=name,
            task_classes=tasks,
            owned_by=str(item.get("owned_by") or "upstream"),
            created=int(item.get("created") or 0),
        )
        offerings.append(
            Offering(
                id=f"upstream-{name}",
                model=name,
                upstream=Upstream(base_url=base_url, kind="openai", api_key=api_key, model=name),
            )
        )
    return Catalog(models=models, offerings=tuple(offerings))


async def bootstrap(
    redis_url: str,
    data_dir: Path,
    *,
    sim_url: str | None,
    upstream: Catalog | None,
) -> dict[str, str]:
    """Catalog offerings for the upstream, the dev workspace and its keys (reused from
    ``credentials.json`` in the data directory while they stay valid)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        store = CatalogStore(client)
        current = await store.get()
        base = current if current.version else load_seed()
        patch = Catalog(offerings=seed_offerings(sim_url)) if sim_url else upstream or Catalog()
        merged = merge_catalog(base, patch)
        # the upstream's own model names win over seed aliases of the same spelling
        aliases = {k: v for k, v in merged.aliases.items() if k not in merged.models}
        await store.apply(msgspec.structs.replace(merged, aliases=aliases))

        workspaces = WorkspaceStore(client)
        apikeys = ApiKeyStore(client)
        await workspaces.create(DEV_WORKSPACE)
        creds_path = data_dir / "credentials.json"
        creds: dict[str, str] = {}
        if creds_path.exists():
            creds = json.loads(creds_path.read_text())
        try:
            await apikeys.verify(creds.get("api_key", ""))
        except AuthenticationFailed:
            creds["api_key"], _ = await apikeys.create(DEV_WORKSPACE, name="lattice-up")
        try:
            await apikeys.verify(creds.get("admin_key", ""))
        except AuthenticationFailed:
            creds["admin_key"], _ = await apikeys.create_admin_key(name="lattice-up")
        write_json_atomic(str(creds_path), creds)
        return creds
    finally:
        await client.aclose()


def _banner(state: dict[str, Any]) -> str:
    base, key = state["base_url"], state["api_key"]
    return f"""
Lattice is up.
  base URL : {base}
  API key  : {key}
  admin key: {state["admin_key"]}
             (lattice catalog show --gateway {state["gateway_url"]} --admin-key …)
  redis    : {state["redis_url"]}
  upstream : {state["upstream"]}

curl {base}/chat/completions \\
  -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
  -d '{{"model": "lovelace:llama-3.2-3b-instruct",
       "messages": [{{"role": "user", "content": "Hello"}}]}}'

python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base}", api_key="{key}")
reply = client.chat.completions.create(
    model="lovelace:llama-3.2-3b-instruct",
    messages=[{{"role": "user", "content": "Hello"}}],
)
print(reply.choices[0].message.content)
PY

Press Ctrl-C to stop.
"""


def run_up(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir or _default_data_dir()).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    children: list[Child] = []
    redis_server: RedisServer | None = None
    try:
        redis_url = os.environ.get("LATTICE_REDIS_URL")
        if not redis_url:
            redis_server = RedisServer(data_dir / "redis")
            redis_server.start()
            redis_url = redis_server.url
        sim_url = None
        upstream = None
        if args.upstream:
            upstream_url = args.upstream.rstrip("/")
            upstream = upstream_catalog(upstream_url, args.upstream_key)
        else:
            sim_port = free_port()
            sim = Child(
                "sim",
                python_module(
                    "gateway.cli.main",
                    "sim",
                    "--port",
                    str(sim_port),
                    "--token-delay-ms",
                    str(args.sim_token_delay_ms),
                ),
                quiet=True,
            )
            children.append(sim)
            upstream_url = sim_url = f"http://127.0.0.1:{sim_port}/v1"
            wait_http_ok(f"{sim_url}/models", 30, sim.proc)
        creds = asyncio.run(bootstrap(redis_url, data_dir, sim_url=sim_url, upstream=upstream))
        port = args.port or 8080
        gateway_url = f"http://{args.host}:{port}"
        gateway = Child(
            "gateway",
            python_module("gateway.cli.main", "serve", "--host", args.host, "--port", str(port)),
            env={
                "LATTICE_REDIS_URL": redis_url,
                "LATTICE_LOG_JSON": "0",
                "LATTICE_SPOOL_DIR": str(data_dir / "spool"),
            },
        )
        children.append(gateway)
        wait_http_ok(f"{gateway_url}/readyz", 60, gateway.proc)
        state = {
            "base_url": f"{gateway_url}/v1",
            "gateway_url": gateway_url,
            "api_key": creds["api_key"],
            "admin_key": creds["admin_key"],
            "redis_url": redis_url,
            "upstream": upstream_url,
            "workspace": DEV_WORKSPACE,
            "data_dir": str(data_dir),
            "pid": os.getpid(),
        }
        if args.state_file:
            write_json_atomic(args.state_file, state)
        print(_banner(state), flush=True)
        while not stop.wait(0.5):
            for child in children:
                if not child.alive():
                    print(f"lattice up: {child.name} exited; stopping", file=sys.stderr)
                    return 1
        return 0
    except (RuntimeError, OSError, CatalogError, ValueError) as exc:
        print(f"lattice up: {exc}", file=sys.stderr)
        return 1
    finally:
        for child in reversed(children):
            child.stop()
        if redis_server is not None:
            redis_server.stop()
        if args.state_file and os.path.exists(args.state_file):
            os.unlink(args.state_file)


def add_up_command(sub: Any) -> None:
    p = sub.add_parser("up", help="start a whole working stack (Redis, simulator, gateway)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--data-dir", help="where Redis and credentials live")
    p.add_argument("--state-file", help="write base_url, api_key, … here as JSON once ready")
    p.add_argument("--upstream", help="front an existing OpenAI-compatible server (…/v1)")
    p.add_argument("--upstream-key", help="the upstream's API key")
    p.add_argument("--sim-token-delay-ms", type=float, default=20.0)
    p.set_defaults(func=run_up)
