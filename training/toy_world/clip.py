"""Toy CLIP: a ``transformers.CLIPModel`` trained contrastively on the wider toy world.

The wider world includes patterned backgrounds the toy generator never sees, so the
scorer can tell whether a fine-tune learned one of them (real CLIP's role for real SD).
Captions name any subset of (colour, shape, background); an image and a caption are a
positive pair when every attribute the caption names is true of the image, which keeps
the in-batch "negatives" honest when two images share a caption.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from training.toy_world import world
from training.toy_world.common import batches, make_optimizer, optimizer_step, progress
from training.toy_world.config import ClipBuild

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

Attrs = tuple[str | None, str | None, str | None]


def caption_table() -> list[Attrs]:
    """Every (colour, shape, background) subset a training caption may name; None = unnamed."""
    opts = itertools.product([*world.COLOURS, None], [*world.SHAPES, None], [*world.BACKGROUNDS, None])
    return [a for a in opts if a != (None, None, None)]


def build_processor(tokenizer: CLIPTokenizer) -> CLIPProcessor:
    size = world.RESOLUTION
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_clip(tokenizer: CLIPTokenizer, cfg: ClipBuild, max_length: int) -> CLIPModel:
    """A small CLIP whose text tower is shaped like SD's text encoder (same tokenizer)."""
    tower = dict(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 4,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
    )
    config = CLIPConfig(
        text_config=dict(
            tower,
            vocab_size=len(tokenizer),
            max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(tower, image_size=world.RESOLUTION, patch_size=8),
        projection_dim=cfg.hidden_size,
    )
    return CLIPModel(config)


def normalise(images_uint8: np.ndarray) -> torch.Tensor:
    """Exactly what ``CLIPImageProcessor`` does to a 64x64 image, on a batch array."""
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0
    return (x - CLIP_MEAN) / CLIP_STD


def _projected(out) -> torch.Tensor:
    # transformers >= 5 returns a model output whose pooler_output is the projection
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def image_embeds(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings."""
    return F.normalize(_projected(model.get_image_features(pixel_values=pixel_values)), dim=-1)


def text_embeds(model: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised text embeddings."""
    out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return F.normalize(_projected(out), dim=-1)


def _multi_positive_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """-log of the softmax mass on the positives, averaged over rows that have one."""
    has = positive.any(dim=1)
    masked = logits.masked_fill(~positive, float("-inf"))
    loss = torch.logsumexp(logits, dim=1) - torch.logsumexp(masked, dim=1)
    return loss[has].mean()


def train_clip(
    model: CLIPModel, tokenizer: CLIPTokenizer, cfg: ClipBuild, gen: torch.Generator, seed: int
) -> list[float]:
    """Contrastive training on a pool of wider-world images; returns the loss curve."""
    scene_list = world.scenes(seed, cfg.pool_size, backgrounds=world.BACKGROUNDS)
    pixels = normalise(world.render_array(scene_list))
    img_attrs = [(s.colour, s.shape, s.background) for s in scene_list]

    table = caption_table()
    text = tokenizer([world.caption_for(*a) for a in table], padding=True, return_tensors="pt")
    # consistency[i, j]: caption j is true of image i (every attribute it names matches)
    consistency = torch.tensor(
        [[all(c is None or c == v for c, v in zip(cap, img)) for cap in table] for img in img_attrs]
    )

    opt, sched = make_optimizer(model.parameters(), cfg.lr, cfg.steps)
    model.train()
    losses: list[float] = []
    bar = progress(cfg.steps, "toy CLIP")
    for idx in batches(len(pixels), cfg.batch_size, cfg.steps, gen):
        img = image_embeds(model, pixels[idx])
        txt = text_embeds(model, text.input_ids, text.attention_mask)
        logits = model.logit_scale.exp() * img @ txt.T
        positive = consistency[idx]
        loss = 0.5 * (_multi_positive_loss(logits, positive) + _multi_positive_loss(logits.T, positive.T))
        optimizer_step(loss, model, opt, sched, losses, bar)
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
    bar.close()
    model.eval()
    return losses
