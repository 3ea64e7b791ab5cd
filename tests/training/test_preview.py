"""`lorafleet validate --json` / `--preview`: what will be trained on, shown as training itself produces it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cluster.cli import main
from tests.training.test_images import png16
from training.buckets import assign_buckets, default_step
from training.config import DataConfig
from training.data import validate_dataset
from training.dataset import load_image
from training.preview import GENERATOR


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse
        return exc.code


@pytest.fixture
def mixed(tmp_path):
    """Six captioned images (sidecars): a landscape photo, 16-bit grey, RGBA, palette, portrait, plain RGB."""
    root = tmp_path / "data"
    root.mkdir()
    rgba = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    rgba.paste((20, 40, 200, 255), (24, 24, 72, 72))
    landscape = Image.new("RGB", (144, 96), (200, 30, 30))
    landscape.paste((0, 200, 0), (0, 0, 20, 96))  # the left edge: cropped away or kept depending on the bucket
    images = {
        "a_wide.jpg": landscape,
        "b_grey16.png": None,
        "c_rgba.png": rgba,
        "d_palette.png": Image.new("RGB", (96, 96), (90, 90, 10)).convert("P"),
        "e_tall.png": Image.new("RGB", (96, 150), (10, 90, 90)),
        "f_rgb.png": Image.new("RGB", (96, 96), (123, 45, 67)),
    }
    for name, img in images.items():
        if img is None:
            (root / name).write_bytes(png16(np.full((96, 96), 207 * 257, dtype=np.uint16)))
        else:
            img.save(root / name)
        (root / name).with_suffix(".txt").write_text(f"a sks photo, {name.split('_')[1].split('.')[0]}")
    return root


def test_json_lists_every_image_with_its_caption_size_mode_bucket_and_conversions(mixed, capsys):
    assert run(["validate", str(mixed), "--trigger", "sks", "--resolution", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["file"]: r for r in out["examples"]}
    assert out["images"] == 6 == len(rows), out
    report = validate_dataset(DataConfig(path=str(mixed), trigger="sks", resolution=64))
    step = default_step(64)
    want_buckets = assign_buckets([e.path for e in report.examples], DataConfig(path=str(mixed), resolution=64), step)
    for ex, (w, h) in zip(report.examples, want_buckets):
        row = rows[ex.path.name]
        assert row["caption"] == ex.caption and row["repeats"] == 1 and row["prior"] is False
        assert row["bucket"] == f"{w}x{h}" and row["conversions"] == list(ex.conversions)
    assert rows["a_wide.jpg"]["size"] == [144, 96] and rows["a_wide.jpg"]["bucket"] != "64x64"
    assert rows["b_grey16.png"]["mode"] == "I;16"
    assert rows["b_grey16.png"]["conversions"][0] == "I;16 (16-bit greyscale) -> 8-bit (scaled 1/257)"
    assert rows["c_rgba.png"]["mode"] == "RGBA" and rows["f_rgb.png"]["conversions"] == []
    assert out["buckets"] == report.buckets and out["fingerprint"] == report.fingerprint()


def test_preview_pixels_are_exactly_what_training_feeds_the_vae(mixed, tmp_path, capsys):
    out = tmp_path / "preview"
    argv = ["validate", str(mixed), "--resolution", "64", "--preview", str(out), "data.background='#404040'"]
    assert run(argv) == 0
    assert "6 images as the model sees them" in capsys.readouterr().out
    cfg = DataConfig(path=str(mixed), resolution=64, background="#404040")
    report = validate_dataset(cfg)
    buckets = assign_buckets([e.path for e in report.examples], cfg, default_step(64))
    index = (out / "index.html").read_text()
    assert GENERATOR in index
    for n, (ex, bucket) in enumerate(zip(report.examples, buckets), start=1):
        t = load_image(ex.path, bucket, cfg.crop, background=(64, 64, 64))  # training's own call, as the loop makes it
        want = t.add(1).mul(127.5).round().permute(1, 2, 0).numpy().astype(np.uint8)
        got = np.asarray(Image.open(out / f"{n:04d}.png"))
        assert got.shape == want.shape, f"{ex.path.name}: preview {got.shape}, training crops to {want.shape}"
        diff = np.abs(got.astype(int) - want.astype(int)).max()
        assert diff == 0, f"{ex.path.name}: preview differs from load_image by up to {diff} levels"
        assert (out / f"{n:04d}.txt").read_text(encoding="utf-8") == ex.caption + "\n"
        assert ex.caption in index
    grey = np.asarray(Image.open(out / "0002.png"))  # b_grey16.png: 207, not white
    assert abs(grey.mean() - 207) <= 1, f"16-bit grey previews at {grey.mean():.1f}, the file shows 207"
    rgba = np.asarray(Image.open(out / "0003.png"))
    assert tuple(rgba[0, 0].tolist()) == (64, 64, 64), "the transparent corner sits on data.background"


def test_preview_replaces_its_own_output_and_never_a_users_folder(mixed, tmp_path, capsys):
    out = tmp_path / "preview"
    assert run(["validate", str(mixed), "--resolution", "64", "--preview", str(out)]) == 0
    (mixed / "f_rgb.png").unlink()  # a rerun with one image fewer leaves no stale 0006.png behind
    assert run(["validate", str(mixed), "--resolution", "64", "--preview", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == [f"{n:04d}.png" for n in range(1, 6)]
    mine = tmp_path / "holiday"
    mine.mkdir()
    (mine / "keep.jpg").write_bytes(b"a user's file")
    capsys.readouterr()
    assert run(["validate", str(mixed), "--resolution", "64", "--preview", str(mine)]) == 2
    assert "not empty and holds no earlier preview" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["keep.jpg"]


def test_validate_takes_data_settings_and_names_a_bad_one(mixed, capsys):
    assert run(["validate", str(mixed), "--resolution", "64", "background=purpel"]) == 2
    err = capsys.readouterr().err
    assert "data.background" in err and "'purpel' is not a colour" in err
    assert run(["validate", str(mixed), "--resolution", "64", "background=#404040"]) == 0  # the shell ate the quotes
    assert "c_rgba.png: RGBA alpha composited on (64, 64, 64)" in capsys.readouterr().out  # text, not a YAML comment
    assert run(["validate", str(mixed), "--resolution", "64", "background=#12345"]) == 2
    assert "'#12345' is not a colour Pillow knows" in capsys.readouterr().err
    assert run(["validate", str(mixed), "--resolution", "64", "data.colour=red"]) == 2
    assert "data.colour" in capsys.readouterr().err
