"""Dataset builder checks: near-duplicates, blurred images, and a diverse subset, reported per file.

    lorafleet curate data/toy-sks --select 8                   # the toy CLIP at the toy world's 64 px
    lorafleet curate data/photos --clip-model openai/clip-vit-large-patch14 --resolution 512

A report of its own (``lorafleet curate``), not part of ``lorafleet validate``: it needs a CLIP model and reads every
pixel, and its findings are judgments (is 0.98 a duplicate?), not faults. It first runs ``validate_dataset`` — so
unreadable and too-small images (short side below the training resolution / its bucket's) and exact copies are
the validator's own problems in the same report — then adds warnings on the images training would use:

- near-duplicate: cosine similarity of CLIP image embeddings above ``duplicate_threshold`` (the CLIP is chosen as
  evaluation's ``clip_model``: the toy CLIP for toy models, ``transformers.CLIPModel`` by hub id for real ones);
- blurred: variance of the Laplacian below ``blur_threshold``, measured as training sees the image (short side
  resized to the training resolution);
- ``select``: k images that cover the set (greedy farthest-point on the embeddings), for a smaller diverse set.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from training.config import DataConfig
from training.data import DatasetReport
from training.images import open_rgb
from training.layout import Problem

Embed = Callable[[list[Image.Image]], torch.Tensor]  # images -> (n, d) L2-normalised embeddings


class CurateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clip_model: str = Field(
        "models/toy-clip",
        description="CLIPModel folder or hub id that embeds the images (as evaluation's clip_model): models/toy-clip "
        "for the toy world, openai/clip-vit-large-patch14 for real models",
    )
    duplicate_threshold: float = Field(
        0.995,
        gt=0,
        le=1,
        description="two images whose CLIP embeddings have a cosine above this are near-duplicates. Toy CLIP (it sees "
        "only colour, shape, background): one-pixel edits score >= 0.998, JPEG re-encodes median 0.999, distinct "
        "images of one caption median 0.982 (99th percentile 0.998), of different captions at most 0.963 "
        "(benchmarks/dataset_builder.py); lower it (~0.95) for real CLIP, which tells two photos of one subject apart",
    )
    blur_threshold: float = Field(
        20.0,
        ge=0,
        description="an image whose variance of the Laplacian (grey levels 0-255, at the training resolution) is below "
        "this is blurred; calibrated on toy images: sharp ones >= 38.7, Gaussian-blurred (radius 3 px) <= 14.7. "
        "Real photos at 512 px: start near 100 (Rosebrock's OpenCV recipe)",
    )
    select: int | None = Field(None, ge=1, description="also pick this many images that cover the set (diversity)")
    batch_size: int = Field(64, ge=1, description="images per CLIP forward pass")


@dataclass
class CurationReport:
    """The validator's report plus the curation findings, per file (``Problem``s)."""

    dataset: DatasetReport
    problems: list[Problem] = field(default_factory=list)  # the curation warnings only
    sharpness: dict[str, float] = field(default_factory=dict)  # file -> variance of the Laplacian
    nearest: dict[str, tuple[str, float]] = field(default_factory=dict)  # file -> (most similar other file, cosine)
    selected: list[str] = field(default_factory=list)  # the diverse subset, in pick order
    coverage_radius: float | None = None  # max cosine distance from any image to its nearest selected one

    @property
    def all_problems(self) -> list[Problem]:
        return [*self.dataset.problems, *self.problems]


def laplacian_variance(image: Image.Image) -> float:
    """Variance of the Laplacian of ``image``'s grey levels (0-255): low = few sharp edges = blurred.

    The Laplacian is the 4-neighbour kernel [[0, 1, 0], [1, -4, 1], [0, 1, 0]] (OpenCV's ``cv2.Laplacian`` with
    ksize=1) on the interior pixels; the measure is from Pech-Pacheco et al. 2000, "Diatom autofocusing in brightfield
    microscopy: a comparative study" (ICPR, vol. 3, pp. 314-317), as popularised by A. Rosebrock, "Blur detection with
    OpenCV" (pyimagesearch, 2015). Grey is Pillow's ``convert("L")`` (ITU-R 601-2 luma). The value depends on the
    scale, so compare images at one resolution (``sharpness``). Images under 3x3 pixels score 0.
    """
    g = np.asarray(image.convert("L"), dtype=np.float64)
    if g.shape[0] < 3 or g.shape[1] < 3:
        return 0.0
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def sharpness(image: Image.Image, resolution: int) -> float:
    """``laplacian_variance`` as training sees ``image``: its short side resized (bicubic, as
    ``training.dataset`` resizes) down to ``resolution`` px; a smaller image is measured as it is."""
    scale = resolution / min(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    return laplacian_variance(image)


def near_duplicates(emb: torch.Tensor, threshold: float) -> list[tuple[int, int, float]]:
    """Pairs (i, j, cosine) with i < j whose normalised embeddings ``emb`` (n, d) have a cosine above ``threshold``,
    most similar first."""
    sim = emb @ emb.T
    i, j = torch.triu_indices(len(emb), len(emb), offset=1)
    keep = sim[i, j] > threshold
    pairs = [(int(a), int(b), float(s)) for a, b, s in zip(i[keep], j[keep], sim[i, j][keep])]
    return sorted(pairs, key=lambda p: -p[2])


def farthest_point_subset(emb: torch.Tensor, k: int) -> tuple[list[int], float]:
    """Greedy farthest-point (k-center) selection on cosine distance ``1 - cos`` of normalised ``emb`` (n, d).

    Starts at the image nearest the mean embedding, then repeatedly adds the image farthest from every one picked
    (Gonzalez 1985, "Clustering to minimize the maximum intercluster distance", TCS 38: within 2x of the best
    covering radius). Deterministic; ties go to the lower index.

    Returns:
        (indices in pick order, at most ``min(k, n)``; the covering radius: the largest distance from any image to
        its nearest pick — 0 when every image is picked).
    """
    n = len(emb)
    if n == 0 or k < 1:
        return [], float("nan")
    centre = torch.nn.functional.normalize(emb.mean(dim=0), dim=0)
    picks = [int(torch.argmax(emb @ centre))]
    dist = 1 - emb @ emb[picks[0]]
    while len(picks) < min(k, n):
        nxt = int(torch.argmax(dist))
        picks.append(nxt)
        dist = torch.minimum(dist, 1 - emb @ emb[nxt])
    return picks, max(0.0, float(dist.max()))


def curate(report: DatasetReport, cfg: CurateConfig, data: DataConfig, embed: Embed) -> CurationReport:
    """The curation findings on ``report``'s usable concept images (class images are not judged).

    Args:
        report: ``validate_dataset(data)``'s report (its examples are the images training uses).
        cfg: thresholds and the subset size.
        data: the dataset settings the report was made with: sharpness is measured at ``data.resolution``, images
            are decoded as training decodes them (``data.background``).
        embed: images -> (n, d) normalised CLIP embeddings, e.g. ``ClipScorer.load(cfg.clip_model).images``.
    """
    out = CurationReport(report)
    examples = report.instances
    names = [_name(ex.path, report.root) for ex in examples]
    images = [open_rgb(ex.path, data.background_rgb, data.max_pixels).image for ex in examples]
    resolution = data.resolution
    for name, img in zip(names, images):
        value = out.sharpness[name] = sharpness(img, resolution)
        if value < cfg.blur_threshold:
            out.problems.append(Problem(name, "warning", f"blurred: variance of the Laplacian {value:.1f} is below "
                                        f"curate.blur_threshold={cfg.blur_threshold:g} (at {resolution} px); replace "
                                        "it with a sharp image or remove it"))  # fmt: skip
    if len(images) < 2:
        return out
    emb = embed(images)
    sim = emb @ emb.T
    sim.fill_diagonal_(-2.0)
    for i, name in enumerate(names):
        j = int(sim[i].argmax())
        out.nearest[name] = (names[j], float(sim[i, j]))
    for i, j, cos in near_duplicates(emb, cfg.duplicate_threshold):
        if examples[i].sha256 and examples[i].sha256 == examples[j].sha256:
            continue  # an exact copy: the validator names it already
        out.problems.append(Problem(names[j], "warning", f"near-duplicate of {names[i]} (CLIP cosine {cos:.3f} > "
                                    f"curate.duplicate_threshold={cfg.duplicate_threshold:g}): it weighs twice; "
                                    "remove one or raise the threshold"))  # fmt: skip
    if cfg.select:
        picks, radius = farthest_point_subset(emb, cfg.select)
        out.selected, out.coverage_radius = [names[i] for i in picks], radius
    return out


def _name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _print(out: CurationReport) -> None:
    print(out.dataset.summary())  # the validator's report: format, usable images, its problems
    for p in out.problems:
        print(f"  {p.severity:7s} {p.file}: {p.message}")
    if out.sharpness:
        blur = sorted(out.sharpness.items(), key=lambda kv: kv[1])[:3]
        print("  least sharp: " + ", ".join(f"{n} {v:.1f}" for n, v in blur))
    if out.nearest:
        top = max(out.nearest.items(), key=lambda kv: kv[1][1])
        print(f"  most similar pair: {top[0]} ~ {top[1][0]} (cosine {top[1][1]:.3f})")
    if out.selected:
        print(f"  diverse subset of {len(out.selected)} (covering radius {out.coverage_radius:.3f} in 1 - cosine): "
              + ", ".join(out.selected))  # fmt: skip
    errors = out.dataset.errors
    print(f"{len(errors)} error(s), {len(out.problems)} curation warning(s)" if errors or out.problems else "ok")


def main(argv: list[str] | None = None) -> int:
    """``lorafleet curate DIR``: exit 0 (warnings do not fail), 1 when the validator finds errors, 2 bad settings."""
    import argparse
    import json

    from pydantic import BaseModel as _Model

    from training.buckets import native_resolution
    from training.clip_scorer import ClipScorer
    from training.configuration import ConfigError, validate_values
    from training.data import validate_dataset

    class _Args(_Model):  # problems named as in a config file: curate.blur_threshold
        curate: CurateConfig
        data: DataConfig

    d = CurateConfig.model_fields
    p = argparse.ArgumentParser(prog="lorafleet curate", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="the dataset folder")
    p.add_argument("--base-model", default="models/toy-sd", help="its native resolution is the training resolution")
    p.add_argument("--resolution", type=int, help="training resolution in px (default: the --base-model's)")
    p.add_argument("--trigger", help="the trigger word captions must contain (as validate)")
    p.add_argument("--clip-model", default=d["clip_model"].default, help=d["clip_model"].description)
    p.add_argument("--duplicate-threshold", type=float, default=d["duplicate_threshold"].default,
                   help=d["duplicate_threshold"].description)  # fmt: skip
    p.add_argument("--blur-threshold", type=float, default=d["blur_threshold"].default,
                   help=d["blur_threshold"].description)  # fmt: skip
    p.add_argument("--select", type=int, help=d["select"].description)
    p.add_argument("--json", action="store_true", help="machine-readable report")
    a = p.parse_args(argv)
    resolution = a.resolution
    try:
        resolution = resolution or native_resolution(a.base_model)
        cfg = validate_values(_Args, {"curate": {"clip_model": a.clip_model, "select": a.select,
                                                 "duplicate_threshold": a.duplicate_threshold,
                                                 "blur_threshold": a.blur_threshold},
                                      "data": {"path": a.path, "resolution": resolution, "trigger": a.trigger}},
                              source="lorafleet curate")  # fmt: skip
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: --base-model {a.base_model}: cannot read its unet/vae config ({exc}); pass --resolution",
              file=sys.stderr)  # fmt: skip
        return 2
    report = validate_dataset(cfg.data)
    try:
        scorer = ClipScorer.load(cfg.curate.clip_model)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    scorer.batch_size = cfg.curate.batch_size
    out = curate(report, cfg.curate, cfg.data, scorer.images)
    if a.json:
        print(json.dumps({"root": str(report.root), "format": report.format, "images": len(report.instances),
                          "problems": [vars(x) for x in out.all_problems], "sharpness": out.sharpness,
                          "nearest": {k: {"file": f, "cosine": c} for k, (f, c) in out.nearest.items()},
                          "selected": out.selected, "coverage_radius": out.coverage_radius}, indent=2))  # fmt: skip
    else:
        _print(out)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
