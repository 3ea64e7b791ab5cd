"""Toy SDXL: an SDXL-architecture base model (``models/toy-sdxl``) trained on the base toy world.

    python -m training.toy_world build-sdxl --config configs/toy_world_sdxl.yaml             # ~20 min on 2 CPU cores
    python -m training.toy_world build-sdxl unet.steps=20 unet.pool_size=200 out_dir=/tmp/toy   # tiny CPU run

Parts, as SDXL base's are: models/toy-sd's VAE, its CLIP text encoder as ``text_encoder`` (SDXL: CLIP ViT-L) and
models/toy-clip's text tower with its projection as ``text_encoder_2`` (SDXL: OpenCLIP bigG, whose projected pooled
output conditions the UNet), both frozen; a new UNet of SDXL's layout (``tiny.sdxl_unet``: no attention at the top
level, linear projections, ``addition_embed_type="text_time"``) trained like toy-sd's (``sd.train_unet``: cached
latents, SD's noise schedule, epsilon prediction, min-SNR) but conditioned as lorafleet's SDXL LoRA training
conditions it — through ``training.families``' SDXL family: penultimate hidden states of both encoders
concatenated, the pooled projection, and time ids (original size, crop top-left, target size) = (64, 64, 0, 0, 64,
64), the toy images being 64x64 and uncropped. A dropped caption is all-zero conditioning (prompt embeddings and
pooled), which is what the pipeline feeds the unconditional half of classifier-free guidance
(``force_zeros_for_empty_prompt=True``, as SDXL base).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPModel, CLIPTokenizer

from training.families import FAMILIES, Conditioning, load_pipeline
from training.toy_world import world
from training.toy_world.common import (
    batches,
    make_optimizer,
    optimizer_step,
    progress,
    seed_everything,
    to_unit_range,
)
from training.toy_world.config import SdxlUnetBuild, ToySdxlConfig
from training.toy_world.sd import SCHEDULE, min_snr_weights
from training.toy_world.tiny import assemble_sdxl_pipeline, sdxl_unet, text_encoder_with_projection

SDXL_DIR = "toy-sdxl"
SDXL = FAMILIES["sdxl"]


def build_sdxl_unet(cfg: SdxlUnetBuild, cross_attention_dim: int, pooled_dim: int) -> UNet2DConditionModel:
    """The toy SDXL UNet: ``tiny.sdxl_unet`` at ``cfg``'s widths on 8x8 latents."""
    return sdxl_unet(
        tuple(cfg.block_out_channels),
        cross_attention_dim,
        pooled_dim,
        attention_head_dim=cfg.attention_head_dim,
        transformer_layers_per_block=cfg.transformer_layers_per_block,
        addition_time_embed_dim=cfg.addition_time_embed_dim,
        sample_size=world.RESOLUTION // 8,
        layers_per_block=cfg.layers_per_block,
    )


@torch.no_grad()
def scaled_latents(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Latent means of ``images`` (N, 64, 64, 3) uint8 times the VAE's own ``scaling_factor``: (N, 4, 8, 8)."""
    pixels = to_unit_range(images)
    means = [vae.encode(pixels[i : i + batch_size]).latent_dist.mean for i in range(0, len(pixels), batch_size)]
    return torch.cat(means) * vae.config.scaling_factor


def assemble_from_toy_parts(cfg: ToySdxlConfig) -> StableDiffusionXLPipeline:
    """A ``StableDiffusionXLPipeline`` of the shipped toy parts (frozen, fp32) and a new, untrained SDXL UNet.

    Raises:
        FileNotFoundError: ``cfg.sd_model`` / ``cfg.clip_model`` is not a toy SD / CLIP folder (build them first:
            ``python -m training.toy_world build``).
    """
    sd = load_pipeline(cfg.sd_model, "cpu", torch.float32)
    if not (Path(cfg.clip_model) / "config.json").is_file():
        raise FileNotFoundError(
            f"clip_model {cfg.clip_model!r} is not a CLIP folder (config.json): build it with "
            "`python -m training.toy_world build` or set clip_model"
        )
    clip = CLIPModel.from_pretrained(cfg.clip_model, dtype=torch.float32)
    text_encoder_2 = text_encoder_with_projection(clip)
    hidden = sd.text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    unet = build_sdxl_unet(cfg.unet, hidden, text_encoder_2.config.projection_dim)
    pipe = assemble_sdxl_pipeline(
        sd.vae.eval().requires_grad_(False),
        sd.text_encoder.eval().requires_grad_(False),
        text_encoder_2,
        sd.tokenizer,
        CLIPTokenizer.from_pretrained(cfg.clip_model),
        unet,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def caption_conditioning(pipe: StableDiffusionXLPipeline, captions: list[str]) -> Conditioning:
    """Every caption's SDXL conditioning through the family (as lorafleet's training encodes it), plus one all-zero
    row last: the unconditional input of classifier-free guidance (``force_zeros_for_empty_prompt``).

    Returns: prompt_embeds (len(captions) + 1, L, D1 + D2), pooled (len(captions) + 1, P).
    """
    cond = SDXL.encode(pipe, SDXL.tokenize(pipe, captions))
    zero = Conditioning(torch.zeros_like(cond.prompt_embeds[:1]), torch.zeros_like(cond.pooled_prompt_embeds[:1]))
    return Conditioning.cat([cond, zero])


def train_sdxl_unet(
    unet: UNet2DConditionModel,
    cfg: SdxlUnetBuild,
    gen: torch.Generator,
    latents: torch.Tensor,
    caption_ids: torch.Tensor,
    cond: Conditioning,
    time_ids: torch.Tensor,
) -> list[float]:
    """Denoising training on cached latents (``sd.train_unet``'s recipe) with SDXL's added conditioning.

    Args:
        latents: (N, 4, 8, 8) scaled latents; ``caption_ids``: (N,) row of each in ``cond``.
        cond: ``caption_conditioning``'s rows, the last one unconditional; ``time_ids``: (6,) for every sample.
    """
    scheduler = DDPMScheduler(**SCHEDULE)
    uncond = len(cond) - 1
    opt, sched = make_optimizer(unet.parameters(), cfg.lr, cfg.steps, warmup=200)
    unet.train()
    losses: list[float] = []
    bar = progress(cfg.steps, "toy SDXL UNet")
    for idx in batches(len(latents), cfg.batch_size, cfg.steps, gen):
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        drop = torch.rand(len(idx), generator=gen) < cfg.uncond_prob
        c = cond[torch.where(drop, uncond, caption_ids[idx])]
        added = SDXL.added_cond_kwargs(c, time_ids.expand(len(idx), -1))
        pred = unet(
            scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=c.prompt_embeds, added_cond_kwargs=added
        )
        per_sample = F.mse_loss(pred.sample, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(scheduler, t)).mean()
        optimizer_step(loss, unet, opt, sched, losses, bar)
    bar.close()
    unet.eval()
    return losses


def build_sdxl(cfg: ToySdxlConfig) -> dict:
    """Train the toy SDXL UNet and write ``{out_dir}/toy-sdxl`` (temporary folder swapped in at the end: a failed
    build leaves the old model); return the summary also saved as its ``toy_world_build.json``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    gen = seed_everything(cfg.seed)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    pipe = assemble_from_toy_parts(cfg)
    base_scenes = world.scenes(cfg.seed + 2, cfg.unet.pool_size)  # the base world, as toy-sd's UNet saw it
    latents = scaled_latents(pipe.vae, world.render_array(base_scenes))
    captions = world.base_captions()
    cond = caption_conditioning(pipe, captions)
    caption_ids = torch.tensor([captions.index(s.caption) for s in base_scenes])
    side = (world.RESOLUTION, world.RESOLUTION)
    time_ids = SDXL.time_ids(side, (0, 0), side)
    timings["encode_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    losses = train_sdxl_unet(pipe.unet, cfg.unet, gen, latents, caption_ids, cond, time_ids)
    timings["unet_s"] = time.perf_counter() - t0

    # fp16 storage of the UNet and VAE keeps the folder small (diffusers loads them back as fp32); the text
    # encoders stay fp32: transformers keeps the stored dtype, and fp16 encoders next to an fp32 UNet fail in a
    # plain from_pretrained without a dtype
    pipe.unet.half()
    pipe.vae.half()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{SDXL_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    summary = {
        "seed": cfg.seed,
        "config": cfg.model_dump(),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "params_m": {
            name: round(sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6, 3)
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        },
        "time_ids": time_ids.tolist(),
        "final_loss": {"unet": round(float(np.mean(losses[-200:])), 5)},
    }
    (tmp / "toy_world_build.json").write_text(json.dumps(summary, indent=2) + "\n")
    final = out / SDXL_DIR
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return summary
