"""lorafleet_adapter.json as people edit it: unknown keys kept, missing optional keys defaulted, wrong types and
broken JSON refused naming the key (an AdapterError, which the Serve app answers with 422, never 500)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from training.adapter import META_NAME, SCHEMA_VERSION, AdapterError, AdapterMeta, read_meta, verify_adapter


@pytest.fixture(scope="module")
def saved(tiny_pipe, tiny_pipe_dir, tmp_path_factory) -> Path:
    from training.toy_world.adapters import random_adapter

    return random_adapter(tiny_pipe, tiny_pipe_dir, tmp_path_factory.mktemp("meta") / "ad", seed=1)


@pytest.fixture
def adapter(saved, tmp_path) -> Path:
    """A copy of a random adapter for the tiny pipeline, to edit."""
    return Path(shutil.copytree(saved, tmp_path / "ad"))


def edit(folder: Path, **changes) -> dict:
    meta = json.loads((folder / META_NAME).read_text())
    meta.update(changes)
    (folder / META_NAME).write_text(json.dumps(meta))
    return meta


def test_an_unknown_key_is_kept_and_written_back(adapter):
    edit(adapter, license="CC-BY-4.0", notes={"by": "someone"})
    meta = verify_adapter(adapter)
    assert meta.model_extra == {"license": "CC-BY-4.0", "notes": {"by": "someone"}}
    again = json.loads(meta.to_json())
    assert again["license"] == "CC-BY-4.0" and again["schema_version"] == SCHEMA_VERSION


def test_missing_optional_keys_take_their_defaults(adapter):
    full = json.loads((adapter / META_NAME).read_text())
    (adapter / META_NAME).write_text(json.dumps({"base_model": full["base_model"], "sha256": full["sha256"]}))
    meta = verify_adapter(adapter)
    assert (meta.rank, meta.alpha, meta.target_modules, meta.trigger, meta.source) == (None, None, [], None, "trained")
    assert meta.schema_version == 1 and meta.weights == "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"rank": "four"}, "key 'rank': Input should be a valid integer"),
        ({"target_modules": "to_q"}, "key 'target_modules': Input should be a valid list"),
        ({"training": [1, 2]}, "key 'training': Input should be a valid dictionary"),
        ({"base_model": None}, "key 'base_model'"),
        ({"schema_version": 99}, "schema_version 99 was written by a newer lorafleet"),
        ({"weights": "../elsewhere/w.safetensors"}, "key 'weights' must be a file name"),
        ({"rank": "4"}, "key 'rank'"),  # strict: a string is not a rank, even one that reads as a number
        ({"rank": True}, "key 'rank'"),
        ({"text_encoder": "yes"}, "key 'text_encoder'"),
        ({"alpha": True}, "key 'alpha'"),
        ({"alpha": 0}, "key 'alpha'"),
        ({"schema_version": "2"}, "key 'schema_version'"),
        ({"schema_version": 2.0}, "schema_version"),
    ],
)
def test_a_wrong_type_is_refused_naming_the_key(adapter, changes, words):
    edit(adapter, **changes)
    with pytest.raises(AdapterError, match=words.replace("(", r"\(")):
        verify_adapter(adapter)


def test_an_integer_alpha_and_a_negative_one_are_numbers(adapter):
    edit(adapter, alpha=8)
    assert verify_adapter(adapter).alpha == 8.0
    edit(adapter, alpha=-8)
    assert verify_adapter(adapter).alpha == -8.0


def test_json_nested_too_deep_is_an_adapter_error_not_a_recursion_error(adapter):
    meta = json.loads((adapter / META_NAME).read_text())
    text = json.dumps(meta)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (adapter / META_NAME).write_text(text)
    with pytest.raises(AdapterError):
        verify_adapter(adapter)


def test_broken_json_and_a_bom_written_file(adapter):
    text = (adapter / META_NAME).read_text()
    (adapter / META_NAME).write_text(text, encoding="utf-8-sig")  # Windows editors' BOM: still read
    assert verify_adapter(adapter).base_model
    (adapter / META_NAME).write_text(text[:-5])
    with pytest.raises(AdapterError, match="is not valid JSON"):
        read_meta(adapter / META_NAME)
    (adapter / META_NAME).write_text("[1, 2]")
    with pytest.raises(AdapterError, match="must hold a JSON object"):
        read_meta(adapter / META_NAME)


def test_the_schema_describes_every_field():
    for name, field in AdapterMeta.model_fields.items():
        assert field.description, f"AdapterMeta.{name} has no description"
