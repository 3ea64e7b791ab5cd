"""``lorafleet caption``: captions written where the validator reads them, existing ones kept, nothing written on
a refusal or a dry run. Folder logic is tested with fixed captions; one CLI run uses the toy captioner."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from cluster.cli import main
from training.captioning.folder import StalePlan, plan_captions, write_captions
from training.config import DataConfig
from training.data import validate_dataset
from training.toy_world import world


def _images_only(tmp_path, n=3, sub=""):
    folder = tmp_path / "imgs"
    (folder / sub).mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(world.scenes(0, n)):
        world.render(scene).save(folder / sub / f"{i:02d}.png")
    return folder


def test_metadata_rows_are_added_and_empty_ones_filled_keeping_every_other_line(toy_dataset):
    meta = toy_dataset / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    first = json.loads(lines[0])
    first["text"], first["source"] = "", "camera"  # an empty caption; an extra key that must survive
    kept = [json.dumps(first), *lines[1:5], "not json at all"]  # a bad line is kept as it is
    meta.write_text("\n".join(kept) + "\n")
    plan = plan_captions(toy_dataset)
    assert plan.format == "metadata" and not plan.errors
    assert [t.name for t in plan.todo] == ["0000.png", "0005.png", "0006.png", "0007.png"]
    assert plan.todo[0].line == 1 and plan.todo[0].old == "" and plan.todo[1].line is None
    write_captions(plan, [(t, f"caption {t.name}") for t in plan.todo])
    out = meta.read_text().splitlines()
    assert out[1:6] == kept[1:6]  # untouched rows and the bad line, byte for byte
    assert json.loads(out[0]) == {"file_name": "0000.png", "text": "caption 0000.png", "source": "camera"}
    assert [json.loads(x)["file_name"] for x in out[6:]] == ["0005.png", "0006.png", "0007.png"]
    assert not plan_captions(toy_dataset).todo  # every image has a caption now


def test_sidecar_files_are_created_and_kept_unless_overwrite(tmp_path):
    folder = _images_only(tmp_path, sub="10_sks")  # a kohya folder: its images have the folder's caption
    plan = plan_captions(folder)
    assert plan.format == "sidecar" and not plan.todo and len(plan.kept) == 3
    (folder / "10_sks" / "01.TXT").write_text("my own words\n")  # a caption file in another letter case
    plan = plan_captions(folder, overwrite=True)
    write_captions(plan, [(t, "new") for t in plan.todo])
    assert sorted(p.name for p in (folder / "10_sks").glob("*.[tT][xX][tT]")) == ["00.txt", "01.TXT", "02.txt"]
    assert (folder / "10_sks" / "01.TXT").read_text() == "new\n"  # rewritten in place, no a.txt + A.TXT twins


def test_images_only_default_to_metadata_and_sidecar_on_request(tmp_path):
    folder = _images_only(tmp_path)
    assert plan_captions(folder).format == "metadata"
    plan = plan_captions(folder, "sidecar")
    write_captions(plan, [(t, f"a caption of {t.name}") for t in plan.todo])
    report = validate_dataset(DataConfig(path=str(folder), min_images=1))
    assert not report.errors and [e.caption for e in report.examples] == [f"a caption of 0{i}.png" for i in range(3)]
    (folder / "00.txt").write_text("mine\n")
    again = plan_captions(folder, "sidecar")
    assert not again.todo and (folder / "00.txt").read_text() == "mine\n"


@pytest.mark.parametrize(
    ("setup", "fmt", "message"),
    [("txt", "metadata", "use --format sidecar"), ("jsonl", "sidecar", "use --format metadata"),
     ("none", "auto", "no images")],
)  # fmt: skip
def test_a_layout_that_would_hide_captions_is_refused_before_writing(tmp_path, setup, fmt, message):
    folder = _images_only(tmp_path, n=2) if setup != "none" else tmp_path
    if setup == "txt":
        (folder / "00.txt").write_text("a caption\n")
    if setup == "jsonl":
        (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "00.png", "text": "x"}) + "\n")
    before = sorted(p.name for p in folder.iterdir())
    plan = plan_captions(folder, fmt)
    assert plan.errors and message in plan.errors[0].message
    with pytest.raises(ValueError, match="nothing written"):
        write_captions(plan, [(t, "x") for t in plan.todo])
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.slow  # loads the toy CLIP in a CLI run
def test_cli_captions_a_toy_folder_so_that_it_validates(repo, toy_dataset, tmp_path, capsys):
    folder = tmp_path / "d"
    shutil.copytree(toy_dataset, folder)
    truth = (folder / "metadata.jsonl").read_text()
    (folder / "metadata.jsonl").unlink()
    args = ["caption", str(folder), "--trigger", "sks", "--base-model", str(repo / "models" / "toy-sd"),
            "--model", str(repo / "models" / "toy-clip")]  # fmt: skip
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "0000.png: " in out and "would write 8 captions to metadata.jsonl" in out
    assert not (folder / "metadata.jsonl").exists()
    assert main(args) == 0
    assert (folder / "metadata.jsonl").read_text() == truth  # the toy captioner recovers every caption
    assert "wrote 8 captions" in capsys.readouterr().out
    assert main([*args, "--json"]) == 0  # nothing left to do; existing captions kept
    result = json.loads(capsys.readouterr().out)
    assert result["captions"] == [] and len(result["kept"]) == 8 and result["written"] == []


# ---- nothing lost, nothing half-written (hostile review) --------------------------------------------------------
def test_rewritten_caption_files_keep_their_permission_bits(tmp_path):
    folder = _images_only(tmp_path)
    meta = folder / "metadata.jsonl"
    meta.write_text(json.dumps({"file_name": "00.png", "text": ""}) + "\n")
    os.chmod(meta, 0o644)  # read by a Ray worker or a colleague under another user
    plan = plan_captions(folder)
    write_captions(plan, [(t, "a caption") for t in plan.todo])
    assert stat.S_IMODE(meta.stat().st_mode) == 0o644 and len(meta.read_text().splitlines()) == 3
    sidecars = _images_only(tmp_path / "b")
    (sidecars / "00.txt").write_text("mine\n")
    os.chmod(sidecars / "00.txt", 0o640)
    plan = plan_captions(sidecars, overwrite=True)
    write_captions(plan, [(t, "new") for t in plan.todo])
    assert stat.S_IMODE((sidecars / "00.txt").stat().st_mode) == 0o640 and (sidecars / "00.txt").read_text() == "new\n"
    (tmp_path / "probe").write_text("")  # a new caption file gets the mode `open` gives (0666 less the umask)
    assert (sidecars / "01.txt").stat().st_mode == (tmp_path / "probe").stat().st_mode


def test_metadata_edited_while_captioning_is_not_overwritten_at_the_planned_line_numbers(tmp_path):
    folder = _images_only(tmp_path)
    meta = folder / "metadata.jsonl"
    mine = json.dumps({"file_name": "01.png", "text": "my own caption"})
    meta.write_text(json.dumps({"file_name": "00.png", "text": ""}) + "\n" + mine + "\n")
    plan = plan_captions(folder)
    assert [(t.name, t.line) for t in plan.todo] == [("00.png", 1), ("02.png", None)]
    edited = mine + "\n" + json.dumps({"file_name": "00.png", "text": ""}) + "\n"  # the user moved a row meanwhile
    meta.write_text(edited)
    with pytest.raises(StalePlan, match="changed while captioning"):
        write_captions(plan, [(t, "machine caption") for t in plan.todo])
    assert meta.read_text() == edited  # line 1 is now the user's caption: it was not replaced


def test_two_images_that_would_share_a_caption_file_are_refused_before_anything_is_written(tmp_path):
    folder = _images_only(tmp_path, n=2)
    shutil.copy(folder / "00.png", folder / "00.jpg")
    plan = plan_captions(folder, "sidecar")
    assert any("share the caption file 00.txt" in p.message for p in plan.errors)
    with pytest.raises(ValueError, match="nothing written"):
        write_captions(plan, [(t, "x") for t in plan.todo])
    assert sorted(p.name for p in folder.iterdir()) == ["00.jpg", "00.png", "01.png"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_read_only_caption_files_are_refused_by_the_plan(tmp_path):
    folder = _images_only(tmp_path)
    (folder / "00.txt").write_text("mine\n")
    os.chmod(folder / "00.txt", 0o444)
    plan = plan_captions(folder, overwrite=True)
    assert [p.file for p in plan.errors] == ["00.txt"] and "read-only" in plan.errors[0].message
