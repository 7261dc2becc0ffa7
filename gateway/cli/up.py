"""``lattice up``: a whole working stack on one machine with embedded defaults.

Starts Redis (embedded ``redis-server`` with AOF in the data directory, unless
``LATTICE_REDIS_URL`` names one), an upstream (the simulator, or ``--upstream URL``), wires
the upstream into the catalog as hosted offerings, makes a ``dev`` workspace with an ``sk_``
key and an admin key, starts the gateway, then a daemon paired to the ``dev`` workspace as
the personal runtime ``lattice-up`` (serving a detected local OpenAI-compatible server, else
the simulator), prints how to call both, and stops everything it started on SIGINT/SIGTERM:
the daemon first (SIGTERM: it drains), then the gateway, the simulator and Redis.

Data directory layout: ``credentials.json`` (0600: the dev key, the admin key, the runtime's
id and credential, reused across restarts while they still authenticate), ``redis/``,
``spool/``, and ``daemon/`` — the daemon's config directory (``runtime.json`` in
:mod:`daemon.config`'s format, 0600; ``daemon.toml``, rewritten at every start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis

from catalog.errors import CatalogError
from catalog.loader import load_seed, merge_catalog, seed_offerings
from catalog.model import Catalog, ModelEntry, Offering, Upstream
from daemon.backends import DEFAULT_PORTS
from daemon.config import RuntimeCredentials, save_credentials
from gateway.auth.apikeys import ApiKeyStore
from gateway.auth.principal import DEFAULT_SCOPES, Scope
from gateway.auth.workspaces import WorkspaceStore
from gateway.catalog_store import CatalogStore
from gateway.cli.processes import Child, python_module, wait_http_ok, write_json_atomic
from gateway.errors import AuthenticationFailed
from gateway.redis_server import RedisServer, free_port
from gateway.runtimes.records import RuntimeRecord
from gateway.runtimes.store import RuntimeStore

__all__ = [
    "DEV_KEY_SCOPES",
    "DEV_RUNTIME_NAME",
    "DEV_WORKSPACE",
    "add_up_command",
    "bootstrap",
    "daemon_config_dir",
    "wait_runtime_reachable",
    "write_daemon_toml",
]

DEV_WORKSPACE = "dev"
#: The personal runtime ``lattice up`` pairs its daemon as.
DEV_RUNTIME_NAME = "lattice-up"
#: Scopes of a dev key made by ``lattice up``: the defaults, plus managing the workspace's
#: runtimes and reading its usage, since the workspace is the developer's own. A key kept
#: from an earlier start keeps the scopes it was made with.
DEV_KEY_SCOPES: tuple[str, ...] = (*DEFAULT_SCOPES, Scope.RUNTIME_MANAGE, Scope.USAGE_READ)
#: How long the daemon has to connect its tunnel before ``lattice up`` gives up.
RUNTIME_READY_TIMEOUT_S = 30.0


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


def daemon_config_dir(data_dir: Path) -> Path:
    """The config directory of the daemon ``lattice up`` starts (``lattice daemon run
    --config-dir``)."""
    return data_dir / "daemon"


def write_daemon_toml(directory: Path, gateway_port: int) -> Path:
    """Write ``daemon.toml`` so that ``auto`` detection never probes the gateway's own port.

    The gateway may listen on one of the default ports of local servers (8080 is llama.cpp's);
    a daemon taking the gateway for its backend would send each dispatch back into the
    gateway. The file belongs to ``lattice up`` and is rewritten at every start.
    """
    ports = ", ".join(str(p) for p in DEFAULT_PORTS if p != gateway_port)
    path = directory / "daemon.toml"
    path.write_text(
        "# Written by `lattice up` at every start (edits are lost).\n"
        "# Where `auto` looks for a local OpenAI-compatible server: the default ports,\n"
        f"# leaving out the gateway's own ({gateway_port}).\n"
        f"[backend]\ndetect_ports = [{ports}]\n"
    )
    return path


async def _ensure_runtime(client: aioredis.Redis, creds: dict[str, str]) -> None:
    """Keep the runtime in ``creds`` while its credential authenticates as a ``dev``
    runtime; else create one and redeem its bootstrap token here, as ``lattice daemon pair
    --token`` would through the API."""
    runtimes = RuntimeStore(client)
    current = await runtimes.authenticate(creds.get("runtime_credential", ""))
    if current is not None and current.workspace == DEV_WORKSPACE:
        creds["runtime_id"] = current.id
        return
    created, token = await runtimes.create(DEV_WORKSPACE, DEV_RUNTIME_NAME)
    redeemed = await runtimes.redeem_bootstrap(token)
    if redeemed is None:  # a token minted a moment ago: only a concurrent revoke gets here
        raise RuntimeError(f"could not pair the new runtime {created.id}")
    creds["runtime_id"], creds["runtime_credential"] = redeemed[0].id, redeemed[1]


async def bootstrap(
    redis_url: str,
    data_dir: Path,
    *,
    sim_url: str | None,
    upstream: Catalog | None,
    gateway_url: str | None = None,
) -> dict[str, str]:
    """Catalog offerings for the upstream, the dev workspace, its keys and its personal
    runtime (reused from ``credentials.json`` in the data directory while they stay valid),
    and (given ``gateway_url``) the daemon's ``runtime.json`` naming it.

    Returns the credentials: ``api_key``, ``admin_key``, ``runtime_id``,
    ``runtime_credential``.
    """
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
            creds["api_key"], _ = await apikeys.create(
                DEV_WORKSPACE, name="lattice-up", scopes=DEV_KEY_SCOPES
            )
        try:
            await apikeys.verify(creds.get("admin_key", ""))
        except AuthenticationFailed:
            creds["admin_key"], _ = await apikeys.create_admin_key(name="lattice-up")
        await _ensure_runtime(client, creds)
        write_json_atomic(str(creds_path), creds)
        if gateway_url is None:
            return creds
        save_credentials(
            RuntimeCredentials(
                gateway_urls=(gateway_url,),
                runtime_id=creds["runtime_id"],
                credential=creds["runtime_credential"],
            ),
            daemon_config_dir(data_dir),
        )
        return creds
    finally:
        await client.aclose()


async def wait_runtime_reachable(
    redis_url: str, runtime_id: str, daemon: subprocess.Popen[bytes], within_s: float
) -> RuntimeRecord:
    """The runtime's record once a gateway process holds its tunnel (status ``reachable``:
    the daemon's hello is recorded); :class:`RuntimeError` if the daemon exits first or
    ``within_s`` seconds pass."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        runtimes = RuntimeStore(client)
        deadline = time.monotonic() + within_s
        while True:
            found = await runtimes.get_with_status(DEV_WORKSPACE, runtime_id)
            if found is not None and found[1] == "reachable":
                return found[0]
            if daemon.poll() is not None:
                raise RuntimeError(
                    f"the daemon exited with {daemon.returncode} before runtime {runtime_id}"
                    " connected"
                )
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"runtime {runtime_id} did not connect within {within_s:g}s: the daemon"
                    " could not reach the gateway (see its output above)"
                )
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


def _runtime_line(state: dict[str, Any], record: RuntimeRecord | None) -> str:
    if record is None:
        return (
            f"{state['runtime_id']} (no daemon started; start one with:\n"
            f"             lattice daemon run --config-dir {state['daemon_config_dir']})"
        )
    return f"{state['runtime_id']} (reachable; runs {record.default_model or '-'})"


def _banner(state: dict[str, Any], record: RuntimeRecord | None) -> str:
    base, key, personal = state["base_url"], state["api_key"], state["personal_model"]
    return f"""
Lattice is up.
  base URL : {base}
  API key  : {key}
  admin key: {state["admin_key"]}
             (lattice catalog show --gateway {state["gateway_url"]} --admin-key …)
  redis    : {state["redis_url"]}
  upstream : {state["upstream"]}
  runtime  : {_runtime_line(state, record)}

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
# the same call on your own runtime, through the daemon's tunnel
reply = client.chat.completions.create(
    model="{personal}",
    messages=[{{"role": "user", "content": "Hello"}}],
)
print(reply.choices[0].message.content)
PY

Press Ctrl-C to stop.
"""


def _start_sim(args: argparse.Namespace, children: list[Child]) -> str:
    """Start the simulator upstream; its base URL (``…/v1``) once it answers."""
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
        new_session=True,
    )
    children.append(sim)
    sim_url = f"http://127.0.0.1:{sim_port}/v1"
    wait_http_ok(f"{sim_url}/models", 30, sim.proc)
    return sim_url


def _start_daemon(args: argparse.Namespace, config_dir: Path, gateway_url: str) -> Child:
    return Child(
        "daemon",
        python_module(
            "daemon",
            "run",
            "--config-dir",
            str(config_dir),
            "--gateway",
            gateway_url,
            "--backend",
            args.daemon_backend,
            "--sim-token-delay-ms",
            str(args.sim_token_delay_ms),
        ),
        new_session=True,
    )


def run_up(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir or _default_data_dir()).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # Started in this order, stopped in reverse: the daemon drains before the gateway goes.
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
            upstream_url = sim_url = _start_sim(args, children)
        port = args.port or 8080
        gateway_url = f"http://{args.host}:{port}"
        creds = asyncio.run(
            bootstrap(
                redis_url, data_dir, sim_url=sim_url, upstream=upstream, gateway_url=gateway_url
            )
        )
        daemon_dir = daemon_config_dir(data_dir)
        write_daemon_toml(daemon_dir, port)
        gateway = Child(
            "gateway",
            python_module("gateway.cli.main", "serve", "--host", args.host, "--port", str(port)),
            env={
                "LATTICE_REDIS_URL": redis_url,
                "LATTICE_LOG_JSON": "0",
                "LATTICE_SPOOL_DIR": str(data_dir / "spool"),
            },
            new_session=True,
        )
        children.append(gateway)
        wait_http_ok(f"{gateway_url}/readyz", 60, gateway.proc)
        record = None
        daemon = None
        if not args.no_daemon:
            daemon = _start_daemon(args, daemon_dir, gateway_url)
            children.append(daemon)
            record = asyncio.run(
                wait_runtime_reachable(
                    redis_url, creds["runtime_id"], daemon.proc, RUNTIME_READY_TIMEOUT_S
                )
            )
        state = {
            "base_url": f"{gateway_url}/v1",
            "gateway_url": gateway_url,
            "api_key": creds["api_key"],
            "admin_key": creds["admin_key"],
            "redis_url": redis_url,
            "upstream": upstream_url,
            "workspace": DEV_WORKSPACE,
            "runtime_id": creds["runtime_id"],
            "personal_model": f"lattice:personal:{creds['runtime_id']}",
            "daemon_config_dir": str(daemon_dir),
            "daemon_pid": daemon.pid if daemon is not None else None,
            "data_dir": str(data_dir),
            "pid": os.getpid(),
        }
        if args.state_file:
            write_json_atomic(args.state_file, state)
        print(_banner(state, record), flush=True)
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
    p = sub.add_parser(
        "up", help="start a whole working stack (Redis, simulator, gateway, a paired daemon)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--data-dir", help="where Redis and credentials live")
    p.add_argument("--state-file", help="write base_url, api_key, … here as JSON once ready")
    p.add_argument("--upstream", help="front an existing OpenAI-compatible server (…/v1)")
    p.add_argument("--upstream-key", help="the upstream's API key")
    p.add_argument("--sim-token-delay-ms", type=float, default=20.0)
    p.add_argument(
        "--daemon-backend",
        choices=("auto", "sim", "openai"),
        default="auto",
        help="what the personal runtime serves: auto (a detected local server, else the"
        " simulator), sim, or openai (a detected local server, or fail)",
    )
    p.add_argument(
        "--no-daemon",
        action="store_true",
        help="pair the runtime but do not start its daemon",
    )
    p.set_defaults(func=run_up)
