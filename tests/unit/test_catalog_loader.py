"""Loading, decoding, validating and merging catalogs (catalog/loader.py, catalog/validate.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from catalog.errors import CatalogError, field_path
from catalog.loader import (
    catalog_from_dict,
    load_catalog_files,
    load_seed,
    merge_catalog,
    read_catalog_file,
    seed_offerings,
    validate_catalog,
)
from catalog.model import Catalog, Offering
from catalog.validate import catalog_problems

LLAMA = "lovelace:llama-3.2-3b-instruct"
MINILM = "lovelace:all-minilm-l6-v2"

CHAT_PARAMS = {
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "response_format", "tools", "tool_choice", "parallel_tool_calls", "user", "metadata",
    "stream", "stream_options", "echo", "suffix", "best_of", "top_k", "min_p",
    "repetition_penalty", "dry_multiplier", "dry_base", "dry_allowed_length",
    "dry_penalty_last_n", "dry_sequence_breakers", "grammar", "truncate_sequence",
}  # fmt: skip


def base_doc() -> dict[str, Any]:
    """A small valid document, as a parsed TOML file would give it."""
    return {
        "task_classes": {
            "chat-completion": {
                "codec": "openai.chat",
                "alias_path": "/v1/chat/completions",
                "streams": True,
                "meter": {"units": ["prompt_tokens", "completion_tokens"], "source": "usage"},
            },
            "image-generation": {
                "alias_path": "/v1/images/generations",
                "input_schema": {
                    "type": "object",
                    "properties": {"prompt": {"type": "string"}},
                    "required": ["prompt"],
                },
            },
        },
        "models": {
            LLAMA: {"task_classes": ["chat-completion"]},
            "lovelace:sdxl": {"task_classes": ["image-generation"]},
        },
        "offerings": [
            {
                "id": "a",
                "model": LLAMA,
                "prices": {"prompt_tokens": 1, "completion_tokens": 2},
                "upstream": {"base_url": "http://127.0.0.1:8000/v1"},
            },
            {
                "id": "b",
                "model": "lovelace:sdxl",
                "prices": {"requests": 40_000},
                "price_per": 1,
                "upstream": {"base_url": "http://127.0.0.1:9000", "kind": "http", "path": "/gen"},
            },
        ],
        "aliases": {"llama": LLAMA, "llama-pinned": f"{LLAMA}@hosted", "l2": "llama"},
        "default_models": {"chat-completion": LLAMA, "image-generation": "lovelace:sdxl"},
    }


def test_base_doc_is_valid() -> None:
    cat = catalog_from_dict(base_doc())
    validate_catalog(cat)
    assert cat.task_classes["image-generation"].name == "image-generation"
    assert cat.models[LLAMA].id == LLAMA


# -- the seed -----------------------------------------------------------------------------


def test_seed_loads_and_is_valid() -> None:
    seed = load_seed()
    assert set(seed.task_classes) == {
        "chat-completion", "text-completion", "embedding", "audio-transcription",
    }  # fmt: skip
    chat = seed.task_classes["chat-completion"]
    assert (chat.codec, chat.alias_path, chat.streams) == (
        "openai.chat", "/v1/chat/completions", True,
    )  # fmt: skip
    assert chat.meter.units == ("prompt_tokens", "completion_tokens")
    assert seed.task_classes["embedding"].meter.units == ("prompt_tokens",)
    assert seed.task_classes["audio-transcription"].meter.units == ("seconds",)
    llama = seed.models[LLAMA]
    assert llama.context_length == 131072
    assert set(llama.task_classes) == {"chat-completion", "text-completion"}
    assert set(llama.supported_params or ()) >= CHAT_PARAMS
    minilm = seed.models[MINILM]
    assert (minilm.embedding_dimensions, minilm.context_length) == (384, 512)
    assert "lovelace:whisper-small" in seed.models
    assert seed.offerings == ()
    assert seed.default_models == {
        "chat-completion": LLAMA, "text-completion": LLAMA, "embedding": MINILM,
    }  # fmt: skip
    assert seed.version == 0


def test_seed_offerings_make_a_valid_catalog() -> None:
    offerings = seed_offerings("http://127.0.0.1:8123/v1", provider="sim", api_key="k")
    cat = merge_catalog(load_seed(), Catalog(offerings=offerings))
    validate_catalog(cat)
    by_model = {o.model: o for o in offerings}
    assert by_model[LLAMA].prices == {"prompt_tokens": 50_000, "completion_tokens": 100_000}
    assert by_model[LLAMA].upstream is not None
    assert by_model[LLAMA].upstream.base_url == "http://127.0.0.1:8123/v1"
    assert by_model[LLAMA].provider == "sim"
    assert not by_model["lovelace:whisper-small"].enabled


# -- files ----------------------------------------------------------------------------------

TOML = """
[task_classes.chat-completion]
codec = "openai.chat"
meter = { units = ["prompt_tokens", "completion_tokens"], source = "usage" }

[models."lovelace:llama-3.2-3b-instruct"]
task_classes = ["chat-completion"]

[[offerings]]
id = "x"
model = "lovelace:llama-3.2-3b-instruct"
prices = { prompt_tokens = 10, completion_tokens = 20 }

[aliases]
llama = "lovelace:llama-3.2-3b-instruct"
"""


def test_read_toml_json_yaml(tmp_path: Path) -> None:
    toml_file = tmp_path / "c.toml"
    toml_file.write_text(TOML)
    from_toml = load_catalog_files([toml_file])
    json_file = tmp_path / "c.json"
    json_file.write_bytes(msgspec.json.encode(msgspec.to_builtins(from_toml)))
    assert read_catalog_file(json_file) == from_toml
    yaml = pytest.importorskip("yaml")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(yaml.safe_dump(json.loads(json_file.read_text())))
    assert read_catalog_file(yaml_file) == from_toml


def test_file_errors_name_the_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(TOML.replace("prompt_tokens = 10", 'prompt_tokens = "10"'))
    with pytest.raises(CatalogError) as info:
        read_catalog_file(bad)
    assert info.value.field == "offerings[0].prices.prompt_tokens"
    assert str(bad) in str(info.value)
    broken = tmp_path / "broken.toml"
    broken.write_text("[task_classes\n")
    with pytest.raises(CatalogError, match="cannot parse"):
        read_catalog_file(broken)


def test_later_files_override_earlier(tmp_path: Path) -> None:
    first = tmp_path / "1.toml"
    first.write_text(TOML)
    second = tmp_path / "2.toml"
    second.write_text('[[offerings]]\nid = "x"\nmodel = "lovelace:llama-3.2-3b-instruct"\n')
    cat = load_catalog_files([first, second])
    assert [o.prices for o in cat.offerings] == [{}]


# -- decoding errors (msgspec's, turned into CatalogError with the field) -----------------


def _set(doc: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node: Any = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("offerings", 0, "prices"), {"prompt_tokens": "1"}, "offerings[0].prices.prompt_tokens"),
        (("offerings", 1, "prices"), {"requests": True}, "offerings[1].prices.requests"),
        (("offerings", 0, "prices"), [1], "offerings[0].prices"),
        (("offerings", 0, "upstream", "base_url"), 5, "offerings[0].upstream.base_url"),
        (("offerings", 0, "bogus"), 1, "offerings[0]"),
        (("task_classes", "chat-completion", "meter", "units"), 3,
         "task_classes.chat-completion.meter.units"),
        (("task_classes", "chat-completion", "codec"), "grpc",
         "task_classes.chat-completion.codec"),
        (("task_classes", "chat-completion", "name"), "other", "task_classes.chat-completion.name"),
        (("models", LLAMA, "context_length"), 1.5, f'models."{LLAMA}".context_length'),
        (("models", LLAMA, "id"), "lovelace:x", f'models."{LLAMA}".id'),
        (("aliases", "llama"), 3, "aliases.llama"),
        (("default_models",), [], "default_models"),
        (("wat",), {}, "wat"),
    ],
)  # fmt: skip
def test_decoding_errors_name_the_field(
    path: tuple[str | int, ...], value: Any, field: str
) -> None:
    with pytest.raises(CatalogError) as info:
        catalog_from_dict(_set(base_doc(), path, value))
    assert info.value.field == field
    assert field in str(info.value)


def test_missing_required_field() -> None:
    doc = base_doc()
    del doc["models"][LLAMA]["task_classes"]
    with pytest.raises(CatalogError, match="task_classes") as info:
        catalog_from_dict(doc)
    assert info.value.field == f'models."{LLAMA}"'


# -- semantic errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        # task classes
        (("task_classes", "Bad_Name"), {}, "task_classes.Bad_Name"),
        (("task_classes", "image-generation", "input_schema"), {"type": "nope"},
         "task_classes.image-generation.input_schema.type"),
        (("task_classes", "image-generation", "input_schema"),
         {"type": "string", "pattern": "("}, "task_classes.image-generation.input_schema"),
        (("task_classes", "image-generation", "alias_path"), "/images",
         "task_classes.image-generation.alias_path"),
        (("task_classes", "image-generation", "alias_path"), "/v1/tasks/x",
         "task_classes.image-generation.alias_path"),
        (("task_classes", "image-generation", "alias_path"), "/v1/chat/completions",
         "task_classes.image-generation.alias_path"),
        (("task_classes", "image-generation", "codec"), "openai.chat",
         "task_classes.image-generation.codec"),
        (("task_classes", "chat-completion", "codec"), "openai.embedding",
         "task_classes.chat-completion.codec"),
        (("task_classes", "image-generation", "meter"), {"units": ["images"]},
         "task_classes.image-generation.meter.units"),
        (("task_classes", "image-generation", "meter"), {"units": [], "source": "usage"},
         "task_classes.image-generation.meter.units"),
        (("task_classes", "image-generation", "meter"), {"units": ["A b"], "source": "usage"},
         "task_classes.image-generation.meter.units[0]"),
        # models
        (("models", "lattice:mine"), {"task_classes": ["chat-completion"]},
         'models."lattice:mine"'),
        (("models", "a@b"), {"task_classes": ["chat-completion"]}, 'models."a@b"'),
        (("models", LLAMA, "task_classes"), ["chat-completion", "nope"],
         f'models."{LLAMA}".task_classes[1]'),
        (("models", LLAMA, "task_classes"), [], f'models."{LLAMA}".task_classes'),
        (("models", LLAMA, "context_length"), 0, f'models."{LLAMA}".context_length'),
        (("models", LLAMA, "supported_params"), ["ok", "not ok"],
         f'models."{LLAMA}".supported_params[1]'),
        # offerings
        (("offerings", 1, "id"), "a", "offerings[1].id"),
        (("offerings", 0, "model"), "lovelace:nope", "offerings[0].model"),
        (("offerings", 0, "prices"), {"prompt_tokens": -1, "completion_tokens": 1},
         "offerings[0].prices.prompt_tokens"),
        (("offerings", 0, "prices"), {"prompt_tokens": 1, "completion_tokens": 1, "images": 1},
         "offerings[0].prices.images"),
        (("offerings", 0, "prices"), {"prompt_tokens": 1}, "offerings[0].prices.completion_tokens"),
        (("offerings", 0, "price_per"), 0, "offerings[0].price_per"),
        (("offerings", 0, "task_classes"), ["image-generation"], "offerings[0].task_classes[0]"),
        (("offerings", 0, "provider"), "a b", "offerings[0].provider"),
        (("offerings", 0, "upstream"), {"base_url": "ftp://x"}, "offerings[0].upstream.base_url"),
        (("offerings", 1, "upstream"), {"base_url": "http://x", "kind": "http"},
         "offerings[1].upstream.path"),
        (("offerings", 1, "upstream"), {"base_url": "http://x"}, "offerings[1].upstream.kind"),
        (("offerings", 0, "upstream"), {"base_url": "http://x", "api_key": "k", "api_key_env": "E"},
         "offerings[0].upstream.api_key"),
        # aliases
        (("aliases", "x"), "lovelace:nope", "aliases.x"),
        (("aliases", LLAMA), "lovelace:sdxl", f'aliases."{LLAMA}"'),
        (("aliases", "x"), f"{LLAMA}@", "aliases.x"),
        (("aliases", "lattice:x"), LLAMA, 'aliases."lattice:x"'),
        # default models
        (("default_models", "chat-completion"), "lovelace:sdxl", "default_models.chat-completion"),
        (("default_models", "nope"), LLAMA, "default_models.nope"),
        (("default_models", "chat-completion"), "lovelace:nope", "default_models.chat-completion"),
    ],
)  # fmt: skip
def test_semantic_errors_name_the_field(
    path: tuple[str | int, ...], value: Any, field: str
) -> None:
    cat = catalog_from_dict(_set(base_doc(), path, value))
    with pytest.raises(CatalogError) as info:
        validate_catalog(cat)
    assert info.value.field == field, info.value
    assert field in str(info.value)


def test_alias_cycle_is_rejected() -> None:
    doc = base_doc()
    doc["aliases"].update({"loop-a": "loop-b", "loop-b": "loop-a"})
    with pytest.raises(CatalogError, match="loops") as info:
        validate_catalog(catalog_from_dict(doc))
    assert info.value.field == "aliases.loop-a"


def test_chained_aliases_and_alias_defaults_are_fine() -> None:
    doc = base_doc()
    doc["default_models"]["chat-completion"] = "l2"
    validate_catalog(catalog_from_dict(doc))


def test_free_offering_and_all_problems() -> None:
    doc = base_doc()
    doc["offerings"][0]["prices"] = {}
    validate_catalog(catalog_from_dict(doc))  # no prices = free
    doc["offerings"][0]["model"] = "lovelace:nope"
    doc["aliases"]["x"] = "nope"
    fields = [p.field for p in catalog_problems(catalog_from_dict(doc))]
    assert fields == ["offerings[0].model", "aliases.x"]


def test_field_path_quotes_non_bare_keys() -> None:
    assert field_path("models", "lovelace:x", "task_classes", 0) == (
        'models."lovelace:x".task_classes[0]'
    )
    assert field_path("offerings", 2, "prices", "prompt_tokens") == (
        "offerings[2].prices.prompt_tokens"
    )


# -- merge ------------------------------------------------------------------------------------


def test_merge_upserts_by_key() -> None:
    base = catalog_from_dict(base_doc())
    base = msgspec.structs.replace(base, version=7)
    patch = catalog_from_dict(
        {
            "models": {LLAMA: {"task_classes": ["chat-completion"], "context_length": 8}},
            "offerings": [
                {"id": "c", "model": LLAMA},
                {"id": "a", "model": LLAMA, "priority": 5},
            ],
            "aliases": {"llama": "lovelace:sdxl", "new": LLAMA},
        }
    )
    merged = merge_catalog(base, patch)
    assert merged.version == 7
    assert merged.models[LLAMA].context_length == 8
    assert "lovelace:sdxl" in merged.models
    assert [o.id for o in merged.offerings] == ["a", "b", "c"]
    assert merged.offerings[0] == Offering(id="a", model=LLAMA, priority=5)
    assert merged.aliases["llama"] == "lovelace:sdxl"
    assert merged.aliases["new"] == LLAMA
    assert merged.aliases["l2"] == "llama"
    assert merged.task_classes == base.task_classes
    assert merged.default_models == base.default_models
