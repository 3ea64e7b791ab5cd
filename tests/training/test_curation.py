"""Dataset builder checks: the Laplacian-variance blur measure, near-duplicates and the diverse subset, and the
`lorafleet curate` report on a toy dataset seeded with a near-copy, a blurred and a too-small image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from cluster.cli import main
from training.config import DataConfig
from training.curation import (
    CurateConfig,
    curate,
    farthest_point_subset,
    laplacian_variance,
    near_duplicates,
    sharpness,
)
from training.data import validate_dataset
from training.toy_world import world


def test_laplacian_variance_of_known_images():
    assert laplacian_variance(Image.new("RGB", (16, 16), (90, 30, 200))) == 0.0  # no edges
    board = (np.indices((16, 16)).sum(axis=0) % 2 * 255).astype(np.uint8)  # 1-px checkerboard
    assert laplacian_variance(Image.fromarray(board)) == pytest.approx(1020.0**2)  # +-4 x 255 at every pixel
    assert laplacian_variance(Image.new("L", (2, 5))) == 0.0


def test_default_blur_threshold_splits_sharp_toy_images_from_blurred_copies():
    """Calibration (benchmarks/dataset_builder.py, 300 scenes): sharp >= 38.7, radius-3 Gaussian blur <= 14.7."""
    limit = CurateConfig().blur_threshold
    images = [world.render(s) for s in world.scenes(7, 24, backgrounds=world.BACKGROUNDS)]
    assert min(laplacian_variance(im) for im in images) > limit
    assert max(laplacian_variance(im.filter(ImageFilter.GaussianBlur(3))) for im in images) < limit


def test_sharpness_is_measured_at_the_training_resolution():
    big = world.render(world.scenes(0, 1)[0]).resize((256, 256), Image.Resampling.NEAREST)
    assert sharpness(big, 64) == pytest.approx(laplacian_variance(big.resize((64, 64), Image.Resampling.BICUBIC)))
    assert sharpness(big, 512) == laplacian_variance(big)  # never upscaled


def _clusters() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=1)
    points = centres.repeat_interleave(4, dim=0) + 0.05 * torch.randn(12, 16, generator=g)
    return torch.nn.functional.normalize(points, dim=1)


def test_near_duplicates_are_the_pairs_above_the_threshold_most_similar_first():
    emb = _clusters()
    emb[5] = emb[2]  # an exact copy across clusters
    pairs = near_duplicates(emb, 0.999)
    assert pairs[0][:2] == (2, 5) and pairs[0][2] == pytest.approx(1.0)
    sims = [s for _, _, s in near_duplicates(emb, 0.0)]
    assert sims == sorted(sims, reverse=True) and all(s > 0.0 for s in sims)


def test_farthest_point_subset_covers_every_cluster():
    emb = _clusters()
    picks, radius = farthest_point_subset(emb, 3)
    assert sorted(i // 4 for i in picks) == [0, 1, 2]  # one per cluster
    assert radius < 0.1  # every point is near a pick
    assert farthest_point_subset(emb, 99)[0] == farthest_point_subset(emb, 12)[0] and farthest_point_subset(emb, 12)[
        1
    ] == pytest.approx(0.0, abs=1e-6)
    assert farthest_point_subset(emb[:0], 3) == ([], pytest.approx(float("nan"), nan_ok=True))


@pytest.fixture
def messy_dataset(toy_dataset):
    """The toy dataset plus a near-copy of 0000 (one pixel changed), a blurred 0001 and a 32-px image."""
    rows = [json.loads(line) for line in (toy_dataset / "metadata.jsonl").read_text().splitlines()]
    copy = Image.open(toy_dataset / "0000.png").convert("RGB")
    copy.putpixel((0, 0), (0, 0, 0))
    copy.save(toy_dataset / "copy.png")
    Image.open(toy_dataset / "0001.png").filter(ImageFilter.GaussianBlur(3)).save(toy_dataset / "blurred.png")
    Image.open(toy_dataset / "0002.png").resize((32, 32)).save(toy_dataset / "small.png")
    rows += [{"file_name": "copy.png", "text": rows[0]["text"]}, {"file_name": "blurred.png", "text": rows[1]["text"]},
             {"file_name": "small.png", "text": rows[2]["text"]}]  # fmt: skip
    (toy_dataset / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return toy_dataset


def test_curate_reports_each_finding_by_file(repo, messy_dataset):
    from training.clip_scorer import ClipScorer

    data = DataConfig(path=str(messy_dataset), resolution=64)
    report = validate_dataset(data)
    out = curate(report, CurateConfig(select=4), data, ClipScorer.load(str(repo / "models" / "toy-clip")).images)
    found = {(p.file, p.message.split(":")[0].split(" (")[0]) for p in out.all_problems}
    assert ("copy.png", "near-duplicate of 0000.png") in found
    assert ("blurred.png", "blurred") in found
    small = [p for p in out.all_problems if p.file == "small.png"]  # too small: the validator's own error
    assert [p.severity for p in small] == ["error"] and "short side 32 px is below" in small[0].message
    assert {p.file for p in out.problems} == {"copy.png", "blurred.png"}  # nothing else is flagged
    assert len(out.selected) == 4 and len(set(out.selected)) == 4 and 0 < out.coverage_radius < 2


@pytest.mark.slow  # loads the toy CLIP in a CLI run
def test_cli_curate_json_report(repo, messy_dataset, capsys):
    args = ["curate", str(messy_dataset), "--base-model", str(repo / "models" / "toy-sd"), "--clip-model",
            str(repo / "models" / "toy-clip"), "--select", "3", "--json"]  # fmt: skip
    assert main(args) == 1  # the too-small image is the validator's error
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 10 and len(result["selected"]) == 3
    assert {p["file"] for p in result["problems"] if p["severity"] == "warning"} >= {"copy.png", "blurred.png"}
    assert main(["curate", str(messy_dataset), "--blur-threshold", "-1"]) == 2
    assert "curate.blur_threshold" in capsys.readouterr().err
