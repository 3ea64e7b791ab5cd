"""Generate seeded images from a Stable-Diffusion-layout model folder (toy or real)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import make_image_grid
from PIL import Image

from training.toy_world import world


def load_pipeline(
    model: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> StableDiffusionPipeline:
    """``StableDiffusionPipeline.from_pretrained`` on a local folder or hub id; fp16 on CUDA, fp32 on CPU by default.

    Raises:
        FileNotFoundError: ``model`` is neither a diffusers folder nor loadable from the hub/cache.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    local = Path(model)
    if local.exists() and not (local / "model_index.json").is_file():
        raise FileNotFoundError(f"{local} has no model_index.json: point the model at a diffusers pipeline folder")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(model), dtype=dtype)
    except OSError as exc:
        raise FileNotFoundError(
            f"cannot load model {str(model)!r}: it is not a local folder and not in the Hugging Face cache "
            "(HF_HUB_OFFLINE=1 forbids downloads). Download it where the Hub is reachable "
            "(`hf download <id>`) or set the model to a local folder such as models/toy-sd."
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def demo_prompts(n: int) -> list[str]:
    """``n`` base-world prompts that cycle through every colour, shape and background."""
    colours, shapes, backgrounds = list(world.COLOURS), world.SHAPES, list(world.PLAIN_BACKGROUNDS)
    return [
        world.caption_for(colours[i % len(colours)], shapes[i % len(shapes)], backgrounds[(i // 6) % 2])
        for i in range(n)
    ]


@torch.no_grad()
def generate(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    *,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 4.0,
    batch_size: int = 12,
) -> list[Image.Image]:
    """One image per prompt; image ``i`` uses seed ``seed + i``, whatever the batching."""
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        gens = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens)
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
