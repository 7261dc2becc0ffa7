"""``python -m billing.fake_stripe [--host H] [--port N]``: serve a fake Stripe until Ctrl-C.

Point Lattice at it with ``LATTICE_STRIPE_API_BASE=http://H:N`` (the meter-events base
defaults to the same URL) and any ``LATTICE_STRIPE_API_KEY=sk_test_...``.
"""

from __future__ import annotations

import argparse
import contextlib

from billing.fake_stripe.server import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m billing.fake_stripe",
        description="An in-memory fake of the Stripe endpoints Lattice uses (tests, benchmarks).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.host, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
