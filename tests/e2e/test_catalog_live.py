"""The live catalog: operator writes reach every gateway process within a second, task
classes added by catalog write are served without a redeploy, bad writes change nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.e2e.conftest import Stack
from tests.e2e.test_errors import assert_envelope

IMAGE_CLASS = {
    "task_classes": {
        "image-generation": {
            "description": "text to image",
            "input_schema": {
                "type": "object",
                "required": ["prompt"],
                "properties": {
                    "prompt": {"type": "string", "minLength": 1},
                    "size": {"enum": ["256x256", "512x512"]},
                    "n": {"type": "integer", "minimum": 1, "maximum": 4},
                },
            },
            "meter": {"units": ["requests"], "source": "request"},
        }
    }
}


def wait_until(predicate, timeout: float = 1.0) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout}s")


def task_post(stack: Stack, gateway: int, task: str, body: object) -> httpx.Response:
    return httpx.post(
        f"{stack.gateways[gateway]}/v1/tasks/{task}",
        json=body,
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )


def test_new_task_class_everywhere_within_a_second(stack: Stack) -> None:
    assert_envelope(
        task_post(stack, 1, "image-generation", {"prompt": "cat"}), 404, "task_not_found"
    )
    stack.apply_catalog(IMAGE_CLASS)
    for gateway in (0, 1):
        wait_until(
            lambda g=gateway: (
                task_post(stack, g, "image-generation", {"prompt": "cat"}).status_code != 404
            )
        )
    # validated against its JSON Schema: 400 naming the path of the first violation
    err = assert_envelope(
        task_post(stack, 1, "image-generation", {"prompt": "cat", "size": "9x9"}), 400
    )
    assert err["param"] in ("size", "$.size", "/size")
    err = assert_envelope(task_post(stack, 0, "image-generation", {"size": "256x256"}), 400)
    assert "prompt" in err["message"]
    # no capacity serves it yet
    assert_envelope(task_post(stack, 1, "image-generation", {"prompt": "cat"}), 503, "no_capacity")

    # an operator adds a model and an HTTP offering: it is served, and metered by request
    stack.apply_catalog(
        {
            "models": {"lovelace:sim-diffusion": {"task_classes": ["image-generation"]}},
            "offerings": [
                {
                    "id": "images-http",
                    "model": "lovelace:sim-diffusion",
                    "upstream": {
                        "kind": "http",
                        "base_url": stack.upstream.base_url,
                        "path": "/images",
                    },
                    "prices": {"requests": 40_000},
                    "price_per": 1,
                }
            ],
            "default_models": {"image-generation": "lovelace:sim-diffusion"},
        }
    )

    def served() -> bool:
        return task_post(stack, 1, "image-generation", {"prompt": "cat"}).status_code == 200

    wait_until(served)
    out = task_post(stack, 0, "image-generation", {"prompt": "dog", "n": 1}).json()
    assert out["data"][0]["url"] == "sim://image/dog"


def test_alias_path_from_catalog(stack: Stack) -> None:
    stack.apply_catalog(
        {
            "task_classes": {
                "echo-task": {
                    "alias_path": "/v1/echo",
                    "input_schema": {"type": "object"},
                }
            }
        }
    )
    wait_until(
        lambda: (
            httpx.post(
                stack.base_url + "/echo",
                json={},
                headers={"Authorization": f"Bearer {stack.api_key}"},
            ).status_code
            == 503
        )
    )


def test_invalid_write_names_the_field_and_changes_nothing(stack: Stack) -> None:
    before = stack.admin("GET", "/admin/v1/catalog").json()
    resp = stack.admin(
        "POST",
        "/admin/v1/catalog",
        {
            "catalog": {
                "offerings": [
                    {
                        "id": "x",
                        "model": "lovelace:nope",
                        "upstream": {"base_url": "http://127.0.0.1:1/v1"},
                    }
                ]
            }
        },
    )
    err = assert_envelope(resp, 400, "invalid_catalog")
    assert err["param"].startswith("offerings[")
    resp = stack.admin(
        "POST",
        "/admin/v1/catalog",
        {"catalog": {"models": {"lovelace:y": {"task_classes": "chat"}}}},
    )
    err = assert_envelope(resp, 400, "invalid_catalog")
    assert "models" in err["param"]
    assert stack.admin("GET", "/admin/v1/catalog").json()["version"] == before["version"]


def test_alias_reaches_both_processes(stack: Stack) -> None:
    resp = stack.admin(
        "PUT", "/admin/v1/catalog/aliases/gpt-4o-mini", {"target": "lovelace:llama-3.2-3b-instruct"}
    )
    assert resp.status_code == 200, resp.text
    for gateway in (0, 1):
        with stack.client(base_url=stack.gateways[gateway] + "/v1") as client:
            took = wait_until(lambda c=client: "gpt-4o-mini" in [m.id for m in c.models.list()])
            assert took < 1.0
            reply = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
            assert reply.model == "gpt-4o-mini"


def test_upstream_credentials_never_shown(stack: Stack) -> None:
    stack.apply_catalog(
        {
            "offerings": [
                {
                    "id": "secret-off",
                    "model": "lovelace:llama-3.2-3b-instruct",
                    "enabled": False,
                    "upstream": {"base_url": "http://127.0.0.1:1/v1", "api_key": "very-secret"},
                }
            ]
        }
    )
    shown = stack.admin("GET", "/admin/v1/catalog").text
    assert "very-secret" not in shown


def lattice(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "LATTICE_GATEWAY_URL": stack.gateways[1],
        "LATTICE_ADMIN_KEY": stack.admin_key,
    }
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_operator_commands(stack: Stack, tmp_path: Path) -> None:
    shown = lattice(stack, "catalog", "show")
    assert shown.returncode == 0 and "lovelace:llama-3.2-3b-instruct" in shown.stdout
    patch = tmp_path / "audio.toml"
    patch.write_text('[aliases]\n"whisper" = "lovelace:whisper-small"\n')
    applied = lattice(stack, "catalog", "apply", str(patch))
    assert applied.returncode == 0, applied.stderr
    aliased = lattice(stack, "catalog", "alias", "claude-ish", "lovelace:llama-3.2-3b-instruct")
    assert aliased.returncode == 0, aliased.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[[offerings]]\nid = "z"\nmodel = "lovelace:missing"\n')
    failed = lattice(stack, "catalog", "apply", str(bad))
    assert failed.returncode == 1 and "offerings[0]" in failed.stderr

    created = lattice(stack, "keys", "create", "--workspace", "cli-ws")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("sk_")
    listed = lattice(stack, "keys", "list", "--workspace", "cli-ws")
    assert key.split("_")[1] in listed.stdout and key.split("_", 2)[2] not in listed.stdout
    revoked = lattice(stack, "keys", "revoke", key.split("_")[1])
    assert revoked.returncode == 0
    missing = lattice(stack, "keys", "revoke", "ltnope")
    assert missing.returncode == 1
