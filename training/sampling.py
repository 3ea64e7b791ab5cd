"""Seeded images from any base pipeline (SD or SDXL family), and the grids the reports and checkpoints show."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import make_image_grid
from PIL import Image


@torch.no_grad()
def generate(
    pipe: DiffusionPipeline,
    prompts: list[str],
    *,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 4.0,
    batch_size: int = 12,
    size: int | None = None,
) -> list[Image.Image]:
    """One image per prompt; image ``i`` uses seed ``seed + i``, whatever the batching. ``size``: square side in
    px (None: the pipeline's default, ``unet.config.sample_size × vae_scale_factor``)."""
    images: list[Image.Image] = []
    sides = {} if size is None else {"width": size, "height": size}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        gens = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, **sides)
        images.extend(out.images)
    return images


def write_samples(images: list[Image.Image], prompts: list[str], out_dir: str | Path, cols: int = 6) -> Path:
    """Save each image, a ``prompts.json`` and a ``grid.png``; return the grid's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        img.save(out / f"{i:03d}.png")
    (out / "prompts.json").write_text(json.dumps(prompts, indent=2) + "\n")
    image_grid(images, cols).save(out / "grid.png")
    return out / "grid.png"


def image_grid(images: list[Image.Image], cols: int = 6) -> Image.Image:
    """``make_image_grid`` with at most ``cols`` per row; a short last row is padded with white."""
    cols = min(cols, len(images))
    rows = -(-len(images) // cols)
    pad = [Image.new("RGB", images[0].size, "white")] * (rows * cols - len(images))
    return make_image_grid(images + pad, rows=rows, cols=cols)
