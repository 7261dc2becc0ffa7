"""Pure parts of the backends: the model map and default-model rule, the advertisement, the
typed errors and the backend spec."""

from __future__ import annotations

import json

import msgspec
import pytest

from daemon.backends import BackendSpec
from daemon.backends.base import Advertisement
from daemon.backends.errors import (
    BackendError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    UnsupportedModel,
)
from daemon.backends.mapping import ModelMap, pick_default

LLAMA = "lovelace:llama-3.2-3b-instruct"


def test_from_pairs() -> None:
    m = ModelMap.from_pairs([f"{LLAMA}=llama3.2:3b", " all-minilm-l6-v2 = all-minilm ", "x=a=b"])
    assert m.to_local(LLAMA) == "llama3.2:3b"
    assert m.to_local("lovelace:all-minilm-l6-v2") == "all-minilm"  # namespace added
    assert m.to_local("lovelace:x") == "a=b"  # the first "=" splits
    assert m.to_local("llama3.2:3b") is None  # local names are not canonical names
    assert ModelMap.from_pairs(m.pairs) == m
    assert len(m) == 3


@pytest.mark.parametrize(
    "pair",
    [
        "no-equals",
        "=local",
        "lovelace:x=",
        "lovelace:x@acme=local",  # a provider pin is not a model
        "lattice:personal:lat_1=local",
        "openai:gpt=local",  # another namespace
    ],
)
def test_bad_pairs(pair: str) -> None:
    with pytest.raises(ValueError):
        ModelMap.from_pairs([pair])


def test_one_canonical_one_local_but_many_canonicals_per_local() -> None:
    with pytest.raises(ValueError):
        ModelMap.from_pairs(["lovelace:a=x", "lovelace:a=y"])
    m = ModelMap.from_pairs(["lovelace:a=x", "lovelace:a=x", "lovelace:b=x"])
    assert m.canonical_names("x") == ("lovelace:a", "lovelace:b")
    assert m.display("x") == "lovelace:a"
    assert m.display("lovelace:b") == "lovelace:b"
    assert m.display("other") == "other"


def test_advertised_only_what_the_backend_has() -> None:
    m = ModelMap.from_pairs([f"{LLAMA}=llama3.2:3b", "lovelace:e=nomic-embed"])
    assert m.advertised(["llama3.2:3b", "mistral"]) == (LLAMA,)  # mistral: unmapped, unsaid
    assert m.advertised() == (LLAMA, "lovelace:e")
    assert m.advertised([]) == ()


def test_merged_prefers_the_other() -> None:
    a = ModelMap({"x": "x", "y": "y"})
    b = ModelMap({"x": "x-q4"})
    assert a.merged(b).to_local("lovelace:x") == "x-q4"
    assert a.merged(b).to_local("lovelace:y") == "y"


def test_default_model_rule() -> None:
    m = ModelMap.from_pairs([f"{LLAMA}=llama3.2:3b"])
    local = ["nomic-embed-text", "mistral", "llama3.2:3b"]
    # configured: canonical or local, advertised canonical when mapped, else local
    assert pick_default(m, LLAMA, local) == LLAMA
    assert pick_default(m, "llama3.2:3b", local) == LLAMA
    assert pick_default(m, "mistral", local) == "mistral"
    assert pick_default(m, "absent", local) is None
    assert pick_default(m, "lovelace:absent", local) is None
    # not configured: the first mapped model, else the first that is not an embedder
    assert pick_default(m, None, local) == LLAMA
    assert pick_default(ModelMap(), None, local) == "mistral"
    assert pick_default(ModelMap(), None, ["nomic-embed-text"]) == "nomic-embed-text"
    assert pick_default(ModelMap(), None, []) is None


def test_servable_models_include_a_local_default() -> None:
    adv = Advertisement(("chat-completion",), (LLAMA,), "mistral", 8)
    assert adv.servable_models == (LLAMA, "mistral")
    assert Advertisement(("chat-completion",), (LLAMA,), LLAMA, 8).servable_models == (LLAMA,)
    assert Advertisement((), (), None, 1).servable_models == ()
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(
            {"task_classes": [], "models": [], "default_model": None, "concurrency": 1, "extra": 1},
            Advertisement,
        )


def test_errors_carry_status_code_and_envelope() -> None:
    assert (BackendUnavailable("x").status, BackendUnavailable("x").code) == (
        502,
        "backend_unavailable",
    )
    assert (BackendTimeout("x").status, BackendTimeout("x").code) == (504, "backend_timeout")
    assert (UnsupportedModel("x").status, UnsupportedModel("x").code) == (404, "model_not_found")
    err = BackendError("boom")
    assert json.loads(err.body) == {
        "error": {"message": "boom", "type": "api_error", "param": None, "code": "backend_error"}
    }


def test_rejected_passes_an_openai_body_through() -> None:
    body = b'{"error":{"message":"slow down","type":"rate_limit_error","param":null,"code":"rl"}}'
    err = BackendRejected.from_reply(429, body)
    assert (err.status, err.code, err.type, err.message) == (
        429,
        "rl",
        "rate_limit_error",
        "slow down",
    )
    assert err.body == body  # byte for byte
    other = BackendRejected.from_reply(422, b"Unprocessable: prompt too long")
    assert other.status == 422 and other.code == "backend_rejected"
    assert json.loads(other.body)["error"]["message"] == (
        "The backend answered 422: Unprocessable: prompt too long"
    )
    assert BackendRejected.from_reply(404, b'{"detail":"Not Found"}').status == 404


def test_spec_decodes_from_config() -> None:
    spec = msgspec.convert(
        {
            "kind": "openai",
            "base_url": "http://127.0.0.1:11434",
            "model_map": [f"{LLAMA}=llama3.2:3b"],
            "task_urls": {"image-generation": "http://127.0.0.1:7860/generate"},
            "concurrency": 16,
        },
        BackendSpec,
    )
    assert spec.kind == "openai" and spec.concurrency == 16 and spec.detect_ports[0] == 11434
    for bad in ({"kind": "magic"}, {"concurrency": 0}, {"unknown": 1}, {"sim_token_delay_ms": -1}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, BackendSpec)
