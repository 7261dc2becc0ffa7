"""Every bad-input class gets its status and the OpenAI error envelope, never a 500 or a
hang; the SDK raises its typed exception for each status."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import Stack
from tests.openapi_schemas import validate

LLAMA = "lovelace:llama-3.2-3b-instruct"
MSG = [{"role": "user", "content": "x"}]


def post(stack: Stack, path: str, *, key: str | None = None, **kwargs: Any) -> httpx.Response:
    headers = kwargs.pop("headers", {})
    if key is not False:
        headers.setdefault("Authorization", f"Bearer {key or stack.api_key}")
    return httpx.post(stack.base_url + path, headers=headers, timeout=10, **kwargs)


def assert_envelope(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers.get("x-request-id")
    body = resp.json()
    validate("ErrorResponse", body)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if code is not None:
        assert body["error"]["code"] == code
    return dict(body["error"])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": LLAMA}, "messages"),
        ({"model": LLAMA, "messages": "hi"}, "messages"),
        ({"model": LLAMA, "messages": []}, "messages"),
        ({"model": LLAMA, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": LLAMA, "messages": MSG, "temperature": "hot"}, "temperature"),
        ({"model": LLAMA, "messages": MSG, "n": 0}, "n"),
        ({"model": LLAMA, "messages": MSG, "max_tokens": -5}, "max_tokens"),
        ({"model": LLAMA, "messages": MSG, "top_logprobs": 99}, "top_logprobs"),
        ({"model": LLAMA, "messages": MSG, "stream": "yes"}, "stream"),
        ({"model": 42, "messages": MSG}, "model"),
    ],
)
def test_wrong_types_are_400_naming_the_param(
    stack: Stack, body: dict[str, Any], param: str
) -> None:
    err = assert_envelope(post(stack, "/chat/completions", json=body), 400)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


def test_embedding_input_shapes(stack: Stack) -> None:
    for value in (3, [], ["a", 1], [[]]):
        err = assert_envelope(
            post(stack, "/embeddings", json={"model": "lovelace:all-minilm-l6-v2", "input": value}),
            400,
        )
        assert err["param"] == "input"


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe", b'{"a": 1'],
)
def test_malformed_json_is_400(stack: Stack, content: bytes) -> None:
    resp = post(
        stack, "/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    assert_envelope(resp, 400, "invalid_json")


DEEP = 20_000  # far past any JSON decoder's nesting limit, well under the body limit


@pytest.mark.parametrize("path", ["/chat/completions", "/tasks/chat-completion", "/embeddings"])
@pytest.mark.parametrize(
    "content",
    [
        b"[" * DEEP + b"]" * DEEP,
        b'{"model": "x", "messages": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        b'{"a": ' * DEEP + b"1" + b"}" * DEEP,
    ],
    ids=["array", "in-object", "objects"],
)
def test_json_nested_too_deep_is_400(stack: Stack, path: str, content: bytes) -> None:
    # The decoder gives up on such nesting with a RecursionError: still a 400, never a 500.
    resp = post(stack, path, content=content, headers={"content-type": "application/json"})
    assert_envelope(resp, 400, "invalid_json")


@pytest.mark.parametrize("depth", [1_500, DEEP])
def test_jwt_with_a_deeply_nested_header_is_401(stack: Stack, depth: int) -> None:
    import base64

    nested = b'{"a":' * depth + b"1" + b"}" * depth
    header = base64.urlsafe_b64encode(nested).rstrip(b"=").decode()
    assert header.startswith("eyJ")  # the shape of a JWT, so the JWT verifier reads it
    token = f"{header}.eyJzdWIiOiJ4In0.c2ln"
    resp = post(stack, "/chat/completions", key=token, json={"model": LLAMA, "messages": MSG})
    assert_envelope(resp, 401)


def test_wrong_content_type_is_415(stack: Stack) -> None:
    resp = post(
        stack,
        "/chat/completions",
        content=b"model=x",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert_envelope(resp, 415, "unsupported_media_type")


def test_oversized_body_is_413(stack: Stack) -> None:
    big = {"model": LLAMA, "messages": [{"role": "user", "content": "x" * 300_000}]}
    assert_envelope(post(stack, "/chat/completions", json=big), 413, "request_too_large")

    # chunked, without a content-length
    def gen():  # type: ignore[no-untyped-def]
        yield b'{"model": "x", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 10_000
        yield b'"}]}'

    resp = post(
        stack, "/chat/completions", content=gen(), headers={"content-type": "application/json"}
    )
    assert_envelope(resp, 413)


def test_unknown_model_is_404(stack: Stack) -> None:
    err = assert_envelope(
        post(stack, "/chat/completions", json={"model": "gpt-9", "messages": MSG}),
        404,
        "model_not_found",
    )
    assert err["param"] == "model"
    with stack.client() as client, pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MSG)  # type: ignore[arg-type]


def test_model_of_another_task_is_400(stack: Stack) -> None:
    resp = post(stack, "/embeddings", json={"model": LLAMA, "input": "x"})
    assert_envelope(resp, 400, "model_not_supported")


def test_unknown_task_and_url_are_404(stack: Stack) -> None:
    assert_envelope(post(stack, "/tasks/teleportation", json={}), 404, "task_not_found")
    assert_envelope(post(stack, "/nothing/here", json={}), 404, "unknown_url")
    resp = httpx.get(stack.gateways[0] + "/v2/whatever")
    assert_envelope(resp, 404, "unknown_url")


def test_wrong_method_is_405(stack: Stack) -> None:
    resp = httpx.get(
        stack.base_url + "/chat/completions", headers={"Authorization": f"Bearer {stack.api_key}"}
    )
    assert_envelope(resp, 405)


@pytest.mark.parametrize(
    "auth",
    [
        None,
        "Bearer",
        "Basic abc",
        "Bearer sk_nope",
        "Bearer sk_ltaaaaaaaaaaaa_" + "A" * 43,
        "Bearer eyJhbGciOiJub25lIn0.e30.",
    ],
)
def test_bad_credentials_are_401(stack: Stack, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    resp = httpx.post(
        stack.base_url + "/chat/completions",
        json={"model": LLAMA, "messages": MSG},
        headers=headers,
    )
    err = assert_envelope(resp, 401)
    assert "sk_" not in err["message"]


def test_unknown_and_wrong_key_answer_alike(stack: Stack) -> None:
    real_id = stack.api_key.split("_")[1]
    wrong_secret = f"sk_{real_id}_" + "B" * 43
    unknown_id = "sk_ltzzzzzzzzzzzz_" + "B" * 43
    a = post(stack, "/chat/completions", key=wrong_secret, json={}).json()
    b = post(stack, "/chat/completions", key=unknown_id, json={}).json()
    assert a == b


def test_sdk_typed_exceptions(stack: Stack) -> None:
    with stack.client(api_key="sk_bad") as client, pytest.raises(openai.AuthenticationError):
        client.models.list()
    with stack.client() as client, pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=LLAMA,
            messages=[],
        )
    no_scope = stack.new_key("dev", scopes=["lattice:compute:usage:read"])
    with (
        stack.client(api_key=no_scope) as client,
        pytest.raises(openai.PermissionDeniedError) as info,
    ):
        client.chat.completions.create(model=LLAMA, messages=MSG)  # type: ignore[arg-type]
    assert info.value.code == "insufficient_scopes"


def test_admin_api_needs_admin_scope(stack: Stack) -> None:
    resp = httpx.get(
        stack.gateways[0] + "/admin/v1/catalog",
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    assert_envelope(resp, 403, "insufficient_scopes")
    resp = httpx.get(stack.gateways[0] + "/admin/v1/catalog")
    assert_envelope(resp, 401)


def test_bad_idempotency_key_is_400(stack: Stack) -> None:
    resp = post(
        stack,
        "/chat/completions",
        json={"model": LLAMA, "messages": MSG},
        headers={"Idempotency-Key": "x" * 300},
    )
    assert_envelope(resp, 400, "invalid_idempotency_key")
