"""Even smaller, untrained toy-world models built in memory (seconds, no files): test fixtures.

Same architecture and code path as the shipped toy models, a few hundred thousand parameters.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPModel, CLIPProcessor

from training.toy_world import world
from training.toy_world.clip import build_clip, build_processor, caption_table
from training.toy_world.config import ClipBuild, UnetBuild, VaeBuild
from training.toy_world.sd import assemble_pipeline, build_unet, build_vae, text_encoder_from_clip
from training.toy_world.tokenizer import build_tokenizer

TINY_MAX_LENGTH = 16


def tiny_clip(seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    """A randomly initialised CLIP (32-wide, 1 layer per tower) and its processor."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer([world.caption_for(*a) for a in caption_table()], TINY_MAX_LENGTH)
    clip = build_clip(tokenizer, ClipBuild(hidden_size=32, layers=1, heads=2), TINY_MAX_LENGTH)
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
