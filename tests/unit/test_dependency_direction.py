"""Dependency direction (STYLE.md §11): ``catalog`` and ``daemon/tunnel`` are leaves,
``billing`` may use ``catalog``, ``daemon`` never imports ``gateway``; only ``billing``
imports ``stripe``; the wire-type modules import no heavy runtime code."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("gateway", "daemon", "catalog", "billing")
ALLOWED = {
    "catalog": set(),
    "billing": {"catalog"},
    "daemon": {"daemon"},
    "gateway": {"gateway", "catalog", "billing", "daemon"},
}


def imports(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PROJECT)
def test_dependency_direction(package: str) -> None:
    allowed = ALLOWED[package] | {package}
    bad = []
    for path in sources(package):
        for name in imports(path):
            top = name.split(".")[0]
            if top in PROJECT and top not in allowed:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def test_tunnel_is_a_leaf() -> None:
    tunnel = ROOT / "daemon" / "tunnel"
    for path in sorted(tunnel.rglob("*.py")) if tunnel.exists() else []:
        for name in imports(path):
            top = name.split(".")[0]
            assert top not in PROJECT or name.startswith("daemon.tunnel"), (path, name)


def test_only_billing_imports_stripe() -> None:
    for package in PROJECT:
        if package == "billing":
            continue
        for path in sources(package):
            assert not any(n.split(".")[0] == "stripe" for n in imports(path)), path


def test_only_stripe_api_imports_stripe() -> None:
    """Within billing and the tests too, stripe-python stays behind billing/stripe_api.py."""
    for path in sources("billing") + sources("tests"):
        if path != ROOT / "billing" / "stripe_api.py":
            assert not any(n.split(".")[0] == "stripe" for n in imports(path)), path


def test_wire_modules_stay_light() -> None:
    heavy = {"litestar", "redis", "aiohttp", "uvicorn", "gateway.runtime", "gateway.dispatch"}
    for path in [ROOT / "gateway/openai/protocol.py", ROOT / "catalog/model.py"]:
        for name in imports(path):
            assert not any(name == h or name.startswith(h + ".") for h in heavy), (path, name)
