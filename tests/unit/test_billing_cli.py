"""``lattice billing …`` argument parsing (billing/cli.py): subcommands, the worker's flags,
and the hook through which other modules add subcommands."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from billing.cli import (
    add_billing_commands,
    build_parser,
    run_reconcile,
    run_status,
    run_worker,
    worker_config,
)
from billing.worker import WorkerConfig


def test_run_flags_make_the_worker_config() -> None:
    args = build_parser().parse_args(
        [
            "billing",
            "run",
            "--window-s",
            "30",
            "--grace-s",
            "2.5",
            "--batch",
            "500",
            "--unit-meters",
            "prompt_tokens, completion_tokens",
        ]
    )
    assert args.func is run_worker
    config = worker_config(args)
    assert isinstance(config, WorkerConfig)
    assert (config.window_s, config.grace_s, config.batch) == (30, 2.5, 500)
    assert config.unit_meters == ("prompt_tokens", "completion_tokens")


def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATTICE_BILLING_WINDOW_S", "120")
    monkeypatch.setenv("LATTICE_BILLING_BATCH", "2000")
    config = worker_config(build_parser().parse_args(["billing", "run"]))
    assert (config.window_s, config.grace_s, config.batch) == (120, 10.0, 2000)


def test_reconcile_and_status() -> None:
    args = build_parser().parse_args(["billing", "reconcile", "--since", "24h", "--json"])
    assert (args.func, args.since, args.json) == (run_reconcile, "24h", True)
    assert build_parser().parse_args(["billing", "status"]).func is run_status
    with pytest.raises(SystemExit):
        build_parser().parse_args(["billing", "reconcile"])  # --since is required


def test_other_modules_register_subcommands_through_extra() -> None:
    def add_payouts(bsub: Any) -> None:
        p = bsub.add_parser("payouts", help="pay providers")
        p.add_argument("--dry-run", action="store_true")
        p.set_defaults(func=lambda args: 7)

    parser = argparse.ArgumentParser(prog="lattice")
    add_billing_commands(parser.add_subparsers(dest="command", required=True), extra=[add_payouts])
    args = parser.parse_args(["billing", "payouts", "--dry-run"])
    assert args.dry_run and args.func(args) == 7
    assert parser.parse_args(["billing", "status"]).func is run_status
