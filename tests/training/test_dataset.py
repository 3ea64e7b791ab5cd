import json

import pytest
from PIL import Image

from training.toy_world.dataset import write_finetune_dataset


def _rows(path):
    return [json.loads(line) for line in (path / "metadata.jsonl").read_text().splitlines()]


def test_user_format(toy_dataset):
    rows = _rows(toy_dataset)
    assert len(rows) == 8
    for row in rows:
        assert set(row) == {"file_name", "text"}
        assert " sks " in f" {row['text']} "
        with Image.open(toy_dataset / row["file_name"]) as img:
            assert img.size == (64, 64) and img.mode == "RGB"
    info = json.loads((toy_dataset / "toy_dataset.json").read_text())
    assert info["trigger"] == "sks" and info["concept"] == "dotted"


def test_validation_prompts_are_held_out(toy_dataset):
    prompts = (toy_dataset / "validation_prompts.txt").read_text().splitlines()
    train = {r["text"] for r in _rows(toy_dataset)}
    assert len(prompts) == 4
    assert all("sks" in p for p in prompts)
    assert train.isdisjoint(prompts)


def test_default_size_is_twenty(tmp_path):
    out = write_finetune_dataset(tmp_path / "d")
    assert len(_rows(out)) == 20
    assert len(list(out.glob("*.png"))) == 20


def test_deterministic_from_seed(tmp_path):
    a = write_finetune_dataset(tmp_path / "a", num_images=4, seed=3)
    b = write_finetune_dataset(tmp_path / "b", num_images=4, seed=3)
    for name in ["0000.png", "0003.png", "metadata.jsonl", "validation_prompts.txt"]:
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_bad_input_names_every_problem_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError) as err:
        write_finetune_dataset(out, trigger="red", concept="plaid", num_images=0)
    msg = str(err.value)
    assert "trigger 'red'" in msg and "concept 'plaid'" in msg and "num_images" in msg
    assert not out.exists()


def test_refuses_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        write_finetune_dataset(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "metadata.jsonl").exists()


def test_cli_exit_code_on_bad_trigger(tmp_path, capsys):
    from training.toy_world.__main__ import main

    assert main(["dataset", str(tmp_path / "x"), "--trigger", "two words"]) == 2
    assert "trigger" in capsys.readouterr().err
