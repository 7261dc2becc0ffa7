"""``python -m daemon run|pair …``: the daemon's commands (as ``lattice daemon …``) without
importing the gateway, so a daemon starts in a fraction of the time."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from daemon.cli import add_daemon_commands


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon")
    add_daemon_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["daemon", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
