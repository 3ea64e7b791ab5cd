"""Aspect-ratio buckets (kohya / SimpleTuner style): a 600x400 photo trains as a landscape, not a cropped square.

``data.resolution`` is the bucket *area*: every bucket ``(w, h)`` has sides that are multiples of the
bucket step and ``w·h ≤ resolution²`` (for each width, the largest height that fits), with an aspect
ratio between 1:``data.max_aspect`` and ``data.max_aspect``:1. Each image goes to the bucket whose
aspect ratio is closest (distance of log-ratios), is resized to cover it and cropped to exactly its size,
and every batch holds images of one bucket.

The step is the base model's granularity — VAE factor × 2**(UNet down blocks − 1): 16 for the toy model,
64 for SD 1.x — so every bucket's latent passes the UNet's down- and up-sampling without padding.

    make_buckets(64, 16)                  # [(48, 80), (64, 64), (80, 48)]
    nearest_bucket((600, 400), buckets)   # the landscape one
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image

from training.config import DataConfig, PreflightError, TrainConfig

log = logging.getLogger(__name__)
Bucket = tuple[int, int]  # (width, height) in pixels

# Without a model at hand (``lorafleet validate``) the step is guessed from the resolution: SD-family models are
# made for ~resolution/4-8 px steps (toy-sd: 16 at 64 px; SD 1.x: 64 at 512 px). A too fine guess would be strict
# (finer steps fill the area better, so their buckets have longer short sides) and refuse images that training
# accepts; ``training.train.run`` reads the model's own step before it validates, so its verdict is exact.
MAX_GUESSED_STEP = 64


def default_step(resolution: int) -> int:
    """The step ``validate_dataset`` assumes for ``data.bucket_step=null``: the largest power of two
    ≤ min(64, resolution / 4) (16 for 64 px, 64 for 512 px and up)."""
    return max(1, min(MAX_GUESSED_STEP, 2 ** int(math.log2(max(resolution // 4, 1)))))


_SWAPPED = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90°


def make_buckets(resolution: int, step: int, max_aspect: float = 2.0) -> list[Bucket]:
    """Every bucket ``(w, h)`` for an area of ``resolution²`` px, sides multiples of ``step``, sorted by width.

    Raises:
        ValueError: ``resolution < step`` (no bucket fits), naming data.resolution and data.bucket_step; a step
            below 1 or ``max_aspect`` outside [1, 8].
    """
    if step < 1 or not 1.0 <= max_aspect <= 8.0:
        raise ValueError(f"data.bucket_step={step} must be >= 1 and data.max_aspect={max_aspect} within [1, 8]")
    if resolution < step:
        raise ValueError(
            f"data.resolution={resolution} is below data.bucket_step={step}: no bucket fits; "
            "raise data.resolution or lower data.bucket_step"
        )
    area = resolution * resolution
    buckets = {(resolution // step * step,) * 2}  # the square, also when resolution is not a multiple of step
    width = step
    while width <= resolution * max_aspect:
        height = area // width // step * step
        if height >= step and max(width, height) <= max_aspect * min(width, height):
            buckets.add((width, height))
        width += step
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to ``size``'s (|log w/h − log bw/bh|); ties go to the larger area."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(ratio - math.log(b[0] / b[1])), -b[0] * b[1]))


def data_buckets(data: DataConfig, step: int) -> list[Bucket]:
    """The buckets ``data`` trains with: ``make_buckets`` with ``data.buckets``, else the one square."""
    if not data.buckets:
        return [(data.resolution, data.resolution)]
    return make_buckets(data.resolution, step, data.max_aspect)


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed: EXIF orientations 5-8 swap the sides (``ImageOps.exif_transpose`` does)."""
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    return (img.height, img.width) if orientation in _SWAPPED else img.size


def image_size(path: str | Path) -> tuple[int, int]:
    """An image file's displayed (width, height); reads the header only."""
    with Image.open(path) as img:
        return oriented_size(img)


def assign_buckets(paths: Sequence[str | Path], data: DataConfig, step: int) -> list[Bucket]:
    """Each image's bucket, in order (reads each file's header)."""
    buckets = data_buckets(data, step)
    if len(buckets) == 1:
        return [buckets[0]] * len(paths)
    return [nearest_bucket(image_size(p), buckets) for p in paths]


def bucket_groups(assigned: Sequence[Bucket]) -> dict[Bucket, list[int]]:
    """Indices per bucket, buckets sorted (the same order on every rank and run), indices in input order."""
    groups: dict[Bucket, list[int]] = {}
    for i, b in enumerate(assigned):
        groups.setdefault(b, []).append(i)
    return dict(sorted(groups.items()))


def shard_by_bucket(assigned: Sequence[Bucket], rank: int, world_size: int) -> list[int]:
    """This rank's indices into ``assigned`` (one bucket per example): each bucket is padded by wrapping around
    to a multiple of ``world_size`` and dealt out, so every rank holds the same count per bucket — and so runs
    the same number of batches (DDP needs equal steps). One bucket gives exactly ``training.dataset.shard``'s."""
    mine = []
    for members in bucket_groups(assigned).values():
        per_rank = math.ceil(len(members) / world_size)
        padded = [members[i % len(members)] for i in range(per_rank * world_size)]
        mine += padded[rank::world_size]
    return mine


def histogram(assigned: Sequence[Bucket]) -> dict[str, int]:
    """``{"80x48": 2, "64x64": 3}``: images per bucket, widest first."""
    counts = Counter(assigned)
    return {f"{w}x{h}": counts[(w, h)] for w, h in sorted(counts, key=lambda b: -b[0] / b[1])}


def granularity(unet_config: dict[str, Any], vae_config: dict[str, Any]) -> int:
    """Pixels per step of a side the model takes: VAE factor 2**(VAE blocks − 1) × 2**(UNet down blocks − 1)."""
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return vae_factor * 2 ** (len(unet_config["down_block_types"]) - 1)


def pipeline_granularity(pipe: Any) -> int:
    """``granularity`` of a loaded diffusers pipeline."""
    return granularity(dict(pipe.unet.config), dict(pipe.vae.config))


def _component_config(base_model: str, component: str) -> dict[str, Any]:
    local = Path(base_model).expanduser() / component / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if Path(base_model).expanduser().exists():
        raise FileNotFoundError(f"{local} is missing")
    from huggingface_hub import hf_hub_download  # a hub id: its snapshot in the HF cache (HF_HUB_OFFLINE=1: only)

    return json.loads(Path(hf_hub_download(base_model, "config.json", subfolder=component)).read_text())


def model_granularity(base_model: str) -> int:
    """``granularity`` read from a diffusers folder's (or a hub id's cached) unet/ and vae/ config.json; no weights.

    Raises:
        OSError / ValueError / KeyError: the configs cannot be read (missing, offline and not cached, malformed).
    """
    return granularity(_component_config(base_model, "unet"), _component_config(base_model, "vae"))


def native_resolution(base_model: str) -> int:
    """The side in pixels the base model was trained at: the UNet's ``sample_size`` (latent pixels) × the VAE
    factor 2**(VAE blocks − 1) — toy-sd 8 × 8 = 64, SD 1.5 64 × 8 = 512, SDXL 128 × 8 = 1024 (diffusers'
    pipelines default ``height``/``width`` the same way). Reads the configs only.

    Raises:
        OSError / ValueError / KeyError: the configs cannot be read.
    """
    unet, vae = _component_config(base_model, "unet"), _component_config(base_model, "vae")
    size = unet["sample_size"]
    size = size[0] if isinstance(size, list | tuple) else size
    return int(size) * 2 ** (len(vae["block_out_channels"]) - 1)


def resolve_resolution(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``data.resolution`` set to the base model's native size when the user did not set it: the
    UNet's ``sample_size`` × VAE factor (``native_resolution``: toy-sd 64, SD 1.5 512, SD 2.1 768, SDXL 1024), else
    the family's default (``ModelFamily.default_resolution``) when only ``model_index.json`` can be read. A set value
    is kept; when neither can be read the field's default stays (a warning says so). Idempotent: the result has the
    field set.
    """
    if "resolution" in cfg.data.model_fields_set:
        return cfg
    try:
        size, source = native_resolution(cfg.base_model), "its UNet sample_size × VAE factor"
    except (OSError, ValueError, KeyError, TypeError):
        from training.families import family_of

        try:
            family = family_of(cfg.base_model)
        except (OSError, ValueError) as exc:
            log.warning("data.resolution not set and base_model unreadable (%s); training at %d px", exc,
                        cfg.data.resolution)  # fmt: skip
            return cfg
        size, source = family.default_resolution, f"the {family.name} family's default"
    log.info("data.resolution not set: %d px, base_model %s's native size (%s)", size, cfg.base_model, source)
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"resolution": size})})


def check_step(step: int, model_step: int, resolution: int) -> list[str]:
    """Why ``data.bucket_step=step`` cannot train a model of granularity ``model_step`` (empty when it can)."""
    problems = []
    if step % model_step:
        problems.append(
            f"data.bucket_step={step} is not a multiple of {model_step}, the base model's granularity "
            f"(VAE factor × UNet downsampling): bucket sides must be; set data.bucket_step to a multiple of "
            f"{model_step}, or null to use {model_step}"
        )
    if resolution < step:
        problems.append(
            f"data.resolution={resolution} is below the bucket step {step}: no bucket fits; raise data.resolution"
        )
    return problems


def resolve_bucket_step(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``data.bucket_step`` set to the base model's granularity when null (checked when set), and
    ``data.resolution`` set to the model's native size when the user did not set it (``resolve_resolution``).

    Reads only the model's unet/vae config.json. When they cannot be read the step stays null (a warning
    says so) and each worker takes it from the model it loads.

    Raises:
        PreflightError: the step is not a multiple of the model's granularity, or exceeds data.resolution.
    """
    cfg = resolve_resolution(cfg)
    if not cfg.data.buckets:
        return cfg
    try:
        model_step = model_granularity(cfg.base_model)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning(
            "cannot read the bucket granularity of base_model %s (%s); validating with %s px buckets, workers take "
            "it from the loaded model; set data.bucket_step to fix it",
            cfg.base_model,
            exc,
            cfg.data.bucket_step or default_step(cfg.data.resolution),
        )
        return cfg
    step = cfg.data.bucket_step or model_step
    if problems := check_step(step, model_step, cfg.data.resolution):
        raise PreflightError("cannot start training:\n  - " + "\n  - ".join(problems))
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"bucket_step": step})})


def worker_step(data: DataConfig, pipe: Any) -> int:
    """The bucket step on a worker (the model is loaded): ``data.bucket_step``, or the model's granularity.

    Raises:
        PreflightError: a set step the model cannot take.
    """
    model_step = pipeline_granularity(pipe)
    step = data.bucket_step or model_step
    if data.buckets and (problems := check_step(step, model_step, data.resolution)):
        raise PreflightError("; ".join(problems))
    return step
