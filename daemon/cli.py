"""``lattice daemon …``: the personal runtime daemon's commands.

``pair`` pairs this machine with a gateway (device flow, or ``--token`` for a one-time
bootstrap token) and stores the credential in the config directory (``daemon/config.py``);
``run`` serves dispatches through the tunnel (``daemon/run_command.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from daemon.config import ConfigError, config_dir, gateway_urls, load_credentials
from daemon.pairing import PairingError, pair
from daemon.run_command import add_run_command

__all__ = ["add_daemon_commands", "run_pair"]


def run_pair(args: argparse.Namespace) -> int:
    directory = Path(args.config_dir) if args.config_dir else config_dir()
    try:
        previous = load_credentials(directory)
    except ConfigError:
        previous = None
    try:
        creds, path = pair(
            gateway_urls(args.gateway), name=args.name, token=args.token, directory=directory
        )
    except PairingError as exc:
        print(f"lattice: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"lattice: cannot store the credentials in {directory}: {exc}", file=sys.stderr)
        return 1
    if previous is not None and previous.runtime_id != creds.runtime_id:
        print(
            f"Replaced the credentials of runtime {previous.runtime_id}; if it is no longer "
            f"used, revoke it: lattice runtimes revoke {previous.runtime_id}"
        )
    print(f"Paired: runtime {creds.runtime_id}. Credentials stored in {path} (mode 0600).")
    return 0


def add_daemon_commands(sub: Any) -> None:
    """Add ``lattice daemon …`` to the top-level subparsers ``sub``."""
    daemon = sub.add_parser("daemon", help="the personal runtime daemon")
    daemon_sub = daemon.add_subparsers(dest="daemon_cmd", required=True)

    p = daemon_sub.add_parser(
        "pair",
        help="pair this machine with a gateway (device code, or --token for a bootstrap token)",
    )
    p.add_argument(
        "--gateway",
        action="append",
        help="gateway URL; repeat for several (default: $LATTICE_GATEWAY_URL, comma-separated)",
    )
    p.add_argument("--name", help="runtime name shown to the owner (default: this host's name)")
    p.add_argument("--token", help="one-time bootstrap token (lbt_…) instead of a device code")
    p.add_argument(
        "--config-dir",
        help="where runtime.json goes (default: $LATTICE_CONFIG_DIR, "
        "$XDG_CONFIG_HOME/lattice or ~/.config/lattice)",
    )
    p.set_defaults(func=run_pair)

    add_run_command(daemon_sub)
