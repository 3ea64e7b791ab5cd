"""Even smaller, untrained toy-world models built in memory (seconds, no files): test fixtures.

Same architecture and code path as the shipped toy models, a few hundred thousand parameters.
"""

from __future__ import annotations

import math

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPModel, CLIPProcessor, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from training.toy_world import world
from training.toy_world.clip import build_clip, build_processor, caption_table
from training.toy_world.config import ClipBuild, UnetBuild, VaeBuild
from training.toy_world.sd import SCHEDULE, assemble_pipeline, build_unet, build_vae, text_encoder_from_clip
from training.toy_world.tokenizer import build_tokenizer

TINY_MAX_LENGTH = 16


def tiny_clip(seed: int = 0, layers: int = 1) -> tuple[CLIPModel, CLIPProcessor]:
    """A randomly initialised CLIP (32-wide, ``layers`` layers per tower) and its processor."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer([world.caption_for(*a) for a in caption_table()], TINY_MAX_LENGTH)
    clip = build_clip(tokenizer, ClipBuild(hidden_size=32, layers=layers, heads=2), TINY_MAX_LENGTH)
    return clip.eval(), build_processor(tokenizer)


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised ``StableDiffusionPipeline`` that makes 64x64 images on CPU in milliseconds."""
    clip, processor = tiny_clip(seed)
    vae = build_vae(VaeBuild(block_out_channels=[8, 16, 16, 16]))
    unet = build_unet(
        UnetBuild(block_out_channels=[16, 32], attention_head_dim=4), 4, clip.config.text_config.hidden_size
    )
    pipe = assemble_pipeline(vae.eval(), text_encoder_from_clip(clip), processor.tokenizer, unet.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_encoder_with_projection(clip: CLIPModel) -> CLIPTextModelWithProjection:
    """The CLIP text tower plus its projection as a ``CLIPTextModelWithProjection`` (SDXL's second text encoder:
    its ``text_embeds`` are the pooled conditioning)."""
    text = clip.config.text_config
    encoder = CLIPTextModelWithProjection(
        text.__class__(**(text.to_dict() | {"projection_dim": clip.config.projection_dim}))
    )
    getattr(encoder, "text_model", encoder).load_state_dict(clip.text_model.state_dict())
    encoder.text_projection.load_state_dict(clip.text_projection.state_dict())
    return encoder.eval().requires_grad_(False)


def sdxl_unet(
    block_out_channels: tuple[int, ...],
    cross_attention_dim: int,
    pooled_dim: int,
    *,
    attention_head_dim: tuple[int, ...] | int = 4,
    transformer_layers_per_block: tuple[int, ...] | int = 1,
    addition_time_embed_dim: int = 8,
    sample_size: int = world.RESOLUTION // 8,
    layers_per_block: int = 1,
) -> UNet2DConditionModel:
    """SDXL's UNet architecture at any width: no attention at the highest resolution, linear projections,
    ``addition_embed_type="text_time"`` (pooled text + 6 size/crop ids, each embedded in ``addition_time_embed_dim``)
    — the shape diffusers' own SDXL tests build (``tests/pipelines/stable_diffusion_xl``)."""
    levels = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        attention_head_dim=attention_head_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        transformer_layers_per_block=transformer_layers_per_block,
        projection_class_embeddings_input_dim=addition_time_embed_dim * 6 + pooled_dim,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=min(32, math.gcd(*block_out_channels)),
    )


def assemble_sdxl_pipeline(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
    tokenizer: CLIPTokenizer,
    tokenizer_2: CLIPTokenizer,
    unet: UNet2DConditionModel,
) -> StableDiffusionXLPipeline:
    """A standard ``StableDiffusionXLPipeline`` with SDXL base's scheduler (Euler, SD's scaled-linear betas,
    ``leading`` spacing, epsilon prediction), zero negative embeddings for an empty negative prompt, no
    watermarker (it needs the invisible-watermark package)."""
    scheduler = EulerDiscreteScheduler(**SCHEDULE, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A randomly initialised ``StableDiffusionXLPipeline`` that makes 64x64 images on CPU in milliseconds: two tiny
    toy-world CLIP text towers (32-wide, 2 layers: SDXL reads the penultimate one, so a LoRA on either encoder's
    first layer reaches the UNet; the second with its projection), a 2-level SDXL UNet, the tiny VAE."""
    clip, processor = tiny_clip(seed, layers=2)
    clip_2, processor_2 = tiny_clip(seed + 1, layers=2)
    torch.manual_seed(seed)
    vae = build_vae(VaeBuild(block_out_channels=[8, 16, 16, 16]))
    hidden = clip.config.text_config.hidden_size + clip_2.config.text_config.hidden_size
    unet = sdxl_unet((16, 32), hidden, clip_2.config.projection_dim, attention_head_dim=(2, 4))
    pipe = assemble_sdxl_pipeline(
        vae.eval(),
        text_encoder_from_clip(clip),
        text_encoder_with_projection(clip_2),
        processor.tokenizer,
        processor_2.tokenizer,
        unet.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
