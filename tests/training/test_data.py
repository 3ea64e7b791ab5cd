"""Dataset validation: each bad-input kind is caught, by file, and nothing is written."""

import io
import json
import os

import pytest
from PIL import Image

from training.config import DataConfig
from training.data import DatasetError, validate_dataset


def _png(size=(64, 64), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _write_metadata(root, rows):
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _by_file(report):
    return {p.file: p for p in report.problems}


def test_toy_dataset_is_clean(toy_dataset):
    report = validate_dataset(DataConfig(path=str(toy_dataset), trigger="sks"))
    assert report.format == "metadata" and not report.problems
    assert len(report.examples) == 8 and all("sks" in e.caption for e in report.examples)


def test_every_bad_file_is_reported_by_name(tmp_path):
    good = [f"good{i}.png" for i in range(4)]
    for i, name in enumerate(good):
        (tmp_path / name).write_bytes(_png(colour=(10 * i, 30, 30)))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (tmp_path / "truncated.png").write_bytes(_png((64, 64), (1, 2, 3))[:60])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("I am not a picture")
    (tmp_path / "small.png").write_bytes(_png((32, 32)))
    (tmp_path / "huge.png").write_bytes(_png((300, 300)))
    (tmp_path / "nocaption.png").write_bytes(_png(colour=(1, 200, 1)))
    (tmp_path / "blank.png").write_bytes(_png(colour=(1, 1, 200)))
    (tmp_path / "z-dup.png").write_bytes((tmp_path / "good0.png").read_bytes())
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    outside = tmp_path.parent / "outside.png"
    outside.write_bytes(_png())
    (tmp_path / "link.png").symlink_to(outside)
    rows = [{"file_name": n, "text": "a photo of sks"} for n in [*good, "corrupt.png", "truncated.png", "small.png"]]
    rows += [{"file_name": "blank.png", "text": "  "}, {"file_name": "z-dup.png", "text": "a photo of sks"}]
    rows += [{"file_name": "gone.png", "text": "a photo of sks"}, {"file_name": "huge.png", "text": "x sks"}]
    _write_metadata(tmp_path, rows)
    with open(tmp_path / "metadata.jsonl", "a") as f:
        f.write("{not json\n")
    before = sorted(p.name for p in tmp_path.iterdir())

    report = validate_dataset(DataConfig(path=str(tmp_path), trigger="sks", max_pixels=256 * 256))
    problems = _by_file(report)
    expect_error = {
        "corrupt.png": "corrupt",
        "truncated.png": "truncated",
        "empty.png": "not an image",
        "text.jpg": "not an image",
        "small.png": "short side 32 px is below 64 px, the short side of its bucket 64x64",
        "huge.png": "decompression bomb",
        "nocaption.png": "no row in metadata.jsonl",
        "blank.png": "empty caption",
        "link.png": "outside the dataset folder",
        "gone.png": "file is missing",
        "metadata.jsonl:12": "not a JSON object",
    }
    for name, words in expect_error.items():
        assert name in problems, name
        assert problems[name].severity == "error" and words in problems[name].message, (name, problems[name])
    assert problems["z-dup.png"].severity == "warning" and "duplicate of good0.png" in problems["z-dup.png"].message
    assert problems["notes.pdf"].severity == "warning"
    assert [e.path.name for e in report.examples] == [*good, "z-dup.png"]
    with pytest.raises(DatasetError) as err:
        report.raise_if_errors()
    assert "11 problems" in str(err.value) and "truncated.png" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "validation writes nothing"


def test_pil_own_bomb_limit_is_an_error_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(_png((200, 200), (i, 0, 0)))
        (tmp_path / f"{i}.txt").write_text("a sks photo")
    report = validate_dataset(DataConfig(path=str(tmp_path)))
    assert report.format == "sidecar"
    assert len(report.errors) == 5  # four bombs + too few images
    assert all("decompression bomb" in p.message for p in report.errors[:4])


def test_sidecar_captions(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(_png(colour=(i * 40, 0, 0)))
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"a sks thing number {i}\n")
    (tmp_path / "3.txt").write_bytes("caf\xe9".encode("latin-1"))
    report = validate_dataset(DataConfig(path=str(tmp_path), min_images=3))
    problems = _by_file(report)
    assert [e.caption for e in report.examples] == [f"a sks thing number {i}" for i in range(3)]
    assert "not UTF-8" in problems["3.txt"].message
    assert "missing caption file 4.txt" in problems["4.png"].message


def test_a_metadata_line_that_is_not_utf8_is_named(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(_png(colour=(i * 40, 0, 0)))
    _write_metadata(tmp_path, [{"file_name": f"{i}.png", "text": "a sks thing"} for i in range(3)])
    with open(tmp_path / "metadata.jsonl", "ab") as f:
        f.write('{"file_name": "3.png", "text": "caf\xe9 sks"}\n'.encode("latin-1"))
    problems = _by_file(validate_dataset(DataConfig(path=str(tmp_path), min_images=3)))
    assert "not UTF-8" in problems["metadata.jsonl:4"].message


def test_dreambooth_needs_the_trigger_in_the_prompt(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(_png(colour=(i * 40, 9, 9)))
    ok = validate_dataset(DataConfig(path=str(tmp_path), instance_prompt="a photo of sks dog", trigger="sks"))
    assert ok.format == "dreambooth" and not ok.problems and len(ok.examples) == 4
    bad = validate_dataset(DataConfig(path=str(tmp_path), instance_prompt="a photo of a dog", trigger="sks"))
    assert "lacks the trigger 'sks'" in bad.errors[0].message


def test_no_captions_at_all_says_what_to_do(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    report = validate_dataset(DataConfig(path=str(tmp_path)))
    assert "set data.instance_prompt" in report.errors[0].message


def test_too_few_images_and_missing_folder(tmp_path):
    _write_metadata(tmp_path, [])
    report = validate_dataset(DataConfig(path=str(tmp_path)))
    assert "only 0 usable images" in report.errors[-1].message
    missing = validate_dataset(DataConfig(path=str(tmp_path / "nope")))
    assert "is not a folder" in missing.errors[0].message


def test_trigger_missing_from_a_caption_is_a_warning(toy_dataset):
    report = validate_dataset(DataConfig(path=str(toy_dataset), trigger="ohwx"))
    assert len(report.warnings) == 8 and not report.errors


def test_max_images_takes_the_first_by_name(toy_dataset):
    report = validate_dataset(DataConfig(path=str(toy_dataset), max_images=5))
    assert [e.path.name for e in report.examples] == [f"000{i}.png" for i in range(5)]
