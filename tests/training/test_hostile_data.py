"""Dataset folders a hostile tester built (issue 18 follow-up): every file that cannot be read is a Problem naming it
(never a traceback), one symlink rule, captions shared or dropped, kohya folders out of range, text in odd encodings,
captions the tokenizer cuts, class images checked by `lorafleet validate`. Inputs: 96x96 images with 'sks' captions."""

import json
import os
from pathlib import Path

import pytest
from pydantic import BaseModel

from cluster.cli import main
from tests.training.test_layouts import CAPTIONS, _images, _png, _problems, _report
from training.captions import caption_length_problems, load_tokenizer
from training.config import DataConfig
from training.configuration import ConfigError, validate_values
from training.data import invisible_characters, kept_fraction
from training.layout import MAX_REPEATS


def _sidecars(root, n=6, start=0):
    _images(root, [f"i{i}.png" for i in range(n)], start)
    for i in range(n):
        (root / f"i{i}.txt").write_text(CAPTIONS[i % 6] + "\n")
    return root


def _validate_json(capsys, *argv):
    rc = main(["validate", *map(str, argv), "--resolution", "64", "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)


# -- 1, 15: every dataset file is read by one rule -------------------------------------------------------------------


@pytest.mark.parametrize("what", ["image", "caption", "metadata"])
def test_a_broken_symlink_is_a_problem_naming_its_target(tmp_path, capsys, what):
    root = _sidecars(tmp_path / "d")
    if what == "image":
        (root / "gone.png").symlink_to(root / "nowhere.png")
        (root / "gone.txt").write_text("a sks photo")
    elif what == "caption":
        (root / "i0.txt").unlink()
        (root / "i0.txt").symlink_to(root / "nowhere.txt")
    else:
        (root / "metadata.jsonl").symlink_to(root / "nowhere.jsonl")
    name = {"image": "gone.png", "caption": "i0.txt", "metadata": "metadata.jsonl"}[what]
    rc, out = _validate_json(capsys, root)
    problems = {p["file"]: p for p in out["problems"]}
    assert rc == 1 and problems[name]["severity"] == "error", out["problems"]
    assert f"broken symlink -> {root / 'nowhere'}" in problems[name]["message"]


def test_a_fifo_a_folder_and_an_unreadable_file_named_like_images_are_problems(tmp_path, monkeypatch):
    root = _sidecars(tmp_path / "d")
    os.mkfifo(root / "pipe.png")  # reading it would block forever
    (root / "pipe.txt").write_text("a sks pipe")
    (root / "folder.txt").mkdir()  # a folder named like a caption file
    (root / "i5.png").unlink()
    (root / "i5.png").mkdir()  # ... and one named like an image (holds nothing: not trained, not a crash)
    real = Path.read_bytes

    def denied(self):  # tests run as root, which chmod cannot stop: the OS error as a user gets it
        if self.name == "i1.png":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    problems = _problems(_report(root))
    assert problems["pipe.png"].message == "is a FIFO, not a file; rename or remove it"
    assert "cannot be read (Permission denied)" in problems["i1.png"].message
    assert len([p for p in problems.values() if p.severity == "error"]) == 2, problems
    assert "caption file without an image" in problems["i5.txt"].message  # its "image" is a folder: not trained
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "i5.png", "text": "a sks"}) + "\n")
    assert "(line 1) but it is a folder, not an image file" in _problems(_report(root))["i5.png"].message


def test_links_out_of_the_dataset_are_refused_for_every_kind_of_file(tmp_path):
    outside = _sidecars(tmp_path / "elsewhere")
    (outside / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"i{i}.png", "text": c}) + "\n" for i, c in enumerate(CAPTIONS))
    )
    root = _sidecars(tmp_path / "d")
    (root / "i0.txt").unlink()
    (root / "i0.txt").symlink_to(outside / "i0.txt")  # was read and trained
    (root / "i1.png").unlink()
    (root / "i1.png").symlink_to(outside / "i1.png")
    (root / "i2.txt").unlink()
    (root / "i2.txt").symlink_to(root / "i3.txt")  # inside: fine
    problems = _problems(_report(root))
    assert "symlink pointing outside the dataset folder" in problems["i0.txt"].message
    assert "symlink pointing outside the dataset folder" in problems["i1.png"].message
    assert "i2.txt" not in problems
    md = _images(tmp_path / "m", [f"i{i}.png" for i in range(6)]) or tmp_path / "m"
    (md / "metadata.jsonl").symlink_to(outside / "metadata.jsonl")  # was accepted
    report = _report(md)
    assert report.format == "metadata" and not report.examples
    assert "symlink pointing outside" in _problems(report)["metadata.jsonl"].message


def test_a_caption_file_of_megabytes_is_refused(tmp_path):
    root = _sidecars(tmp_path / "d")
    (root / "i0.txt").write_text("a sks photo " * 1_000_000)
    assert "more than 64 KiB: not a caption" in _problems(_report(root))["i0.txt"].message


# -- 2: a preview inside the dataset -------------------------------------------------------------------------------


def test_a_preview_inside_the_dataset_is_refused_and_an_old_one_not_read(tmp_path, capsys):
    root = _sidecars(tmp_path / "d")
    assert main(["validate", str(root), "--resolution", "64", "--preview", str(root / "prev")]) == 2
    assert "inside the dataset folder" in capsys.readouterr().err and not (root / "prev").exists()
    assert main(["validate", str(root), "--resolution", "64", "--preview", str(tmp_path / "prev")]) == 0
    (tmp_path / "prev").rename(root / "prev")  # as a user moving it there by hand
    report = _report(root)
    assert len(report.examples) == 6, report.summary()  # not 12
    assert "--preview` folder, not read" in _problems(report)["prev/"].message


# -- 3: class images in validate -----------------------------------------------------------------------------------


def test_validate_checks_the_class_images_as_training_does(tmp_path, capsys):
    root = _sidecars(tmp_path / "d")
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "file").write_text("x")
    for folder, why in ((tmp_path / "nope", "does not exist"), (tmp_path / "file", "is a file"),
                        (empty, "holds no images"), (root, "are the same folder"),
                        (tmp_path, "is inside data.class_data_dir")):  # fmt: skip
        rc, out = _validate_json(capsys, root, f"data.class_data_dir={folder}", "data.class_prompt=a dog")
        assert rc == 1 and why in out["problems"][-1]["message"], (folder, out["problems"])
    classes = tmp_path / "dogs"
    _images(classes, [f"c{i}.png" for i in range(3)], start=10)
    rc, out = _validate_json(capsys, root, f"data.class_data_dir={classes}", "data.class_prompt=a sks dog",
                             "--trigger", "sks")  # fmt: skip
    assert rc == 1 and "contains the trigger 'sks'" in out["problems"][-1]["message"]
    rc, out = _validate_json(capsys, root, f"data.class_data_dir={classes}", "data.class_prompt=a dog")
    assert rc == 0 and out["images"] == 6 and out["class_images"] == 3, out
    priors = [e for e in out["examples"] if e["prior"]]
    assert [e["caption"] for e in priors] == ["a dog"] * 3
    assert main(["validate", str(root), "--resolution", "64", f"data.class_data_dir={classes}",
                 "data.class_prompt=a dog"]) == 0  # fmt: skip
    assert "6 usable images + 3 class images" in capsys.readouterr().out


# -- 4: captions longer than the tokenizer reads -------------------------------------------------------------------


def test_captions_cut_by_the_tokenizer_are_named_and_a_cut_trigger_is_an_error(repo):
    tok = load_tokenizer(str(repo / "models" / "toy-sd"))  # model_max_length 32, 'sks' is 3 tokens
    assert tok.model_max_length == 32
    fits = " ".join(["red"] * 27) + " sks"  # start + 27 + 3 + end = 32: the trigger is the last thing kept
    cut = " ".join(["red"] * 28) + " sks"  # 33: its last token is cut
    front = "sks " + " ".join(["red"] * 40)
    got = {p.file: p for p in caption_length_problems([("a", fits), ("b", cut), ("c", front)], tok, "sks")}
    assert "a" not in got
    assert got["b"].severity == "error" and "33 tokens, the base model reads 32" in got["b"].message
    assert "trigger 'sks' lies past the cut" in got["b"].message
    assert got["c"].severity == "warning" and "45 tokens" in got["c"].message


def test_validate_with_a_base_model_checks_caption_lengths_and_the_bucket_step(repo, tmp_path, capsys):
    root = _sidecars(tmp_path / "d")
    (root / "i0.txt").write_text(" ".join(["red"] * 30) + " sks")
    base = str(repo / "models" / "toy-sd")
    rc, out = _validate_json(capsys, root, "--base-model", base, "--trigger", "sks")
    assert rc == 1 and out["problems"][0]["file"] == "i0.png" and "past the cut" in out["problems"][0]["message"]
    rc, out = _validate_json(capsys, root, "--base-model", base, "data.bucket_step=7")
    assert rc == 2 and "not a multiple of 16" in out["problems"][0]["message"], out


def test_validate_checks_at_the_base_models_own_resolution_unless_told(repo, tmp_path, capsys):
    """96 px images: fine for the 64 px toy model, too small at the 512 px default without a model."""
    root = _sidecars(tmp_path / "d")
    base = str(repo / "models" / "toy-sd")

    def rule(*argv):
        rc = main(["validate", str(root), *argv, "--json"])
        return rc, json.loads(capsys.readouterr().out)["bucket_rule"]

    assert rule("--base-model", base)[0] == 0 and "data.resolution=64" in rule("--base-model", base)[1]
    assert rule() == (1, rule()[1]) and "data.resolution=512" in rule()[1]
    assert "data.resolution=128" in rule("--base-model", base, "--resolution", "128")[1]


def test_build_worker_spec_refuses_a_trigger_past_the_token_limit(train_config, toy_dataset):
    from training.data import DatasetError, validate_dataset
    from training.training_set import build_worker_spec

    meta = Path(toy_dataset) / "metadata.jsonl"
    rows = [json.loads(x) for x in meta.read_text().splitlines()]
    rows[0]["text"] = " ".join(["red"] * 30) + " sks " + rows[0]["text"]  # toy tokenizer: 32 tokens
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = train_config()
    report = validate_dataset(cfg.data)
    with pytest.raises(DatasetError, match="lies past the cut"):
        build_worker_spec(cfg, report)


# -- 5: '#' on the command line -----------------------------------------------------------------------------------


class _Data(BaseModel):  # the shape `lorafleet validate` validates
    data: DataConfig


def test_a_hash_value_on_the_command_line_is_text_not_a_comment():
    cfg = validate_values(_Data, {"data": {"path": "x"}}, ["data.background=#7f7f7f"]).data
    assert cfg.background_rgb == (127, 127, 127)
    for bad in ("#zzz", "#12345"):
        with pytest.raises(ConfigError, match=f"'{bad}' is not a colour Pillow knows"):
            validate_values(_Data, {"data": {"path": "x"}}, [f"data.background={bad}"])


# -- 6, 7: shared caption stems, case twins, unused sidecars ------------------------------------------------------


def test_two_images_sharing_a_caption_name_both_name_it(tmp_path):
    root = _sidecars(tmp_path / "d")
    (root / "i0.jpg").write_bytes(_png(9))  # PNG bytes under .jpg: Pillow reads content
    (root / "anim.gif").write_bytes(_png(10))
    (root / "anim.webp").write_bytes(_png(11))
    problems = _problems(_report(root))
    assert "shares the caption file i0.txt with i0.jpg" in problems["i0.png"].message
    assert "shares the caption file i0.txt with i0.png" in problems["i0.jpg"].message
    assert "rename one image" in problems["anim.gif"].message and "anim.webp" in problems["anim.gif"].message
    assert "i0.txt" not in problems  # not "without an image": the errors above name it


def test_caption_files_differing_only_in_case_are_both_named(tmp_path):
    root = _sidecars(tmp_path / "d")
    (root / "I0.TXT").write_text("another sks caption")
    (p,) = [p for p in _report(root).errors]
    assert "i0.txt and I0.TXT" in p.message or "I0.TXT and i0.txt" in p.message


def test_sidecars_next_to_metadata_are_named_as_unused(tmp_path):
    root = _sidecars(tmp_path / "d")
    (root / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"i{i}.png", "text": c}) + "\n" for i, c in enumerate(CAPTIONS))
    )
    (w,) = _report(root).warnings
    assert "6 caption files (.txt) are not read" in w.message and "data.format=sidecar" in w.message


# -- 8, 9: kohya repeats and nesting -------------------------------------------------------------------------------


def test_absurd_kohya_repeats_are_an_error_naming_the_folder(tmp_path):
    _sidecars(tmp_path / "d" / "99999999999999999999_sks dog")
    _sidecars(tmp_path / "d" / f"{MAX_REPEATS}_sks cat", start=20)
    report = _report(tmp_path / "d")
    problems = _problems(report)
    assert "more than 1000" in problems["99999999999999999999_sks dog/"].message
    assert report.groups == {f"{MAX_REPEATS}_sks cat": (6, MAX_REPEATS)}


def test_a_kohya_folder_inside_another_is_not_merged(tmp_path):
    _sidecars(tmp_path / "d" / "10_sks dog")
    _sidecars(tmp_path / "d" / "10_sks dog" / "5_sks cat", start=20)
    report = _report(tmp_path / "d")
    assert report.groups == {"10_sks dog": (6, 10)}, report.summary()
    (w,) = report.warnings
    assert w.file == "10_sks dog/5_sks cat/" and "6 images in a sub-folder" in w.message


# -- 10: invisible characters -------------------------------------------------------------------------------------


def test_invisible_characters_in_captions_are_named_with_their_position(tmp_path):
    assert invisible_characters("a s\u200bks dog") == ["U+200B (ZERO WIDTH SPACE) at character 4"]
    assert invisible_characters("a \u202egod skS\x1b[31m\x07") == [
        "U+202E (RIGHT-TO-LEFT OVERRIDE) at character 3", "U+001B (ESC, a terminal escape) at character 11",
        "U+0007 (BEL) at character 16"]  # fmt: skip
    assert invisible_characters("caf\u00e9 sks\tdog") == []  # accents and tabs are visible text
    root = _sidecars(tmp_path / "d")
    (root / "i0.txt").write_text("a photo of \u200bsks\u200b dog")
    problems = _problems(_report(root))
    assert "U+200B (ZERO WIDTH SPACE) at character 12" in problems["i0.png"].message
    assert "U+200B (ZERO WIDTH SPACE) at character 16" in problems["i0.png"].message


# -- 11: text encodings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding, named", [("utf-16", "UTF-16 text"), ("utf-32", "UTF-32 text")])
def test_metadata_in_utf16_or_utf32_is_one_error(tmp_path, encoding, named):
    root = tmp_path / "d"
    _images(root, [f"i{i}.png" for i in range(6)])
    text = "".join(json.dumps({"file_name": f"i{i}.png", "text": c}) + "\n" for i, c in enumerate(CAPTIONS))
    (root / "metadata.jsonl").write_bytes(text.encode(encoding))
    (root / "i0.txt").write_bytes("a sks photo".encode(encoding))
    report = _report(root, format="metadata")
    assert [p.file for p in report.errors] == ["metadata.jsonl"], report.summary()
    assert named in report.errors[0].message and "re-save metadata.jsonl as UTF-8" in report.errors[0].message
    sidecar = _report(root, format="sidecar")
    assert named in _problems(sidecar)["i0.txt"].message


# -- 12, 16: the validate command line ------------------------------------------------------------------------------


def test_validate_json_prints_json_for_invalid_settings_too(tmp_path, capsys):
    root = _sidecars(tmp_path / "d")
    rc, out = _validate_json(capsys, root, "data.resolution=abc", "train.lr=1", f"data.path={tmp_path}")
    messages = " | ".join(p["message"] for p in out["problems"])
    assert rc == 2 and out["error"] == "invalid settings", out
    assert "validate takes only data.* settings" in messages and "drop data.path" in messages
    assert "data.resolution" in messages


def test_a_caption_extension_that_is_an_image_extension_is_refused():
    with pytest.raises(ValueError, match="'.png' is an image extension"):
        DataConfig(path="x", caption_extension=".png")


# -- 13: a forced format on a captioned folder ---------------------------------------------------------------------


def test_forcing_dreambooth_or_kohya_on_caption_files_says_what_they_ignore(tmp_path):
    root = _sidecars(tmp_path / "d")
    (p,) = _report(root, format="dreambooth").problems
    assert "data.format=dreambooth" in p.message and "ignores the 6 caption files" in p.message
    assert "data.instance_prompt" in p.message and "data.format=auto" in p.message
    with_prompt = _report(root, format="dreambooth", instance_prompt="a sks thing")
    assert len(with_prompt.examples) == 6 and "6 caption files (.txt) are not read" in with_prompt.warnings[0].message
    kohya = _report(root, format="kohya")
    assert not [p for p in kohya.problems if "without an image" in p.message], kohya.summary()
    assert any("data.format=kohya ignores the 6 caption files" in p.message for p in kohya.warnings)


# -- 14: crops that keep little ------------------------------------------------------------------------------------


def test_a_crop_keeping_less_than_half_is_a_warning_with_the_fraction(tmp_path):
    assert kept_fraction((64, 3000), (48, 80)) == pytest.approx(80 / (3000 * 48 / 64))
    root = _sidecars(tmp_path / "d")
    (root / "i0.png").write_bytes(_png(0, size=(64, 3000)))
    (root / "i1.png").write_bytes(_png(1, size=(96, 160)))  # a portrait bucket fits it: nothing cut
    problems = _problems(_report(root))
    assert "64x3000 is cropped to bucket 48x80: training sees 4% of it" in problems["i0.png"].message
    assert "data.max_aspect=2" in problems["i0.png"].message and "i1.png" not in problems


# -- 16: the rest ---------------------------------------------------------------------------------------------------


def test_small_layout_cases(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (p,) = _report(empty).problems
    assert p.message.startswith("no images (") and "captions" not in p.message
    root = _sidecars(tmp_path / "d")
    (root / "i0.txt").write_text("\n  \na sks photo\n")
    assert "line 1 is blank; the caption is line 3" in _problems(_report(root))["i0.txt"].message
    md = tmp_path / "md"
    _images(md, [f"i{i}.png" for i in range(6)])
    rows = [{"file_name": f"i{i}.png", "text": c} for i, c in enumerate(CAPTIONS)]
    rows[1]["text"] = "a sks photo\nsecond line"
    rows.append({"file_name": "I0.PNG", "text": "again"})
    (md / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = _problems(_report(md))
    assert "duplicate row: I0.PNG names the same image as i0.png on line 1" in problems["metadata.jsonl:7"].message
    assert "has line breaks" in problems["metadata.jsonl:2"].message


def test_json_size_is_the_oriented_size(tmp_path, capsys):
    from PIL import Image

    root = _sidecars(tmp_path / "d")
    img = Image.new("RGB", (96, 128), "red")
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90°: shown 128x96
    img.save(root / "i0.png", exif=exif)
    rc, out = _validate_json(capsys, root)
    row = next(r for r in out["examples"] if r["file"] == "i0.png")
    assert row["size"] == [128, 96] and row["stored_size"] == [96, 128]


def test_evaluation_reads_transparent_references_on_data_background(tmp_path):
    from PIL import Image

    from evaluation.config import DataArgs
    from evaluation.suite import dataset_split

    root = _sidecars(tmp_path / "d")
    Image.new("RGBA", (96, 96), (255, 0, 0, 0)).save(root / "i0.png")  # fully transparent
    train, _ = dataset_split(DataArgs(train_path=str(root), background="#404040"), "sks")
    assert "RGBA alpha composited on (64, 64, 64)" in train[0].conversions
