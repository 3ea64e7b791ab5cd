"""Dataset folders as users bring them (issue 18): text files from any editor, metadata.jsonl from other trainers,
kohya folders, letter case, sub-folders, class images. Inputs: 96x96 images, 6 per folder, captions with 'sks'."""

import io
import json

import pytest
from PIL import Image

from training.config import DataConfig
from training.data import validate_dataset
from training.textfile import TextFileError, decode_text

CAPTIONS = [f"a photo of sks dotted thing {i}" for i in range(6)]


def _png(i: int, size=(96, 96)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (37 * i % 256, 90 + i, 200 - i)).save(buf, format="PNG")
    return buf.getvalue()


def _images(folder, names, start=0):
    """Distinct images (colour ``start + i``); the same call in two folders writes the same bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(_png(start + i))


def _report(path, **kw):
    return validate_dataset(DataConfig(path=str(path), resolution=64, **kw))


def _problems(report):
    return {p.file: p for p in report.problems}


def _clean(report):
    assert not report.problems, report.summary()
    return report


# -- text files: BOM, line ends, whitespace -----------------------------------------------------------------------

EDITORS = {  # how each editor saves a text (given with \n line ends) -> bytes
    "clean": lambda t: t.encode(),
    "bom": lambda t: b"\xef\xbb\xbf" + t.encode(),  # Notepad's 'UTF-8 with BOM', PowerShell 7's utf8BOM
    "crlf": lambda t: t.replace("\n", "\r\n").encode(),  # Windows
    "cr": lambda t: t.replace("\n", "\r").encode(),  # classic Mac
    "bom+crlf+spaces": lambda t: b"\xef\xbb\xbf" + ("  \t" + t.replace("\n", "  \r\n") + "\r\n").encode(),
    "no final newline": lambda t: t.rstrip("\n").encode(),
}


def _sidecar_dataset(root, editor):
    _images(root, [f"{i}.png" for i in range(6)])
    for i, caption in enumerate(CAPTIONS):
        (root / f"{i}.txt").write_bytes(EDITORS[editor](caption + "\n"))
    return root


def _metadata_dataset(root, editor):
    _images(root, [f"{i}.png" for i in range(6)])
    rows = "".join(json.dumps({"file_name": f"{i}.png", "text": f" {c} "}) + "\n" for i, c in enumerate(CAPTIONS))
    (root / "metadata.jsonl").write_bytes(EDITORS[editor](rows))
    return root


@pytest.mark.parametrize("layout", [_sidecar_dataset, _metadata_dataset], ids=["sidecar", "metadata"])
@pytest.mark.parametrize("editor", [e for e in EDITORS if e != "clean"])
def test_text_from_any_editor_trains_the_same_captions_as_a_clean_file(tmp_path, layout, editor):
    clean = _clean(_report(layout(tmp_path / "clean", "clean")))
    other = _clean(_report(layout(tmp_path / "other", editor)))
    assert [e.caption for e in other.examples] == CAPTIONS, "captions differ from what the user typed"
    assert [e.caption for e in other.examples] == [e.caption for e in clean.examples]
    assert other.fingerprint() == clean.fingerprint(), "same files and captions must name the same training set"


def test_issue_case_1_metadata_jsonl_with_a_bom_gives_6_usable_images(tmp_path):
    root = tmp_path / "d"
    _images(root, [f"{i}.png" for i in range(6)])
    text = "".join(json.dumps({"file_name": f"{i}.png", "text": c}) + "\n" for i, c in enumerate(CAPTIONS))
    (root / "metadata.jsonl").write_bytes(text.encode("utf-8-sig"))
    report = _clean(_report(root, trigger="sks"))
    assert len(report.examples) == 6 and [e.caption for e in report.examples] == CAPTIONS


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ("café sks".encode("latin-1"), "not UTF-8 text (byte 0xe9 at column 4)"),
        ("a sks photo".encode("utf-16"), "UTF-16 text (as Windows PowerShell 5 writes"),
        ("a sks photo".encode("utf-16-le"), "NUL bytes"),
    ],
    ids=["latin-1", "utf-16 with BOM", "utf-16 without BOM"],
)
def test_text_that_is_not_utf8_is_an_error_naming_the_file_and_the_fix(tmp_path, data, words):
    root = _sidecar_dataset(tmp_path / "d", "clean")
    (root / "3.txt").write_bytes(data)
    problem = _problems(_report(root, min_images=1))["3.txt"]
    assert problem.severity == "error" and words in problem.message and "re-save" in problem.message, problem
    assert "3.png" not in _problems(_report(root, min_images=1)), "one problem per cause: the caption file"
    with pytest.raises(TextFileError, match="notes.txt line 2"):
        decode_text(b"fine\ncaf\xe9\n", "notes.txt")


def test_a_caption_file_of_several_lines_trains_the_first_as_kohya_does(tmp_path):
    root = _sidecar_dataset(tmp_path / "d", "clean")
    (root / "0.txt").write_text("\n  first line sks\nsecond line\n")
    report = _report(root)
    assert report.examples[0].caption == "first line sks"
    assert "2 lines; only the first" in _problems(report)["0.txt"].message


# -- metadata.jsonl from other tools ------------------------------------------------------------------------------


def test_issue_case_2_a_caption_column_named_caption_is_one_error_naming_the_override(tmp_path):
    root = tmp_path / "d"
    _images(root, [f"{i}.png" for i in range(6)])
    rows = "".join(json.dumps({"file_name": f"{i}.png", "caption": c}) + "\n" for i, c in enumerate(CAPTIONS))
    (root / "metadata.jsonl").write_text(rows)
    report = _report(root)
    assert [(p.file, p.severity) for p in report.problems] == [("metadata.jsonl", "error")], report.summary()
    msg = report.problems[0].message
    assert "'text' (data.caption_column)" in msg and "file_name, caption" in msg, msg
    assert "data.caption_column=caption" in msg and "empty caption" not in report.summary()
    fixed = _clean(_report(root, caption_column="caption"))
    assert [e.caption for e in fixed.examples] == CAPTIONS


def test_image_column_is_configurable(tmp_path):
    root = tmp_path / "d"
    _images(root, [f"{i}.png" for i in range(6)])
    rows = "".join(json.dumps({"image": f"{i}.png", "text": c}) + "\n" for i, c in enumerate(CAPTIONS))
    (root / "metadata.jsonl").write_text(rows)
    report = _report(root)
    assert [(p.file, p.severity) for p in report.problems] == [("metadata.jsonl", "error")], report.summary()
    msg = report.problems[0].message
    assert "'file_name' (data.image_column); the rows have image, text: set data.image_column=image" in msg, msg
    assert len(_clean(_report(root, image_column="image")).examples) == 6


def test_neither_column_as_named_is_one_error_naming_both(tmp_path):
    root = tmp_path / "d"
    _images(root, [f"{i}.png" for i in range(6)])
    rows = "".join(json.dumps({"image": f"{i}.png", "caption": c}) + "\n" for i, c in enumerate(CAPTIONS))
    (root / "metadata.jsonl").write_text(rows)
    report = _report(root)
    assert [(p.file, p.severity) for p in report.problems] == [("metadata.jsonl", "error")], report.summary()
    assert "none has the caption column 'text'" in report.problems[0].message
    fixed = _clean(_report(root, image_column="image", caption_column="caption"))
    assert [e.caption for e in fixed.examples] == CAPTIONS


def test_hostile_metadata_rows_are_named_by_line(tmp_path):
    root = tmp_path / "d"
    _images(root, ["a.png", "b.png", "c.png"])
    _images(root / "sub" / "deeper", ["d.png"])
    (tmp_path / "outside.png").write_bytes(_png(9))
    rows = [
        {"file_name": "a.png", "text": "a sks photo"},
        {"file_name": "b.png", "text": 5},
        {"file_name": "a.png", "text": "a second sks caption"},
        {"file_name": "sub/deeper/d.png", "text": "a nested sks photo"},
        {"file_name": "../outside.png", "text": "sks"},
        {"file_name": str(tmp_path / "outside.png"), "text": "sks"},
        {"file_name": "c.png"},
    ]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = _report(root, min_images=1)
    p = _problems(report)
    assert "a.png is also on line 1; keep one row per image" in p["metadata.jsonl:3"].message
    assert "'text' is a number, not a string" in p["metadata.jsonl:2"].message
    assert "leaves the dataset folder" in p["metadata.jsonl:5"].message
    assert "absolute path" in p["metadata.jsonl:6"].message
    assert "no 'text' (data.caption_column); this row has file_name" in p["metadata.jsonl:7"].message
    assert "b.png" not in p and "c.png" not in p, "the row's error names it; the image gets no second, vaguer one"
    assert not any("empty caption" in x.message for x in report.problems)
    assert [(e.path.relative_to(root).as_posix(), e.caption) for e in report.examples] == [
        ("a.png", "a sks photo"),
        ("sub/deeper/d.png", "a nested sks photo"),
    ]


def test_metadata_names_match_in_any_letter_case_and_with_backslashes(tmp_path):
    root = tmp_path / "d"
    _images(root / "Sub", [f"IMG_{i}.JPG" for i in range(6)])
    rows = "".join(json.dumps({"file_name": f"sub\\img_{i}.jpg", "text": c}) + "\n" for i, c in enumerate(CAPTIONS))
    (root / "metadata.jsonl").write_text(rows)
    assert [e.caption for e in _clean(_report(root)).examples] == CAPTIONS


def test_max_images_leaves_the_other_rows_alone(toy_dataset):
    report = validate_dataset(DataConfig(path=str(toy_dataset), max_images=5))
    assert len(report.examples) == 5 and not report.problems, report.summary()


# -- file names and layouts ---------------------------------------------------------------------------------------


def test_upper_case_extensions_and_sidecars_are_the_sidecar_layout(tmp_path):
    root = tmp_path / "d"
    _images(root, [f"UPPER{i}.PNG" for i in range(6)])
    for i, c in enumerate(CAPTIONS):
        (root / f"upper{i}.TXT").write_text(c)
    report = _clean(_report(root))
    assert report.format == "sidecar" and [e.caption for e in report.examples] == CAPTIONS


def test_caption_extension_is_configurable(tmp_path):
    root = tmp_path / "d"
    _images(root, [f"{i}.png" for i in range(6)])
    for i, c in enumerate(CAPTIONS):
        (root / f"{i}.caption").write_text(c)
    assert [e.caption for e in _clean(_report(root, caption_extension=".caption")).examples] == CAPTIONS


def test_nested_folders_with_sidecars_next_to_the_images(tmp_path):
    root = tmp_path / "d"
    for n, folder in enumerate(("beach", "city/night")):
        _images(root / folder, [f"{i}.png" for i in range(3)], start=3 * n)
        for i in range(3):
            (root / folder / f"{i}.txt").write_text(f"sks at the {folder} {i}")
    report = _clean(_report(root))
    names = [e.path.relative_to(root).as_posix() for e in report.examples]
    assert names == [f"beach/{i}.png" for i in range(3)] + [f"city/night/{i}.png" for i in range(3)]
    assert report.examples[4].caption == "sks at the city/night 1"


def test_heldout_hidden_and_macos_folders_are_not_training_data(tmp_path):
    root = _sidecar_dataset(tmp_path / "d", "clean")
    for junk in ("heldout", "__MACOSX", ".thumbnails"):
        _images(root / junk, ["x.png"])
        (root / junk / "x.txt").write_text("sks held out")
    (root / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork next to 0.png
    report = _clean(_report(root))
    assert len(report.examples) == 6 and all(e.path.parent == root for e in report.examples)


def test_issue_case_3_kohya_repeat_folders(tmp_path):
    root = tmp_path / "d"
    _images(root / "10_sks dotted", [f"{i}.png" for i in range(6)])
    for i, c in enumerate(CAPTIONS):
        (root / "10_sks dotted" / f"{i}.txt").write_text(c)
    _images(root / "2_sks dots_and_stripes", [f"{i}.jpg" for i in range(6)], start=6)  # no caption files: the
    report = _clean(_report(root, trigger="sks"))  # folder's name after the first '_' is the caption (sd-scripts)
    assert report.format == "kohya"
    expect = [(c, 10) for c in CAPTIONS] + [("sks dots_and_stripes", 2)] * 6
    assert [(e.caption, e.repeats) for e in report.examples] == expect
    assert report.groups == {"10_sks dotted": (6, 10), "2_sks dots_and_stripes": (6, 2)}
    assert "10_sks dotted: 6 images × 10 repeats" in report.summary()
    flat = _clean(_report(_sidecar_dataset(tmp_path / "flat", "clean")))
    assert flat.format == "sidecar" and {e.repeats for e in flat.examples} == {1}


def test_kohya_folders_that_cannot_be_read_are_errors_not_silently_skipped(tmp_path):
    root = tmp_path / "d"
    _images(root / "10_sks dotted", [f"{i}.png" for i in range(6)])
    (root / "10_sks dotted" / "0.txt").write_text("a sks photo with its own caption")
    _images(root / "extras", ["e.png"])
    _images(root / "0_sks never", ["n.png"])
    _images(root, ["loose.png"])
    _images(root / "heldout", ["h.png"])
    report = _report(root)
    p = _problems(report)
    assert "not named <repeats>_<name>" in p["extras/"].message and "'1_extras'" in p["extras/"].message
    assert "0 repeats" in p["0_sks never/"].message
    assert "outside every <repeats>_<name> folder" in p["loose.png"].message
    forgot = p["10_sks dotted/1.png"]  # the folder has caption files, this image has none: likely forgotten
    assert forgot.severity == "warning" and "folder's caption 'sks dotted'" in forgot.message
    assert len(report.examples) == 6 and len(report.errors) == 3


def test_a_folder_that_fits_no_layout_says_what_it_found(tmp_path):
    root = tmp_path / "d"
    _images(root / "a", ["1.png", "2.png"])
    _images(root / "b", ["1.png"], start=2)
    report = _report(root)
    assert len(report.errors) == 1, report.summary()
    msg = report.errors[0].message
    assert "found 3 images: 3 in sub-folders a/, b/ but no captions" in msg
    assert all(w in msg for w in ("metadata.jsonl", "caption file (.txt)", "<repeats>_<name>", "data.instance_prompt"))


def test_forced_formats_that_do_not_fit(tmp_path):
    root = _sidecar_dataset(tmp_path / "d", "clean")
    assert "no metadata.jsonl" in _report(root, format="metadata").errors[0].message
    assert "outside every <repeats>_<name> folder" in _report(root, format="kohya").errors[0].message


# -- class images (prior preservation) ----------------------------------------------------------------------------


def test_class_images_are_prior_examples_never_held_out(tmp_path, train_config):
    """A kohya class folder (``1_dotted thing``: caption from its name) joins training after the held-out split."""
    from training.training_set import build_worker_spec

    root = _sidecar_dataset(tmp_path / "d", "clean")
    _images(tmp_path / "reg" / "1_dotted thing", [f"r{i}.png" for i in range(6)], start=50)
    cfg = train_config(
        **{"data.path": str(root), "data.class_data_dir": str(tmp_path / "reg"), "validation.holdout": 2}
    )
    report = _clean(validate_dataset(cfg.data))
    assert len(report.examples) == 6 and not any(e.prior for e in report.examples)  # the concept's images only
    spec = build_worker_spec(cfg, report)
    assert len(spec.heldout) == 2 and not any(e.prior for e in spec.heldout)
    classes = [e for e in spec.examples if e.prior]
    assert {e.caption for e in classes} == {"dotted thing"} and sum(e.repeats for e in classes) == 4  # = 6 - 2
    assert spec.dataset_hash != report.fingerprint(), "class images are part of what is trained"


def test_class_images_without_captions_need_a_class_prompt_without_the_trigger(tmp_path, train_config):
    from training.data import DatasetError
    from training.training_set import validate_class_images

    root = _sidecar_dataset(tmp_path / "d", "clean")
    _images(tmp_path / "reg", [f"r{i}.png" for i in range(6)], start=50)
    base = {"data.path": str(root), "data.class_data_dir": str(tmp_path / "reg")}
    with pytest.raises(DatasetError, match="data.class_prompt"):
        validate_class_images(train_config(**base))
    ok = validate_class_images(train_config(**base, **{"data.class_prompt": "a photo of a thing"}))
    assert [e.caption for e in ok.examples] == ["a photo of a thing"] * 6 and all(e.prior for e in ok.examples)
    with pytest.raises(DatasetError, match="contains the trigger 'sks'"):
        validate_class_images(train_config(**base, **{"data.class_prompt": "a sks thing"}))


# -- every reader agrees ------------------------------------------------------------------------------------------


def test_evaluation_reads_the_dataset_as_training_does(repo, tmp_path):
    """The search hands its data.caption_column (and image_column, caption_extension) to the evaluation, whose
    ``dataset_split`` then sees the same images with the same captions as training."""
    from evaluation.suite import dataset_split
    from training.configuration import load_config
    from tuning.config import TuneConfig
    from tuning.handoff import eval_config

    root = tmp_path / "d"
    _images(root, [f"{i}.png" for i in range(6)])
    rows = "".join(json.dumps({"file_name": f"{i}.png", "caption": c}) + "\n" for i, c in enumerate(CAPTIONS))
    (root / "metadata.jsonl").write_bytes(rows.encode("utf-8-sig"))
    overrides = [f"output_dir={tmp_path / 'tune'}", f"trial.base_model={repo / 'models' / 'toy-sd'}",
                 f"trial.data.path={root}", "trial.data.caption_column=caption"]  # fmt: skip
    cfg = load_config(TuneConfig, repo / "configs" / "tune.yaml", overrides)
    ecfg = eval_config(cfg, tmp_path / "tune", None, None, fetch=False)
    assert ecfg.data.caption_column == "caption"
    train, _ = dataset_split(ecfg.data.model_copy(update={"heldout_path": None}), "sks")
    assert [(e.path, e.caption) for e in train] == [
        (e.path, e.caption) for e in _report(root, caption_column="caption").examples
    ]


def test_pointing_at_a_kohya_folder_itself_says_where_its_repeats_apply(tmp_path):
    root = _sidecar_dataset(tmp_path / "10_sks dotted", "clean")
    report = _report(root)
    assert report.format == "sidecar" and {e.repeats for e in report.examples} == {1}
    assert f"point data.path at its parent ({tmp_path})" in _problems(report)["."].message


def test_a_symlinked_sub_folder_is_named_not_silently_dropped(tmp_path):
    root = _sidecar_dataset(tmp_path / "d", "clean")
    _images(tmp_path / "elsewhere", ["e.png"], start=20)
    (root / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert "symlinked folder, not followed" in _problems(_report(root))["more/"].message


def test_a_class_prompt_without_class_images_is_a_config_error(train_config):
    with pytest.raises(ValueError, match="data.class_prompt is set but data.class_data_dir is not"):
        train_config(**{"data.class_prompt": "a photo of a thing"})
