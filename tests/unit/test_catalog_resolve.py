"""Model resolution (catalog/resolve.py): defaults, aliases, pins, mismatches, ordering."""

from __future__ import annotations

import pytest

from catalog.errors import ModelTaskMismatch, NoDefaultModel, UnknownModel, UnknownTask
from catalog.loader import catalog_from_dict, load_seed, merge_catalog, seed_offerings
from catalog.model import Catalog, ModelEntry, Offering
from catalog.resolve import effective_params, resolve_model

LLAMA = "lovelace:llama-3.2-3b-instruct"
MINILM = "lovelace:all-minilm-l6-v2"
CHAT = "chat-completion"


@pytest.fixture(scope="module")
def cat() -> Catalog:
    seed = load_seed()
    hosted = seed_offerings("http://127.0.0.1:1/v1")
    extra = catalog_from_dict(
        {
            "offerings": [
                # cheaper than hosted, same priority: comes first
                {"id": "cheap", "model": LLAMA, "provider": "acme",
                 "prices": {"prompt_tokens": 1, "completion_tokens": 1}},
                # priority beats price
                {"id": "preferred", "model": LLAMA, "provider": "acme", "priority": 10,
                 "prices": {"prompt_tokens": 10**6, "completion_tokens": 10**6}},
                {"id": "off", "model": LLAMA, "enabled": False},
                {"id": "chat-only", "model": LLAMA, "task_classes": [CHAT], "provider": "solo"},
            ],
            "aliases": {"llama": "llama-3.2-3b-instruct", "llama-acme": f"{LLAMA}@acme"},
        }
    )  # fmt: skip
    return merge_catalog(merge_catalog(seed, Catalog(offerings=hosted)), extra)


def ids(offerings: tuple[Offering, ...]) -> list[str]:
    return [o.id for o in offerings]


def test_canonical_model(cat: Catalog) -> None:
    r = resolve_model(cat, LLAMA, CHAT, None)
    assert r.model.id == LLAMA
    assert r.requested == LLAMA
    assert r.provider is None
    assert r.task.name == CHAT
    # priority first, then price: chat-only is free, cheap costs less than hosted
    assert ids(r.offerings) == ["preferred", "chat-only", "cheap", "hosted-llama-3.2-3b-instruct"]


def test_offering_task_subset(cat: Catalog) -> None:
    r = resolve_model(cat, LLAMA, "text-completion", None)
    assert ids(r.offerings) == ["preferred", "cheap", "hosted-llama-3.2-3b-instruct"]


@pytest.mark.parametrize("requested", [None, "", "default"])
def test_default_model(cat: Catalog, requested: str | None) -> None:
    r = resolve_model(cat, requested, "embedding", None)
    assert r.model.id == MINILM
    assert r.requested == MINILM


def test_workspace_default_wins(cat: Catalog) -> None:
    r = resolve_model(cat, None, CHAT, "llama@acme")
    assert (r.model.id, r.requested, r.provider) == (LLAMA, "llama@acme", "acme")


@pytest.mark.parametrize("workspace_default", [MINILM, "lovelace:gone"])
def test_workspace_default_not_serving_the_task_falls_back(
    cat: Catalog, workspace_default: str
) -> None:
    r = resolve_model(cat, "default", CHAT, workspace_default)
    assert (r.model.id, r.requested) == (LLAMA, LLAMA)


def test_no_default(cat: Catalog) -> None:
    with pytest.raises(NoDefaultModel) as info:
        resolve_model(cat, None, "audio-transcription", None)
    assert isinstance(info.value, UnknownModel)
    assert info.value.task == "audio-transcription"


def test_aliases_chain_and_echo_the_request(cat: Catalog) -> None:
    r = resolve_model(cat, "llama", CHAT, None)
    assert (r.model.id, r.requested, r.provider) == (LLAMA, "llama", None)


def test_pin(cat: Catalog) -> None:
    r = resolve_model(cat, f"{LLAMA}@acme", CHAT, None)
    assert r.provider == "acme"
    assert ids(r.offerings) == ["preferred", "cheap"]
    nobody = resolve_model(cat, f"{LLAMA}@nobody", CHAT, None)
    assert nobody.offerings == ()


def test_pinned_alias_and_caller_pin_wins(cat: Catalog) -> None:
    assert resolve_model(cat, "llama-acme", CHAT, None).provider == "acme"
    assert resolve_model(cat, "llama-acme@solo", CHAT, None).provider == "solo"
    assert resolve_model(cat, "llama@hosted", CHAT, None).provider == "hosted"


@pytest.mark.parametrize(
    "name", ["lovelace:nope", "nope", f"{LLAMA}@", "@acme", "lattice:personal:lat_123", "lattice:x"]
)
def test_unknown_model(cat: Catalog, name: str) -> None:
    with pytest.raises(UnknownModel) as info:
        resolve_model(cat, name, CHAT, None)
    assert info.value.name == name
    assert name in info.value.message


def test_model_task_mismatch(cat: Catalog) -> None:
    with pytest.raises(ModelTaskMismatch) as info:
        resolve_model(cat, MINILM, CHAT, None)
    assert (info.value.model, info.value.task) == (MINILM, CHAT)


def test_unknown_task(cat: Catalog) -> None:
    with pytest.raises(UnknownTask) as info:
        resolve_model(cat, LLAMA, "image-generation", None)
    assert info.value.task == "image-generation"


def test_alias_cycle_is_unknown() -> None:
    cat = Catalog(
        task_classes=load_seed().task_classes,
        aliases={"a": "b", "b": "a"},
    )
    with pytest.raises(UnknownModel):
        resolve_model(cat, "a", CHAT, None)


def test_effective_params() -> None:
    model = ModelEntry(id="m", task_classes=(CHAT,), supported_params=("temperature", "seed"))
    plain = Offering(id="o", model="m")
    narrow = Offering(id="p", model="m", supported_params=("temperature",))
    assert effective_params(model, plain) == frozenset({"temperature", "seed"})
    assert effective_params(model, narrow) == frozenset({"temperature"})
    assert effective_params(model, None) == frozenset({"temperature", "seed"})
    anything = ModelEntry(id="m", task_classes=(CHAT,))
    assert effective_params(anything, plain) is None
