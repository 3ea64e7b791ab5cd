"""Images and captions -> training batches for one worker: transforms, sharding, and the latent cache.

The base model is frozen, so each image's VAE latent distribution and each caption's text
embedding are computed once (``EncodedSource``); every step then costs only the UNet. Random
crops need the pixels each step, so they go through ``PixelSource``, which encodes per step —
as does a text-encoder LoRA, whose embeddings change while it trains.

With ``data.buckets`` each image has an aspect-ratio bucket (``training.buckets``): it is resized to cover
its bucket and cropped to it, the latent cache keeps one tensor per bucket, every batch holds one bucket,
and ranks are sharded per bucket so they all run the same number of batches.

Any base-model family (``training.families``): token ids are (B, E, L) for E text encoders, the cached text
conditioning is the family's ``encode`` (SDXL: prompt embeds and pooled embeds), and families with size
conditioning (SDXL) get each sample's time ids from its crop (``Crop``): cached per flip view in ``EncodedSource``,
per draw in ``PixelSource``.

Repeats (kohya's ``<repeats>_<name>`` folders, ``Example.repeats``) are a sampling weight, as kohya's
``num_repeats``: an epoch is every image × its repeats, so an image with ``repeats=3`` is drawn three times per
epoch. The sources hold each image once (one latent-cache entry, one caption embedding) and a list of *slots*
(an image index per draw); buckets, sharding, batch counts and so the LR schedule count slots. Class images
(``Example.prior``, DreamBooth prior preservation) ride along with a per-sample flag the loss weighs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

from training.buckets import Bucket, assign_buckets, bucket_groups, histogram, shard_by_bucket, worker_step
from training.config import DataConfig
from training.data import Example
from training.families import Conditioning
from training.images import WHITE, open_rgb
from training.model import Parts


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, E, L) token ids of the E text encoders (``ModelFamily.tokenize``)
    pixels: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1]; None when latents are cached
    latent_mean: torch.Tensor | None = None  # (B, C, h, w), unscaled VAE posterior
    latent_std: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None  # (B, L, D) cached text conditioning (``ModelFamily.encode``)
    prior: torch.Tensor | None = None  # (B,) bool: class (regularisation) images, weighted by train.prior_loss_weight
    pooled_prompt_embeds: torch.Tensor | None = None  # (B, P) cached with prompt_embeds by families that pool (SDXL)
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL size/crop conditioning (``Crop.time_ids``); None for SD

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def cond(self) -> Conditioning | None:
        """The cached text conditioning, or None when the text encoders run per step."""
        if self.prompt_embeds is None:
            return None
        return Conditioning(self.prompt_embeds, self.pooled_prompt_embeds)


@dataclass(frozen=True)
class Crop:
    """Where a training image's pixels came from, as SDXL's size conditioning reads it.

    ``original_size``: the decoded image's (height, width); ``top_left``: the crop's (y, x) in the resized image —
    in its mirror image when the crop was flipped (x = resized width − right edge), as diffusers'
    ``train_text_to_image_lora_sdxl.py`` flips before it crops; ``target_size``: the crop's (height, width), i.e.
    the bucket. ``time_ids`` orders them as ``StableDiffusionXLPipeline._get_add_time_ids`` does.
    """

    original_size: tuple[int, int]
    top_left: tuple[int, int]
    target_size: tuple[int, int]

    def time_ids(self) -> torch.Tensor:
        """(6,) float32: original (h, w), crop top-left (y, x), target (h, w)."""
        return torch.tensor([*self.original_size, *self.top_left, *self.target_size], dtype=torch.float32)


def load_image(
    path: str | Path,
    size: int | tuple[int, int],
    crop: str = "center",
    flip: bool = False,
    gen: torch.Generator | None = None,
    background: tuple[int, int, int] = WHITE,
) -> torch.Tensor:
    """Decode with ``training.images.open_rgb`` (16-bit scaled, transparency on ``background``, EXIF orientation,
    first frame), resize to cover ``size`` — (width, height), or an int for a square — crop to it (center or
    random), and optionally mirror.

    Returns a (3, height, width) float tensor in [-1, 1] (``(tensor + 1) * 127.5`` gives the 8-bit pixels back).

    Raises:
        ImageReadError: the file cannot be decoded (validation refuses such files first).
    """
    return load_image_and_crop(path, size, crop, flip, gen, background)[0]


def load_image_and_crop(
    path: str | Path,
    size: int | tuple[int, int],
    crop: str = "center",
    flip: bool = False,
    gen: torch.Generator | None = None,
    background: tuple[int, int, int] = WHITE,
) -> tuple[torch.Tensor, Crop]:
    """``load_image``'s pixels (the same random draws from ``gen``) and the ``Crop`` they came from.

    Raises:
        ImageReadError: the file cannot be decoded.
    """
    width, height = (size, size) if isinstance(size, int) else size
    img = open_rgb(path, background).image
    original = (img.height, img.width)
    scale = max(width / img.width, height / img.height)
    resized = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(resized, Image.Resampling.BICUBIC) if resized != img.size else img
    dx, dy = img.width - width, img.height - height
    if crop == "random":
        left = int(torch.randint(0, dx + 1, (1,), generator=gen)) if dx else 0
        top = int(torch.randint(0, dy + 1, (1,), generator=gen)) if dy else 0
    else:
        left, top = dx // 2, dy // 2
    resized_width = img.width
    img = img.crop((left, top, left + width, top + height))
    if flip:
        img = ImageOps.mirror(img)
        left = resized_width - (left + width)  # the same crop taken from the mirrored resized image
    tensor = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return tensor.permute(2, 0, 1).float().div(127.5).sub(1.0), Crop(original, (top, left), (height, width))


def shard(examples: list[Example], rank: int, world_size: int) -> list[Example]:
    """This rank's share, padded by wrapping around so every rank gets the same count (DDP needs equal steps)."""
    per_rank = math.ceil(len(examples) / world_size)
    padded = [examples[i % len(examples)] for i in range(per_rank * world_size)]
    return padded[rank::world_size]


def tokenize(parts: Parts, captions: list[str]) -> torch.Tensor:
    """(B, E, L) token ids of every text encoder of the family (``ModelFamily.tokenize``)."""
    return parts.tokenize(captions)


@torch.no_grad()
def encode_text(parts: Parts, input_ids: torch.Tensor, batch_size: int = 64) -> Conditioning:
    """The frozen text conditioning of (B, E, L) ids in fp32 on ``parts.device``, through the unwrapped encoders."""
    chunks = [parts.encode(input_ids[i : i + batch_size], raw=True) for i in range(0, len(input_ids), batch_size)]
    return Conditioning.cat(chunks).to(torch.float32)


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


def expand_repeats(examples: list[Example]) -> list[int]:
    """The slots of one epoch: example ``i`` listed ``examples[i].repeats`` times (kohya's num_repeats)."""
    return [i for i, e in enumerate(examples) for _ in range(e.repeats)]


class _Source:
    """Examples (each once) with their token ids, (cached) text embeddings and buckets, and the epoch's slots
    (example indices, an image listed once per repeat) grouped by bucket for per-bucket batches."""

    def __init__(
        self,
        examples: list[Example],
        data: DataConfig,
        parts: Parts,
        cache_text: bool,
        buckets: list[Bucket] | None = None,
        slots: list[int] | None = None,
    ):
        self.examples = examples
        self.data = data
        if buckets is None:
            buckets = assign_buckets([e.path for e in examples], data, worker_step(data, parts.pipe))
        self.buckets = buckets  # (width, height) per example
        self.slots = expand_repeats(examples) if slots is None else slots  # example index per draw of an epoch
        groups = bucket_groups([buckets[i] for i in self.slots])  # positions in slots per bucket, buckets sorted
        self.groups = [[self.slots[j] for j in members] for members in groups.values()]  # example indices
        self.prior = torch.tensor([e.prior for e in examples], dtype=torch.bool)
        self.input_ids = tokenize(parts, [e.caption for e in examples])  # (n, E, L)
        cond = encode_text(parts, self.input_ids) if cache_text else None
        self.prompt_embeds = cond.prompt_embeds if cond is not None else None
        self.pooled_prompt_embeds = cond.pooled_prompt_embeds if cond is not None else None
        self.uses_time_ids = parts.family.uses_time_ids

    def __len__(self) -> int:
        """Samples per epoch on this rank: images × repeats (each image is held and encoded once)."""
        return len(self.slots)

    @property
    def num_images(self) -> int:
        """Distinct images on this rank (instance and class)."""
        return len(self.examples)

    def _prior(self, idx: list[int]) -> torch.Tensor | None:
        """The batch's class-image flags; None when this source holds no class image."""
        return self.prior[idx] if bool(self.prior.any()) else None

    def batches_per_epoch(self, batch_size: int) -> int:
        """Batches of one epoch: each bucket's images chunked on their own."""
        return sum(batches_per_epoch(len(g), batch_size) for g in self.groups)

    def histogram(self) -> dict[str, int]:
        return histogram(self.buckets)

    def _text(self, idx: list[int]) -> dict[str, torch.Tensor | None]:
        """The batch's token ids and cached conditioning, as ``Batch`` fields."""
        embeds, pooled = self.prompt_embeds, self.pooled_prompt_embeds
        return {
            "input_ids": self.input_ids[idx],
            "prompt_embeds": None if embeds is None else embeds[idx],
            "pooled_prompt_embeds": None if pooled is None else pooled[idx],
        }

    def _bucket(self, idx: list[int]) -> Bucket:
        found = {self.buckets[i] for i in idx}
        if len(found) != 1:
            raise ValueError(f"a batch must hold one bucket; indices {idx} span {sorted(found)}")
        return found.pop()


class PixelSource(_Source):
    """Decodes and encodes every step: random crops (within each image's bucket) and flips are drawn anew."""

    def batch(self, idx: list[int], gen: torch.Generator) -> Batch:
        self._bucket(idx)
        flips = torch.rand(len(idx), generator=gen) < 0.5 if self.data.random_flip else [False] * len(idx)
        loaded = [
            load_image_and_crop(
                self.examples[i].path, self.buckets[i], self.data.crop, bool(f), gen, self.data.background_rgb
            )
            for i, f in zip(idx, flips)
        ]
        pixels = torch.stack([p for p, _ in loaded])
        time_ids = torch.stack([c.time_ids() for _, c in loaded]) if self.uses_time_ids else None
        return Batch(**self._text(idx), pixels=pixels, prior=self._prior(idx), time_ids=time_ids)


class EncodedSource(_Source):
    """Latent distributions (both mirror images when ``data.random_flip``) and text embeddings, encoded once.

    One tensor per bucket: ``mean[bucket]`` is (n_bucket, views, C, h, w); ``row[i]`` is example i's row in it.
    ``time_ids`` (families with size conditioning): (n_examples, views, 6), each view's own crop.
    """

    def __init__(
        self,
        examples: list[Example],
        data: DataConfig,
        parts: Parts,
        cache_text: bool,
        buckets: list[Bucket] | None = None,
        slots: list[int] | None = None,
    ):
        super().__init__(examples, data, parts, cache_text, buckets, slots)
        flips = (False, True) if data.random_flip else (False,)
        self.views = len(flips)
        self.mean: dict[Bucket, torch.Tensor] = {}
        self.std: dict[Bucket, torch.Tensor] = {}
        self.row = [0] * len(examples)
        self.time_ids = torch.zeros(len(examples), self.views, 6) if self.uses_time_ids else None
        bg = data.background_rgb
        for bucket, members in bucket_groups(self.buckets).items():  # each image once, whatever its repeats
            views = []
            for v, f in enumerate(flips):
                loaded = [load_image_and_crop(examples[i].path, bucket, data.crop, f, background=bg) for i in members]
                views.append(encode_pixels(parts, torch.stack([p for p, _ in loaded])))
                if self.time_ids is not None:
                    self.time_ids[members, v] = torch.stack([c.time_ids() for _, c in loaded])
            self.mean[bucket] = torch.stack([v[0] for v in views], dim=1).cpu()
            self.std[bucket] = torch.stack([v[1] for v in views], dim=1).cpu()
            for r, i in enumerate(members):
                self.row[i] = r

    def batch(self, idx: list[int], gen: torch.Generator) -> Batch:
        bucket = self._bucket(idx)
        rows = [self.row[i] for i in idx]
        n = len(idx)
        view = torch.randint(0, self.views, (n,), generator=gen) if self.views > 1 else torch.zeros(n, dtype=int)
        mean, std = self.mean[bucket][rows, view], self.std[bucket][rows, view]
        time_ids = self.time_ids[idx, view] if self.time_ids is not None else None
        return Batch(**self._text(idx), latent_mean=mean, latent_std=std, prior=self._prior(idx), time_ids=time_ids)


def make_source(
    examples: list[Example], data: DataConfig, parts: Parts, use_cache: bool, *, rank: int = 0, world_size: int = 1
) -> PixelSource | EncodedSource:
    """This rank's share of ``examples`` as a batch source.

    The epoch's slots (each example × its ``repeats``) are sharded per bucket (see ``shard_by_bucket``), so
    every rank runs the same number of batches; the source keeps each image it drew at least once a single
    time (cached once) and lists it once per slot.
    """
    cache_text = not parts.trains_text_encoder
    assigned = assign_buckets([e.path for e in examples], data, worker_step(data, parts.pipe))
    slots = expand_repeats(examples)
    mine = [slots[j] for j in shard_by_bucket([assigned[i] for i in slots], rank, world_size)]
    held = sorted(set(mine))
    local = {i: k for k, i in enumerate(held)}
    cls = EncodedSource if use_cache else PixelSource
    return cls(
        [examples[i] for i in held], data, parts, cache_text, [assigned[i] for i in held], [local[i] for i in mine]
    )


def epoch_batches(
    source: PixelSource | EncodedSource, batch_size: int, seed: int, epoch: int, rank: int = 0
) -> Iterator[Batch]:
    """Shuffled batches of one epoch (every slot once: an image with ``repeats=r`` r times), each of one bucket;
    the order depends only on (seed, epoch, rank), so resumes replay it. One bucket: a permutation chunked in
    order. Several: each bucket's slots permuted and chunked, then the batches' order permuted."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)
    if len(source.groups) <= 1:
        members = source.groups[0] if source.groups else []  # example indices, one per slot (repeats)
        order = [members[i] for i in torch.randperm(len(members), generator=gen).tolist()]
        for start in range(0, len(order), batch_size):
            yield source.batch(order[start : start + batch_size], gen)
        return
    chunks = []
    for members in source.groups:
        perm = [members[i] for i in torch.randperm(len(members), generator=gen).tolist()]
        chunks += [perm[start : start + batch_size] for start in range(0, len(perm), batch_size)]
    for j in torch.randperm(len(chunks), generator=gen).tolist():
        yield source.batch(chunks[j], gen)


def planned_batches(assigned: list[Bucket], examples: list[Example], batch_size: int, world_size: int = 1) -> int:
    """Batches per epoch on every rank before any model is loaded — what ``make_source(...).batches_per_epoch``
    gives: each example's slots (× repeats) in its bucket (``assigned[i]``), dealt to ``world_size`` ranks.
    The LR schedule and ``train.max_steps`` count these."""
    counts: dict[Bucket, int] = {}
    for bucket, e in zip(assigned, examples, strict=True):
        counts[bucket] = counts.get(bucket, 0) + e.repeats
    return sum(batches_per_epoch(math.ceil(n / world_size), batch_size) for n in counts.values())


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Batches of ``n`` images of one bucket (a source's total: ``source.batches_per_epoch``)."""
    return math.ceil(n / batch_size)
