"""Toy Stable Diffusion: VAE, UNet and scheduler trained on the base toy world.

The recipe is SD 1.x's at toy scale: a KL autoencoder that compresses 64x64 images 8x to
8x8x4 latents, a frozen CLIP text encoder (the toy CLIP's text tower, as SD uses OpenAI
CLIP's), and a cross-attention UNet trained for epsilon prediction on cached latents with
SD's scaled-linear noise schedule, caption dropout for classifier-free guidance and
min-SNR loss weighting.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from training.toy_world import world
from training.toy_world.common import batches, make_optimizer, optimizer_step, progress, to_unit_range
from training.toy_world.config import UnetBuild, VaeBuild

# SD 1.x's noise schedule, so fine-tuning code written for SD applies unchanged
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SNR_GAMMA = 5.0


def build_vae(cfg: VaeBuild) -> AutoencoderKL:
    levels = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(16, math.gcd(*cfg.block_out_channels)),
        sample_size=world.RESOLUTION,
    )


def train_vae(vae: AutoencoderKL, cfg: VaeBuild, gen: torch.Generator, images: np.ndarray) -> list[float]:
    """Reconstruction + small KL, on images of the wider world (a VAE is a generic codec)."""
    pixels = to_unit_range(images)
    opt, sched = make_optimizer(vae.parameters(), cfg.lr, cfg.steps)
    vae.train()
    losses: list[float] = []
    bar = progress(cfg.steps, "toy VAE")
    for idx in batches(len(pixels), cfg.batch_size, cfg.steps, gen):
        x = pixels[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
        optimizer_step(loss, vae, opt, sched, losses, bar)
    bar.close()
    vae.eval()
    return losses


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, images: np.ndarray) -> float:
    """Mean absolute error, in 0-255 pixel levels, of encode -> decode on ``images``."""
    x = to_unit_range(images)
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return float((recon - x).abs().mean() * 127.5)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Latent means of ``images``; also sets the VAE's ``scaling_factor`` to 1/std like SD's 0.18215."""
    pixels = to_unit_range(images)
    means = torch.cat(
        [vae.encode(pixels[i : i + batch_size]).latent_dist.mean for i in range(0, len(pixels), batch_size)]
    )
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return means * vae.config.scaling_factor


def text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    """The CLIP text tower as a standalone ``CLIPTextModel`` (identical weights)."""
    encoder = CLIPTextModel(clip.config.text_config)
    # transformers 5 flattens CLIPTextModel; 4.x wraps a CLIPTextTransformer in .text_model
    getattr(encoder, "text_model", encoder).load_state_dict(clip.text_model.state_dict())
    return encoder.eval().requires_grad_(False)


@torch.no_grad()
def encode_prompts(encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Per-token hidden states, padded to ``model_max_length`` exactly as the SD pipeline does."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return encoder(ids).last_hidden_state


def build_unet(cfg: UnetBuild, latent_channels: int, cross_attention_dim: int) -> UNet2DConditionModel:
    levels = len(cfg.block_out_channels)
    return UNet2DConditionModel(
        sample_size=world.RESOLUTION // 8,
        in_channels=latent_channels,
        out_channels=latent_channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=min(32, math.gcd(*cfg.block_out_channels)),
    )


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Min-SNR-gamma loss weights min(SNR, 5) / SNR for epsilon prediction (Hang et al., 2023), shape (B,)."""
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    return torch.clamp(snr, max=SNR_GAMMA) / snr  # epsilon prediction (Hang et al., 2023)


def train_unet(
    unet: UNet2DConditionModel,
    cfg: UnetBuild,
    gen: torch.Generator,
    latents: torch.Tensor,
    caption_ids: torch.Tensor,
    prompt_embeds: torch.Tensor,
) -> list[float]:
    """Denoising training on cached latents; ``prompt_embeds[-1]`` is the empty prompt."""
    scheduler = DDPMScheduler(**SCHEDULE)
    uncond = len(prompt_embeds) - 1
    opt, sched = make_optimizer(unet.parameters(), cfg.lr, cfg.steps, warmup=200)
    unet.train()
    losses: list[float] = []
    bar = progress(cfg.steps, "toy UNet")
    for idx in batches(len(latents), cfg.batch_size, cfg.steps, gen):
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        drop = torch.rand(len(idx), generator=gen) < cfg.uncond_prob
        cond = prompt_embeds[torch.where(drop, uncond, caption_ids[idx])]
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(scheduler, t)).mean()
        optimizer_step(loss, unet, opt, sched, losses, bar)
    bar.close()
    unet.eval()
    return losses


def assemble_pipeline(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    """A standard ``StableDiffusionPipeline`` (no safety checker: the toy world has nothing to flag)."""
    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
