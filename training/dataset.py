"""Images and captions -> training batches for one worker: transforms, sharding, and the latent cache.

The base model is frozen, so each image's VAE latent distribution and each caption's text
embedding are computed once (``EncodedSource``); every step then costs only the UNet. Random
crops need the pixels each step, so they go through ``PixelSource``, which encodes per step —
as does a text-encoder LoRA, whose embeddings change while it trains.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

from training.config import DataConfig
from training.data import Example
from training.model import Parts


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) token ids
    pixels: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1]; None when latents are cached
    latent_mean: torch.Tensor | None = None  # (B, C, h, w), unscaled VAE posterior
    latent_std: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None  # (B, L, D) cached text-encoder output

    def __len__(self) -> int:
        return len(self.input_ids)


def load_image(
    path: str | Path, resolution: int, crop: str = "center", flip: bool = False, gen: torch.Generator | None = None
) -> torch.Tensor:
    """Resize the short side to ``resolution``, crop a square (center or random), optionally mirror.

    Returns a (3, resolution, resolution) float tensor in [-1, 1].
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC) if size != img.size else img
    dx, dy = img.width - resolution, img.height - resolution
    if crop == "random":
        left = int(torch.randint(0, dx + 1, (1,), generator=gen)) if dx else 0
        top = int(torch.randint(0, dy + 1, (1,), generator=gen)) if dy else 0
    else:
        left, top = dx // 2, dy // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = ImageOps.mirror(img)
    tensor = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    return tensor.permute(2, 0, 1).float().div(127.5).sub(1.0)


def shard(examples: list[Example], rank: int, world_size: int) -> list[Example]:
    """This rank's share, padded by wrapping around so every rank gets the same count (DDP needs equal steps)."""
    per_rank = math.ceil(len(examples) / world_size)
    padded = [examples[i % len(examples)] for i in range(per_rank * world_size)]
    return padded[rank::world_size]


def tokenize(parts: Parts, captions: list[str]) -> torch.Tensor:
    tok = parts.tokenizer
    return tok(
        captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_text(parts: Parts, input_ids: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    encoder = parts.raw_text_encoder
    chunks = [encoder(input_ids[i : i + batch_size].to(parts.device))[0] for i in range(0, len(input_ids), batch_size)]
    return torch.cat(chunks).float()


@torch.no_grad()
def encode_pixels(parts: Parts, pixels: torch.Tensor, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std for each image (sampled afresh each step, as without a cache)."""
    vae = parts.vae
    means, stds = [], []
    for i in range(0, len(pixels), batch_size):
        dist = vae.encode(pixels[i : i + batch_size].to(parts.device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


class PixelSource:
    """Decodes and encodes every step: random crops and flips are drawn anew each time."""

    def __init__(self, examples: list[Example], data: DataConfig, parts: Parts, cache_text: bool):
        self.examples = examples
        self.data = data
        self.input_ids = tokenize(parts, [e.caption for e in examples])
        self.prompt_embeds = encode_text(parts, self.input_ids) if cache_text else None

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, idx: list[int], gen: torch.Generator) -> Batch:
        flips = torch.rand(len(idx), generator=gen) < 0.5 if self.data.random_flip else [False] * len(idx)
        pixels = torch.stack(
            [
                load_image(self.examples[i].path, self.data.resolution, self.data.crop, bool(f), gen)
                for i, f in zip(idx, flips)
            ]
        )
        embeds = self.prompt_embeds[idx] if self.prompt_embeds is not None else None
        return Batch(self.input_ids[idx], pixels=pixels, prompt_embeds=embeds)


class EncodedSource:
    """Latent distributions (both mirror images when ``data.random_flip``) and text embeddings, encoded once."""

    def __init__(self, examples: list[Example], data: DataConfig, parts: Parts, cache_text: bool):
        self.data = data
        self.input_ids = tokenize(parts, [e.caption for e in examples])
        self.prompt_embeds = encode_text(parts, self.input_ids) if cache_text else None
        flips = (False, True) if data.random_flip else (False,)
        views = [
            encode_pixels(parts, torch.stack([load_image(e.path, data.resolution, data.crop, f) for e in examples]))
            for f in flips
        ]
        self.mean = torch.stack([v[0] for v in views], dim=1).cpu()  # (N, views, C, h, w)
        self.std = torch.stack([v[1] for v in views], dim=1).cpu()

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, idx: list[int], gen: torch.Generator) -> Batch:
        views = self.mean.shape[1]
        view = torch.randint(0, views, (len(idx),), generator=gen) if views > 1 else torch.zeros(len(idx), dtype=int)
        embeds = self.prompt_embeds[idx] if self.prompt_embeds is not None else None
        return Batch(
            self.input_ids[idx], latent_mean=self.mean[idx, view], latent_std=self.std[idx, view], prompt_embeds=embeds
        )


def make_source(
    examples: list[Example], data: DataConfig, parts: Parts, use_cache: bool
) -> PixelSource | EncodedSource:
    cache_text = not parts.trains_text_encoder
    return (EncodedSource if use_cache else PixelSource)(examples, data, parts, cache_text)


def epoch_batches(
    source: PixelSource | EncodedSource, batch_size: int, seed: int, epoch: int, rank: int = 0
) -> Iterator[Batch]:
    """Shuffled batches of one epoch; the order depends only on (seed, epoch, rank), so resumes replay it."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)
    order = torch.randperm(len(source), generator=gen).tolist()
    for start in range(0, len(order), batch_size):
        yield source.batch(order[start : start + batch_size], gen)


def batches_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
